"""Optional API keys: bearer tokens on every route but the probes (and metrics)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import make_settings, serve
from pydantic import ValidationError

from service.settings import Settings

BODY = {"instances": [[0.0, 1.0, 2.0]], "parameters": {"seed": 1}}
V2_BODY = {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [0, 1, 2]}]}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_with_keys_set_a_missing_or_wrong_key_is_401_and_a_right_one_works(model_dir: Path):
    with serve(make_settings(model_dir, api_keys="alpha, beta")) as live:
        for headers in ({}, bearer("gamma"), bearer("alph"), {"authorization": "Basic alpha"}):
            for url, body in (("/v1/models/reg:predict", BODY), ("/v2/models/reg/infer", V2_BODY)):
                response = live.post(url, json=body, headers=headers)
                assert response.status_code == 401, (url, headers)
                assert response.headers["www-authenticate"].startswith("Bearer")
            assert live.get("/v1/models", headers=headers).status_code == 401
        assert live.post("/v1/models/reg:predict", json=BODY, headers=bearer("alpha")).is_success
        assert live.post("/v2/models/reg/infer", json=V2_BODY, headers=bearer("beta")).is_success
        assert live.get("/v1/models", headers=bearer("beta")).status_code == 200
        for probe in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"):
            assert live.get(probe).status_code == 200, probe


def test_probes_and_metrics_can_need_a_key_too(model_dir: Path) -> None:
    settings = make_settings(model_dir, api_keys="alpha", auth_health=True, auth_metrics=True)
    with serve(settings) as live:
        assert live.get("/healthz").status_code == 401
        assert live.get("/metrics").status_code == 401
        assert live.get("/metrics", headers=bearer("alpha")).status_code == 200


def test_a_keys_file_holds_digests_not_keys(model_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# ops team\n{hashlib.sha256(b'secret-1').hexdigest()}  ops\n\n")
    with serve(make_settings(model_dir, api_keys_file=keys)) as live:
        url = "/v1/models/reg:predict"
        assert live.post(url, json=BODY, headers=bearer("secret-1")).status_code == 200
        assert live.post(url, json=BODY, headers=bearer("secret-2")).status_code == 401


@pytest.mark.parametrize(
    ("text", "words"),
    [("not-a-digest\n", "keys:1: not a sha256 hex digest"), ("# only comments\n", "none were")],
)
def test_a_bad_keys_file_is_a_configuration_error(tmp_path: Path, text: str, words: str) -> None:
    keys = tmp_path / "keys"
    keys.write_text(text)
    with pytest.raises(ValidationError, match=words):
        Settings(api_keys_file=keys)
    with pytest.raises(ValidationError, match="No such file"):
        Settings(api_keys_file=tmp_path / "missing")


def test_the_key_is_not_in_the_settings_repr() -> None:
    assert "hunter2" not in repr(Settings(api_keys="hunter2"))
