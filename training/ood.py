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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata

from training.summaries import Summary

DEFAULT_FPR = 0.05
LEVELS = np.linspace(0.0, 1.0, 101)  # the stored quantiles: every percentile
SCORES = {"classification": "mutual_information", "regression": "epistemic_std"}


def epistemic_score(task: str, summary: Summary) -> torch.Tensor:
    """One score per row [B] from a batch's summaries."""
    if task == "classification":
        return summary["mutual_information"]
    return summary["epistemic_variance"].clamp_min(0).sqrt().mean(-1)


def reference(task: str, summary: Summary, num_samples: int, fpr: float = DEFAULT_FPR) -> dict:
    """The manifest's `ood` entry from in-distribution rows' summaries of `num_samples`
    draws (with fewer draws per request, scores are noisier and more rows pass the
    threshold)."""
    if not 0 < fpr < 1:
        raise ValueError(f"the OOD false-positive rate must be in (0, 1), got {fpr}")
    scores = epistemic_score(task, summary).double()
    levels = torch.from_numpy(LEVELS)

    def distribution(values: torch.Tensor) -> dict:
        return {
            "threshold": float(torch.quantile(values, 1 - fpr)),
            "quantiles": torch.quantile(values, levels).tolist(),
        }

    others = {  # the other scores' distributions, for clients and operators that prefer them
        name: distribution(torch.from_numpy(values))
        for name, values in detection_scores(task, summary).items()
        if name != SCORES[task]
    }
    return {
        "score": SCORES[task],
        "rows": int(scores.numel()),
        "num_samples": num_samples,
        "fpr": fpr,
        **distribution(scores),
        "levels": LEVELS.tolist(),
        **({"others": others} if others else {}),
    }


@dataclass(frozen=True)
class OodReference:
    """A checkpoint's `ood` entry, checked once at load."""

    task: str
    fpr: float
    threshold: float
    levels: np.ndarray
    quantiles: np.ndarray

    @classmethod
    def parse(cls, entry: object, task: str) -> OodReference:
        """ValueError says what is wrong with a malformed entry."""
        if not isinstance(entry, dict):
            raise ValueError(f"ood must be an object, got {type(entry).__name__}")
        if entry.get("score") != SCORES[task]:
            raise ValueError(f"ood.score must be {SCORES[task]!r} for {task}")
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
        return cls(task, fpr, threshold, levels, quantiles)

    def fields(self, summary: Summary) -> Summary:
        """A batch's summary fields `ood_score` (each row's score's level among the
        in-distribution rows) and `ood` (its flag), [B] each."""
        scores = epistemic_score(self.task, summary).double().cpu().numpy()
        levels = np.interp(scores, self.quantiles, self.levels)
        flags = scores > self.threshold
        return {"ood_score": torch.from_numpy(levels), "ood": torch.from_numpy(flags)}


def detection_scores(task: str, summary: Summary) -> dict[str, np.ndarray]:
    """Per-row OOD scores, larger meaning more unusual: a classifier's mutual information
    (epistemic), predictive entropy (total) and negated max probability (Hendrycks & Gimpel
    2017's max-softmax baseline); a regressor's epistemic std."""
    if task == "regression":
        return {"epistemic_std": epistemic_score(task, summary).double().numpy()}
    return {
        "mutual_information": summary["mutual_information"].double().numpy(),
        "entropy": summary["entropy"].double().numpy(),
        "max_softmax": -summary["probabilities"].max(-1).values.double().numpy(),
    }


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
