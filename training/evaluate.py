"""`credence-eval`: the uncertainty metrics of any checkpoint on any data the trainer reads.

    credence-eval --model models/yacht --data ../shared/data/uci/yacht --split 0
    credence-eval --model models/sine-gap/2 --data toy:sine-gap --json sine-gap.json

It scores the data's test rows when the data has them (a UCI split, a toy), else every row,
with the same draws and summaries the server uses, so a served prediction under the same
seed has the same mean and intervals. A calibrated checkpoint is scored both raw and with
its stored calibration applied, as the server applies it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from training.calibration import CalibrationError, method_name, parse_calibration
from training.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    read_checkpoint,
    request_cap,
)
from training.data import DataError, Dataset, load_data
from training.metrics import evaluate
from training.model import draws_used

DEFAULT_SEED = 0


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
    parser.add_argument("--json", type=Path, help="also write the report to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        checkpoint = load_model_path(args.model)
        loaded = load_data(args.data, target=args.target, split=args.split)
        data = loaded.test if loaded.test is not None else loaded.train
        check_compatible(checkpoint, data)
        model = checkpoint.build()
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
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
