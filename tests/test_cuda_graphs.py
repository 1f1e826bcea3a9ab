"""CUDA graphs for MC-dropout draws: buckets, padding and the graph cache.

The bookkeeping runs here with a stand-in recording that computes eagerly into the same
static buffers a graph would use, so padded rows, larger draw buckets and reused buffers
are checked on any machine; the real recording is checked where CUDA is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import (
    classification_model,
    make_settings,
    regression_manifest,
    regression_model,
    reordering_tolerance,
)

from service import cuda_graphs
from service.cuda_graphs import GraphedSampler, bucket, capture_cuda
from service.registry import Registry
from training.checkpoint import save_checkpoint


def eager_capture(fn: Callable[..., torch.Tensor], *args: object):
    """A recording stand-in: replay recomputes into the output buffer, as a graph would."""
    output = fn(*args)
    return (lambda: output.copy_(fn(*args))), output


def test_buckets_are_powers_of_two_from_eight() -> None:
    assert [bucket(n) for n in (1, 7, 8, 9, 16, 17, 100, 256)] == [8, 8, 8, 16, 16, 32, 128, 256]


def test_padded_batches_draw_what_the_model_draws_for_the_same_rows() -> None:
    """Rows pad to their bucket and draws take the first n of theirs: the masks are the same
    (draw i depends only on the seed and i), and the products, which span the bucket, agree
    with the per-request path to rounding."""
    model = regression_model()
    graphed = GraphedSampler(model, max_rows=64, capture=eager_capture)
    gen = torch.Generator().manual_seed(0)
    for rows, n in ((1, 5), (3, 40), (8, 8), (13, 100), (3, 40), (64, 20)):
        x = torch.randn(rows, 3, generator=gen)
        seeds = torch.randint(0, 1 << 40, (rows,), generator=gen)
        seeds[-1] = seeds[0]  # a request's rows share a seed
        expected = model.sample(x, n, seeds)
        got = graphed.sample(x, n, seeds)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, **reordering_tolerance(model, expected))
    assert set(graphed._graphs) == {(8, 8), (8, 64), (16, 128), (64, 32)}


def test_an_answer_is_not_overwritten_by_the_next_batch() -> None:
    graphed = GraphedSampler(classification_model(), max_rows=8, capture=eager_capture)
    first = graphed.sample(torch.ones(2, 4), 10, torch.tensor([1, 2]))
    kept = first.clone()
    graphed.sample(torch.zeros(2, 4), 10, torch.tensor([3, 4]))
    torch.testing.assert_close(first, kept, rtol=0, atol=0)


def test_the_graph_cache_is_bounded_and_a_request_past_every_bucket_runs_eagerly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS", 2)
    model = regression_model()
    recorded: list[int] = []

    def counting_capture(fn, x, n, seeds):
        recorded.append(n)
        return eager_capture(fn, x, n, seeds)

    graphed = GraphedSampler(model, max_rows=16, capture=counting_capture)
    x, seeds = torch.zeros(1, 3), torch.tensor([5])
    for n in (8, 16, 8, 32, 8):  # the third call reuses 8; 32 evicts 16; 8 is still there
        graphed.sample(x, n, seeds)
    assert recorded == [8, 16, 32]
    assert list(graphed._graphs) == [(8, 32), (8, 8)]
    big = torch.randn(40, 3)  # more rows than a batch holds: one request of 40 instances
    torch.testing.assert_close(
        graphed.sample(big, 8, torch.full((40,), 9)),
        model.sample(big, 8, torch.full((40,), 9)),
        rtol=0,
        atol=0,
    )
    assert recorded == [8, 16, 32]


def test_cuda_graphs_are_ignored_with_a_warning_off_cuda(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_checkpoint(regression_model(), tmp_path, "reg", regression_manifest())
    with caplog.at_level(logging.WARNING):
        registry = Registry.load(
            tmp_path, torch.device("cpu"), make_settings(tmp_path, cuda_graphs=True)
        )
    assert not isinstance(registry.resolve("reg").model, GraphedSampler)
    assert "reg v1: cuda_graphs ignored: the model is on cpu, not CUDA" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recorded_cuda_graphs_replay_the_eager_draws(tmp_path: Path) -> None:
    model = regression_model().to("cuda")
    graphed = GraphedSampler(model, max_rows=32, capture=capture_cuda)
    for rows, n in ((1, 50), (5, 50), (20, 7), (5, 50)):
        x = torch.randn(rows, 3, device="cuda")
        seeds = torch.arange(rows, device="cuda") * 11 + 1
        torch.testing.assert_close(
            graphed.sample(x, n, seeds), model.sample(x, n, seeds), rtol=1e-5, atol=1e-5
        )
    save_checkpoint(regression_model(), tmp_path, "reg", regression_manifest())
    settings = make_settings(tmp_path, cuda_graphs=True)
    loaded = Registry.load(tmp_path, torch.device("cuda"), settings).resolve("reg")
    assert isinstance(loaded.model, GraphedSampler)
