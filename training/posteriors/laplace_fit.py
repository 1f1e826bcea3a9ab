"""Fitting the last-layer Laplace posterior of a MAP network: curvature, evidence, factors.

The prior on the last layer is N(0, 1/lambda I); lambda maximizes the Laplace approximation
of the marginal likelihood (MacKay 1992; Immer et al. 2021),

    log Z(lambda) = log p(D | W*) - lambda/2 |W*|^2 + d/2 log lambda - 1/2 log det(H + lambda I),

evaluated on a log-spaced grid in one vectorized pass through the eigenvalues of H. For a
Gaussian likelihood the mean outputs are linear in W, so W*(lambda) is re-solved in closed
form at every lambda, and with homoscedastic noise the `full` and `kron` structures make log Z
the exact Bayesian linear-regression evidence and the posterior the exact one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from training.likelihoods import GaussianHead
from training.posteriors.laplace import LastLayerLaplace

PRIOR_PRECISION_GRID = torch.logspace(-4, 5, 181, dtype=torch.float64)  # 0.05 decades apart


@dataclass
class LaplaceFit:
    prior_precision: float
    log_evidence: float
    grid: list[float]
    evidence_curve: list[float]


@dataclass
class _Curvature:
    eigenvalues: torch.Tensor  # eigenvalues of H (or of its approximation), any shape
    factors: dict[str, torch.Tensor]  # eigenvectors: "factor" (full) or "left" / "right"


def _curvature(
    structure: str, phi: torch.Tensor, weights: torch.Tensor | None, lam: torch.Tensor | None
) -> _Curvature:
    """GGN of the NLL in the last layer, [K P] x [K P] in vec order (output, feature).

    Gaussian: per-example output precisions `weights` [N, K] (H is block diagonal);
    categorical: per-example softmax Hessians `lam` [N, K, K].
    """
    p = phi.shape[1]
    if structure == "diag":
        if weights is not None:
            h = weights.T @ phi**2  # [K, P]
        else:
            h = torch.diagonal(lam, dim1=1, dim2=2).T @ phi**2
        eye = {"dtype": h.dtype, "device": h.device}
        return _Curvature(h, {"left": torch.eye(p, **eye), "right": torch.eye(len(h), **eye)})
    if structure == "kron":
        a = phi.T @ phi
        g = torch.diag(weights.mean(0)) if weights is not None else lam.mean(0)
        a_val, a_vec = torch.linalg.eigh(a)
        g_val, g_vec = torch.linalg.eigh(g)
        values = g_val.clamp_min(0)[:, None] * a_val.clamp_min(0)[None, :]
        return _Curvature(values, {"left": a_vec, "right": g_vec})
    if weights is not None:
        blocks = torch.einsum("nk,nj,nm->kjm", weights, phi, phi)
        h = torch.block_diag(*blocks)
    else:
        k = lam.shape[1]
        h = torch.einsum("nkl,nj,nm->kjlm", lam, phi, phi).reshape(k * p, k * p)
    values, vectors = torch.linalg.eigh(h)
    return _Curvature(values.clamp_min(0), {"factor": vectors})


def _covariance_factors(curv: _Curvature, precision: float) -> dict[str, torch.Tensor]:
    inv_sd = (curv.eigenvalues + precision).rsqrt()
    if "factor" in curv.factors:
        return {"factor": curv.factors["factor"] * inv_sd[None, :]}
    return {**curv.factors, "scale": inv_sd}


def _normal_equations(
    phi: torch.Tensor, y: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output k: Phi^T W_k Phi [K, P, P] and Phi^T W_k y_k [K, P]."""
    m = torch.einsum("nk,nj,nm->kjm", weights, phi, phi)
    return m, torch.einsum("nk,nj,nk->kj", weights, phi, y)


def _gaussian_terms(
    phi: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, grid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every lambda on the grid, with the mean rows re-solved at that lambda: the data
    log-likelihood [L] and |W*|^2 [L], through the eigenvalues of Phi^T W_k Phi."""
    m, b = _normal_equations(phi, y, weights)
    e, u = torch.linalg.eigh(m)
    e = e.clamp_min(0)
    c = torch.einsum("kjm,kj->km", u, b)
    denom = e[None] + grid[:, None, None]  # [L, K, P]
    norm2 = (c**2 / denom**2).sum((1, 2))
    ywy = (weights * y**2).sum()
    quad = ywy - 2 * (c**2 / denom).sum((1, 2)) + (e * c**2 / denom**2).sum((1, 2))
    log_norm = -0.5 * torch.log(2 * math.pi / weights).sum()
    return log_norm - 0.5 * quad, norm2


@torch.no_grad()
def fit_last_layer(
    model: LastLayerLaplace,
    z: torch.Tensor,
    y: torch.Tensor,
    prior_precision: float | None = None,
    grid: torch.Tensor = PRIOR_PRECISION_GRID,
) -> LaplaceFit:
    """Set `model`'s last-layer posterior from standardized training rows (z, y).

    `prior_precision` None tunes lambda by the evidence on `grid`; a number fixes it.
    """
    if prior_precision is not None:
        if prior_precision <= 0:
            raise ValueError(f"prior precision must be positive, got {prior_precision}")
        grid = torch.tensor([prior_precision], dtype=torch.float64)
    phi = model.features(z).double()
    grid = grid.to(phi.device)
    raw = model(z).double()
    k = model.outputs
    weight = model.last_weight().double()
    gaussian = isinstance(model.head, GaussianHead)
    if gaussian:
        precisions = 1.0 / model.head.per_draw(raw)[:, k:]
        curv = _curvature(model.structure, phi, precisions, None)
        data_ll, norm2 = _gaussian_terms(phi, y.double(), precisions, grid)
    else:
        p = torch.softmax(raw, -1)
        lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        curv = _curvature(model.structure, phi, None, lam)
        nll = torch.nn.functional.cross_entropy(raw, y.long(), reduction="sum")
        data_ll = -nll.expand(len(grid))
        norm2 = weight[:k].pow(2).sum().expand(len(grid))
    d = k * phi.shape[1]
    logdet = torch.log(curv.eigenvalues.flatten()[None, :] + grid[:, None]).sum(1)
    evidence = data_ll - 0.5 * grid * norm2 + 0.5 * d * torch.log(grid) - 0.5 * logdet
    best = int(torch.argmax(evidence))
    lam_star = float(grid[best])
    if gaussian:  # the mean rows at their MAP under the chosen prior
        m, b = _normal_equations(phi, y.double(), precisions)
        eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
        solved = torch.linalg.solve(m + lam_star * eye, b)  # [K, P]
        model.last.weight[:k] = solved[:, :-1].to(model.last.weight.dtype)
        model.last.bias[:k] = solved[:, -1].to(model.last.bias.dtype)
    factors = {n: v.to(torch.float32) for n, v in _covariance_factors(curv, lam_star).items()}
    model.set_posterior(factors, lam_star)
    return LaplaceFit(lam_star, float(evidence[best]), grid.tolist(), evidence.tolist())
