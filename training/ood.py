"""Out-of-distribution flags: how unusual a prediction's epistemic uncertainty is for the
data the model was trained on.

A posterior is unsure where it has not seen data, so the epistemic score (a classifier's
mutual information; a regressor's epistemic std, averaged over targets) of inputs unlike the
training data is large. What counts as large depends on the model: the checkpoint stores the
score's quantiles on in-distribution rows (the validation rows, with the calibration the
server applies), and a prediction gets `ood_score`, the share of those rows whose score is
below its own (interpolated between stored quantiles), and `ood`, whether its score passes
the quantile at 1 - FPR: at the default FPR of 5%, one in-distribution prediction in twenty
is flagged, and the test below the threshold is a calibrated statement, not a guess. A
classifier's entry also stores the same distribution of its predictive entropy and negated
max probability (`others`), the usual alternatives.

A classifier can instead be scored by the density of its penultimate features
(`feature_density`, training.density), which softmax-fooling inputs such as noise images do
not fool: the entry then names the checkpoint's density file (`density`), the quantiles are
of that score on the validation rows, and mutual information moves to `others`. Which score
drives the flag is a training choice (`SCORE_CHOICES`, credence-train --ood-score).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata

from training.density import FILE as DENSITY_FILE
from training.density import DensityError, GaussianDensity
from training.summaries import Summary

DEFAULT_FPR = 0.05
LEVELS = np.linspace(0.0, 1.0, 101)  # the stored quantiles: every percentile
SCORES = {"classification": "mutual_information", "regression": "epistemic_std"}
FEATURE_DENSITY = "feature_density"
# what may drive a model's flag: "auto" is feature_density for a classifier with a feature
# layer, else the task's epistemic score (SCORES)
SCORE_CHOICES = ("auto", FEATURE_DENSITY, "mutual_information")


def served_scores(task: str) -> tuple[str, ...]:
    """The scores a checkpoint of `task` may serve its flag on."""
    return (SCORES[task], FEATURE_DENSITY) if task == "classification" else (SCORES[task],)


def epistemic_score(task: str, summary: Summary) -> torch.Tensor:
    """One score per row [B] from a batch's summaries."""
    if task == "classification":
        return summary["mutual_information"]
    return summary["epistemic_variance"].clamp_min(0).sqrt().mean(-1)


def reference(
    task: str,
    summary: Summary,
    num_samples: int,
    fpr: float = DEFAULT_FPR,
    density: GaussianDensity | None = None,
    density_scores: np.ndarray | None = None,
) -> dict:
    """The manifest's `ood` entry from in-distribution rows' summaries of `num_samples`
    draws (with fewer draws per request, scores are noisier and more rows pass the
    threshold). With a fitted `density` and the same rows' `density_scores`, the entry
    serves feature_density (and the density goes in the checkpoint's DENSITY_FILE)."""
    if not 0 < fpr < 1:
        raise ValueError(f"the OOD false-positive rate must be in (0, 1), got {fpr}")
    if (density is None) != (density_scores is None):
        raise ValueError("a feature-density reference needs the density and its scores")
    by_density = density is not None
    if by_density and task != "classification":
        raise ValueError("feature_density scores classifiers (a Gaussian per class)")
    name = FEATURE_DENSITY if by_density else SCORES[task]
    all_scores = detection_scores(task, summary, density_scores)
    scores = torch.from_numpy(all_scores[name]).double()
    levels = torch.from_numpy(LEVELS)

    def distribution(values: torch.Tensor) -> dict:
        return {
            "threshold": float(torch.quantile(values, 1 - fpr)),
            "quantiles": torch.quantile(values, levels).tolist(),
        }

    others = {  # the other scores' distributions, for clients and operators that prefer them
        other: distribution(torch.from_numpy(values))
        for other, values in all_scores.items()
        if other != name
    }
    return {
        "score": name,
        "rows": int(scores.numel()),
        "num_samples": num_samples,
        "fpr": fpr,
        **distribution(scores),
        "levels": LEVELS.tolist(),
        **({"others": others} if others else {}),
        **({"density": density.manifest()} if by_density else {}),
    }


