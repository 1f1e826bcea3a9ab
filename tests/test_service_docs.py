"""/docs and /redoc render from this server's own assets: they work on an offline network."""

from __future__ import annotations

import re

import pytest
from conftest import Client


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_a_docs_page_loads_nothing_from_another_host(client: Client, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200
    html = response.text
    assert not re.search(r"(https?:)?//[\w.-]+\.\w", html), re.findall(r"https?://\S+", html)
    assets = re.findall(r"""(?:src|href)=["']?(/[^"' >]+)""", html)
    assert any(a.endswith(".js") for a in assets), assets
    for asset in assets:
        fetched = client.get(asset)
        assert fetched.status_code == 200 and len(fetched.content) > 1000, asset
    assert "/openapi.json" in html


def test_the_schema_the_pages_render_is_served(client: Client) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["info"]["title"] == "Credence"
