"""Request parsing on its own: nested input shapes, locations and the fast path."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch

from service.errors import ApiError
from service.protocol import parse_predict
from service.registry import ModelSpec


def spec(shape: tuple[int, ...], features: tuple[str, ...] | None = None) -> ModelSpec:
    return ModelSpec(
        name="m", version=1, task="regression", method="mc_dropout", input_shape=shape,
        dtype=torch.float32, feature_names=features, output_names=("y",),
        default_num_samples=10, max_num_samples=100, manifest={},
    )  # fmt: skip


def problems(body: object, model: ModelSpec) -> list[dict]:
    with pytest.raises(ApiError) as caught:
        parse_predict(orjson.dumps(body), model, 100)
    return [p.as_dict() for p in caught.value.problems]


def test_nested_instances_for_a_multi_dimensional_input() -> None:
    image = spec((2, 3))
    rows = [[[1, 2, 3], [4, 5, 6]], [[0, 0, 0], [1.5, -1, 2]]]
    request = parse_predict(orjson.dumps({"instances": rows}), image, 100)
    assert request.x.shape == (2, 2, 3) and request.x.dtype == np.float32
    assert request.x[1, 1].tolist() == [1.5, -1.0, 2.0]
    assert (request.num_samples, request.levels, request.seed) == (10, (0.95,), None)

    (short,) = problems({"instances": [[[1, 2, 3], [4, 5]]]}, image)
    assert short["code"] == "wrong_shape" and short["location"] == ["instances", 0, 1]
    (flat,) = problems({"instances": [[1, 2, 3, 4, 5, 6]]}, image)
    assert flat["code"] == "wrong_shape" and "2 lists" in flat["message"]
    (text,) = problems({"instances": [[[1, 2, 3], [4, "5", 6]]]}, image)
    assert text["location"] == ["instances", 0, 1, 1]


def test_nan_in_a_nested_input_is_located() -> None:
    raw = b'{"instances": [[[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, NaN, 6]]]}'
    with pytest.raises(ApiError) as caught:
        parse_predict(raw, spec((2, 3)), 100)
    (problem,) = caught.value.problems
    assert problem.location == ("instances", 1, 1, 1) and "NaN" in problem.message


def test_problems_are_capped_and_listed() -> None:
    found = problems({"instances": [["x", "y", "z"]] * 50}, spec((3,)))
    assert len(found) == 20 and all(p["code"] == "wrong_type" for p in found)


def test_large_request_parses_exactly() -> None:
    rows = torch.randn(1000, 32).tolist()
    body = orjson.dumps({"instances": rows, "parameters": {"seed": 1}})
    request = parse_predict(body, spec((32,)), 1000)
    assert request.x.shape == (1000, 32) and request.x.dtype == np.float32
    assert np.array_equal(request.x, np.array(rows, np.float32))
