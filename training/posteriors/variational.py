"""Bayes by Backprop (Blundell et al. 2015): a mean-field Gaussian on every weight.

Each weight has a mean and a scale softplus(rho). Training uses a low-variance gradient
estimator, the local reparameterization trick (Kingma et al. 2015: sample pre-activations,
not weights) or Flipout (Wen et al. 2018: one weight perturbation decorrelated across
examples by random signs). Serving must draw whole weights instead, because a draw has to be
shared by every row of a request: weights are drawn per (unique seed, draw index) from the
counter-based generator, so a seeded request is reproducible whatever it is batched with,
and applied with one batched matmul (or grouped convolution) over [n, U] weight draws.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from training import rng
from training.architectures import build_body
from training.model import NoFeatures, PosteriorModel
from training.pointwise import ACTIVATIONS
from training.posteriors.seeding import SeedGroups
from training.priors import DEFAULT_PRIOR, Prior, parse_prior

ESTIMATORS = ("local", "flipout")
DEFAULT_INIT_SCALE = 1e-2
_MIN_STD = 1e-8


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def gaussian_kl(prior: Prior, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || prior) summed over elements: closed form when the prior has one,
    else a one-sample Monte-Carlo estimate log q(w) - log p(w) at a fresh w ~ q (unbiased)."""
    closed = prior.kl(mu, sigma)
    if closed is not None:
        return closed.sum()
    eps = torch.randn_like(mu)
    log_q = -0.5 * eps**2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    return (log_q - prior.log_prob(mu + sigma * eps)).sum()


