"""Per-feature attributions computed per posterior draw, and their spread across draws.

An attribution says how much each input feature moved one output of the model away from
what it gives at a baseline. A Bayesian model has one such answer per posterior draw; their
mean is the attribution, their spread how sure the model is of it. A feature the data never
needed gets attributions that scatter around zero across draws (their interval covers 0);
one it relies on gets attributions that agree.

Methods (both in standardized units, where the baseline, the training mean, is 0):

- `integrated_gradients` (Sundararajan et al. 2017): a_i = z_i * int_0^1 dF/dz_i(alpha z)
  d alpha by the midpoint rule on `steps` points. Per draw the attributions sum to
  F(x) - F(baseline) up to the rule's error, at most TV/steps for an integrand
  g(alpha) = dF(alpha z)/d alpha of total variation TV along the path (each of the steps
  intervals is off by at most its oscillation of g over the interval times its length).
  The largest such gap over the draws is returned as `convergence_delta`.
- `gradient_x_input`: a_i = z_i * dF/dz_i(z), one gradient (a first-order estimate).

Both are the same in original units as in standardized ones (the standardization is
elementwise affine: z_i * dF/dz_i = (x_i - mean_i) * dF/dx_i).

F is, per draw, the predictive mean of each target (regression), or each class's
probability or log-probability (classification). Each draw's gradient needs a copy of the
inputs of its own (`PosteriorModel.path_draws`): every draw and every point of the path run
in one pass over [draws x points] rows (in chunks that bound memory), then one backward pass
per output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.model import PosteriorModel
from training.summaries import Summary

METHODS = ("integrated_gradients", "gradient_x_input")
QUANTITIES = {"regression": ("mean",), "classification": ("probability", "log_probability")}
DEFAULT_STEPS = 32
MAX_STEPS = 256
# input elements of the [draws x points] rows of one pass: bounds the activations autograd
# keeps (a few hundred megabytes for a small CNN) whatever the request
ELEMENTS_PER_PASS = 1 << 21


@dataclass(frozen=True)
class Explain:
    """What to attribute: the method, its path steps (integrated gradients), the per-draw
    quantity (one of QUANTITIES[task]) and which outputs (indices of targets or classes)."""

    method: str
    steps: int
    quantity: str
    outputs: tuple[int, ...]

    def to_json(self) -> dict:
        return {**self.__dict__, "outputs": list(self.outputs)}

    @classmethod
    def from_json(cls, data: dict) -> Explain:
        return cls(data["method"], int(data["steps"]), data["quantity"], tuple(data["outputs"]))


def _quantity(model: PosteriorModel, draws: torch.Tensor, quantity: str) -> torch.Tensor:
    """Draws [n, P, *out] -> the per-draw quantity of every output [n, P, outputs]."""
    if quantity == "mean":
        return draws[..., : draws.shape[-1] // 2]
    if quantity == "probability":
        return F.softmax(draws, dim=-1)
    if quantity == "log_probability":
        return F.log_softmax(draws, dim=-1)
    raise ValueError(f"unknown quantity {quantity!r}")


def _nodes(explain: Explain) -> torch.Tensor:
    """Where on the path from the baseline (0) to the input (1) gradients are taken."""
    if explain.method == "integrated_gradients":
        return (torch.arange(explain.steps, dtype=torch.float64) + 0.5) / explain.steps
    if explain.method == "gradient_x_input":
        return torch.ones(1, dtype=torch.float64)
    raise ValueError(f"unknown attribution method {explain.method!r}; known: {METHODS}")


def points_per_pass(n: int, input_size: int) -> int:
    return max(1, ELEMENTS_PER_PASS // (n * input_size))


def attribute(
    model: PosteriorModel, x: torch.Tensor, n: int, seeds: torch.Tensor, explain: Explain
) -> dict[str, torch.Tensor]:
    """Per-draw attributions of inputs x [B, *input_shape] (original units, a seed per row):
    `attributions` [n, B, O, *input_shape] for the O = len(explain.outputs) outputs, and the
    quantity per draw at the input (`value`) and at the baseline (`baseline_value`),
    [n, B, O] each. Draw s is the draw `model.sample` makes for index s of the row's seed."""
    rows, shape = x.shape[0], x.shape[1:]
    with torch.inference_mode(False), torch.enable_grad():
        z = model.normalizer.inputs(x.detach().clone()).detach()
        outputs = torch.tensor(explain.outputs, device=x.device)
        nodes = _nodes(explain).to(device=x.device, dtype=z.dtype)
        size = z[0].numel()
        total = torch.zeros(n, rows, len(explain.outputs), *shape, dtype=z.dtype, device=x.device)
        points = len(nodes) * rows  # point p: node p // rows on row p % rows's path
        step = points_per_pass(n, size)
        for start in range(0, points, step):
            p = torch.arange(start, min(points, start + step), device=x.device)
            row = p % rows
            path = nodes[p // rows].view(-1, *([1] * len(shape))) * z[row]
            leaf = path.unsqueeze(0).expand(n, *path.shape).clone().requires_grad_()
            value = _quantity(model, model.path_draws(leaf, seeds[row]), explain.quantity)
            value = value[..., outputs]
            for o in range(len(explain.outputs)):
                (grad,) = torch.autograd.grad(
                    value[..., o].sum(), leaf, retain_graph=o < len(explain.outputs) - 1
                )
                total[:, :, o].index_add_(1, row, grad)
        attributions = z.unsqueeze(1) * total / len(nodes)
    with torch.no_grad():
        ends = torch.cat([z, torch.zeros_like(z)])  # the inputs, then the baselines
        end_seeds = torch.cat([seeds, seeds])
        values = []
        step = points_per_pass(n, size)
        for start in range(0, len(ends), step):
            chunk = ends[start : start + step]
            expanded = chunk.unsqueeze(0).expand(n, *chunk.shape)
            draws = model.path_draws(expanded, end_seeds[start : start + step])
            values.append(_quantity(model, draws, explain.quantity)[..., outputs])
        value = torch.cat(values, dim=1)
    return {
        "attributions": attributions.detach(),
        "value": value[:, :rows],
        "baseline_value": value[:, rows:],
    }


def quantiles(t: torch.Tensor, probs: list[float]) -> torch.Tensor:
    """Quantiles over axis 0 by linear interpolation between order statistics (torch's
    default rule), [len(probs), *t.shape[1:]]; unlike torch.quantile, of any size."""
    ordered = t.sort(dim=0).values
    n = t.shape[0]
    out = []
    for q in probs:
        position = q * (n - 1)
        low = int(position)
        high = min(low + 1, n - 1)
        weight = position - low
        out.append(ordered[low] * (1 - weight) + ordered[high] * weight)
    return torch.stack(out)


def summarize_attributions(
    per_draw: dict[str, torch.Tensor], levels: tuple[float, ...], explain: Explain
) -> Summary:
    """Across draws: `mean`, `std` [B, O, *input_shape], central intervals `lower` and `upper`
    [B, L, O, *input_shape] (the draws' quantiles), the quantity's mean at the input
    (`prediction`) and at the baseline (`baseline_prediction`) [B, O], and for integrated
    gradients `convergence_delta` [B, O]: the largest gap over the draws between the sum
    of a draw's attributions and its F(x) - F(baseline)."""
    a = per_draw["attributions"].double()
    tails = [(1 - level) / 2 for level in levels]
    lower = quantiles(a, tails).transpose(0, 1)
    upper = quantiles(a, [1 - t for t in tails]).transpose(0, 1)
    value, base = per_draw["value"].double(), per_draw["baseline_value"].double()
    summary = {
        "mean": a.mean(0),
        "std": a.std(0, correction=0),
        "lower": lower,
        "upper": upper,
        "prediction": value.mean(0),
        "baseline_prediction": base.mean(0),
    }
    if explain.method == "integrated_gradients":
        gap = a.flatten(3).sum(-1) - (value - base)
        summary["convergence_delta"] = gap.abs().amax(0)
    return summary
