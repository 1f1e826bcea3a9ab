"""schemathesis against the service's own OpenAPI schema, every route (V1, V2, admin):
generated requests, valid and invalid, must never get a 5xx, and every answer must be a
status, content type and body that the schema documents for its route."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from conftest import listening, make_settings
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.settings import Settings

EXAMPLES = 25  # per route and phase: the whole module in well under a minute on 2 cores
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


# the schema as the app builds it (no models needed); it is the one /openapi.json serves
schema = schemathesis.openapi.from_dict(create_app(Settings(model_dir=Path("models"))).openapi())


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[str]:
    """A real server on loopback, the admin routes open so that they are exercised too
    (they change no file)."""
    with listening(make_settings(model_dir, admin_without_keys=True)) as address:
        yield f"http://{address}"


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)
def test_every_route_answers_as_its_schema_says(server: str, case: schemathesis.Case) -> None:
    case.call_and_validate(base_url=server, checks=CHECKS)


def test_the_schema_is_the_one_the_server_serves(server: str) -> None:
    assert httpx.get(f"{server}/openapi.json").json() == schema.raw_schema
