"""A density of a classifier's penultimate features: the out-of-distribution score that
noise cannot fool.

Softmax scores (mutual information, entropy, max probability) read the network's outputs,
and inputs far from the data can land anywhere in output space, confidently: uniform-noise
images often get a confident class. The features the output layer reads are better
behaved: in-distribution rows cluster per class, and rows unlike the data fall outside the
clusters. Gaussian discriminant analysis on them (Lee et al. 2018's Mahalanobis score with a
covariance per class, as Mukhoti et al. 2021's Deep Deterministic Uncertainty fits it) gives

    score(x) = -log sum_c pi_c N(f(x); mu_c, Sigma_c)

with pi_c the class frequencies, mu_c and Sigma_c each class's mean and covariance of the
fit rows' features f (`PosteriorModel.embed`, dropout off, weights at their means). Larger
means more unusual. Everything is float64: each Sigma_c is factored once by Cholesky, with
a jitter of `JITTER` times its mean variance (raised tenfold until the factor exists: a ReLU
unit that never fires for a class has variance 0), and the mixture is a log-sum-exp.

A stored set of M networks (ensembles, SG-MCMC samples) has M feature spaces, one per member,
fitted separately; the score is the members' mean log density (`combine`). Averaging the
densities themselves would not do: each member's density is in its own units (an affine
change of a member's features multiplies its density by a constant), so the member with the
most concentrated features would outweigh the others by factors of e^100 and more, where the
mean of the log densities shifts by a constant and ranks rows by every member alike.

The tensors live in the checkpoint's `density.safetensors` (never pickled); `from_bytes`
refuses a malformed file with a message that says what is wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from training.model import PosteriorModel

FILE = "density.safetensors"
COMBINE = "mean_log_density"
JITTER = 1e-6  # of a class's mean feature variance, the least added to its covariance
MAX_JITTER = 1.0
MIN_ROWS = 2  # a class with fewer fit rows has no covariance and is left out of the mixture
SCORE_ROWS = 2048  # rows per pass when scoring: bounds the [K, C, D, rows] solves
TENSORS = ("means", "cholesky", "log_prior", "classes")


class DensityError(ValueError):
    """Features or stored tensors from which no density can be fitted or served."""


@dataclass(frozen=True)
class GaussianDensity:
    """Per member k and class component c: mean [K, C, D], lower Cholesky factor of the
    jittered covariance [K, C, D, D], log class prior [C] and the class each component is
    (`classes` [C]: classes with too few fit rows are not components)."""

    means: torch.Tensor
    cholesky: torch.Tensor
    log_prior: torch.Tensor
    classes: torch.Tensor

    @property
    def members(self) -> int:
        return self.means.shape[0]

    @property
    def features(self) -> int:
        return self.means.shape[2]

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor) -> GaussianDensity:
        """From the fit rows' features [K, N, D] and class labels [N]."""
        if features.dim() != 3 or labels.shape != features.shape[1:2]:
            shapes = f"{tuple(features.shape)} and {tuple(labels.shape)}"
            raise DensityError(f"features [K, N, D] and labels [N] expected, got {shapes}")
        f = features.detach().double().cpu()
        if not torch.isfinite(f).all():
            raise DensityError("the fit rows' features are not all finite")
        labels = labels.detach().long().cpu()
        present, counts = torch.unique(labels, return_counts=True)
        kept = present[counts >= MIN_ROWS]
        if len(kept) == 0:
            raise DensityError(f"no class has the {MIN_ROWS} fit rows a covariance needs")
        means, factors = [], []
        for c in kept.tolist():
            rows = f[:, labels == c]  # [K, n_c, D]
            mu = rows.mean(1)
            centred = rows - mu.unsqueeze(1)
            sigma = centred.transpose(1, 2) @ centred / (rows.shape[1] - 1)
            means.append(mu)
            factors.append(torch.stack([_jittered_cholesky(s) for s in sigma]))
        counts = counts[counts >= MIN_ROWS].double()
        return cls(
            means=torch.stack(means, 1),
            cholesky=torch.stack(factors, 1),
            log_prior=(counts / counts.sum()).log(),
            classes=kept,
        )

    def log_density(self, features: torch.Tensor) -> torch.Tensor:
        """Each member's log mixture density of its rows' features: [K, B, D] -> [K, B]."""
        self._check(features)
        f = features.detach().double().to(self.means.device)
        d = self.features
        log_det = 2 * self.cholesky.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # [K, C]
        constant = self.log_prior - 0.5 * (d * math.log(2 * math.pi) + log_det)  # [K, C]
        parts = []
        for a in range(0, max(f.shape[1], 1), SCORE_ROWS):
            centred = f[:, None, a : a + SCORE_ROWS] - self.means[:, :, None]  # [K, C, b, D]
            solved = torch.linalg.solve_triangular(
                self.cholesky, centred.transpose(-1, -2), upper=False
            )  # [K, C, D, b]
            log_joint = constant[..., None] - 0.5 * solved.pow(2).sum(-2)  # [K, C, b]
            parts.append(torch.logsumexp(log_joint, dim=1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """The OOD score per row [B] (float64): minus the members' mean log density."""
        return -self.log_density(features).mean(0)

    def _check(self, features: torch.Tensor) -> None:
        if features.dim() != 3 or features.shape[0] != self.members:
            raise DensityError(
                f"features must be [{self.members}, B, {self.features}], "
                f"got {tuple(features.shape)}"
            )
        if features.shape[2] != self.features:
            raise DensityError(
                f"the density was fitted on {self.features} features per row, "
                f"these rows have {features.shape[2]}"
            )

    def manifest(self) -> dict:
        """What the manifest's `ood.density` records about the file."""
        return {
            "file": FILE,
            "members": self.members,
            "features": self.features,
            "components": int(self.classes.numel()),
            "combine": COMBINE,
        }

    def to_bytes(self) -> bytes:
        return save_safetensors(
            {name: getattr(self, name).contiguous() for name in TENSORS}, {"combine": COMBINE}
        )

    @classmethod
    def from_bytes(cls, data: bytes, num_classes: int | None = None) -> GaussianDensity:
        """The stored density, checked: DensityError says what is malformed."""
        try:
            tensors = load_safetensors(data)
        except (SafetensorError, ValueError, OSError) as exc:
            raise DensityError(f"{FILE} is not a safetensors file: {exc}") from None
        missing = [name for name in TENSORS if name not in tensors]
        if missing or len(tensors) != len(TENSORS):
            raise DensityError(f"{FILE} must hold exactly {list(TENSORS)}, has {sorted(tensors)}")
        means, chol, log_prior, classes = (tensors[name] for name in TENSORS)
        for name in ("means", "cholesky", "log_prior"):
            if tensors[name].dtype != torch.float64:
                raise DensityError(f"{FILE}: {name} must be float64, is {tensors[name].dtype}")
        if classes.dtype != torch.int64:
            raise DensityError(f"{FILE}: classes must be int64, is {classes.dtype}")
        if means.dim() != 3 or 0 in means.shape:
            raise DensityError(f"{FILE}: means must be [K, C, D], got {tuple(means.shape)}")
        k, c, d = means.shape
        expected = {"cholesky": (k, c, d, d), "log_prior": (c,), "classes": (c,)}
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                got = tuple(tensors[name].shape)
                raise DensityError(
                    f"{FILE}: {name} must be {list(shape)} for means {[k, c, d]}, got {list(got)}"
                )
        if not (torch.isfinite(means).all() and torch.isfinite(chol).all()):
            raise DensityError(f"{FILE}: means and cholesky must be finite")
        if not torch.equal(chol, chol.tril()) or not (chol.diagonal(dim1=-2, dim2=-1) > 0).all():
            raise DensityError(
                f"{FILE}: cholesky must be lower triangular with a positive diagonal"
            )
        if not torch.isfinite(log_prior).all() or abs(float(log_prior.exp().sum()) - 1) > 1e-9:
            raise DensityError(f"{FILE}: log_prior must be the logs of probabilities summing to 1")
        top = num_classes if num_classes is not None else np.iinfo(np.int64).max
        values = classes.tolist()
        if len(set(values)) != len(values) or not all(0 <= v < top for v in values):
            raise DensityError(f"{FILE}: classes must be distinct class indices in [0, {top})")
        return cls(means, chol, log_prior, classes)


def _jittered_cholesky(sigma: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor of sigma + jitter I, the jitter the least of JITTER x 10^i
    times sigma's mean variance for which the factor exists."""
    d = sigma.shape[0]
    scale = float(sigma.diagonal().mean())
    scale = scale if scale > 0 else 1.0  # every feature constant: a unit ball around the mean
    jitter = JITTER
    while jitter <= MAX_JITTER:
        factor, info = torch.linalg.cholesky_ex(sigma + jitter * scale * torch.eye(d).double())
        if int(info) == 0:
            return factor
        jitter *= 10
    raise DensityError(f"no Cholesky factor of a class covariance with jitter up to {MAX_JITTER}")


def fit_density(
    model: PosteriorModel, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor
) -> GaussianDensity:
    """The density of `model`'s features (`PosteriorModel.embed_inputs`) of rows x, labels y."""
    features = model.embed_inputs(torch.as_tensor(x))
    return GaussianDensity.fit(features, torch.as_tensor(y))


def density_scores(
    model: PosteriorModel, density: GaussianDensity, x: np.ndarray | torch.Tensor
) -> np.ndarray:
    """Each row's OOD score [B] (float64) under `density`."""
    return density.score(model.embed_inputs(torch.as_tensor(x))).numpy()