@dataclass(frozen=True)
class OodReference:
    """A checkpoint's `ood` entry, checked once at load."""

    task: str
    fpr: float
    threshold: float
    levels: np.ndarray
    quantiles: np.ndarray
    score: str = ""
    density: GaussianDensity | None = None  # feature_density: the fitted class Gaussians

    @property
    def needs_features(self) -> bool:
        """Whether `fields` needs the batch's features (PosteriorModel.embed)."""
        return self.density is not None

    @classmethod
    def parse(
        cls,
        entry: object,
        task: str,
        files: dict[str, bytes] | None = None,
        num_classes: int | None = None,
    ) -> OodReference:
        """ValueError says what is wrong with a malformed entry; a feature_density entry's
        tensors are read from `files` (the checkpoint's, by name) and checked."""
        if not isinstance(entry, dict):
            raise ValueError(f"ood must be an object, got {type(entry).__name__}")
        allowed = served_scores(task)
        if entry.get("score") not in allowed:
            names = " or ".join(map(repr, allowed))
            raise ValueError(f"ood.score must be {names} for {task}, got {entry.get('score')!r}")
        density = None
        if entry["score"] == FEATURE_DENSITY:
            density = _parse_density(entry.get("density"), files or {}, num_classes)
        try:
            levels = np.asarray(entry["levels"], dtype=np.float64)
            quantiles = np.asarray(entry["quantiles"], dtype=np.float64)
            fpr, threshold = float(entry["fpr"]), float(entry["threshold"])
        except (KeyError, TypeError, ValueError) as exc:
            message = f"ood needs numeric levels, quantiles, fpr and threshold ({exc})"
            raise ValueError(message) from None
        if levels.ndim != 1 or levels.shape != quantiles.shape or len(levels) < 2:
            raise ValueError("ood.levels and ood.quantiles must be lists of the same length")
        if not (np.all(np.diff(levels) > 0) and np.all(np.diff(quantiles) >= 0)):
            raise ValueError("ood.levels must increase and ood.quantiles must not decrease")
        if not (np.isfinite(quantiles).all() and np.isfinite(threshold) and 0 < fpr < 1):
            raise ValueError("ood.quantiles, threshold and fpr must be finite, fpr in (0, 1)")
        return cls(task, fpr, threshold, levels, quantiles, entry["score"], density)

    def fields(self, summary: Summary, features: torch.Tensor | None = None) -> Summary:
        """A batch's summary fields `ood_score` (each row's score's level among the
        in-distribution rows) and `ood` (its flag), [B] each; a feature_density reference
        scores the rows' `features` [K, B, D] (PosteriorModel.embed)."""
        if self.density is not None:
            if features is None:
                raise ValueError("a feature_density OOD score needs the rows' features")
            scores = self.density.score(features.cpu()).numpy()
        else:
            scores = epistemic_score(self.task, summary).double().cpu().numpy()
        levels = np.interp(scores, self.quantiles, self.levels)
        flags = scores > self.threshold
        return {"ood_score": torch.from_numpy(levels), "ood": torch.from_numpy(flags)}


def _parse_density(
    entry: object, files: dict[str, bytes], num_classes: int | None
) -> GaussianDensity:
    if not isinstance(entry, dict) or entry.get("file") != DENSITY_FILE:
        raise ValueError(f"ood.density must name its file {DENSITY_FILE!r} for feature_density")
    if DENSITY_FILE not in files:
        raise ValueError(f"ood.score feature_density needs {DENSITY_FILE}, which is not listed")
    try:
        density = GaussianDensity.from_bytes(files[DENSITY_FILE], num_classes)
    except DensityError as exc:
        raise ValueError(str(exc)) from None
    for key, value in (("members", density.members), ("features", density.features)):
        if entry.get(key) != value:
            raise ValueError(f"ood.density.{key} is {entry.get(key)!r}; {DENSITY_FILE} has {value}")
    return density


def detection_scores(
    task: str, summary: Summary, density_scores: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per-row OOD scores, larger meaning more unusual: a classifier's mutual information
    (epistemic), predictive entropy (total) and negated max probability (Hendrycks & Gimpel
    2017's max-softmax baseline), and its feature density score when given
    (training.density); a regressor's epistemic std."""
    if task == "regression":
        return {"epistemic_std": epistemic_score(task, summary).double().numpy()}
    scores = {
        "mutual_information": summary["mutual_information"].double().numpy(),
        "entropy": summary["entropy"].double().numpy(),
        "max_softmax": -summary["probabilities"].max(-1).values.double().numpy(),
    }
    if density_scores is not None:
        scores[FEATURE_DENSITY] = np.asarray(density_scores, dtype=np.float64)
    return scores


def detection(in_scores: np.ndarray, out_scores: np.ndarray) -> dict[str, float]:
    """How well a score separates out-of-distribution rows (the positives, scored higher)
    from in-distribution ones: AUROC (ties count half), AUPR (average precision) and the
    false-positive rate at 95% true-positive rate."""
    scores = np.concatenate([in_scores, out_scores]).astype(np.float64)
    positive = np.concatenate([np.zeros(len(in_scores)), np.ones(len(out_scores))])
    ranks = rankdata(scores)
    n_in, n_out = len(in_scores), len(out_scores)
    auroc = (ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out)
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(positive[order])
    precision = hits / np.arange(1, len(scores) + 1)
    aupr = float((precision * positive[order]).sum() / n_out)
    threshold = np.quantile(out_scores, 0.05)  # 95% of the positives score at least this
    fpr = float((np.asarray(in_scores) >= threshold).mean())
    return {"auroc": float(auroc), "aupr": aupr, "fpr_at_95_tpr": fpr}