def input_snr(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """|mu| / sigma of a first layer's weights averaged over all but its input axis (axis 1:
    the features of a dense or recurrent layer, the channels of a convolution) -> [inputs].
    A weight whose posterior is mostly noise around zero (the prior's answer for an input
    the data never needed) scores near 0; one the data pinned down scores high."""
    ratio = mu.detach().abs() / sigma.detach()
    return ratio.mean(dim=[d for d in range(ratio.dim()) if d != 1])


class _Variational(nn.Module):
    """Shared by the layers: a Gaussian (mean, softplus(rho)) on the weight and the bias."""

    def __init__(self, weight_shape: tuple[int, ...], prior: Prior, estimator: str):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.prior, self.estimator = prior, estimator
        fan_in = math.prod(weight_shape[1:])
        bound = 1.0 / math.sqrt(fan_in)
        rho = inverse_softplus(torch.tensor(DEFAULT_INIT_SCALE)).item()
        self.weight_mu = nn.Parameter(torch.empty(weight_shape).uniform_(-bound, bound))
        self.weight_rho = nn.Parameter(torch.full(weight_shape, rho))
        self.bias_mu = nn.Parameter(torch.empty(weight_shape[0]).uniform_(-bound, bound))
        self.bias_rho = nn.Parameter(torch.full((weight_shape[0],), rho))

    @property
    def weight_sigma(self) -> torch.Tensor:
        return F.softplus(self.weight_rho)

    @property
    def bias_sigma(self) -> torch.Tensor:
        return F.softplus(self.bias_rho)

    def kl(self) -> torch.Tensor:
        """KL(q || prior) of this layer's weight and bias."""
        return gaussian_kl(self.prior, self.weight_mu, self.weight_sigma) + gaussian_kl(
            self.prior, self.bias_mu, self.bias_sigma
        )

    def draw(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights [*keys.shape, *weight_shape] and biases [*keys.shape, out], one per key."""
        size_w = self.weight_mu.numel()
        eps = rng.normal(keys, size_w + self.bias_mu.numel(), self.weight_mu.dtype)
        weight = self.weight_mu + self.weight_sigma * eps[..., :size_w].unflatten(
            -1, self.weight_mu.shape
        )
        return weight, self.bias_mu + self.bias_sigma * eps[..., size_w:]

    def set_posterior(self, weight: torch.Tensor, bias: torch.Tensor, delta: float) -> None:
        """MOPED (Krishnan et al. 2020): means from a deterministic fit, scales delta |w|."""
        with torch.no_grad():
            for mu, rho, value in (
                (self.weight_mu, self.weight_rho, weight),
                (self.bias_mu, self.bias_rho, bias),
            ):
                mu.copy_(value.reshape(mu.shape))
                rho.copy_(
                    inverse_softplus((delta * value.abs()).clamp_min(1e-6)).reshape(rho.shape)
                )


class VariationalLinear(_Variational):
    def __init__(self, in_features: int, out_features: int, prior: Prior, estimator: str):
        super().__init__((out_features, in_features), prior, estimator)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """One stochastic training pass: independent weight noise per example."""
        mean = F.linear(h, self.weight_mu, self.bias_mu)
        if self.estimator == "local":
            var = F.linear(h**2, self.weight_sigma**2, self.bias_sigma**2)
            return mean + (var + _MIN_STD**2).sqrt() * torch.randn_like(mean)
        delta_w = self.weight_sigma * torch.randn_like(self.weight_sigma)
        sign_in = torch.randn_like(h).sign()
        sign_out = torch.randn_like(mean).sign()
        noise = F.linear(h * sign_in, delta_w) * sign_out
        return mean + noise + self.bias_sigma * torch.randn_like(mean)

    def draw_forward(self, h: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Grouped rows h [n or 1, U, R, in] under weight draws keys [n, U] -> [n, U, R, out]."""
        weight, bias = self.draw(keys)
        return torch.matmul(h, weight.transpose(-1, -2)) + bias.unsqueeze(-2)


class VariationalConv2d(_Variational):
    """Square kernels, stride 1, 'same' padding."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, prior: Prior, estimator: str
    ):
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        super().__init__(shape, prior, estimator)
        self.padding = kernel_size // 2

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mean = F.conv2d(h, self.weight_mu, self.bias_mu, padding=self.padding)
        if self.estimator == "local":
            var = F.conv2d(h**2, self.weight_sigma**2, self.bias_sigma**2, padding=self.padding)
            return mean + (var + _MIN_STD**2).sqrt() * torch.randn_like(mean)
        delta_w = self.weight_sigma * torch.randn_like(self.weight_sigma)
        sign_in = torch.randn(h.shape[0], h.shape[1], 1, 1, device=h.device).sign()
        sign_out = torch.randn(mean.shape[0], mean.shape[1], 1, 1, device=h.device).sign()
        noise = F.conv2d(h * sign_in, delta_w, padding=self.padding) * sign_out
        bias_noise = self.bias_sigma.view(-1, 1, 1) * torch.randn_like(mean[:, :, :1, :1])
        return mean + noise + bias_noise

    def draw_forward(self, h: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """h [n or 1, U, R, C, H, W] -> [n, U, R, O, H, W]: one grouped convolution in which
        group (s, u) is draw s of seed u's kernel."""
        weight, bias = self.draw(keys)  # [n, U, O, C, k, k], [n, U, O]
        n, u = keys.shape
        h = h.expand(n, *h.shape[1:])
        r, c, height, width = h.shape[2:]
        x = h.permute(2, 0, 1, 3, 4, 5).reshape(r, n * u * c, height, width)
        out = F.conv2d(x, weight.reshape(-1, *weight.shape[3:]), padding=self.padding, groups=n * u)
        out = out.view(r, n, u, -1, height, width).permute(1, 2, 0, 3, 4, 5)
        return out + bias[:, :, None, :, None, None]


class VariationalNet(PosteriorModel):
    """Optional conv blocks (conv, activation, 2x2 max-pool) then dense layers, all variational.

    arch: {"in_features": D} or {"input_shape": [C, H, W], "conv": [channels, ...],
    "kernel_size": 3}; "hidden": [widths], "activation", "prior" (a prior string),
    "estimator" ("local" or "flipout").
    """

    method = "variational"

    def __init__(self, arch: dict, likelihood: dict, normalization: dict):
        super().__init__(arch, likelihood, normalization)
        self.prior = parse_prior(arch.get("prior", DEFAULT_PRIOR))
        self.arch["prior"] = self.prior.spec
        estimator = arch.get("estimator", "local")
        self.activation = ACTIVATIONS[arch.get("activation", "relu")]
        convs: list[nn.Module] = []
        if "input_shape" in arch:
            channels, height, width = arch["input_shape"]
            kernel = int(arch.get("kernel_size", 3))
            for out_channels in arch.get("conv", []):
                convs.append(
                    VariationalConv2d(channels, out_channels, kernel, self.prior, estimator)
                )
                channels, height, width = out_channels, height // 2, width // 2
            flat = channels * height * width
        else:
            flat = arch["in_features"]
        self.convs = nn.ModuleList(convs)
        widths = [flat, *arch.get("hidden", []), self.head.raw_features]
        self.layers = nn.ModuleList(
            VariationalLinear(a, b, self.prior, estimator) for a, b in itertools.pairwise(widths)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z
        for conv in self.convs:
            h = F.max_pool2d(self.activation(conv(h)), 2)
        h = h.flatten(1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """The last hidden activations with every weight at its posterior mean: [1, B, D]."""
        if not self.convs and len(self.layers) < 2:
            raise NoFeatures("a network without hidden layers has no feature layer to embed")
        h = z
        for conv in self.convs:
            h = F.conv2d(h, conv.weight_mu, conv.bias_mu, padding=conv.padding)
            h = F.max_pool2d(self.activation(h), 2)
        h = h.flatten(1)
        for layer in self.layers[:-1]:
            h = self.activation(F.linear(h, layer.weight_mu, layer.bias_mu))
        return h.unsqueeze(0)

    def raw_draws(self, z: torch.Tensor, n: int, seeds: torch.Tensor) -> torch.Tensor:
        groups = SeedGroups.of(seeds)
        # [1, U, R, ...]: weights broadcast it to n draws
        return self._grouped_draws(groups.spread(z).unsqueeze(0), n, groups)

    def raw_draws_at(self, z: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        groups = SeedGroups.of(seeds)
        return self._grouped_draws(z[:, groups.rows], z.shape[0], groups)

    def _grouped_draws(self, h: torch.Tensor, n: int, groups: SeedGroups) -> torch.Tensor:
        """Grouped rows h [1 or n, U, R, ...] under n weight draws per seed -> [n, B, raw]."""
        stream = itertools.count()
        for conv in self.convs:
            h = self.activation(conv.draw_forward(h, rng.draw_keys(groups.unique, n, next(stream))))
            h = F.max_pool2d(h.flatten(0, 2), 2).unflatten(0, h.shape[:3])
        h = h.flatten(3)
        for i, layer in enumerate(self.layers):
            h = layer.draw_forward(h, rng.draw_keys(groups.unique, n, next(stream)))
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return groups.gather(h.expand(n, *h.shape[1:]))

    def kl(self) -> torch.Tensor:
        """KL(q || prior) over every weight and bias (nats, whole network)."""
        return sum((m.kl() for m in self.variational_layers()), torch.zeros(()))

    def penalty(self, num_train: int) -> torch.Tensor:
        return self.kl() / num_train

    def variational_layers(self) -> list[_Variational]:
        return [*self.convs, *self.layers]

    def input_snr(self) -> torch.Tensor:
        """Posterior signal-to-noise of the first layer's weights per input (`input_snr`)."""
        first = self.variational_layers()[0]
        return input_snr(first.weight_mu, first.weight_sigma)


class VariationalBody(PosteriorModel):
    """A mean-field Gaussian on every parameter of any body of the architecture registry.

    Training draws one weight set per minibatch (the reparameterization of Blundell et al.
    2015; the local and Flipout estimators are the dense and convolutional fast path,
    `VariationalNet`). A draw is one weight set per (seed, draw index), each module's drawn
    from one stream of normals as `VariationalNet` draws its layers, run by one vmap of the
    body over the [draws x seeds] weight sets.

    arch: an architecture config, prior.
    """

    method = "variational"

    def __init__(self, arch: dict, likelihood: dict, normalization: dict):
        super().__init__(arch, likelihood, normalization)
        self.prior = parse_prior(arch.get("prior", DEFAULT_PRIOR))
        self.arch["prior"] = self.prior.spec
        body = build_body(arch, self.head.raw_features)
        rho = inverse_softplus(torch.tensor(DEFAULT_INIT_SCALE)).item()
        self.names = [name for name, _ in body.named_parameters()]
        self.mu = nn.ParameterList(p.detach().clone() for p in body.parameters())
        self.rho = nn.ParameterList(torch.full_like(p, rho) for p in body.parameters())
        # each module's parameters are one draw of normals: (first index, end index)
        owners = [name.rsplit(".", 1)[0] for name in self.names]
        self.groups = [
            (owners.index(owner), len(owners) - owners[::-1].index(owner))
            for owner in dict.fromkeys(owners)
        ]
        self._template = [body.to("meta")]  # the computation, not its values: no submodule

    def _call(self, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self._template[0], weights, (x,))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        weights = {
            name: mu + F.softplus(rho) * torch.randn_like(mu)
            for name, mu, rho in zip(self.names, self.mu, self.rho, strict=True)
        }
        return self._call(weights, z)

    def draw(self, keys: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """One weight set per key: keys[g] [*K] for module group g -> {name: [*K, *shape]}."""
        weights = {}
        for (a, b), k in zip(self.groups, keys, strict=True):
            sizes = [self.mu[i].numel() for i in range(a, b)]
            eps = rng.normal(k, sum(sizes), self.mu[a].dtype).split(sizes, dim=-1)
            for i, e in zip(range(a, b), eps, strict=True):
                mu = self.mu[i]
                weights[self.names[i]] = mu + F.softplus(self.rho[i]) * e.unflatten(-1, mu.shape)
        return weights

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """The body's features with every parameter at its posterior mean: [1, B, D]."""
        template = self._template[0]
        template.check_features()
        means = {
            name.removeprefix("features."): mu
            for name, mu in zip(self.names, self.mu, strict=True)
            if name.startswith("features.")
        }
        return torch.func.functional_call(template.features, means, (z,)).unsqueeze(0)

    def raw_draws(self, z: torch.Tensor, n: int, seeds: torch.Tensor) -> torch.Tensor:
        groups = SeedGroups.of(seeds)
        x = groups.spread(z)  # [U, R, ...]
        return self._grouped_draws(x.unsqueeze(0).expand(n, *x.shape), groups)

    def raw_draws_at(self, z: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        groups = SeedGroups.of(seeds)
        return self._grouped_draws(z[:, groups.rows], groups)

    def _grouped_draws(self, x: torch.Tensor, groups: SeedGroups) -> torch.Tensor:
        """Grouped rows x [n, U, R, ...], each draw's own -> [n, B, raw]."""
        n, u = x.shape[:2]
        keys = [rng.draw_keys(groups.unique, n, stream=g) for g in range(len(self.groups))]
        weights = {k: w.flatten(0, 1) for k, w in self.draw(keys).items()}  # [n U, ...]
        out = torch.func.vmap(self._call)(weights, x.flatten(0, 1))  # [n U, R, raw]
        return groups.gather(out.unflatten(0, (n, u)))

    def kl(self) -> torch.Tensor:
        """KL(q || prior) over every parameter (nats, whole network)."""
        return sum(
            (
                gaussian_kl(self.prior, mu, F.softplus(rho))
                for mu, rho in zip(self.mu, self.rho, strict=True)
            ),
            torch.zeros(()),
        )

    def penalty(self, num_train: int) -> torch.Tensor:
        return self.kl() / num_train

    def input_snr(self) -> torch.Tensor:
        """Posterior signal-to-noise per input (`input_snr`) of the first weight matrix or
        kernel of the body."""
        i = next(i for i, mu in enumerate(self.mu) if mu.dim() >= 2)
        return input_snr(self.mu[i], F.softplus(self.rho[i]))
