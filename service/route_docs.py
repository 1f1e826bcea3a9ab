"""What the FastAPI routes answer, as pydantic models, for the OpenAPI schema only.

The routes build their bodies by hand (orjson), so these models document them; the
schemathesis test (tests/test_service_openapi_fuzz.py) checks every answer, status and
content type against them, and the models forbid fields they do not name.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.schemas import ErrorAnswer, V2Error

STRICT = ConfigDict(extra="forbid", protected_namespaces=())


class Health(BaseModel):
    model_config = STRICT
    status: str


class Readiness(BaseModel):
    model_config = STRICT
    status: str = Field(description="ready, or not_ready (503) while no model is loaded")
    loaded: list[str]
    failed: list[str]


class VersionState(BaseModel):
    model_config = STRICT
    version: int
    state: str = Field(description="loaded or failed")
    error: str | None = Field(None, description="why it failed to load")
    device: str | None = None
    precision: str | None = None
    cuda_graphs: bool | None = None
    created_at: str | None = None
    metrics: dict[str, Any] | None = None
    reload_error: str | None = Field(
        None, description="why a rewrite of its files was refused; what loaded before serves"
    )


class ModelSummary(BaseModel):
    model_config = STRICT
    name: str
    ready: bool
    default_version: int | None
    state: str
    versions: list[VersionState]


class Models(BaseModel):
    model_config = STRICT
    models: list[ModelSummary]


class ModelDetail(ModelSummary):
    task: str | None = None
    method: str | None = None
    architecture: str | None = None
    input: dict[str, Any] | None = None
    output: dict[str, Any] | None = None
    num_samples: dict[str, Any] | None = None
    credible_levels_default: list[float] | None = None
    calibration: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None


class ServerMetadata(BaseModel):
    model_config = STRICT
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    model_config = STRICT
    live: bool


class Ready(BaseModel):
    model_config = STRICT
    ready: bool


class ModelReady(BaseModel):
    model_config = STRICT
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    model_config = STRICT
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    model_config = STRICT
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


def answers(
    ok: Any,
    errors: tuple[int, ...] = (),
    v2: bool = False,
    more: dict[int, dict[str, Any]] | None = None,
) -> dict[int | str, dict[str, Any]]:
    """A route's `responses`: its 200 (a model, or None: an empty body), 401 (when API keys
    are set) and the error statuses it can give, in its protocol's error body; `more` adds
    other statuses (e.g. a not-ready 503 with the 200's body)."""
    error = V2Error if v2 else ErrorAnswer
    documented: dict[int | str, dict[str, Any]] = {
        200: {"description": "the answer"} if ok is None else {"model": ok, "description": "ok"}
    }
    for status in sorted({401, *errors}):
        documented[status] = {"model": error, "description": "a refusal that says why"}
    documented.update(more or {})
    return documented
