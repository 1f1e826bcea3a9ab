"""The FastAPI app: routes, error handling and the lifespan that loads models and batchers.

Every error is JSON (`service.errors`): client mistakes are 4xx with what and where,
failures of our own are a JSON 500, never an HTML page or a dropped connection.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import orjson
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Scope

from service import admin, explain, protocol, v2_routes
from service.auth import Keys, keys_of
from service.batcher import Batcher, Columns, Render
from service.cpus import available_cores
from service.cuda_graphs import GraphedSampler
from service.dataplane import Decode, predict_route
from service.docs import add_docs
from service.errors import ApiError, Problem, error_body
from service.gateway import FastRoute, Gateway, header, internal_error, native_error
from service.metrics import Metrics
from service.registry import FailedModel, LoadedModel, ModelEntry, ModelSpec, Registry, arch_of
from service.reload import ModelManager, describe_version
from service.route_docs import Health, ModelDetail, Models, Readiness, answers
from service.schemas import document
from service.settings import Settings, resolve_device
from training.summaries import Summary

log = logging.getLogger("credence.app")
JSON = "application/json"
# {name} and {version} match one path segment each, like Starlette's default convertor.
PREDICT_PATH = re.compile(
    r"/v1/models/(?P<name>[^/]+?)(?:/versions/(?P<version>[^/]+))?:(?P<verb>predict|sample|acquire|explain)"
)
# Newer FastAPI instruments every request for OpenTelemetry and, even with no provider set
# up, reads the environment per request to find out (a tenth of the event loop's time
# under load). Operators watch this service through its Prometheus metrics instead.
NO_OTEL = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


def json_response(payload: bytes, status: int = 200, headers: dict | None = None) -> Response:
    return Response(payload, status_code=status, media_type=JSON, headers=headers)


def error_response(error: ApiError) -> Response:
    return json_response(error.body(), error.status, dict(error.headers))


def model_summary(entry: ModelEntry) -> dict:
    return {
        "name": entry.name,
        "ready": entry.default_version is not None,  # KServe V1's model-ready field
        "default_version": entry.default_version,
        "state": entry.state,
        "versions": [version_state(m, entry.refused.get(v)) for v, m in entry.versions.items()],
    }


def version_state(model: LoadedModel | FailedModel, refused: str | None = None) -> dict:
    """One version's state; `refused`: why a rewrite of its files was refused (it keeps
    serving what it loaded before)."""
    if isinstance(model, FailedModel):
        return {"version": model.version, "state": "failed", "error": model.error}
    manifest = model.spec.manifest
    extra = {"reload_error": refused} if refused else {}
    return {
        "version": model.spec.version,
        "state": "loaded",
        "device": str(model.device),
        "precision": model.precision,
        "cuda_graphs": isinstance(model.model, GraphedSampler),
        "created_at": manifest.get("created_at"),
        "metrics": manifest.get("metrics"),
        **extra,
    }


def describe(metrics: Metrics, registry: Registry, settings: Settings) -> None:
    """Each loaded version's info and OOD baseline, and each failed one's load failure, for
    dashboards and alert rules."""
    for failed in registry.failed():
        metrics.load_failures.labels(failed.name, str(failed.version)).inc()
    for loaded in registry.loaded():
        describe_version(metrics, loaded, settings.backend)


def model_detail(entry: ModelEntry) -> dict:
    detail = model_summary(entry)
    default = entry.versions.get(entry.default_version) if entry.default_version else None
    if isinstance(default, LoadedModel):
        spec = default.spec
        detail.update(
            task=spec.task,
            method=spec.method,
            architecture=arch_of(spec),
            input={
                "shape": list(spec.input_shape),
                "dtype": str(spec.dtype).removeprefix("torch."),
                "feature_names": list(spec.feature_names) if spec.feature_names else None,
            },
            output={"names": list(spec.output_names)},
            num_samples={
                "default": spec.default_num_samples,
                "max": spec.max_num_samples,
                "set_size": spec.set_size,
            },
            credible_levels_default=list(protocol.DEFAULT_LEVELS),
            # which calibration and how many rows fitted it, not its (up to 1000) knots
            calibration=(
                {"method": spec.calibration.method, "rows": spec.calibration.rows}
                if spec.calibration
                else None
            ),
            metrics=spec.manifest.get("metrics"),
            # what ood_score ranks and how often the flag fires in distribution
            ood={"score": spec.ood.score, "fpr": spec.ood.fpr} if spec.ood else None,
        )
        if spec.manifest.get("forecast"):  # a forecaster: window, horizon, features, targets
            detail["forecast"] = spec.manifest["forecast"]
    return detail


def batch_workers(model: LoadedModel, settings: Settings) -> int:
    """Processes that compute a model version's batches (service.workers):
    `settings.batch_workers`, or if auto:

    A small model's batch is a millisecond or two of small ops: it is computed on the event
    loop's own thread (0). On a worker thread each op fought the loop for the GIL (small
    model at concurrency 32 on 2 cores, with benchmarks/serve.py's server and client: 4,579
    requests/s on the loop against 2,876 on one thread); in a worker process the pipe and the
    process's fixed cost per batch outweigh the core it adds (7,192 against 4,215). A large
    torch model runs one batch per core, each in a process of its own on one thread: two
    OpenMP threads per batch wait at every GEMM barrier for the one the event loop and the
    clients keep off its core (784-1024-1024-10 at concurrency 32: +24% requests/s), and
    processes rather than threads spare it the GIL (+18%, 701 to 825 requests/s).
    onnxruntime picks its own threads per model (service.onnx_backend), so a large onnx
    model's batches run one at a time, in one process.

    On CUDA the GPU computes, not the cores: one process drives it, whatever the model's
    size. Computed on the loop, a batch would hold the loop while it waits for the GPU's
    results; a process per core would each hold a CUDA context (hundreds of megabytes of GPU
    memory) and time-share one GPU. The loop collects the next batch while the GPU computes.
    """
    if settings.batch_workers != "auto":
        return settings.batch_workers
    if model.device.type == "cuda":
        return 1
    if model.small:
        return 0
    return 1 if settings.backend == "onnx" else available_cores()


def quiet_garbage_collector() -> None:
    """Keep the cycle collector off the request path.

    Every request allocates hundreds of containers (its parsed JSON, its response), so the
    default threshold of 700 ran a collection every few requests, and the occasional full
    one walked every object the models and the app hold (7% of the event loop's samples for
    the large model). Frozen startup objects are never walked, and a young generation of
    50,000 is collected a few times a second. Measured at concurrency 32 (benchmarks/serve.py's
    servers and client): +12% requests/s for the small model, +4-10% for the large one.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


