"""The Open Inference Protocol (KServe V2), driven by Triton's own HTTP client on a real port:
binary and JSON tensors, metadata, readiness, errors, and the native API's numbers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from conftest import (
    CLASSES,
    listening,
    make_settings,
    metric_value,
    regression_manifest,
    regression_model,
    serve,
)
from tritonclient.utils import InferenceServerException

from training import ood
from training.checkpoint import save_checkpoint

FIELDS = ("mean", "std", "variance", "epistemic_variance", "aleatoric_variance")
CLASS_FIELDS = (
    "confidence",
    "entropy",
    "expected_entropy",
    "mutual_information",
    "variation_ratio",
)
ROWS = np.array([[0.0, 1.0, 2.0], [-1.5, 0.25, 3.0]], dtype=np.float32)
CLASS_ROWS = np.array([[0.1, -0.2, 0.3, 1.0], [2.0, 0.0, -1.0, 0.5]], dtype=np.float32)


@pytest.fixture(scope="module")
def base_url(model_dir: Path) -> Iterator[str]:
    with listening(make_settings(model_dir)) as address:
        yield address


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(base_url) as client:
        yield client


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://{base_url}", timeout=30) as http:
        yield http


def tensor(x: np.ndarray, binary: bool = True) -> triton.InferInput:
    datatype = {np.float32: "FP32", np.float64: "FP64"}[x.dtype.type]
    infer_input = triton.InferInput("input", list(x.shape), datatype)
    infer_input.set_data_from_numpy(x, binary_data=binary)
    return infer_input


def native(http: httpx.Client, model: str, x: np.ndarray, parameters: dict) -> list[dict]:
    body = {"instances": x.tolist(), "parameters": parameters}
    response = http.post(f"/v1/models/{model}:predict", json=body)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def test_health_and_server_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "credence" and "binary_tensor_data" in metadata["extensions"]
    assert metadata["version"] == "0.1.0"
    assert client.is_model_ready("reg") and client.is_model_ready("reg", "1")
    assert client.is_model_ready("twin", "1") and not client.is_model_ready("twin", "2")
    assert not client.is_model_ready("broken")  # failed to load: known, not ready


def test_readiness_answers_say_why(http: httpx.Client) -> None:
    assert http.get("/v2/models/broken/ready").json() == {"name": "broken", "ready": False}
    unknown = http.get("/v2/models/nope/ready")
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]
    missing = http.get("/v2/models/reg/versions/7/ready")
    assert missing.status_code == 404 and "version" in missing.json()["error"]


def test_model_metadata_advertises_the_input_and_every_output(
    client: triton.InferenceServerClient,
) -> None:
    reg = client.get_model_metadata("reg")
    assert reg["name"] == "reg" and reg["versions"] == ["1"]
    assert reg["platform"] == "credence_mc_dropout"
    assert reg["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3]}]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in reg["outputs"]}
    assert outputs == {
        **{name: ("FP64", [-1, 1]) for name in FIELDS},
        "lower": ("FP64", [-1, -1, 1]),
        "upper": ("FP64", [-1, -1, 1]),
    }
    clf = client.get_model_metadata("clf", "1")
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in clf["outputs"]}
    assert outputs["probabilities"] == ("FP64", [-1, 3])
    assert outputs["predicted_class"] == ("INT64", [-1])
    assert outputs["predicted_label"] == ("BYTES", [-1])
    twin = client.get_model_metadata("twin")
    assert twin["versions"] == ["1"]  # v2 failed to load
    with pytest.raises(InferenceServerException, match="no model named 'nope'"):
        client.get_model_metadata("nope")


def test_binary_regression_equals_the_native_answer(
    client: triton.InferenceServerClient, http: httpx.Client
) -> None:
    parameters = {"num_samples": 30, "seed": 5, "credible_levels": "0.9,0.5"}
    result = client.infer("reg", [tensor(ROWS)], parameters=parameters)  # all outputs, binary
    expected = native(
        http, "reg", ROWS, {"num_samples": 30, "seed": 5, "credible_levels": [0.9, 0.5]}
    )
    for name in FIELDS:
        got = result.as_numpy(name)
        assert got.dtype == np.float64 and got.shape == (2, 1)
        assert got.tolist() == [p[name] for p in expected], name
    lower, upper = result.as_numpy("lower"), result.as_numpy("upper")
    assert lower.shape == (2, 2, 1)
    assert lower.tolist() == [[i["lower"] for i in p["intervals"]] for p in expected]
    assert upper.tolist() == [[i["upper"] for i in p["intervals"]] for p in expected]
    response = result.get_response()
    assert response["model_name"] == "reg" and response["model_version"] == "1"
    assert response["parameters"] == {"num_samples": 30, "seed": 5, "credible_levels": "0.9,0.5"}


def test_json_classification_with_chosen_outputs_equals_the_native_answer(
    client: triton.InferenceServerClient, http: httpx.Client
) -> None:
    outputs = [
        triton.InferRequestedOutput("probabilities", binary_data=False),
        triton.InferRequestedOutput("predicted_label", binary_data=True),
        triton.InferRequestedOutput("predicted_class", binary_data=False),
        *(triton.InferRequestedOutput(name, binary_data=False) for name in CLASS_FIELDS),
        triton.InferRequestedOutput("upper", binary_data=False),
    ]
    result = client.infer(
        "clf",
        [tensor(CLASS_ROWS, binary=False)],
        outputs=outputs,
        request_id="req-7",
        parameters={"seed": 11, "num_samples": 20, "credible_levels": "[0.8]"},
    )
    response = result.get_response()
    assert response["id"] == "req-7"
    assert [o["name"] for o in response["outputs"]] == [o.name() for o in outputs]
    assert result.as_numpy("lower") is None  # not asked for
    expected = native(
        http, "clf", CLASS_ROWS, {"seed": 11, "num_samples": 20, "credible_levels": [0.8]}
    )
    assert result.as_numpy("probabilities").tolist() == [p["probabilities"] for p in expected]
    labels = [label.decode() for label in result.as_numpy("predicted_label")]
    assert labels == [p["predicted_class"] for p in expected]
    assert [CLASSES[i] for i in result.as_numpy("predicted_class")] == labels
    for name in CLASS_FIELDS:
        assert result.as_numpy(name).tolist() == [p[name] for p in expected], name
    upper = result.as_numpy("upper")
    assert upper.tolist() == [[i["upper"] for i in p["intervals"]] for p in expected]


def test_fp64_inputs_a_version_path_and_defaults(
    client: triton.InferenceServerClient, http: httpx.Client
) -> None:
    result = client.infer(
        "reg", [tensor(ROWS.astype(np.float64))], model_version="1", parameters={"seed": 2}
    )
    expected = native(http, "reg", ROWS, {"seed": 2})
    assert result.as_numpy("mean").tolist() == [p["mean"] for p in expected]
    parameters = result.get_response()["parameters"]
    assert parameters["num_samples"] == 50 and parameters["credible_levels"] == "0.95"
    unseeded = client.infer("reg", [tensor(ROWS)]).get_response()["parameters"]
    assert 0 <= unseeded["seed"] < 2**63


def test_a_plain_json_body_with_nested_data(http: httpx.Client) -> None:
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 3], "data": ROWS.tolist()}],
        "outputs": [{"name": "mean"}],
        "parameters": {"seed": 4},
    }
    response = http.post("/v2/models/reg/infer", json=body)
    assert response.status_code == 200 and "inference-header-content-length" not in response.headers
    (mean,) = response.json()["outputs"]
    assert mean["name"] == "mean" and mean["shape"] == [2, 1] and mean["datatype"] == "FP64"
    assert mean["data"] == [p["mean"][0] for p in native(http, "reg", ROWS, {"seed": 4})]


def infer_body(**changes: object) -> dict:
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [0.0, 1.0, 2.0]}
    tensor.update(changes.pop("tensor", {}))  # type: ignore[arg-type]
    return {"inputs": [tensor], **changes}


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (infer_body(tensor={"datatype": "INT32"}), 400, "datatype must be one of ['FP32', 'FP64']"),
        (infer_body(tensor={"datatype": ["FP32"]}), 400, "datatype must be one of"),
        (infer_body(outputs=[{"name": {"a": 1}}]), 400, "unknown output an object"),
        (infer_body(tensor={"shape": [1, 4]}), 400, "shape must be [B, 3]"),
        (infer_body(tensor={"name": "x"}), 400, 'the input is named "input"'),
        (infer_body(tensor={"data": [0.0, 1.0]}), 400, "data holds 2 numbers; its shape needs 3"),
        (infer_body(tensor={"data": [0.0, True, 1.0]}), 400, "numbers only"),
        (infer_body(tensor={"data": [0.0, 10**400, 1.0]}), 400, "too large"),
        (infer_body(tensor={"data": [0.0, 1e39, 1.0]}), 400, "range of torch.float32"),
        (infer_body(tensor={"data": [[0.0, 1.0], 2.0]}), 400, "numbers only"),
        (infer_body(id=3), 400, "id must be a string"),
        (infer_body(parameters={"seed": -1}), 400, "seed must be an integer"),
        (infer_body(parameters={"binary_data_output": "yes"}), 400, "must be a boolean"),
        (infer_body(outputs=[{"name": "mean"}, {"name": "mean"}]), 400, "asked for twice"),
        (
            infer_body(outputs=[{"name": "mean", "parameters": {"classification": 2}}]),
            400,
            "binary_data",
        ),
        (infer_body(extra=1), 400, "unknown field 'extra'"),
        (infer_body(outputs=[{"name": "median"}]), 400, 'unknown output the string "median"'),
        (infer_body(parameters={"credible_levels": "0.9,x"}), 400, "credible_levels must be"),
        (infer_body(parameters={"credible_levels": "1.5"}), 400, "credible_levels must be"),
        (infer_body(parameters={"num_samples": 10_000}), 400, "num_samples must be an integer"),
        (infer_body(parameters={"temperature": 1}), 400, "unknown parameter 'temperature'"),
        ({"inputs": []}, 400, "inputs must hold one tensor"),
    ],
)
def test_bad_requests_are_400_saying_what(
    http: httpx.Client, body: dict, status: int, says: str
) -> None:
    response = http.post("/v2/models/reg/infer", json=body)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]


def test_unknown_models_and_methods(http: httpx.Client) -> None:
    response = http.post("/v2/models/nope/infer", json=infer_body())
    assert response.status_code == 404 and "no model named 'nope'" in response.json()["error"]
    response = http.post("/v2/models/reg/versions/9/infer", json=infer_body())
    assert response.status_code == 404 and "no version '9'" in response.json()["error"]
    response = http.get("/v2/models/reg/infer")
    assert response.status_code == 405 and "POST" in response.json()["error"]
    response = http.post("/v2/models/reg/infer", content=b"{nope")
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]


def binary_request(
    header: dict, data: bytes, length: str | bytes | None = None
) -> tuple[bytes, dict]:
    raw = json.dumps(header).encode()
    return raw + data, {"Inference-Header-Content-Length": length or str(len(raw))}


@pytest.mark.parametrize(
    ("size", "data", "length", "says"),
    [
        (12, np.zeros(3, np.float32).tobytes(), "x1", "Inference-Header-Content-Length must be"),
        (
            12,
            np.zeros(3, np.float32).tobytes(),
            "999999",
            "Inference-Header-Content-Length must be",
        ),
        (12, np.zeros(3, np.float32).tobytes(), b"\xb2", "Inference-Header-Content-Length must"),
        (12, np.zeros(3, np.float32).tobytes(), "9" * 5000, "Inference-Header-Content-Length must"),
        (12, np.zeros(3, np.float32).tobytes(), "-3", "Inference-Header-Content-Length must"),
        (8, np.zeros(3, np.float32).tobytes(), None, "binary_data_size must be 12"),
        (12, np.zeros(2, np.float32).tobytes(), None, "binary_data_size must be 12"),
        (12, np.array([0, np.nan, 1], np.float32).tobytes(), None, "not a finite number"),
    ],
)
def test_malformed_binary_tensors_are_400(
    http: httpx.Client, size: int, data: bytes, length: str | bytes | None, says: str
) -> None:
    tensor = {
        "name": "input",
        "datatype": "FP32",
        "shape": [1, 3],
        "parameters": {"binary_data_size": size},
    }
    content, headers = binary_request({"inputs": [tensor]}, data, length)
    response = http.post("/v2/models/reg/infer", content=content, headers=headers)
    assert response.status_code == 400, response.text
    assert says in response.json()["error"]


def test_a_compressed_body_is_refused_by_name(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="Content-Encoding 'gzip' is not supported"):
        client.infer("reg", [tensor(ROWS)], request_compression_algorithm="gzip")


def test_triton_errors_reach_the_client(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match='unknown output the string "median"'):
        client.infer("reg", [tensor(ROWS)], outputs=[triton.InferRequestedOutput("median")])
    with pytest.raises(InferenceServerException, match="shape must be"):
        client.infer("reg", [tensor(CLASS_ROWS)])


def test_nan_in_json_data_is_400(http: httpx.Client) -> None:
    body = (
        b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [0, NaN, 1]}]}'
    )
    response = http.post("/v2/models/reg/infer", content=body)
    assert response.status_code == 400 and "not a finite number" in response.json()["error"]


def test_native_and_v2_requests_share_batches(model_dir: Path) -> None:
    """Requests of both protocols in one batch each get their own protocol's answer."""
    with serve(make_settings(model_dir, max_batch_delay_ms=50.0)) as app:
        calls = []
        for seed in range(6):
            row = ROWS[seed % 2].tolist()
            native_body = {"instances": [row], "parameters": {"seed": seed}}
            v2_body = infer_body(tensor={"data": row}, parameters={"seed": seed})
            calls += [("/v1/models/reg:predict", native_body), ("/v2/models/reg/infer", v2_body)]
        responses = app.gather(*calls)
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        for native_answer, v2_answer in zip(responses[::2], responses[1::2], strict=True):
            (mean,) = [o for o in v2_answer.json()["outputs"] if o["name"] == "mean"]
            expected = native_answer.json()["predictions"][0]["mean"]
            np.testing.assert_allclose(mean["data"], expected, rtol=1e-6)
        metrics = app.get("/metrics").text
        assert metric_value(metrics, "credence_batch_requests_count", model="reg", version="1") < 12
        errors = app.post("/v2/models/reg/infer", json={"inputs": []})
        assert errors.status_code == 400
        metrics = app.get("/metrics").text
        labels = {"model": "reg", "version": "1", "protocol": "v2"}
        assert metric_value(metrics, "credence_requests_total", **labels, code="400") == 1
        assert metric_value(metrics, "credence_requests_total", **labels, code="200") == 6
        failed = metric_value(
            metrics, "credence_request_failures_total", **labels, reason="bad_request"
        )
        assert failed == 1


