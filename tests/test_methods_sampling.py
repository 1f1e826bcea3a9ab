"""The sampler contract for every method: vectorized, seed-pure, and checkpoint-stable.

These use small untrained models (a Laplace model gets a posterior fitted on random rows),
because the contract is about how draws are made, not about what was learned.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import reordering_tolerance
from torch.overrides import TorchFunctionMode

import training.posteriors.mc_dropout as mc_dropout
from training import segments
from training.build import build_model
from training.checkpoint import read_checkpoint, save_checkpoint
from training.model import PosteriorModel
from training.posteriors.laplace_fit import fit_last_layer
from training.train import sample_limits

GAUSSIAN = {"kind": "gaussian", "num_targets": 2, "noise": "heteroscedastic"}
HOMOSCEDASTIC = {"kind": "gaussian", "num_targets": 1, "noise": "homoscedastic"}
CATEGORICAL = {"kind": "categorical", "num_classes": 3}
TABULAR = {"x_mean": [0.5, -1.0, 0.0], "x_std": [2.0, 1.0, 0.5], "y_mean": [1.0, 2.0]}
TABULAR["y_std"] = [3.0, 0.5]
ONE_TARGET = {**TABULAR, "y_mean": [1.0], "y_std": [3.0]}
IMAGES = {"x_mean": [0.1], "x_std": [0.9]}
MLP = {"in_features": 3, "hidden": [8, 8]}

CASES = {
    "mc_dropout": ({"method": "mc_dropout", "arch": {**MLP, "dropout": 0.2}}, GAUSSIAN),
    "variational": ({"method": "variational", "arch": MLP}, GAUSSIAN),
    "variational-flipout-mixture": (
        {
            "method": "variational",
            "arch": {**MLP, "estimator": "flipout", "prior": "mixture:0.5,1,0.01"},
        },
        CATEGORICAL,
    ),
    "variational-conv": (
        {
            "method": "variational",
            "arch": {"input_shape": [2, 6, 6], "conv": [3, 4], "kernel_size": 3, "hidden": [5]},
        },
        CATEGORICAL,
    ),
    "ensemble": ({"method": "ensemble", "arch": {**MLP, "members": 4}}, GAUSSIAN),
    "sgld": ({"method": "sgld", "arch": {**MLP, "members": 6}}, CATEGORICAL),
    "sghmc": ({"method": "sghmc", "arch": {**MLP, "members": 3}}, HOMOSCEDASTIC),
    "laplace-diag": ({"method": "laplace", "arch": {**MLP, "structure": "diag"}}, GAUSSIAN),
    "laplace-kron": ({"method": "laplace", "arch": {**MLP, "structure": "kron"}}, CATEGORICAL),
    "laplace-full": ({"method": "laplace", "arch": {**MLP, "structure": "full"}}, HOMOSCEDASTIC),
}
STACKED = {"ensemble", "sgld", "sghmc"}


def _inputs(case: str, rows: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    shape = (2, 6, 6) if case == "variational-conv" else (3,)
    return torch.randn(rows, *shape, generator=gen)


def _model(case: str) -> PosteriorModel:
    config, likelihood = CASES[case]
    if case == "variational-conv":
        stats = IMAGES
    elif likelihood is CATEGORICAL:
        stats = {k: TABULAR[k] for k in ("x_mean", "x_std")}
    else:
        stats = TABULAR if likelihood["num_targets"] == 2 else ONE_TARGET
    torch.manual_seed(0)
    model = build_model({**config, "likelihood": likelihood}, stats)
    if config["method"] == "laplace":  # a real posterior, so that draws actually vary
        z = torch.randn(40, 3)
        y = torch.randint(0, 3, (40,)) if likelihood is CATEGORICAL else torch.randn(40, 1)
        if likelihood is GAUSSIAN:
            y = torch.randn(40, 2)
        fit_last_layer(model, z, y)
    return model.eval()


@pytest.fixture(params=sorted(CASES), scope="module")
def case(request) -> tuple[str, PosteriorModel]:
    return request.param, _model(request.param)


def test_draws_have_the_contract_shape(case):
    name, model = case
    x = _inputs(name, 5)
    draws = model.sample(x, 7, torch.zeros(5, dtype=torch.int64))
    raw = model.head.raw_features
    width = 2 * model.head.num_targets if model.task == "regression" else raw
    assert draws.shape == (7, 5, width)
    assert torch.isfinite(draws).all()


REQUESTS = [3, 1, 1, 2, 4, 1]  # rows of each request in the batch below
SEEDS = [7, 3, 3, 9, 7, 12]  # two adjacent requests share a seed, and two apart


def test_a_request_gets_the_same_bits_alone_and_in_any_batch(case):
    """The sampler contract's promise, to the bit: a request's draws depend on its rows, seed
    and n alone, whatever other requests (even ones with its seed) share the batch."""
    name, model = case
    x = _inputs(name, sum(REQUESTS))
    seeds = torch.tensor([s for s, r in zip(SEEDS, REQUESTS, strict=True) for _ in range(r)])
    batch = model.sample(x, 10, seeds, REQUESTS)
    start = 0
    for rows in REQUESTS:
        part = slice(start, start + rows)
        start += rows
        alone = model.sample(x[part].clone(), 10, seeds[part].clone(), [rows])
        assert torch.equal(batch[:, part], alone)
    # and with the requests in another order
    order = [4, 0, 5, 2, 1, 3]
    bounds = [sum(REQUESTS[:i]) for i in range(len(REQUESTS) + 1)]
    rows = torch.cat([torch.arange(bounds[i], bounds[i + 1]) for i in order])
    shuffled = model.sample(x[rows], 10, seeds[rows], [REQUESTS[i] for i in order])
    assert torch.equal(shuffled, batch[:, rows])


def test_without_sizes_the_draws_are_the_per_request_draws_to_rounding(case):
    """Without sizes a model may multiply over the whole batch, each row's randomness from
    its own seed: repeated seeds (a request's rows) still share their draws, and only the
    products' order of addition differs from the per-request path."""
    name, model = case
    x = _inputs(name, 6)
    seeds = torch.tensor([5, 5, 2, 8, 8, 8])
    expected = model.sample(x, 40, seeds, [2, 1, 3])
    got = model.sample(x, 40, seeds)
    torch.testing.assert_close(got, expected, **reordering_tolerance(model, expected))


def test_sizes_that_do_not_cover_the_rows_are_refused(case):
    name, model = case
    with pytest.raises(ValueError, match="sum to 3 rows"):
        model.sample(_inputs(name, 3), 4, torch.zeros(3, dtype=torch.int64), [1, 1])


@pytest.mark.parametrize("input_dropout", [False, True])
@pytest.mark.parametrize("budget", [1, 500])  # bytes: one draw per chunk; 3, 3, 3 and 1
def test_mc_dropout_draws_do_not_depend_on_the_chunks_they_are_computed_in(
    monkeypatch, budget, input_dropout
):
    config, likelihood = CASES["mc_dropout"]
    arch = {**config["arch"], "input_dropout": input_dropout}
    torch.manual_seed(0)
    model = build_model({**config, "arch": arch, "likelihood": likelihood}, TABULAR).eval()
    x, seeds = _inputs("mc_dropout", 5), torch.tensor([4, 1, 4, 2, 8])
    whole = model.sample(x, 10, seeds)  # 10 draws x 5 rows x 8 units: one chunk by default
    monkeypatch.setattr(mc_dropout, "CHUNK_BYTES", budget)
    mc_dropout._request_plan.cache_clear()  # plans are cached per budget too, but be sure
    chunked = model.sample(x, 10, seeds)
    torch.testing.assert_close(chunked, whole, **reordering_tolerance(model, whole))


@pytest.mark.parametrize(
    ("dtype", "rtol"),
    # significant bits kept: 8 for bfloat16 (relative rounding 2^-9 per value), 11 for float16
    # (2^-12), over a few layers; a different dropout mask would move a draw by the size of a
    # unit's contribution
    [(torch.bfloat16, 0.02), (torch.float16, 0.003)],
    ids=["bfloat16", "float16"],
)
def test_mc_dropout_in_16_bits_draws_what_float32_draws_to_its_rounding(
    dtype: torch.dtype, rtol: float
) -> None:
    model = _model("mc_dropout")
    x, seeds = _inputs("mc_dropout", 6), torch.tensor([3, 9, 3, 1, 4, 1])
    full = model.sample(x, 40, seeds)
    half_model = copy.deepcopy(model).to_precision(dtype)
    assert half_model.layers[0].weight.dtype == dtype
    half = half_model.sample(x, 40, seeds)
    assert half.dtype == torch.float32  # the head and the normalization stay float32
    scale = full.abs().max().item()
    torch.testing.assert_close(half, full, rtol=rtol, atol=rtol * scale)
    assert not torch.equal(half, full)  # it really ran in 16 bits


def test_mc_dropout_refuses_a_precision_it_cannot_serve() -> None:
    with pytest.raises(ValueError, match=r"float32, bfloat16 or float16, not torch\.int8"):
        _model("mc_dropout").to_precision(torch.int8)


def test_different_seeds_get_independent_draws(case):
    name, model = case
    x = _inputs(name, 1).expand(2, *_inputs(name, 1).shape[1:])
    draws = model.sample(x, 6, torch.tensor([1, 2]))
    if name in STACKED:  # a fixed set of draws: draw s is member s for every seed
        torch.testing.assert_close(draws[:, 0], draws[:, 1])
    else:
        assert not torch.allclose(draws[:, 0], draws[:, 1])
        assert not torch.allclose(draws[0], draws[1])  # and the draws of one seed differ


def test_draw_s_does_not_depend_on_how_many_draws_were_asked_for(case):
    name, model = case
    x = _inputs(name, 4)
    seeds = torch.tensor([11, 12, 11, 13])
    few, more = model.sample(x, 3, seeds), model.sample(x, 9, seeds)[:3]
    torch.testing.assert_close(few, more, **reordering_tolerance(model, more))


class _CountCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _calls(
    model: PosteriorModel,
    x: torch.Tensor,
    n: int,
    seeds: torch.Tensor,
    sizes: list[int] | None = None,
) -> int:
    model.sample(x, n, seeds, sizes)  # the hash's per-size constants are cached on first use
    with _CountCalls() as counter:
        model.sample(x, n, seeds, sizes)
    return counter.calls


def test_sampling_is_vectorized_over_draws(case):
    """No Python loop over n: the number of torch calls is the same for 1 draw and 64 (for a
    finite set of draws, all of them: more repeat members, which takes a gather)."""
    name, model = case
    x = _inputs(name, 6)
    many = model.members if name in STACKED else 64
    for seeds in (torch.zeros(6, dtype=torch.int64), torch.tensor([0, 0, 1, 1, 2, 2])):
        for sizes in (None, segments.runs(seeds)):
            assert _calls(model, x, many, seeds, sizes) == _calls(model, x, 1, seeds, sizes)


def test_mc_dropout_loops_over_requests_for_their_products_alone():
    """MC dropout's masks and activations are computed for the whole batch; each further
    request adds only its own products, one per layer; without sizes, not even those."""
    model = _model("mc_dropout")
    x = _inputs("mc_dropout", 12)
    one = _calls(model, x, 64, torch.zeros(12, dtype=torch.int64), [12])
    batch_wide = _calls(model, x, 64, torch.zeros(12, dtype=torch.int64))
    for requests in (2, 6, 12):
        seeds = torch.arange(requests).repeat_interleave(12 // requests)
        sizes = [12 // requests] * requests
        assert _calls(model, x, 64, seeds, sizes) == one + (requests - 1) * len(model.layers)
        assert _calls(model, x, 64, seeds) == batch_wide


def test_checkpoint_round_trip_gives_identical_draws(case, tmp_path):
    name, model = case
    x = _inputs(name, 5)
    seeds = torch.tensor([4, 4, 8, 1, 8])
    manifest = {
        "input": {"shape": list(x.shape[1:]), "dtype": "float32", "feature_names": None},
        "output": {"names": [f"o{i}" for i in range(model.head.raw_features)]},
        "num_samples": sample_limits(model, {"default": 10, "max": 100}),
        "calibration": None,
    }
    path = save_checkpoint(model, tmp_path, "m", manifest)
    loaded = read_checkpoint(path).build()
    assert type(loaded) is type(model)
    torch.testing.assert_close(loaded.sample(x, 12, seeds), model.sample(x, 12, seeds))
