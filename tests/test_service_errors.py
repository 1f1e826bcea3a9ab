"""Bad input gets a 4xx JSON body that says what is wrong and where; never a 500."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import Client, make_settings, metric_value, serve

URL = "/v1/models/reg:predict"
GOOD = [0.1, 0.2, 0.3]
LEVELS = ["parameters", "credible_levels"]


def error_of(response: httpx.Response) -> dict:
    assert response.headers["content-type"] == "application/json", response.text
    return response.json()["error"]


def problems(response: httpx.Response) -> list[dict]:
    error = error_of(response)
    return error.get("details", [error])


def instances(*rows: object) -> dict:
    return {"instances": list(rows)}


def parameters(**values: object) -> dict:
    return {"instances": [GOOD], "parameters": values}


@pytest.mark.parametrize(
    ("body", "code", "location", "words"),
    [
        (instances([1.0, 2.0]), "wrong_shape", ["instances", 0], ["3 numbers", "2 values"]),
        (instances(GOOD, [1, 2, 3, 4]), "wrong_shape", ["instances", 1], ["4 values"]),
        (instances(1.0, 2.0), "wrong_shape", ["instances", 0], ["the number 1.0"]),
        (instances([1.0, "1.5", 2.0]), "wrong_type", ["instances", 0, 1], ['"1.5"']),
        (instances([True, 1.0, 2.0]), "wrong_type", ["instances", 0, 0], ["boolean"]),
        (instances([1.0, 2.0, None]), "wrong_type", ["instances", 0, 2], ["null"]),
        (instances([1.0, [2.0], 3]), "wrong_type", ["instances", 0, 1], ["list"]),
        (instances({"a": 1, "b": "x", "c": 2}), "wrong_type", ["instances", 0, "b"], ['"x"']),
        (instances({"a": 1, "b": 2}), "missing_feature", ["instances", 0], ["'c'"]),
        (instances({"a": 1, "b": 2, "c": 3, "d": 4}), "unknown_feature", ["instances", 0], ["'d'"]),
        (instances(), "empty_instances", ["instances"], ["empty"]),
        ({"instances": "abc"}, "wrong_type", ["instances"], ["list"]),
        ({}, "missing_field", ["instances"], ["required"]),
        ({"instances": [GOOD], "extra": 1}, "unknown_field", ["extra"], ["extra"]),
        (parameters(num_samples=0), "out_of_range", ["parameters", "num_samples"], ["1 to 500"]),
        (parameters(num_samples=501), "out_of_range", ["parameters", "num_samples"], ["1 to 500"]),
        (parameters(num_samples=10.5), "wrong_type", ["parameters", "num_samples"], ["integer"]),
        (parameters(num_samples=True), "wrong_type", ["parameters", "num_samples"], ["boolean"]),
        (parameters(credible_levels=[0.9, 1]), "out_of_range", [*LEVELS, 1], ["between 0 and 1"]),
        (parameters(credible_levels=[0]), "out_of_range", [*LEVELS, 0], ["between 0 and 1"]),
        (parameters(credible_levels=0.9), "wrong_type", LEVELS, ["list"]),
        (parameters(credible_levels=[]), "wrong_type", LEVELS, ["list"]),
        (parameters(credible_levels=["0.9"]), "wrong_type", [*LEVELS, 0], ['"0.9"']),
        (parameters(seed=-1), "out_of_range", ["parameters", "seed"], ["2**63"]),
        (parameters(seed=2**63), "out_of_range", ["parameters", "seed"], ["2**63"]),
        (parameters(seed="7"), "wrong_type", ["parameters", "seed"], ['"7"']),
        (parameters(samples=10), "unknown_parameter", ["parameters", "samples"], ["num_samples"]),
        ({"instances": [GOOD], "parameters": [1]}, "wrong_type", [], ["object"]),
    ],
)
def test_bad_request_is_422_naming_the_problem(
    client: Client, body: dict, code: str, location: list, words: list[str]
) -> None:
    response = client.post(URL, json=body)
    assert response.status_code == 422, response.text
    found = [p for p in problems(response) if p["code"] == code and p["location"] == location]
    assert found, response.text
    for word in words:
        assert word in found[0]["message"], (word, found[0]["message"])


@pytest.mark.parametrize(
    ("raw", "location", "word"),
    [
        (b'{"instances": [[1.0, NaN, 2.0]]}', ["instances", 0, 1], "NaN"),
        (b'{"instances": [[0, 0, 0], [1.0, 2.0, Infinity]]}', ["instances", 1, 2], "Infinity"),
        (b'{"instances": [[-Infinity, 2.0, 3.0]]}', ["instances", 0, 0], "-Infinity"),
        (b'{"instances": [{"a": 1, "b": NaN, "c": 2}]}', ["instances", 0, "b"], "NaN"),
        (b'{"instances": [[1e400, 2.0, 3.0]]}', ["instances", 0, 0], "Infinity"),
        (b'{"instances": [[1e39, 2.0, 3.0]]}', ["instances", 0, 0], "float32"),
        (b'{"instances": [[1' + b"0" * 400 + b", 2, 3]]}", ["instances", 0, 0], "too large"),
    ],
)
def test_non_finite_inputs_are_named_with_their_place(
    client: Client, raw: bytes, location: list, word: str
) -> None:
    response = client.post(URL, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    (problem,) = problems(response)
    assert problem["code"] == "non_finite" and problem["location"] == location
    assert word in problem["message"]


def test_every_problem_is_listed_with_its_location(client: Client) -> None:
    raw = b'{"instances": [[1, NaN, 3], [true, "1.5", null]], "parameters": {"seed": -3}}'
    response = client.post(URL, content=raw)
    assert response.status_code == 422
    error = error_of(response)
    assert "and 4 more problems" in error["message"]
    locations = [p["location"] for p in error["details"]]
    assert ["instances", 0, 1] in locations and ["instances", 1, 2] in locations
    assert ["parameters", "seed"] in locations


@pytest.mark.parametrize("raw", [b"", b"{", b'{"instances": [[1, 2, 3]]', b"\xff\xfe", b"[" * 5000])
def test_invalid_json_is_400(client: Client, raw: bytes) -> None:
    response = client.post(URL, content=raw)
    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "invalid_json"


@pytest.mark.parametrize("raw", [b"[1, 2]", b"null", b'"x"', b"3"])
def test_body_that_is_not_an_object_is_422(client: Client, raw: bytes) -> None:
    response = client.post(URL, content=raw)
    assert response.status_code == 422 and error_of(response)["code"] == "invalid_body"


def test_too_many_instances(model_dir: Path) -> None:
    with serve(make_settings(model_dir, max_instances=4)) as small:
        response = small.post(URL, json={"instances": [GOOD] * 5})
    assert response.status_code == 422
    assert error_of(response)["code"] == "too_many_instances" and "at most 4" in response.text


@pytest.mark.parametrize(
    ("url", "status", "code", "location"),
    [
        ("/v1/models/nope:predict", 404, "model_not_found", ["path", "name"]),
        ("/v1/models/reg/versions/7:predict", 404, "version_not_found", ["path", "version"]),
        ("/v1/models/reg/versions/x:predict", 404, "version_not_found", ["path", "version"]),
        ("/v1/models/twin/versions/2:predict", 503, "model_unavailable", ["path", "version"]),
        ("/v1/models/broken:predict", 503, "model_unavailable", ["path", "name"]),
    ],
)
def test_unknown_or_unloadable_models(
    client: Client, url: str, status: int, code: str, location: list
) -> None:
    response = client.post(url, json={"instances": [GOOD]})
    assert response.status_code == status, response.text
    error = error_of(response)
    assert (error["code"], error["location"]) == (code, location)
    if status == 503:
        assert "sha256 of weights.safetensors does not match" in error["message"]
    assert client.get("/v1/models/nope").status_code == 404


def test_bad_requests_interleaved_with_good_ones_do_not_affect_them(model_dir: Path) -> None:
    good = {"instances": [GOOD, [1.0, -1.0, 0.5]], "parameters": {"seed": 5, "num_samples": 30}}
    bad = [
        {"instances": [[1.0, "x", 2.0]]},
        {"instances": [[1.0, 2.0]]},
        {"instances": [GOOD], "parameters": {"num_samples": 10**6}},
        {"instances": []},
    ]
    settings = make_settings(model_dir, max_batch_delay_ms=30, batch_invariant=True)
    with serve(settings) as live:  # so the good answers are the same bits as alone
        alone = live.post(URL, json=good).json()
        calls = [(URL, good if i % 2 == 0 else bad[i // 2 % len(bad)]) for i in range(16)]
        responses = live.gather(*calls)
    for (_, body), response in zip(calls, responses, strict=True):
        if body is good:
            assert response.status_code == 200 and response.json() == alone
        else:
            assert response.status_code == 422


def test_failing_batch_is_a_json_500_for_its_requests_only(model_dir: Path) -> None:
    with serve(make_settings(model_dir)) as live:
        model = live.app.state.registry.resolve("reg").model
        real = model.sample

        def explode(*args: object, **kwargs: object) -> None:
            model.sample = real  # fail once
            raise RuntimeError("simulated device failure")

        model.sample = explode
        failed = live.post(URL, json={"instances": [GOOD]})
        after = live.post(URL, json={"instances": [GOOD]})
    assert failed.status_code == 500
    error = error_of(failed)
    assert error["code"] == "inference_failed" and "simulated device failure" in error["message"]
    assert after.status_code == 200


def broken(*args: object, **kwargs: object) -> None:
    raise KeyError("a bug")


def test_unexpected_exception_is_a_json_500(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve(make_settings(model_dir)) as live:
        monkeypatch.setattr("service.app.protocol.parse_predict", broken)
        response = live.post(URL, json={"instances": [GOOD]})
        monkeypatch.undo()
        assert live.post(URL, json={"instances": [GOOD]}).status_code == 200
        text = live.get("/metrics").text
    assert response.status_code == 500
    assert error_of(response)["code"] == "internal_error"
    labels = {"model": "reg", "version": "1", "protocol": "native"}
    assert metric_value(text, "credence_requests_total", **labels, code="500") == 1
    assert metric_value(text, "credence_request_failures_total", **labels, reason="internal") == 1


def test_unexpected_exception_on_another_route_is_a_json_500(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve(make_settings(model_dir)) as live:
        monkeypatch.setattr("service.app.model_detail", broken)
        response = live.get("/v1/models/reg")
    assert response.status_code == 500
    assert error_of(response)["code"] == "internal_error"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (b'{"instances": [[1, 2, 3]], "instances": [[4, 5, 6]]}', "instances"),
        (b'{"instances": [[1, 2, 3]], "parameters": {"seed": 1, "seed": 2}}', "seed"),
        (b'{"instances": [{"a": 1, "b": 2, "c": 3, "a": 4}]}', "a"),
        (b'{"instances": [[1, NaN, 3]], "parameters": {"num_samples": 5, "num_samples": 6}}',
         "num_samples"),
    ],
)  # fmt: skip
def test_a_key_given_twice_is_422_naming_it(client: Client, raw: bytes, key: str) -> None:
    """orjson would keep the last value without a word; which one the client meant is not
    for the server to guess."""
    response = client.post(URL, content=raw)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == "duplicate_key" and repr(key) in error["message"]


def test_rows_keyed_by_feature_name_still_parse(client: Client) -> None:
    raw = b'{"instances": [{"a": 1, "b": 2, "c": 3}, {"c": 0, "b": 1, "a": 2}]}'
    assert client.post(URL, content=raw).status_code == 200
