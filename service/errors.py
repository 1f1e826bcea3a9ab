"""The one error type the service raises on purpose, and the JSON body every error has.

    {"error": {"code": str, "message": str, "location": [...], "details": [...]?}}

`location` points into the request ("instances", 3, 1) or at a path parameter ("path",
"name"). When a request has several problems, `details` lists each one with its own code,
message and location, and the top-level fields repeat the first one, so a client that
reads only `error.message` still learns what is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import orjson

Location = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a request, and where."""

    code: str
    message: str
    location: Location = ()

    def as_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "location": list(self.location)}


@dataclass(eq=False)
class ApiError(Exception):
    """An error answered with `status` and the JSON body above."""

    status: int
    problems: Sequence[Problem]
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def single(
        cls,
        status: int,
        code: str,
        message: str,
        location: Location = (),
        headers: Mapping[str, str] | None = None,
    ) -> ApiError:
        return cls(status, [Problem(code, message, location)], dict(headers or {}))

    def __str__(self) -> str:
        return f"{self.status}: {self.problems[0].message}"

    def body(self) -> bytes:
        return error_body(self.problems)


# A failed request's `reason` label (service.metrics): what went wrong, in words an operator
# alerts on. The first problem's code decides where one status covers several causes.
REASON_BY_CODE = {
    "overloaded": "overloaded",
    "shutting_down": "shutting_down",
    "model_unavailable": "unavailable",
    "too_many_instances": "too_large",
    "deadline_exceeded": "timeout",
}
REASON_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "bad_request",
    499: "client_gone",
    503: "unavailable",
    504: "timeout",
}


def failure_reason(error: ApiError) -> str:
    """The `reason` a failed request is counted under: one of a fixed few, so the label's
    values stay bounded whatever clients send."""
    reason = REASON_BY_CODE.get(error.problems[0].code) if error.problems else None
    if reason is None:
        reason = REASON_BY_STATUS.get(error.status)
    if reason is None:
        reason = "bad_request" if error.status < 500 else "internal"
    return reason


def problems_message(problems: Sequence[Problem]) -> str:
    """The first problem's message, saying how many more there are: for protocols whose
    error body is one string (V2's `{"error": "..."}`) and for `error.message` here."""
    first = problems[0]
    if len(problems) == 1:
        return first.message
    more = len(problems) - 1
    return f"{first.message} (and {more} more problem{'s' * (more > 1)})"


def error_body(problems: Sequence[Problem]) -> bytes:
    error = problems[0].as_dict()
    if len(problems) > 1:
        error["message"] = problems_message(problems)
        error["details"] = [p.as_dict() for p in problems]
    return orjson.dumps({"error": error})