def test_ood_flags_are_outputs_where_the_checkpoint_has_a_reference(tmp_path: Path) -> None:
    """A reference whose threshold every prediction of this model passes: the flags and
    scores equal the native API's, and each protocol's flags are counted."""
    manifest = regression_manifest()
    scores = {"epistemic_variance": torch.linspace(0, 1e-12, 200).unsqueeze(-1)}
    manifest["ood"] = ood.reference("regression", scores, num_samples=50)
    save_checkpoint(regression_model(), tmp_path, "flagged", manifest)
    with serve(make_settings(tmp_path)) as app:
        metadata = app.get("/v2/models/flagged").json()
        outputs = {o["name"]: o["datatype"] for o in metadata["outputs"]}
        assert outputs["ood"] == "BOOL" and outputs["ood_score"] == "FP64"
        body = infer_body(tensor={"shape": [2, 3], "data": ROWS.tolist()}, parameters={"seed": 3})
        body["outputs"] = [{"name": "ood"}, {"name": "ood_score"}]
        answer = app.post("/v2/models/flagged/infer", json=body)
        assert answer.status_code == 200, answer.text
        got = {o["name"]: o["data"] for o in answer.json()["outputs"]}
        native_body = {"instances": ROWS.tolist(), "parameters": {"seed": 3}}
        expected = app.post("/v1/models/flagged:predict", json=native_body).json()
        assert got["ood"] == [p["ood"] for p in expected["predictions"]] == [True, True]
        assert got["ood_score"] == [p["ood_score"] for p in expected["predictions"]]
        count = metric_value(
            app.get("/metrics").text, "credence_ood_predictions_total", model="flagged", version="1"
        )
        assert count == 4


def test_without_a_reference_there_are_no_ood_outputs(http: httpx.Client) -> None:
    response = http.post("/v2/models/reg/infer", json=infer_body(outputs=[{"name": "ood"}]))
    assert response.status_code == 400 and "unknown output" in response.json()["error"]


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (b'{"inputs": [], "inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", '
         b'"data": [0, 1, 2]}]}', "inputs"),
        (b'{"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "datatype": '
         b'"FP64", "data": [0, 1, 2]}]}', "datatype"),
        (b'{"parameters": {"seed": 1, "seed": 2}, "inputs": [{"name": "input", "shape": '
         b'[1, 3], "datatype": "FP32", "data": [0, 1, 2]}]}', "seed"),
    ],
)  # fmt: skip
def test_a_key_given_twice_is_a_400_naming_it(http: httpx.Client, raw: bytes, key: str) -> None:
    response = http.post("/v2/models/reg/infer", content=raw)
    assert response.status_code == 400
    assert f"the key {key!r} appears twice" in response.json()["error"]
