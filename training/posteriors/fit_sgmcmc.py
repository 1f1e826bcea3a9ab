"""Stochastic-gradient MCMC: SGLD and SGHMC with a cyclical step size (Zhang et al. 2020).

Potential per example: U(w) / N = mean minibatch NLL - log p(w) / N. With a per-example step
size a (the learning rate of the equivalent SGD) the updates are

    SGLD   w <- w - a grad + sqrt(2 a T / N) xi                 (Welling & Teh 2011)
    SGHMC  v <- (1 - f) v - a grad + sqrt(2 f a T / N) xi,  w <- w + v   (Chen et al. 2014)

(a / N is the step size on U itself), T a temperature and f the friction. Plain SGD steps
are far slower than Adam at leaving a random initialization, so each chain first runs
`warmup_epochs` of Adam on the same potential (a MAP fit from its own random start, as a deep
ensemble member; part of the burn-in), then the cycles start from there. Each cycle's step
size follows a / 2 (cos(pi t / L) + 1); its first `exploration` fraction adds no noise (an
optimizer finding a new mode) and the rest samples. The first `burnin_cycles` cycles are
discarded; from each later cycle `samples_per_cycle` weights are kept, `thin` steps apart,
ending at the cycle's last step. Several chains run in parallel as stacked parameters, and
the kept samples are stored ordered so that the first draws span cycles and chains. Each
chain's noise comes from its own generator, seeded by (seed, chain), so the chains can be
spread over processes (training.distributed) without changing a sample.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass

import torch

from training.data import Dataset
from training.distributed import SINGLE, Spread, unit_seed
from training.fit import (
    FitOptions,
    FitResult,
    adam,
    minibatches,
    standardized,
    torch_threads,
)
from training.posteriors.fit_ensemble import fit_ensemble, members_log_likelihood
from training.posteriors.stacked import Stacked

SAMPLERS = ("sgld", "sghmc")


@dataclass
class SGMCMCSettings:
    sampler: str = "sgld"
    chains: int = 4
    warmup_epochs: int = 100
    cycles: int = 4
    burnin_cycles: int = 1
    epochs_per_cycle: int = 50
    samples_per_cycle: int = 5
    exploration: float = 0.5
    step_size: float = 1e-3
    friction: float = 0.1
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not 0 <= self.burnin_cycles < self.cycles:
            raise ValueError("need 0 <= burnin_cycles < cycles so that some samples are kept")
        if not 0 <= self.exploration < 1 or not 0 < self.friction <= 1:
            raise ValueError("need 0 <= exploration < 1 and 0 < friction <= 1")
        if min(self.chains, self.epochs_per_cycle, self.samples_per_cycle) < 1:
            raise ValueError("chains, epochs_per_cycle and samples_per_cycle must be >= 1")
        if self.warmup_epochs < 0:
            raise ValueError("warmup_epochs must be >= 0")
        if self.step_size <= 0 or self.temperature < 0:
            raise ValueError("need step_size > 0 and temperature >= 0")

    @property
    def num_samples(self) -> int:
        """How many weight samples are stored: chains x kept cycles x samples per cycle."""
        return self.chains * (self.cycles - self.burnin_cycles) * self.samples_per_cycle


@dataclass(frozen=True)
class _Schedule:
    length: int  # steps per cycle
    sampling_start: int  # first step of the cycle that injects noise
    thin: int
    keep: frozenset[int]  # steps of a cycle whose weights are kept

    @classmethod
    def of(cls, settings: SGMCMCSettings, steps_per_epoch: int) -> _Schedule:
        length = settings.epochs_per_cycle * steps_per_epoch
        start = math.ceil(settings.exploration * length)
        thin = max(1, (length - start) // settings.samples_per_cycle)
        keep = {length - 1 - i * thin for i in range(settings.samples_per_cycle)}
        if min(keep) < start:
            raise ValueError(
                f"a cycle's sampling stage has {length - start} steps, fewer than "
                f"samples_per_cycle={settings.samples_per_cycle}; raise epochs_per_cycle or "
                "lower samples_per_cycle or exploration"
            )
        return cls(length, start, thin, frozenset(keep))

    def step_size(self, base: float, t: int) -> float:
        return 0.5 * base * (math.cos(math.pi * t / self.length) + 1)


def _chain_noise(
    generators: list[torch.Generator], params: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Standard normal noise shaped like each of `params` ([m, ...], one block of chains),
    chain c's from generator c alone: one draw per chain and step covers all its weights."""
    sizes = [p[0].numel() for p in params]
    flat = torch.stack([torch.randn(sum(sizes), generator=g) for g in generators])
    return [part.reshape(p.shape) for part, p in zip(flat.split(sizes, 1), params, strict=True)]


def _update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momenta: list[torch.Tensor],
    settings: SGMCMCSettings,
    alpha: float,
    noise: list[torch.Tensor] | None,
    noise_sd: float,
) -> None:
    """One SGLD or SGHMC step in place (see the module docstring); `noise` is None in a
    cycle's noise-free stage. Every operation rounds once per element, so a block of chains
    gets the same bits as it does among all chains."""
    for i, (p, g, v) in enumerate(zip(params, grads, momenta, strict=True)):
        if settings.sampler == "sgld":
            p.sub_(alpha * g)
            if noise is not None:
                p.add_(noise_sd * noise[i])
        else:
            v.mul_(1 - settings.friction).sub_(alpha * g)
            if noise is not None:
                v.add_(noise_sd * noise[i])
            p.add_(v)


