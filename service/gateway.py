"""The outermost layer of the app: every protocol's predict requests straight to their handler.

Predict requests skip FastAPI's middleware, routing, dependency solving and per-route
exception wrapping, which cost more than everything else on the event loop's side of a
request: in benchmarks/serve.py on 2 cores, a FastAPI app that only parses the body and
returns a stored one (the ceiling) serves ~9,000 requests/s at concurrency 32, and the
same on plain ASGI (the floor) ~30,000. Every other route goes through FastAPI as usual.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import Keys
from service.errors import ApiError, Problem, failure_reason

log = logging.getLogger("credence.app")

JSON_HEADER = (b"content-type", b"application/json")

# (name, version or None, verb: the route's action ("predict", "sample", "acquire",
# "infer"), scope, receive, send)
PredictHandler = Callable[[str, str | None, str, Scope, Receive, Send], Awaitable[None]]
# an error as a protocol answers it: (status, body, headers)
ErrorRenderer = Callable[[ApiError], tuple[int, bytes, Mapping[str, str]]]
# counts a predict request the gateway refused itself: (name, version or None, status as
# answered, reason (service.errors.failure_reason), seconds)
RefusalCounter = Callable[[str, str | None, int, str, float], None]


def native_error(error: ApiError) -> tuple[int, bytes, Mapping[str, str]]:
    return error.status, error.body(), error.headers


@dataclass(frozen=True)
class FastRoute:
    """One protocol's predict routes: their path ({name} and {version} match one path
    segment each, like Starlette's default convertor; {verb} is the action), their handler,
    how they word errors, and what counts the requests the gateway refuses."""

    path: re.Pattern[str]
    handler: PredictHandler
    error: ErrorRenderer = native_error
    refused: RefusalCounter | None = None


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


@dataclass(frozen=True)
class Reply:
    """A response body with its own headers (content-type included); a plain `bytes`
    response is JSON."""

    body: bytes
    headers: Mapping[str, str]


async def send_reply(send: Send, reply: bytes | Reply) -> None:
    if isinstance(reply, bytes):
        await send_json(send, 200, reply)
        return
    raw = [(k.lower().encode(), v.encode()) for k, v in reply.headers.items()]
    raw.append((b"content-length", str(len(reply.body)).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": raw})
    await send({"type": "http.response.body", "body": reply.body})


async def send_error(send: Send, error: ApiError, render: ErrorRenderer = native_error) -> None:
    await send_json(send, *render(error))


class Gateway:
    """In front of the app's whole middleware stack: each route's path goes to its handler,
    which gets a JSON 500 (and a logged traceback) for any exception it lets out; everything
    else goes to the FastAPI app, whose own handlers answer its errors."""

    def __init__(
        self,
        app: ASGIApp,
        routes: Sequence[FastRoute],
        max_body_bytes: int,
        keys: Keys | None = None,
    ):
        self.app = app
        self.routes = tuple(routes)
        self.max_body_bytes = max_body_bytes
        self.keys = keys

    def match(self, path: str) -> tuple[FastRoute, re.Match[str]] | None:
        for route in self.routes:
            found = route.path.fullmatch(path)
            if found is not None:
                return route, found
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        matched = self.match(scope["path"]) if scope["type"] == "http" else None
        if self.keys is not None and scope["type"] == "http" and not self.keys.allows(scope):
            error = ApiError.single(
                401,
                "unauthorized",
                "this route needs an API key: Authorization: Bearer <key>",
                ("headers", "authorization"),
                headers={"WWW-Authenticate": 'Bearer realm="credence"'},
            )
            if matched is None:
                await send_error(send, error)
            else:
                await refuse(send, error, *matched, time.perf_counter())
            return
        if matched is None:
            await self.app(scope, receive, send)
            return
        route, match = matched
        start = time.perf_counter()
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
                await refuse(send, error, route, match, start)
                return
            length = header(scope, b"content-length")
            if length is None:  # chunked: counted as it arrives
                receive = bounded(receive, self.max_body_bytes)
            elif length.isdigit() and int(length) > self.max_body_bytes:
                # refused before a byte of the body is read (the HTTP server delivers no more
                # than a declared length)
                await refuse(send, body_too_large(self.max_body_bytes), route, match, start)
                return
            name, version, verb = match["name"], match["version"], match["verb"]
            await route.handler(name, version, verb, scope, receive, watch)
        except Exception as exc:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if started:
                raise
            await send_error(send, internal_error(exc), route.error)


async def refuse(
    send: Send, error: ApiError, route: FastRoute, match: re.Match[str], start: float
) -> None:
    """Answer a predict request the handler never sees, and count it as the handler would."""
    status, body, headers = route.error(error)
    await send_json(send, status, body, headers)
    if route.refused is not None:
        reason = failure_reason(error)
        route.refused(match["name"], match["version"], status, reason, time.perf_counter() - start)


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header (`name` in lower case), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def body_too_large(limit: int) -> ApiError:
    message = f"the request body is over the server's limit of {limit} bytes (max_body_bytes)"
    return ApiError.single(413, "body_too_large", message)


def bounded(receive: Receive, limit: int) -> Receive:
    """`receive` that raises a 413 ApiError as soon as the body passes `limit` bytes, so a
    client cannot make the server hold more than that."""
    seen = 0

    async def bounded_receive() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise body_too_large(limit)
        return message

    return bounded_receive


def internal_error(exc: Exception) -> ApiError:
    problem = Problem("internal_error", f"internal server error ({type(exc).__name__})")
    return ApiError(500, [problem])
