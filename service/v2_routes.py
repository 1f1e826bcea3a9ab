"""The Open Inference Protocol's (KServe V2) routes: metadata and health through FastAPI,
infer on the gateway's fast path like the native predict (service.gateway).

Health follows V2: 200 means true, a 4xx false (400, with `{"ready": false}`). Errors are
V2's `{"error": "..."}` with the native API's status, 422 becoming 400 (service.v2).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from starlette.types import Scope

from service import v2
from service.batcher import Columns, Render
from service.dataplane import Decode, predict_route
from service.errors import ApiError
from service.gateway import FastRoute
from service.metrics import Metrics
from service.protocol import PredictRequest
from service.registry import LoadedModel, ModelSpec, Registry
from service.route_docs import Live, ModelMetadata, ModelReady, Ready, ServerMetadata, answers
from service.settings import Settings

SERVER_NAME = "credence"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
INFER_PATH = re.compile(
    r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/(?P<verb>infer)"
)

NOT_READY = {"model": Ready, "description": "not ready"}
METADATA = answers(ModelMetadata, (404, 503), v2=True)
READINESS = answers(
    ModelReady, (404,), v2=True, more={400: {"model": ModelReady, "description": "not ready"}}
)

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (V2)"])


def reply(payload: object, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def error_response(error: ApiError) -> Response:
    status, body, headers = v2.error_reply(error)
    return Response(body, status_code=status, media_type="application/json", headers=dict(headers))


def registry_of(request: Request) -> Registry:
    return request.app.state.registry


@router.get("", responses=answers(ServerMetadata, v2=True))
async def server_metadata(request: Request) -> Response:
    version = request.app.version  # the app's, as its OpenAPI schema states it
    return reply({"name": SERVER_NAME, "version": version, "extensions": EXTENSIONS})


@router.get("/health/live", responses=answers(Live, v2=True))
async def live() -> Response:
    return reply({"live": True})


@router.get("/health/ready", responses=answers(Ready, v2=True, more={400: NOT_READY}))
async def ready(request: Request) -> Response:
    registry: Registry | None = getattr(request.app.state, "registry", None)
    loaded = bool(registry and registry.loaded())
    return reply({"ready": loaded}, 200 if loaded else 400)


def metadata(request: Request, name: str, version: str | None) -> Response:
    registry = registry_of(request)
    try:
        loaded = registry.resolve(name, version)
        entry = registry.entry(name)
    except ApiError as error:
        return error_response(error)
    versions = [v for v, m in entry.versions.items() if isinstance(m, LoadedModel)]
    return reply(v2.model_metadata(loaded.spec, versions))


def readiness(request: Request, name: str, version: str | None) -> Response:
    """Ready: 200. Known but not loaded (failed, or no version loaded): 400. Unknown: 404."""
    try:
        registry_of(request).resolve(name, version)
    except ApiError as error:
        if error.status != 503:
            return error_response(error)
        return reply({"name": name, "ready": False}, 400)
    return reply({"name": name, "ready": True})


@router.get("/models/{name}", responses=METADATA)
async def model_metadata(request: Request, name: str) -> Response:
    return metadata(request, name, None)


@router.get("/models/{name}/versions/{version}", responses=METADATA)
async def version_metadata(request: Request, name: str, version: str) -> Response:
    return metadata(request, name, version)


@router.get("/models/{name}/ready", responses=READINESS)
async def model_ready(request: Request, name: str) -> Response:
    return readiness(request, name, None)


@router.get("/models/{name}/versions/{version}/ready", responses=READINESS)
async def version_ready(request: Request, name: str, version: str) -> Response:
    return readiness(request, name, version)


def decoder(settings: Settings) -> Decode:
    """V2's codec (service.v2) in the data plane's shape."""

    def decode(
        body: bytes, verb: str, scope: Scope, spec: ModelSpec
    ) -> tuple[PredictRequest, Callable[[int], Render], Columns]:
        length = v2.header_length(scope["headers"])
        infer = v2.decode(body, length, spec, settings.max_instances)

        def renderer(seed: int) -> Render:
            return lambda part: v2.render(spec, infer, seed, part)

        return infer.request, renderer, v2.columns

    return decode


def infer_route(app: FastAPI, metrics: Metrics, settings: Settings) -> FastRoute:
    """POST /v2/models/{name}[/versions/{version}]/infer, on the gateway's fast path."""
    return predict_route(INFER_PATH, app, metrics, decoder(settings), v2.error_reply, "v2")