def _noise_sd(settings: SGMCMCSettings, alpha: float, num_train: int) -> float:
    variance = 2 * alpha * settings.temperature / num_train
    return math.sqrt(variance * settings.friction if settings.sampler == "sghmc" else variance)


def _draw_order(snapshots: list[torch.Tensor], cycles_kept: int) -> list[torch.Tensor]:
    """Per parameter, snapshots [cycle x sample in cycle, chain, ...] -> one [S, ...] tensor,
    ordered (sample in cycle, cycle, chain) so the first draws span cycles and chains rather
    than neighbouring steps of one chain."""
    return [
        snaps.unflatten(0, (cycles_kept, -1)).transpose(0, 1).flatten(0, 2) for snaps in snapshots
    ]


def fit_sgmcmc(
    model: Stacked,
    train: Dataset,
    val: Dataset | None,
    options: FitOptions,
    settings: SGMCMCSettings,
    spread: Spread = SINGLE,
) -> FitResult:
    """Run the chains (this process's block of them, with `spread`) and store the kept
    samples of every chain in `model` (members = settings.num_samples), on every process.

    A learned homoscedastic noise (the head's parameter) is not sampled: it is a point
    estimate fitted by Adam on the same minibatches (empirical Bayes), from every chain's
    gradient.
    """
    if model.members != settings.num_samples:
        raise ValueError(f"model has {model.members} members, settings keep {settings.num_samples}")
    start_time = time.perf_counter()
    n = len(train)
    chain = type(model)(
        {**model.arch, "members": settings.chains}, model.head.config(), model.normalizer.stats
    )
    chain.head.load_state_dict(model.head.state_dict())
    if settings.warmup_epochs:
        warmup = dataclasses.replace(options, epochs=settings.warmup_epochs, patience=None)
        fit_ensemble(chain, train, None, warmup, spread)
        chain.train()
    block = spread.block(settings.chains)
    params = chain.body_parameters()
    head_params = list(chain.head.parameters())
    head_opt = adam(head_params, options.lr) if head_params else None
    momenta = [torch.zeros_like(p[block]) for p in params]
    generators = [
        torch.Generator().manual_seed(unit_seed(options.seed, c))
        for c in range(block.start, block.stop)
    ]
    steps_per_epoch = math.ceil(n / options.batch_size)
    schedule = _Schedule.of(settings, steps_per_epoch)
    kept: list[list[torch.Tensor]] = []
    nll_per_epoch: list[float] = []
    with torch_threads(options.threads):
        x, y = standardized(chain, train)
        shuffle = torch.Generator().manual_seed(options.seed)
        for cycle in range(settings.cycles):
            t = 0
            for _ in range(settings.epochs_per_cycle):
                steps: list[tuple[int, torch.Tensor]] = []  # (rows, this block's nll)
                for rows in minibatches(n, options.batch_size, shuffle):
                    noise_var = chain.member_noise(block, spread)
                    nll = chain.member_nll(chain.run_block(x[rows], block), y[rows], noise_var)
                    grads = torch.autograd.grad(
                        nll.sum() + chain.penalty(n, block), [*params, *head_params]
                    )
                    alpha = schedule.step_size(settings.step_size, t)
                    noise_sd = _noise_sd(settings, alpha, n) if t >= schedule.sampling_start else 0
                    with torch.no_grad():
                        mine = [p[block] for p in params]
                        noise = _chain_noise(generators, mine) if noise_sd else None
                        mine_grads = [g[block] for g in grads[: len(params)]]
                        _update(mine, mine_grads, momenta, settings, alpha, noise, noise_sd)
                    if head_opt is not None:
                        for p, g in zip(head_params, grads[len(params) :], strict=True):
                            p.grad = g
                        head_opt.step()
                    if cycle >= settings.burnin_cycles and t in schedule.keep:
                        kept.append([p[block].detach().clone() for p in params])
                    steps.append((len(rows), nll.detach()))
                    t += 1
                every = spread.gather(torch.stack([v for _, v in steps], 1), settings.chains)
                total = 0.0  # every chain's mean per step, gathered once per epoch
                for (rows, _), values in zip(steps, every.T.contiguous(), strict=True):
                    total += float(values.mean()) * rows
                if not math.isfinite(total):
                    raise FloatingPointError(
                        f"{settings.sampler} diverged in cycle {cycle}; use a smaller step size"
                    )
                nll_per_epoch.append(total / n)
        snapshots = [  # per parameter [snapshot, chain, ...], every process's chains
            spread.gather(torch.stack([s[i] for s in kept], 1), settings.chains).transpose(0, 1)
            for i in range(len(params))
        ]
        model.load_members(_draw_order(snapshots, settings.cycles - settings.burnin_cycles))
        model.head.load_state_dict(chain.head.state_dict())
        model.eval()
        val_ll = members_log_likelihood(model, val, spread) if val else None
    epochs = settings.cycles * settings.epochs_per_cycle
    return FitResult(
        epochs_run=epochs,
        steps=epochs * steps_per_epoch,
        best_epoch=epochs,
        best_val_log_likelihood=val_ll,
        stopped_early=False,
        seconds=time.perf_counter() - start_time,
        history=[(epochs, val_ll)] if val_ll is not None else [],
        metrics={
            "epochs": {"nll": nll_per_epoch},
            "sgmcmc": {
                **asdict(settings),
                "num_samples": settings.num_samples,
                "steps_per_cycle": schedule.length,
                "sampling_start": schedule.sampling_start,
                "thin": schedule.thin,
            },
        },
    )
