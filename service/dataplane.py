"""The protocol-neutral predict path: resolve the model, decode, batch, answer.

Each protocol brings a `Decode` (its HTTP body -> the internal `PredictRequest`, plus how to
render the answer) and an error renderer; the model lookup, the seed, the batcher and the
metrics are the same for all of them, so a request gets the same numbers whichever protocol
carried it.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from service.batcher import Batcher, Columns, Render
from service.errors import ApiError, failure_reason
from service.gateway import (
    ErrorRenderer,
    FastRoute,
    PredictHandler,
    read_body,
    send_json,
    send_reply,
)
from service.metrics import Metrics
from service.protocol import PredictRequest
from service.registry import ModelSpec, Registry

# Seeds for requests that bring none: distinct, not secret (the response tells the seed),
# so no os.urandom syscall per request (4% of the event loop's time at concurrency 32).
UNSEEDED = random.Random()

# (body, route verb, ASGI scope, the model's spec) -> (the request, its renderer given the
# seed, the protocol's columns); raises ApiError for a bad request
Decode = Callable[
    [bytes, str, Scope, ModelSpec], tuple[PredictRequest, Callable[[int], Render], Columns]
]


def model_labels(registry: Registry, name: str, version: str | None) -> tuple[str, str]:
    """A request's (model, version) metric labels: "(unknown)" for a name no model has (a
    client cannot grow the label set), "" for a version that does not resolve."""
    if name not in registry.entries:
        return "(unknown)", ""
    try:
        return name, str(registry.resolve(name, version).spec.version)
    except ApiError:
        return name, ""


def predict_route(
    path: re.Pattern[str],
    app: FastAPI,
    metrics: Metrics,
    decode: Decode,
    error: ErrorRenderer,
    protocol: str,
) -> FastRoute:
    """One protocol's predict routes on the gateway: its handler, and the count of the
    requests the gateway refuses before the handler sees them (401, 405, 413)."""

    def refused(name: str, version: str | None, status: int, reason: str, seconds: float) -> None:
        labels = model_labels(app.state.registry, name, version)
        metrics.observe_request(*labels, protocol, status, reason, seconds)

    handler = predict_handler(app, metrics, decode, error, protocol)
    return FastRoute(path, handler, error, refused)


def predict_handler(
    app: FastAPI, metrics: Metrics, decode: Decode, error: ErrorRenderer, protocol: str
) -> PredictHandler:
    """A gateway handler for one protocol's predict route, as plain ASGI (service.gateway);
    every request it answers is counted under `protocol`, a failure with its reason."""

    async def predict(
        name: str, version: str | None, verb: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        start = time.perf_counter()
        labels, status, reason = ["", ""], 500, "internal"  # what an exception leaves
        try:
            registry: Registry = app.state.registry
            labels[0] = name if name in registry.entries else "(unknown)"
            loaded = registry.resolve(name, version)  # a 404 or 503 needs no body
            labels[1] = str(loaded.spec.version)
            body = await read_body(receive)
            if body is None:  # the client is gone: nothing to answer
                status, reason = 499, "client_gone"
                return
            # Resolved again, and from here to the submit nothing awaits: a reload
            # (service.reload) swaps the registry and the batchers between two requests,
            # never inside one, so the request is queued on the version it resolved and
            # finishes there.
            loaded = registry.resolve(name, version)
            labels[1] = str(loaded.spec.version)
            req, renderer, columns = decode(body, verb, scope, loaded.spec)
            seed = req.seed if req.seed is not None else UNSEEDED.getrandbits(63)
            batcher: Batcher = app.state.batchers[loaded.key]
            payload = await batcher.submit(
                req.x,
                req.num_samples,
                req.levels,
                seed,
                renderer(seed),
                columns,
                req.timeout_s,
                req.explain,
            )
            status, reason = 200, ""
            await send_reply(send, payload)
        except ApiError as exc:
            reason = failure_reason(exc)
            status, body, headers = error(exc)
            await send_json(send, status, body, headers)
        finally:
            metrics.observe_request(*labels, protocol, status, reason, time.perf_counter() - start)

    return predict
