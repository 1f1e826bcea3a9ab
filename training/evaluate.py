"""`credence-eval`: the uncertainty metrics of any checkpoint on any data the trainer reads.

    credence-eval --model models/yacht --data ../shared/data/uci/yacht --split 0
    credence-eval --model models/sine-gap/2 --data toy:sine-gap --json sine-gap.json
    credence-eval --model models/fashion-mnist --data fashion-mnist \
        --ood-data mnist-5k --ood-data noise:uniform --reliability fmnist.png

It scores the data's test rows when the data has them (a UCI split, a toy), else every row,
with the same draws and summaries the server uses, so a served prediction under the same
seed has the same mean and intervals. A calibrated checkpoint is scored both raw and with
its stored calibration applied, as the server applies it. With --ood-data, it also reports
how well the model's uncertainty tells those rows (another data set of the same input shape,
or noise:gaussian / noise:uniform images) from its own test rows: AUROC, AUPR and the
false-positive rate at 95% true-positive rate, per score (training.ood.detection_scores; a
checkpoint whose OOD flag reads its feature density also reports `feature_density`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from training.calibration import CalibrationError, method_name, parse_calibration
from training.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    read_checkpoint,
    request_cap,
)
from training.data import DataError, Dataset, load_data
from training.density import GaussianDensity, density_scores
from training.images import NOISE, noise_images
from training.metrics import evaluate, reliability_bins, sample_draws
from training.model import PosteriorModel, draws_used
from training.ood import FEATURE_DENSITY, OodReference, detection, detection_scores
from training.summaries import summarize

DEFAULT_SEED = 0
NOISE_PREFIX = "noise:"
NOISE_ROWS = 2000


def load_model_path(path: str | Path) -> Checkpoint:
    """MODEL_DIR/NAME (its highest version) or MODEL_DIR/NAME/VERSION."""
    path = Path(path)
    if path.name.isdigit():
        return read_checkpoint(path)
    return latest_checkpoint(path.parent, path.name)


def check_compatible(checkpoint: Checkpoint, data: Dataset) -> None:
    """Refuse data the model was not trained for, saying what differs."""
    manifest = checkpoint.manifest
    if manifest["task"] != data.task:
        raise DataError(f"the model is a {manifest['task']} model; the data is {data.task}")
    if manifest["input"]["shape"] != list(data.input_shape):
        raise DataError(
            f"the model takes inputs of shape {manifest['input']['shape']}; "
            f"the data's are {list(data.input_shape)}"
        )
    names = manifest["output"]["names"]
    if data.task == "classification" and names != list(data.output_names):
        raise DataError(f"the model's classes {names} differ from the data's {data.output_names}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="credence-eval",
        description="Uncertainty metrics of a checkpoint on a data set: RMSE, log-likelihood, "
        "95%% interval coverage and width, raw and calibrated (regression); accuracy, NLL, ECE "
        "(classification).",
    )
    parser.add_argument("--model", required=True, help="MODEL_DIR/NAME or MODEL_DIR/NAME/VERSION")
    parser.add_argument("--data", required=True, help="a CSV file, a UCI folder or toy:NAME")
    parser.add_argument("--target", help="CSV column to predict (default: the last column)")
    parser.add_argument("--split", type=int, help="UCI split K: score its test rows")
    parser.add_argument(
        "--num-samples", type=int, help="posterior draws (default: the manifest's default)"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="draw seed (default: 0)")
    parser.add_argument(
        "--ood-data",
        action="append",
        default=[],
        metavar="SPEC",
        help="out-of-distribution rows to tell from the data's: a data spec of the same input "
        f"shape (all its rows), or {NOISE_PREFIX}{'|'.join(NOISE)} ({NOISE_ROWS} images); "
        "repeatable",
    )
    parser.add_argument(
        "--reliability",
        type=Path,
        metavar="PNG",
        help="classifiers: write the reliability diagram here (needs matplotlib)",
    )
    parser.add_argument("--json", type=Path, help="also write the report to this file")
    return parser


def ood_rows(spec: str, shape: list[int]) -> np.ndarray:
    """Every row of `spec` (train and test), or noise images of `shape`."""
    if spec.startswith(NOISE_PREFIX):
        if len(shape) != 3:
            raise DataError(f"{spec}: noise images are for image models; this one takes {shape}")
        return noise_images(spec[len(NOISE_PREFIX) :], NOISE_ROWS, tuple(shape), DEFAULT_SEED)
    loaded = load_data(spec)
    parts = [loaded.train.x] + ([] if loaded.test is None else [loaded.test.x])
    if list(parts[0].shape[1:]) != shape:
        raise DataError(f"{spec}: rows of shape {list(parts[0].shape[1:])}, the model's {shape}")
    return np.concatenate(parts)


def stored_density(checkpoint: Checkpoint) -> GaussianDensity | None:
    """The feature density a checkpoint's OOD flag reads, checked as the server checks it
    (CheckpointError when malformed); None when its flag reads another score."""
    entry = checkpoint.manifest.get("ood")
    if not isinstance(entry, dict) or entry.get("score") != FEATURE_DENSITY:
        return None
    names = checkpoint.manifest["output"]["names"]
    try:
        return OodReference.parse(
            entry, checkpoint.manifest["task"], checkpoint.files, len(names)
        ).density
    except ValueError as exc:
        raise CheckpointError(f"{checkpoint.path}: manifest: {exc}") from None


def ood_report(
    model: PosteriorModel,
    task: str,
    data: Dataset,
    specs: list[str],
    n: int,
    seed: int,
    density: GaussianDensity | None = None,
) -> dict[str, dict]:
    """Per OOD spec and score: AUROC, AUPR, FPR at 95% TPR against `data`'s rows."""

    def scores(x: np.ndarray) -> dict[str, np.ndarray]:
        summary = summarize(task, sample_draws(model, x, n, seed), [])
        by_density = None if density is None else density_scores(model, density, x)
        return detection_scores(task, summary, by_density)

    inside = scores(data.x)
    shape = list(data.input_shape)
    report = {}
    for spec in specs:
        outside = scores(ood_rows(spec, shape))
        report[spec] = {name: detection(inside[name], outside[name]) for name in inside}
    return report


