"""The counter-based generator: uniform, independent across streams, pure in its inputs."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from training import rng


def test_uniforms_pass_a_kolmogorov_smirnov_test():
    u = rng.uniform(rng.draw_keys(torch.tensor([123]), 200, stream=0), 100).flatten()
    # 20,000 draws: a correct generator fails at the 1e-3 level one time in a thousand.
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3


def test_normals_pass_a_kolmogorov_smirnov_test():
    z = rng.normal(rng.draw_keys(torch.tensor([5]), 200, stream=0), 100).flatten()
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3


def test_bernoulli_rate_is_within_monte_carlo_error():
    keep = rng.bernoulli(rng.draw_keys(torch.arange(10), 100, stream=3), 100, p=0.9)
    n = keep.numel()  # 100,000 draws; sd of the rate = sqrt(0.09 / n) ~ 9.5e-4
    assert abs(keep.double().mean().item() - 0.9) < 5 * (0.09 / n) ** 0.5


def test_streams_seeds_and_draws_are_uncorrelated():
    seeds = torch.tensor([1, 2])
    a = rng.uniform(rng.draw_keys(seeds, 100, stream=0), 50)
    b = rng.uniform(rng.draw_keys(seeds, 100, stream=1), 50)
    pairs = [
        (a[:, 0], b[:, 0]),  # same seed, different stream
        (a[:, 0], a[:, 1]),  # different seeds
        (a[:-1, 0], a[1:, 0]),  # consecutive draws
    ]
    for x, y in pairs:
        r = torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1].item()
        assert abs(r) < 5 / (x.numel() ** 0.5)  # 5 standard errors of a null correlation


def test_draws_depend_only_on_seed_and_index():
    keys = rng.draw_keys(torch.tensor([7, 8, 7]), 30, stream=2)
    torch.testing.assert_close(keys[:, 0], keys[:, 2])
    assert not torch.equal(keys[:, 0], keys[:, 1])
    torch.testing.assert_close(rng.draw_keys(torch.tensor([7]), 10, stream=2)[:, 0], keys[:10, 0])


def test_large_seeds_use_both_halves():
    low = rng.seed_keys(torch.tensor([5]))
    high = rng.seed_keys(torch.tensor([5 + (1 << 40)]))
    assert not torch.equal(low, high)


def test_keys_computed_in_torch_are_the_bits_numpy_computes():
    """On an accelerator the keys are computed on the device in torch; here that code runs
    on CPU tensors against the numpy path the CPU takes (seeds of all sizes and signs)."""
    seeds = torch.tensor([0, 1, 7, (1 << 31) + 3, (1 << 40) + 5, (1 << 62) + 11, -9])
    for n, stream in ((1, 0), (37, 2), (256, 5)):
        counters = rng._mixed_counters(n, torch.device("cpu"))
        torch.testing.assert_close(
            rng._draw_keys(seeds, counters, stream), rng.draw_keys(seeds, n, stream), rtol=0, atol=0
        )
        grid = seeds.view(1, -1).expand(3, -1)  # keys of any shape of seeds
        torch.testing.assert_close(
            rng._draw_keys(grid, counters, stream), rng.draw_keys(grid, n, stream), rtol=0, atol=0
        )
    torch.testing.assert_close(rng._seed_keys(seeds), rng.seed_keys(seeds), rtol=0, atol=0)


def test_mask_halves_are_the_same_bits_through_either_view():
    """Off the CPU the mask words come from the signed 16-bit view; here both run."""
    words = rng._bits32(rng.draw_keys(torch.arange(5), 7, stream=1), 33)
    for size in (1, 64, 65, 66):
        torch.testing.assert_close(
            rng._halves(words, size, unsigned=False),
            rng._halves(words, size, unsigned=True),
            rtol=0,
            atol=0,
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_keys_on_cuda_stay_there_and_match_the_cpu():
    seeds = torch.tensor([3, 1 << 40, 12345])
    keys = rng.draw_keys(seeds.cuda(), 64, stream=1)
    assert keys.device.type == "cuda"
    torch.testing.assert_close(keys.cpu(), rng.draw_keys(seeds, 64, stream=1), rtol=0, atol=0)
    bits = rng.bernoulli_bits(keys, 100, 0.9).cpu()
    torch.testing.assert_close(bits, rng.bernoulli_bits(keys.cpu(), 100, 0.9), rtol=0, atol=0)