class App(FastAPI):
    """FastAPI with the Gateway in front of its middleware stack (service.gateway)."""

    fast_routes: list[FastRoute]
    max_body_bytes: int
    keys: Keys | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return Gateway(stack, self.fast_routes, self.max_body_bytes, self.keys)


def native_decode(settings: Settings) -> Decode:
    """The native codec (service.protocol) in the data plane's shape: `verb` is the route's
    :predict, :sample (the draws), :acquire (a pool's best points to label) or :explain
    (attributions, service.explain)."""

    def decode(
        body: bytes, verb: str, scope: Scope, spec: ModelSpec
    ) -> tuple[protocol.PredictRequest, Callable[[int], Render], Columns]:
        protocol.check_content_type(header(scope, b"content-type"))
        req = protocol.parse_predict(body, spec, settings.max_instances, verb)

        def renderer(seed: int) -> Render:
            if verb == "explain":
                return partial(
                    explain.render_explanations, spec, req.num_samples, seed, req.explain
                )
            if verb == "acquire":
                return partial(
                    protocol.render_acquired, spec, req.num_samples, seed, req.acquisition, req.k
                )
            if verb == "sample" and protocol.wants_binary(header(scope, b"accept")):
                return partial(protocol.render_draws_binary, spec, req.num_samples, seed)
            render = protocol.render_draws if verb == "sample" else protocol.render
            return partial(render, spec, req.num_samples, seed)

        columns = {"sample": draw_columns, "explain": explain.explain_rows}
        return req, renderer, columns.get(verb, protocol.predictions)

    return decode


