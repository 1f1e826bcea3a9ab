"""The predict routes' bodies as pydantic models, for the OpenAPI schema only.

The routes are answered in front of FastAPI (service.gateway) and parse their bodies by hand
(service.protocol, service.v2), so FastAPI cannot see them; `openapi_paths` describes them
from these models, and tests check both ways that the models are the truth: the schema's
examples are accepted by the real parsers, and real responses validate against the models
(which forbid fields they do not name).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

from training.attributions import DEFAULT_STEPS, MAX_STEPS

STRICT = ConfigDict(extra="forbid")


class Parameters(BaseModel):
    model_config = STRICT
    num_samples: int | None = Field(None, ge=1, description="posterior draws")
    credible_levels: list[float] | None = Field(
        None, description="central interval levels in (0, 1); default [0.95]"
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="reproducible draws")
    timeout_ms: float | None = Field(None, gt=0, description="a deadline shorter than the server's")


class PredictBody(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "instances": [[0.1, 2.0, 3.5]],
                "parameters": {"num_samples": 100, "credible_levels": [0.5, 0.95], "seed": 7},
            }
        },
    )
    instances: list[list[Any] | dict[str, float]] = Field(
        description="rows in feature order (nested lists for multi-dimensional inputs), or "
        "objects keyed by feature name"
    )
    parameters: Parameters | None = None


class SampleParameters(BaseModel):
    model_config = STRICT
    num_samples: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    timeout_ms: float | None = Field(None, gt=0)


class SampleBody(PredictBody):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {"instances": [[0.1, 2.0, 3.5]], "parameters": {"num_samples": 4}}
        },
    )
    parameters: SampleParameters | None = None  # type: ignore[assignment]


class AcquireParameters(SampleParameters):
    k: int | None = Field(None, ge=1, description="how many of the pool to return (default 1)")
    acquisition: Literal["bald", "max_entropy", "variation_ratios", "epistemic_variance"] | None = (
        None
    )


class AcquireBody(PredictBody):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "instances": [[0.1, 2.0, 3.5], [3.0, -1.0, 0.0], [0.5, 0.5, 0.5]],
                "parameters": {"k": 2, "seed": 1},
            }
        },
    )
    parameters: AcquireParameters | None = None  # type: ignore[assignment]


class ExplainParameters(BaseModel):
    model_config = STRICT
    num_samples: int | None = Field(None, ge=1, description="posterior draws to attribute")
    credible_levels: list[float] | None = Field(
        None, description="central interval levels of the attributions across draws"
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    method: Literal["integrated_gradients", "gradient_x_input"] | None = Field(
        None, description="default integrated_gradients (baseline: the training mean)"
    )
    steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description=f"integrated gradients' path points ({DEFAULT_STEPS})"
    )
    quantity: Literal["mean", "probability", "log_probability"] | None = Field(
        None,
        description="what is attributed per draw: the predictive mean (regression, the "
        "only choice), each class's probability (the default) or log-probability",
    )
    outputs: list[str | int] | None = Field(
        None, description="targets or classes to explain, by name or index (default all)"
    )
    timeout_ms: float | None = Field(None, gt=0)


class ExplainBody(PredictBody):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "instances": [[0.1, 2.0, 3.5]],
                "parameters": {"num_samples": 50, "steps": 16, "seed": 7},
            }
        },
    )
    parameters: ExplainParameters | None = None  # type: ignore[assignment]


class Interval(BaseModel):
    model_config = STRICT
    level: float
    lower: list[float]
    upper: list[float]


class RegressionPrediction(BaseModel):
    model_config = STRICT
    mean: list[float]
    std: list[float]
    variance: list[float] = Field(description="epistemic_variance + aleatoric_variance")
    epistemic_variance: list[float]
    aleatoric_variance: list[float]
    intervals: list[Interval]
    calibration: str | None = Field(description="the calibration applied, or null")
    ood_score: float | None = Field(description="level among the validation rows' scores")
    ood: bool | None


class ClassificationPrediction(BaseModel):
    model_config = STRICT
    probabilities: list[float]
    predicted_class: str
    confidence: float
    entropy: float
    expected_entropy: float = Field(description="aleatoric")
    mutual_information: float = Field(description="epistemic")
    variation_ratio: float
    intervals: list[Interval]
    ood_score: float | None
    ood: bool | None


class Answer(BaseModel):
    model_config = STRICT
    model_name: str
    model_version: int
    num_samples: int = Field(description="the draws used (a sample set's size at most)")
    seed: int


class PredictAnswer(Answer):
    predictions: list[RegressionPrediction] | list[ClassificationPrediction]


class SampleAnswer(Answer):
    outputs: list[str]
    draws: dict[str, list[list[list[float]]]] = Field(
        description="mean and variance (regression) or probabilities, [n][instances][outputs]"
    )


class AcquireAnswer(Answer):
    acquisition: str
    indices: list[int] = Field(description="into the pool, best first")
    scores: list[float]


class AttributionInterval(BaseModel):
    model_config = STRICT
    level: float
    lower: list[Any] = Field(description="per output, the input's shape: quantile of the draws")
    upper: list[Any]


class Attributions(BaseModel):
    model_config = STRICT
    mean: list[Any] = Field(
        description="per output, a list over features (an image's [C][H][W]): the mean "
        "attribution over the posterior draws"
    )
    std: list[Any] = Field(description="their standard deviation across draws")
    intervals: list[AttributionInterval]


class Explanation(BaseModel):
    model_config = STRICT
    attributions: Attributions
    prediction: list[float] = Field(description="the attributed quantity at the instance")
    baseline_prediction: list[float] = Field(description="and at the baseline")
    convergence_delta: list[float] | None = Field(
        description="integrated gradients: the largest gap over the draws between a draw's "
        "attributions' sum and its prediction minus its baseline prediction"
    )


class ExplainAnswer(Answer):
    method: str
    steps: int
    quantity: str
    outputs: list[str] = Field(description="the outputs explained, in the attributions' order")
    feature_names: list[str] | None
    baseline: list[Any] = Field(description="the baseline input: the training mean")
    posterior_snr: list[float] | None = Field(
        description="variational models: |mu| / sigma of the first layer's weights, averaged "
        "over its outputs, per input feature (per input channel for a convolution)"
    )
    explanations: list[Explanation]


class Problem(BaseModel):
    model_config = STRICT
    code: str
    message: str
    location: list[str | int]


class ErrorDetail(Problem):
    details: list[Problem] | None = None


class ErrorAnswer(BaseModel):
    model_config = STRICT
    error: ErrorDetail


class InferInput(BaseModel):
    model_config = STRICT
    name: Literal["input"]
    shape: list[int]
    datatype: Literal["FP32", "FP64"]
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class InferOutputRequest(BaseModel):
    model_config = STRICT
    name: str
    parameters: dict[str, Any] | None = None


class InferBody(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "inputs": [
                    {"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [0.1, 2.0, 3.5]}
                ],
                "parameters": {"num_samples": 100, "seed": 7, "credible_levels": "0.5,0.95"},
                "outputs": [{"name": "mean"}, {"name": "lower"}, {"name": "upper"}],
            }
        },
    )
    id: str | None = None
    parameters: dict[str, str | int | float | bool] | None = None
    inputs: list[InferInput]
    outputs: list[InferOutputRequest] | None = None


class InferOutput(BaseModel):
    model_config = STRICT
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class InferAnswer(BaseModel):
    model_config = STRICT
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any]
    outputs: list[InferOutput]


class V2Error(BaseModel):
    model_config = STRICT
    error: str


NATIVE_ERRORS = (400, 401, 404, 413, 415, 422, 503, 504)
V2_ERRORS = (400, 401, 404, 413, 503, 504)
ROUTES = {  # path -> (summary, request body, answer)
    "/v1/models/{name}:predict": ("Predictive summaries", PredictBody, PredictAnswer),
    "/v1/models/{name}/versions/{version}:predict": (
        "Predictive summaries from one version",
        PredictBody,
        PredictAnswer,
    ),
    "/v1/models/{name}:sample": ("Joint posterior draws", SampleBody, SampleAnswer),
    "/v1/models/{name}:acquire": ("Points worth labelling", AcquireBody, AcquireAnswer),
    "/v1/models/{name}:explain": ("Attributions per posterior draw", ExplainBody, ExplainAnswer),
    "/v2/models/{name}/infer": ("Open Inference Protocol (V2) infer", InferBody, InferAnswer),
    "/v2/models/{name}/versions/{version}/infer": (
        "Open Inference Protocol (V2) infer, one version",
        InferBody,
        InferAnswer,
    ),
}


def openapi_paths(components: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI path items for the gateway's routes; their models go into `components`."""
    paths: dict[str, Any] = {}
    ref = "#/components/schemas/{model}"
    for path, (summary, body, answer) in ROUTES.items():
        v2 = path.startswith("/v2")
        error, statuses = (V2Error, V2_ERRORS) if v2 else (ErrorAnswer, NATIVE_ERRORS)
        for model in (body, answer, error):
            schema = model.model_json_schema(ref_template=ref)
            components.update(schema.pop("$defs", {}))
            components[model.__name__] = schema
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in ("name", "version")
            if "{" + name + "}" in path
        ]

        def json(model: type[BaseModel]) -> dict[str, Any]:
            return {"application/json": {"schema": {"$ref": ref.format(model=model.__name__)}}}

        responses = {
            "200": {"description": "the answer", "content": json(answer)},
            **{
                str(status): {"description": "a refusal that says why", "content": json(error)}
                for status in statuses
            },
        }
        paths[path] = {
            "post": {
                "summary": summary,
                "operationId": path.strip("/")
                .replace("/", "_")
                .replace(":", "_")
                .replace("{", "")
                .replace("}", ""),
                "parameters": parameters,
                "requestBody": {"required": True, "content": json(body)},
                "responses": responses,
            }
        }
    return paths


def document(app: FastAPI) -> None:
    """`app.openapi()` with the gateway's routes beside FastAPI's own."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            schema["paths"] = {**openapi_paths(components), **schema["paths"]}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
