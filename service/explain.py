""":explain responses: per-feature attributions with their spread across posterior draws.

The batcher computes a group's attributions (service.workers.explain_group); here they
become one object per instance, built for the whole group at once (one `tolist` per field),
and a response per request that says what was attributed to what: the method, the per-draw
quantity, the outputs, the features and the baseline (the training mean, in input units).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import orjson

from service.registry import ModelSpec
from training.attributions import Explain
from training.summaries import Summary


def explain_rows(spec: ModelSpec, summary: Summary, levels: Sequence[float]) -> list[dict]:
    """One explanation per row of a group's attribution summary: lists over the outputs
    explained, each the input's shape (a list over features, or an image's [C][H][W])."""
    mean, std = summary["mean"].tolist(), summary["std"].tolist()
    lower, upper = summary["lower"].tolist(), summary["upper"].tolist()  # [B][L][O]...
    prediction = summary["prediction"].tolist()
    baseline = summary["baseline_prediction"].tolist()
    rows = len(mean)
    delta = summary.get("convergence_delta")
    deltas = delta.tolist() if delta is not None else [None] * rows
    snr = summary.get("posterior_snr")
    snrs = snr.tolist() if snr is not None else [None] * rows
    return [
        {
            "attributions": {
                "mean": mean[i],
                "std": std[i],
                "intervals": [
                    {"level": level, "lower": lower[i][j], "upper": upper[i][j]}
                    for j, level in enumerate(levels)
                ],
            },
            "prediction": prediction[i],
            "baseline_prediction": baseline[i],
            "convergence_delta": deltas[i],
            "posterior_snr": snrs[i],
        }
        for i in range(rows)
    ]


def baseline_input(spec: ModelSpec) -> list:
    """The baseline in input units: the training mean the model standardizes with."""
    stats = spec.manifest.get("normalization") or {}
    mean = np.asarray(stats.get("x_mean", 0.0), dtype=np.float64)
    return np.broadcast_to(mean, spec.input_shape).tolist()


def render_explanations(
    spec: ModelSpec, num_samples: int, seed: int, explain: Explain, rows: list[dict]
) -> bytes:
    """One :explain response from its rows of `explain_rows`."""
    snr = rows[0].get("posterior_snr")
    return orjson.dumps(
        {
            "model_name": spec.name,
            "model_version": spec.version,
            "num_samples": num_samples,
            "seed": seed,
            "method": explain.method,
            "steps": explain.steps,
            "quantity": explain.quantity,
            "outputs": [spec.output_names[i] for i in explain.outputs],
            "feature_names": list(spec.feature_names) if spec.feature_names else None,
            "baseline": baseline_input(spec),
            "posterior_snr": snr,
            "explanations": [
                {key: value for key, value in row.items() if key != "posterior_snr"} for row in rows
            ],
        }
    )