def draw_columns(spec: ModelSpec, summary: Summary, levels: None) -> list[dict]:
    """A :sample group's rows: its summary holds the draws themselves."""
    return protocol.draw_rows(summary)


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app with its own metrics; models load when its lifespan starts."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        device = resolve_device(settings.device)
        log.info("device %s; loading models from %s", device, settings.model_dir.resolve())
        registry = await asyncio.to_thread(Registry.load, settings.model_dir, device, settings)
        torch.set_num_threads(settings.torch_threads or 1)  # the workers are the parallelism

        def new_batcher(model: LoadedModel) -> Batcher:
            return Batcher(model, settings, metrics, batch_workers(model, settings))

        batchers = {m.key: new_batcher(m) for m in registry.loaded()}
        for batcher in batchers.values():
            batcher.start()
        await asyncio.gather(*(batcher.ready() for batcher in batchers.values()))
        describe(metrics, registry, settings)
        metrics.model_versions.labels("loaded").set(len(registry.loaded()))
        metrics.model_versions.labels("failed").set(len(registry.failed()))
        log.info(
            "serving %d model version(s): %s; %d failed to load%s",
            len(batchers),
            ", ".join(f"{n} v{v}" for n, v in batchers) or "none",
            len(registry.failed()),
            "".join(f"\n  {m.name} v{m.version}: {m.error}" for m in registry.failed()),
        )
        models = ModelManager(registry, batchers, settings, metrics, device, new_batcher)
        app.state.registry, app.state.batchers, app.state.models = registry, batchers, models
        models.start_polling()
        collector_thresholds = gc.get_threshold()
        quiet_garbage_collector()
        try:
            yield
        finally:
            gc.unfreeze()
            gc.set_threshold(*collector_thresholds)
            await models.close()
            await asyncio.gather(*(b.stop() for b in batchers.values()))

    app = App(
        title="Credence",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # service.docs serves them without a CDN
        redoc_url=None,
        **NO_OTEL,
    )
    app.state.settings, app.state.metrics = settings, metrics
    add_docs(app)
    document(app)

    @app.exception_handler(Exception)  # a JSON 500, not Starlette's plain-text page
    async def _internal_error(request: Request, exc: Exception) -> Response:
        return error_response(internal_error(exc))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(ApiError.single(exc.status_code, code, message, ("path",)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        problems = [
            Problem("invalid_request", str(e.get("msg")), tuple(e.get("loc", ())))
            for e in exc.errors()
        ] or [Problem("invalid_request", "invalid request")]
        return json_response(error_body(problems), 422)

    @app.get("/healthz", responses=answers(Health))
    async def healthz() -> Response:
        return json_response(b'{"status":"ok"}')

    @app.get(
        "/readyz",
        responses=answers(Readiness, more={503: {"model": Readiness, "description": "no model"}}),
    )
    async def readyz(request: Request) -> Response:
        registry: Registry | None = getattr(request.app.state, "registry", None)
        loaded = registry.loaded() if registry else []
        body = {
            "status": "ready" if loaded else "not_ready",
            "loaded": [f"{m.spec.name}/{m.spec.version}" for m in loaded],
            "failed": [f"{m.name}/{m.version}" for m in (registry.failed() if registry else [])],
        }
        return json_response(orjson.dumps(body), 200 if loaded else 503)

    @app.get("/metrics", response_class=PlainTextResponse, responses=answers(None))
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", responses=answers(Models))
    async def list_models(request: Request) -> Response:
        registry: Registry = request.app.state.registry
        body = {"models": [model_summary(e) for e in registry.entries.values()]}
        return json_response(orjson.dumps(body))

    @app.get("/v1/models/{name}", responses=answers(ModelDetail, (404,)))
    async def get_model(request: Request, name: str) -> Response:
        entry = request.app.state.registry.entry(name)
        return json_response(orjson.dumps(model_detail(entry)))

    app.include_router(v2_routes.router)
    app.include_router(admin.router)
    app.max_body_bytes = settings.max_body_bytes
    app.keys = keys_of(settings)
    app.fast_routes = [
        predict_route(PREDICT_PATH, app, metrics, native_decode(settings), native_error, "native"),
        v2_routes.infer_route(app, metrics, settings),
    ]
    return app
