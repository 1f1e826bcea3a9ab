"""The outermost layer of the app: predict requests straight to their handler.

Predict requests skip FastAPI's middleware, routing, dependency solving and per-route
exception wrapping, which cost more than everything else on the event loop's side of a
request: in benchmarks/serve.py on 2 cores, a FastAPI app that only parses the body and
returns a stored one (the ceiling) serves ~9,000 requests/s at concurrency 32, and the
same on plain ASGI (the floor) ~30,000. Every other route goes through FastAPI as usual.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, Problem

log = logging.getLogger("credence.app")

# {name} and {version} match one path segment each, like Starlette's default convertor.
PREDICT_PATH = re.compile(
    r"/v1/models/(?P<name>[^/]+?)(?:/versions/(?P<version>[^/]+))?:(?P<verb>predict|sample|acquire)"
)
JSON_HEADER = (b"content-type", b"application/json")

# (name, version or None, verb: "predict", "sample" or "acquire", scope, receive, send)
PredictHandler = Callable[[str, str | None, str, Scope, Receive, Send], Awaitable[None]]


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_json(
    send: Send, status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> None:
    raw = [JSON_HEADER, (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: ApiError) -> None:
    await send_json(send, error.status, error.body(), error.headers)


class Gateway:
    """In front of the app's whole middleware stack: predict paths go to `predict`, which
    gets a JSON 500 (and a logged traceback) for any exception it lets out; everything else
    goes to the FastAPI app, whose own handlers answer its errors."""

    def __init__(self, app: ASGIApp, predict: PredictHandler):
        self.app = app
        self.predict = predict

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = PREDICT_PATH.fullmatch(scope["path"]) if scope["type"] == "http" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            if scope["method"] != "POST":
                message = f"{scope['method']} {scope['path']}: predictions take POST"
                error = ApiError.single(
                    405, "method_not_allowed", message, ("path",), headers={"Allow": "POST"}
                )
                await send_error(send, error)
                return
            name, version, verb = match["name"], match["version"], match["verb"]
            await self.predict(name, version, verb, scope, receive, watch)
        except Exception as exc:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if started:
                raise
            await send_error(send, internal_error(exc))


def internal_error(exc: Exception) -> ApiError:
    problem = Problem("internal_error", f"internal server error ({type(exc).__name__})")
    return ApiError(500, [problem])
