"""The architecture registry: every network body a posterior method can transform.

An architecture builds a `Body` from its manifest config: `features` (everything up to the
last hidden activations) and `last`, the output layer. Methods treat bodies alike: MC
dropout keys the body's dropout `Site`s, ensembles and SG-MCMC stack its parameters,
variational inference puts a Gaussian on each of them, and last-layer Laplace takes
`features` and `last`. Adding an architecture is one `Architecture` entry in this module.

    mlp   [D]        dense layers (dropout on each layer's input)
    cnn   [C, H, W]  conv blocks (conv, activation, 2x2 max-pool, channel dropout), then dense
    lstm  [T, F]     recurrent layers (one dropout mask per sequence on inputs and state,
    gru   [T, F]     Gal & Ghahramani 2016b; the first layer's inputs, the sequence's own
                     features, only with input_dropout), the last state, then dense
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training import rng
from training.model import NoFeatures
from training.pointwise import ACTIVATIONS


class Site(nn.Module):
    """Where dropout may act. Rate 0 is the identity; in training a site drops with torch's
    generator, and under `keyed` with the counter-based one, each row's mask from its key.

    `kind`: "element" drops features of [rows, F]; "channel" drops whole channels of
    [rows, C, H, W]; a recurrent layer asks its sites for one mask per sequence (`mask`).
    """

    def __init__(self, p: float, width: int, kind: str = "element"):
        super().__init__()
        self.p, self.width, self.kind = float(p), int(width), kind

    def mask(self, rows: int, like: torch.Tensor) -> torch.Tensor | None:
        """Scaled keep mask [rows, width], or None where nothing is dropped."""
        if self.p == 0:
            return None
        keep = 1 - self.p
        keys = getattr(_KEYED, "keys", {}).get(id(self))
        if keys is not None:
            kept = rng.bernoulli_bits(keys, self.width, keep) != 0
        elif self.training:
            kept = torch.rand(rows, self.width, device=like.device) < keep
        else:
            return None
        return kept.to(like.dtype) / keep

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        m = self.mask(h.shape[0], h)
        if m is None:
            return h
        return h * (m.view(*m.shape, 1, 1) if self.kind == "channel" else m)


_KEYED = threading.local()  # this thread's {id(site): keys [rows]} under `keyed`


@contextmanager
def keyed(sites: list[Site], keys: list[torch.Tensor | None]) -> Iterator[None]:
    """Masks from the given per-row keys (one tensor [rows] per site) for the duration, in
    this thread only: threads sampling one model at once each use their own keys."""
    previous = getattr(_KEYED, "keys", {})
    _KEYED.keys = {id(s): k for s, k in zip(sites, keys, strict=True) if k is not None}
    try:
        yield
    finally:
        _KEYED.keys = previous


class Recurrent(nn.Module):
    """An LSTM or GRU layer in PyTorch's gate layout, written as a loop of matmuls so that
    stacked and drawn weights (functional_call under vmap) and per-sequence dropout masks
    apply to it like to any other layer. Returns the last hidden state [rows, hidden], or
    every step's [rows, T, hidden] (`sequence`, to feed another recurrent layer)."""

    GATES: dict[str, int] = {"lstm": 4, "gru": 3}  # noqa: RUF012

    def __init__(
        self,
        kind: str,
        in_features: int,
        hidden: int,
        p: float = 0.0,
        sequence: bool = False,
        input_p: float | None = None,
    ):
        super().__init__()
        self.kind, self.hidden, self.sequence = kind, hidden, sequence
        gates = self.GATES[kind] * hidden
        bound = 1 / math.sqrt(hidden)
        self.weight_ih = nn.Parameter(torch.empty(gates, in_features).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(torch.empty(gates, hidden).uniform_(-bound, bound))
        self.bias_ih = nn.Parameter(torch.empty(gates).uniform_(-bound, bound))
        self.bias_hh = nn.Parameter(torch.empty(gates).uniform_(-bound, bound))
        self.input_site = Site(p if input_p is None else input_p, in_features)
        self.state_site = Site(p, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [rows, T, F]
        rows = x.shape[0]
        m_in, m_h = self.input_site.mask(rows, x), self.state_site.mask(rows, x)
        if m_in is not None:
            x = x * m_in.unsqueeze(1)
        inputs = F.linear(x, self.weight_ih, self.bias_ih)  # every step's input part at once
        h = x.new_zeros(rows, self.hidden)
        c = x.new_zeros(rows, self.hidden)
        states = []
        for t in range(x.shape[1]):
            hh = F.linear(h if m_h is None else h * m_h, self.weight_hh, self.bias_hh)
            if self.kind == "lstm":
                i, f, g, o = (inputs[:, t] + hh).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            else:
                xr, xz, xn = inputs[:, t].chunk(3, dim=-1)
                hr, hz, hn = hh.chunk(3, dim=-1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                h = (1 - z) * torch.tanh(xn + r * hn) + z * h
            if self.sequence:
                states.append(h)
        return torch.stack(states, dim=1) if self.sequence else h


class Body(nn.Module):
    """A network as `features` (a sequence of modules) and the output layer `last`."""

    def __init__(self, features: list[nn.Module], last: nn.Linear, last_site: Site):
        super().__init__()
        self.features = nn.Sequential(*features)
        self.last_site = last_site
        self.last = last

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.last(self.last_site(self.features(z)))

    def sites(self) -> list[Site]:
        """Dropout sites in the order their masks are keyed (stream i for site i)."""
        return [m for m in self.modules() if isinstance(m, Site)]

    def check_features(self) -> None:
        """NoFeatures unless `features` computes something: a network without hidden layers
        feeds its (flattened) inputs straight to `last`."""
        if not any(True for _ in self.features.parameters()):
            raise NoFeatures("a network without hidden layers has no feature layer to embed")


class _Activation(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.name](h)


def _dense(width: int, arch: dict, p: float, first_p: float) -> tuple[list[nn.Module], int]:
    """Dense hidden layers from `width` inputs: (modules, output width). The first layer's
    input site drops at `first_p`, the others at `p`."""
    modules: list[nn.Module] = []
    for i, out in enumerate(arch.get("hidden", [])):
        modules += [Site(first_p if i == 0 else p, width), nn.Linear(width, out)]
        modules.append(_Activation(arch.get("activation", "relu")))
        width = out
    return modules, width


def _mlp(arch: dict, out_features: int, p: float) -> Body:
    (width,) = arch["input_shape"]
    modules, width = _dense(width, arch, p, p if arch.get("input_dropout") else 0.0)
    return Body(modules, nn.Linear(width, out_features), Site(p if modules else 0.0, width))


def _cnn(arch: dict, out_features: int, p: float) -> Body:
    channels, height, width = arch["input_shape"]
    kernel = int(arch.get("kernel_size", 3))
    modules: list[nn.Module] = []
    for out in arch.get("conv", []):
        modules += [
            nn.Conv2d(channels, out, kernel, padding=kernel // 2),
            _Activation(arch.get("activation", "relu")),
            nn.MaxPool2d(2),
            Site(p, out, kind="channel"),
        ]
        channels, height, width = out, height // 2, width // 2
    modules.append(nn.Flatten())
    dense, flat = _dense(channels * height * width, arch, p, 0.0)
    return Body([*modules, *dense], nn.Linear(flat, out_features), Site(p, flat))


def _recurrent(kind: str) -> Callable[[dict, int, float], Body]:
    def build(arch: dict, out_features: int, p: float) -> Body:
        _, width = arch["input_shape"]
        sizes = list(arch.get("recurrent", [64]))
        modules: list[nn.Module] = []
        # the series' own features are dropped only with input_dropout, as an MLP's are: a
        # univariate series dropped for a whole sequence leaves a draw nothing to read
        first_p = p if arch.get("input_dropout", True) else 0.0
        for i, size in enumerate(sizes):
            last = i == len(sizes) - 1
            input_p = first_p if i == 0 else p
            modules.append(Recurrent(kind, width, size, p, sequence=not last, input_p=input_p))
            width = size
        dense, width = _dense(width, arch, p, p)
        return Body([*modules, *dense], nn.Linear(width, out_features), Site(p, width))

    return build


@dataclass(frozen=True)
class Architecture:
    name: str
    input_rank: int  # the rank of one input: [D], [C, H, W], [T, F]
    build: Callable[[dict, int, float], Body]
    defaults: dict[str, Any] = field(default_factory=dict)  # what --arch NAME starts from


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("mlp", 1, _mlp, {"hidden": [100, 100]}),
        Architecture("cnn", 3, _cnn, {"conv": [32, 64], "kernel_size": 3, "hidden": [128]}),
        Architecture("lstm", 2, _recurrent("lstm"), {"recurrent": [64], "hidden": []}),
        Architecture("gru", 2, _recurrent("gru"), {"recurrent": [64], "hidden": []}),
    )
}


def arch_name(arch: dict) -> str:
    """A manifest's architecture; checkpoints from before the registry are MLPs."""
    return str(arch.get("name", "mlp"))


def input_shape(arch: dict) -> list[int]:
    return list(arch["input_shape"]) if "input_shape" in arch else [int(arch["in_features"])]


def build_body(arch: dict, out_features: int, dropout: float = 0.0) -> Body:
    """The body an arch config describes, with dropout rate `dropout` at its sites."""
    name = arch_name(arch)
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    spec = ARCHITECTURES[name]
    shape = input_shape(arch)
    if len(shape) != spec.input_rank:
        raise ValueError(f"{name} takes inputs of rank {spec.input_rank}, got input shape {shape}")
    return spec.build({**arch, "input_shape": shape}, out_features, dropout)


def arch_config(
    name: str,
    input_shape: list[int] | tuple[int, ...],
    hidden: list[int] | None = None,
    activation: str = "relu",
    **options: Any,
) -> dict:
    """The manifest config of architecture `name` for inputs of `input_shape`: its defaults,
    then what is given (None keeps the default)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    spec = ARCHITECTURES[name]
    if len(input_shape) != spec.input_rank:
        shape = list(input_shape)
        raise ValueError(f"{name} takes inputs of rank {spec.input_rank}, the data's are {shape}")
    given = {k: v for k, v in options.items() if v is not None}
    unknown = set(given) - set(spec.defaults)
    if unknown:
        raise ValueError(f"{name} takes no options {sorted(unknown)}")
    config = {"name": name, **spec.defaults, **given, "activation": activation}
    if hidden is not None:
        config["hidden"] = list(hidden)
    if name == "mlp":  # the MLP fast paths' key (and every checkpoint before the registry)
        return {**config, "in_features": int(input_shape[0])}
    return {**config, "input_shape": [int(d) for d in input_shape]}