def plot_reliability(bins: dict[str, list[float]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
    ax.plot(bins["confidence"], bins["accuracy"], "o-", label="model")
    ax.set(title=title, xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        checkpoint = load_model_path(args.model)
        loaded = load_data(args.data, target=args.target, split=args.split)
        data = loaded.test if loaded.test is not None else loaded.train
        check_compatible(checkpoint, data)
        model = checkpoint.build()
        density = stored_density(checkpoint)
        calibration = parse_calibration(
            checkpoint.manifest.get("calibration"), data.task, data.num_outputs
        )
    except (CheckpointError, CalibrationError, DataError, OSError) as exc:
        parser.error(str(exc))
    limits = checkpoint.manifest["num_samples"]
    highest = request_cap(limits, model.set_size)
    num_samples = args.num_samples or limits["default"]
    if num_samples < 1 or (highest is not None and num_samples > highest):
        parser.error(f"--num-samples must be in [1, {highest}] for this model")
    num_samples = draws_used(num_samples, model.set_size)
    if args.reliability and data.task != "classification":
        parser.error("--reliability applies to classifiers")
    if args.reliability and importlib.util.find_spec("matplotlib") is None:
        parser.error("--reliability needs matplotlib: pip install matplotlib")
    report = {
        "model": checkpoint.name,
        "version": checkpoint.version,
        "method": checkpoint.manifest["method"],
        "data": {"spec": args.data, **loaded.spec},
        "rows": "test" if loaded.test is not None else "all",
        "seed": args.seed,
        "num_samples": num_samples,
        "calibration": method_name(calibration),
        "metrics": evaluate(model, data, num_samples, args.seed, calibration),
    }
    if args.reliability:
        draws = sample_draws(model, data.x, num_samples, args.seed)
        probabilities = summarize(data.task, draws, [])["probabilities"]
        report["reliability"] = reliability_bins(probabilities, torch.as_tensor(data.y))
        plot_reliability(
            report["reliability"], f"{checkpoint.name} on {args.data}", args.reliability
        )
    if args.ood_data:
        try:
            report["ood"] = ood_report(
                model, data.task, data, args.ood_data, num_samples, args.seed, density
            )
        except (DataError, OSError) as exc:
            parser.error(str(exc))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
