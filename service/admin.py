"""Admin routes: reload a model natively, and Triton's model-repository extension on V2.

    POST /v1/models/{name}:reload                  new and changed versions swapped in
    POST /v1/models/{name}/versions/{version}:reload   one version only
    POST /v2/repository/models/{name}/load         Triton: load or reload (200, empty body)
    POST /v2/repository/models/{name}/unload       Triton: stop serving it (200, empty body)
    GET|POST /v2/repository/index                  Triton: every version and its state

Reload, load and unload change what the server serves, so with API keys configured they
need a key (service.auth, like every route), and with none they are refused (403) unless
`admin_without_keys` opens them. The index only reads, like GET /v1/models.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, ValidationError

from service import v2
from service.errors import ApiError
from service.reload import ModelManager
from service.repository import check_version
from service.route_docs import answers

router = APIRouter()


def json_body(model: type[BaseModel]) -> dict:
    """An optional JSON request body, for the OpenAPI schema (the route parses it)."""
    schema = model.model_json_schema()
    return {"required": False, "content": {"application/json": {"schema": schema}}}


class ReloadAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    default_version: int | None
    loaded: list[int]
    unchanged: list[int]
    unloaded: list[int]


class IndexBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ready: bool | None = None
    repository_name: str | None = None


class IndexEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    version: str | None = None
    state: str | None = None
    reason: str | None = None


class LoadBody(BaseModel):
    """Triton's load body; `config` and `file:` overrides are not supported here."""

    model_config = ConfigDict(extra="forbid")
    parameters: dict[str, str | int | float | bool] | None = None


def manager_of(request: Request) -> ModelManager:
    """The app's ModelManager once the admin routes are open to this request."""
    app = request.app
    if app.keys is None and not app.state.settings.admin_without_keys:
        raise ApiError.single(
            403,
            "admin_disabled",
            "admin routes are off: configure API keys (CREDENCE_API_KEYS) or set "
            "CREDENCE_ADMIN_WITHOUT_KEYS=true",
            ("path",),
        )
    return app.state.models


def json_reply(payload: object, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


async def native_reload(request: Request, name: str, version: int | None) -> Response:
    manager = manager_of(request)
    outcome = await manager.reload(name, version)
    entry = manager.registry.entries.get(name)
    error = outcome.error(entry)
    if error is not None:
        raise error
    answer = {
        "name": name,
        "default_version": entry.default_version if entry else None,
        "loaded": outcome.loaded,
        "unchanged": outcome.unchanged,
        "unloaded": outcome.unloaded,
    }
    return json_reply(answer)


RELOAD_DOC = {
    "summary": "Load new and changed versions, check them fully, then swap them in",
    "responses": answers(ReloadAnswer, (400, 403, 404, 422)),
}


@router.post("/v1/models/{name}:reload", **RELOAD_DOC)
async def reload_model(request: Request, name: str) -> Response:
    return await native_reload(request, name, None)


@router.post("/v1/models/{name}/versions/{version}:reload", **RELOAD_DOC)
async def reload_version(request: Request, name: str, version: str) -> Response:
    return await native_reload(request, name, check_version(version))


async def v2_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The optional JSON body of a repository request, or a 400 saying what is wrong."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(map(str, problem.get("loc", ()))) or "body"
        raise ApiError.single(400, "invalid_request", f"{where}: {problem['msg']}") from None


def v2_error(error: ApiError) -> Response:
    status, body, headers = v2.error_reply(error)
    return Response(body, status_code=status, media_type="application/json", headers=dict(headers))


INDEX = answers(list[IndexEntry], (400,), v2=True)
CHANGE = answers(None, (400, 403, 404), v2=True)


@router.get("/v2/repository/index", responses=INDEX)
async def repository_index_get(request: Request) -> Response:
    return json_reply(request.app.state.models.index())


@router.post(
    "/v2/repository/index",
    responses=INDEX,
    openapi_extra={"requestBody": json_body(IndexBody)},
)
async def repository_index(request: Request) -> Response:
    try:
        body = await v2_body(request, IndexBody)
    except ApiError as error:
        return v2_error(error)
    return json_reply(request.app.state.models.index(ready_only=bool(body.ready)))


@router.post(
    "/v2/repository/models/{name}/load",
    response_class=Response,
    responses=CHANGE,
    openapi_extra={"requestBody": json_body(LoadBody)},
)
async def repository_load(request: Request, name: str) -> Response:
    try:
        manager = manager_of(request)
        body = await v2_body(request, LoadBody)
        unsupported = sorted((body.parameters or {}).keys())
        if unsupported:
            raise ApiError.single(
                400,
                "unsupported_parameter",
                f"load parameters {unsupported} are not supported: the checkpoint on disk "
                "is what loads",
            )
        outcome = await manager.reload(name)
        error = outcome.error(manager.registry.entries.get(name))
        if error is not None:
            raise error
    except ApiError as error:
        return v2_error(error)
    return Response(status_code=200)


@router.post(
    "/v2/repository/models/{name}/unload",
    response_class=Response,
    responses=CHANGE,
    openapi_extra={"requestBody": json_body(LoadBody)},
)
async def repository_unload(request: Request, name: str) -> Response:
    try:
        manager = manager_of(request)
        body = await v2_body(request, LoadBody)
        unsupported = sorted(set(body.parameters or {}) - {"unload_dependents"})
        if unsupported:
            raise ApiError.single(
                400, "unsupported_parameter", f"unload parameters {unsupported} are not supported"
            )
        await manager.unload(name)
    except ApiError as error:
        return v2_error(error)
    return Response(status_code=200)
