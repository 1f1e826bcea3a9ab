"""Image instances: nested [C, H, W] or [H, W] lists, and base64 PNG or JPEG, all the same
pixels; every way an image can be wrong is a 422 naming the instance."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_settings, serve
from PIL import Image

from training.architectures import arch_config
from training.build import build_model
from training.checkpoint import save_checkpoint

GRAY = [1, 8, 8]
COLOR = [3, 6, 5]
SEED = {"seed": 4, "num_samples": 6}


def _model(shape: list[int]):
    torch.manual_seed(0)
    arch = arch_config("cnn", shape, [8], conv=[4]) | {"dropout": 0.2}
    config = {
        "method": "mc_dropout",
        "arch": arch,
        "likelihood": {"kind": "categorical", "num_classes": 3},
    }
    stats = {"x_mean": [[[0.4]]] * shape[0], "x_std": [[[0.3]]] * shape[0]}
    return build_model(config, stats)


def _manifest(shape: list[int]) -> dict:
    return {
        "input": {"shape": shape, "dtype": "float32", "feature_names": None},
        "output": {"names": ["a", "b", "c"]},
        "num_samples": {"default": 6, "max": 50},
        "calibration": None,
    }


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    root: Path = tmp_path_factory.mktemp("images")
    save_checkpoint(_model(GRAY), root, "gray", _manifest(GRAY))
    save_checkpoint(_model(COLOR), root, "color", _manifest(COLOR))
    with serve(make_settings(root)) as client:
        yield client


def _encode(pixels: np.ndarray, fmt: str = "PNG") -> str:
    """uint8 [H, W] or [H, W, 3] -> base64 of the file."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def _predict(client, name: str, rows: list) -> dict:
    response = client.post(
        f"/v1/models/{name}:predict", json={"instances": rows, "parameters": SEED}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_a_png_is_the_same_instance_as_its_pixels_over_255(client):
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    planes = (pixels / 255.0).tolist()
    from_png = _predict(client, "gray", [{"b64": _encode(pixels)}])
    assert from_png == _predict(client, "gray", [[planes]])  # [C, H, W]
    assert from_png == _predict(client, "gray", [planes])  # [H, W] for one channel


def test_a_color_jpeg_is_decoded_channels_first(client):
    pixels = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    text = _encode(pixels, "JPEG")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))
    as_lists = (decoded.transpose(2, 0, 1) / 255.0).tolist()
    assert _predict(client, "color", [{"b64": text}]) == _predict(client, "color", [as_lists])


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"b64": "not base64!"}, "not valid base64"),
        ({"b64": base64.b64encode(b"GIF89a not really").decode()}, "not a PNG or JPEG"),
        ({"b64": _encode(np.zeros((9, 8), dtype=np.uint8))}, "8x9 (width x height)"),
        ({"b64": 17}, "must be a string"),
        ({"b64": _encode(np.zeros((8, 8), dtype=np.uint8)), "size": 8}, "beside b64"),
    ],
)
def test_a_bad_image_is_a_422_naming_the_instance(client, row, words):
    good = {"b64": _encode(np.zeros((8, 8), dtype=np.uint8))}
    response = client.post("/v1/models/gray:predict", json={"instances": [good, row]})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    (problem,) = error.get("details", [error])
    assert problem["location"][:2] == ["instances", 1]
    assert words in problem["message"]


def test_a_plane_of_the_wrong_size_is_a_shape_error(client):
    response = client.post("/v1/models/gray:predict", json={"instances": [[[0.0] * 8] * 7]})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "wrong_shape"
