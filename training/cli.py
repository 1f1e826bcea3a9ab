"""`credence-train`: fit a Bayesian neural network on a data set and write a checkpoint.

    credence-train --data toy:sine-gap
    credence-train --data houses.csv --target price --out models --name houses
    credence-train --data ../shared/data/uci/yacht --split 0
    credence-train --data fashion-mnist --arch cnn
    torchrun --nproc-per-node 4 -m training.cli --data toy:sine-gap --method ensemble --members 8
    credence-train --data series:co2 --task forecast --arch lstm --window 24 --horizon 12

Only --data is required: the defaults (architecture, step budget, early stopping, learned
noise) are chosen to give a good model on small tabular data without tuning. The method's
own options come from its declaration in `training.methods`, so adding a method adds flags
here without changing this module. Under torchrun the processes share an ensemble's members or
an SG-MCMC run's chains, and rank 0 writes the one checkpoint (`training.distributed`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

from training.architectures import ARCHITECTURES
from training.calibration import CHOICES as CALIBRATION_CHOICES
from training.checkpoint import NAME_PATTERN, save_checkpoint
from training.data import TASKS, TOY_PREFIX, TOYS, DataError, load_data, slug
from training.dataset import LoadedData
from training.distributed import backend, from_environment, world_size
from training.fit import FitOptions
from training.likelihoods import NOISE_KINDS
from training.methods import METHODS
from training.onnx_export import EXPORTABLE_METHODS, ExportError, check_exportable, export_files
from training.ood import SCORE_CHOICES as OOD_SCORES
from training.series import BUNDLED as BUNDLED_SERIES
from training.series import SERIES_PREFIX, load_forecast
from training.train import (
    DEFAULT_VAL_FRACTION,
    EVAL_SAMPLES,
    MIN_ROWS,
    NUM_SAMPLES,
    build_manifest,
    result_files,
    save_trained,
    train_model,
)

FIT_DEFAULTS = FitOptions()
# Split conformal by default: the one method with a coverage guarantee, and the one that met
# 93-97% test coverage of 95% intervals on all five UCI sets (isotonic was narrower but a
# little under on Boston and yacht). Classifiers, and runs with no validation rows, get none.
DEFAULT_CALIBRATION = "conformal"
FORECAST = "forecast"
FORECAST_FLAGS = ("window", "horizon", "test_steps", "time_column")


def _bounded(
    kind: type[int] | type[float], low: float, high: float, what: str
) -> Callable[[str], int | float]:
    """An argparse type: `kind` parsed from the flag's text, refused outside [low, high]."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _bounded(int, 1, math.inf, "a positive integer")
_nonnegative_int = _bounded(int, 0, math.inf, "an integer >= 0")
_positive_float = _bounded(float, math.nextafter(0, 1), math.inf, "a positive number")
_fraction = _bounded(float, 0, 0.5, "a number in [0, 0.5]")
_fraction_of_budget = _bounded(float, 0, 1, "a number in [0, 1]")


class _HelpFormatter(argparse.HelpFormatter):
    """Show a flag's default when it has a real one and its help does not already say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is d for d in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    """One argument group per method, declared by the method itself (flags default None)."""
    for name, method in METHODS.items():
        method.add_arguments(parser.add_argument_group(f"{name} options", method.help))


def method_options(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """(options for the chosen method, flags given that belong only to other methods)."""
    chosen = METHODS[args.method]
    options = {key: getattr(args, key, None) for key in chosen.defaults}
    foreign = {
        key
        for name, method in METHODS.items()
        if name != args.method
        for key in method.defaults
        if key not in chosen.defaults and getattr(args, key, None) is not None
    }
    return options, sorted("--" + key.replace("_", "-") for key in foreign)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="credence-train",
        description="Fit a Bayesian neural network and write a servable checkpoint.",
        formatter_class=_HelpFormatter,
    )
    toys = ", ".join(TOY_PREFIX + t for t in TOYS)
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        required=True,
        metavar="SPEC",
        help=f"a CSV file with a header row, a UCI benchmark folder, or a toy ({toys})",
    )
    data.add_argument(
        "--target", metavar="COLUMN", help="CSV column to predict (default: the last column)"
    )
    data.add_argument(
        "--split",
        type=_nonnegative_int,
        metavar="K",
        help="UCI split K: train on its train rows, report on its test rows "
        "(default: train on every row)",
    )
    data.add_argument(
        "--task",
        choices=(*TASKS, FORECAST),
        help="default: inferred (toys know; a non-numeric CSV target means classification); "
        "forecast: --data is a series (a CSV with a time column, or "
        f"{', '.join(SERIES_PREFIX + s for s in BUNDLED_SERIES)}), --target its columns to "
        "forecast (comma-separated; default: all)",
    )
    series = parser.add_argument_group("forecast (--task forecast)")
    series.add_argument(
        "--window", type=_positive_int, metavar="W", help="past steps of every feature per instance"
    )
    series.add_argument(
        "--horizon", type=_positive_int, metavar="H", help="future steps predicted per target"
    )
    series.add_argument(
        "--test-steps",
        type=_nonnegative_int,
        metavar="K",
        help="last steps held out for the test metrics, every window whose targets lie in "
        "them a test row (default: H; 0: none)",
    )
    series.add_argument(
        "--relative",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="predict changes from the window's last value, on inputs taken relative to it "
        "(undone in the served outputs): a trending series stays in the trained range",
    )
    series.add_argument(
        "--time-column", metavar="COLUMN", help="a CSV series' time column (default: the first)"
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--method", choices=sorted(METHODS), default="mc_dropout", help="posterior approximation"
    )
    model.add_argument(
        "--arch",
        choices=sorted(ARCHITECTURES),
        default="mlp",
        help="network body: mlp for vectors, cnn for images, lstm or gru for sequences",
    )
    defaults = "; ".join(
        f"{a.name} {' '.join(map(str, a.defaults['hidden'])) or 'none'}"
        for a in ARCHITECTURES.values()
    )
    model.add_argument(
        "--hidden",
        type=_positive_int,
        nargs="+",
        metavar="UNITS",
        help=f"dense hidden layer widths (default: {defaults})",
    )
    model.add_argument(
        "--conv",
        type=_positive_int,
        nargs="+",
        metavar="CHANNELS",
        help="cnn: channels of each conv block (default: "
        f"{' '.join(map(str, ARCHITECTURES['cnn'].defaults['conv']))})",
    )
    model.add_argument(
        "--kernel-size",
        type=_positive_int,
        metavar="K",
        help=f"cnn: kernel size (default: {ARCHITECTURES['cnn'].defaults['kernel_size']})",
    )
    model.add_argument(
        "--recurrent",
        type=_positive_int,
        nargs="+",
        metavar="UNITS",
        help="lstm, gru: state sizes of the recurrent layers (default: "
        f"{' '.join(map(str, ARCHITECTURES['lstm'].defaults['recurrent']))})",
    )
    model.add_argument(
        "--activation", choices=("relu", "tanh", "gelu"), default="relu", help="hidden units"
    )
    model.add_argument(
        "--noise",
        choices=NOISE_KINDS,
        default="homoscedastic",
        help="regression noise: one learned variance per target, an input-dependent "
        "variance head, or fixed by --tau",
    )
    model.add_argument(
        "--tau",
        type=_positive_float,
        metavar="T",
        help="noise precision in original target units, for --noise fixed",
    )
    model.add_argument(
        "--noise-refit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="choose the homoscedastic noise on the validation rows after training",
    )
    model.add_argument(
        "--calibration",
        choices=CALIBRATION_CHOICES,
        help="regression: post-hoc calibration fitted on the validation rows, stored in the "
        "checkpoint and applied by the server (variance scaling, isotonic recalibration, split "
        f"conformal intervals; default {DEFAULT_CALIBRATION} for regression with validation "
        "rows, else none)",
    )
    model.add_argument(
        "--ood-score",
        choices=OOD_SCORES,
        default="auto",
        help="classifiers: the score the served OOD flag reads: the density of the network's "
        "penultimate features (feature_density, fitted on the training rows) or the mutual "
        "information of the draws; auto (the default) is feature_density where the network "
        "has a hidden layer",
    )

    fit = parser.add_argument_group("training")
    fit.add_argument(
        "--epochs",
        type=_positive_int,
        metavar="E",
        help=f"epochs to run (default: about {FIT_DEFAULTS.target_steps} gradient steps, "
        f"within [{FIT_DEFAULTS.min_epochs}, {FIT_DEFAULTS.max_epochs}] epochs)",
    )
    fit.add_argument("--lr", type=_positive_float, default=FIT_DEFAULTS.lr, help="Adam step size")
    fit.add_argument(
        "--batch-size",
        type=_positive_int,
        default=FIT_DEFAULTS.batch_size,
        metavar="B",
        help="rows per gradient step",
    )
    fit.add_argument(
        "--val-fraction",
        type=_fraction,
        default=DEFAULT_VAL_FRACTION,
        metavar="F",
        help="share of the training rows held out for early stopping (0: none)",
    )
    fit.add_argument(
        "--patience",
        type=_fraction_of_budget,
        default=FIT_DEFAULTS.patience,
        metavar="F",
        help="stop when the validation log-likelihood has not improved for this share of "
        "the epochs (0: never stop early)",
    )
    fit.add_argument("--seed", type=int, default=0, help="seeds the split, init and dropout")
    fit.add_argument(
        "--threads",
        type=_positive_int,
        help="torch threads (default: 1 for small models, where more threads only add overhead)",
    )

    out = parser.add_argument_group("output")
    out.add_argument("--out", default="models", metavar="DIR", help="model directory")
    out.add_argument("--name", help="model name (default: derived from --data)")
    out.add_argument(
        "--num-samples-default",
        type=_positive_int,
        default=NUM_SAMPLES["default"],
        metavar="N",
        help="posterior draws per request when the request does not say (a sample set of "
        "M draws: at most M)",
    )
    out.add_argument(
        "--max-num-samples",
        type=_positive_int,
        default=NUM_SAMPLES["max"],
        metavar="N",
        help="most posterior draws a request may ask for (a sample set of M draws serves a "
        "request for more with its M)",
    )
    out.add_argument(
        "--eval-samples",
        type=_positive_int,
        default=EVAL_SAMPLES,
        metavar="N",
        help="posterior draws for the reported metrics",
    )
    out.add_argument(
        "--export-onnx",
        action="store_true",
        help=f"also write model.onnx into the checkpoint (for CREDENCE_BACKEND=onnx; methods "
        f"{', '.join(EXPORTABLE_METHODS)})",
    )
    out.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")
    _add_method_options(parser)
    return parser


def _format_metrics(metrics: dict) -> str:
    if "rmse" in metrics:
        text = (
            f"RMSE {metrics['rmse']:.4g}, log-likelihood {metrics['log_likelihood']:.4g}, "
            f"95% coverage {metrics['coverage_95']:.3f}"
        )
        if "calibrated_coverage_95" in metrics:
            text += f" (calibrated {metrics['calibrated_coverage_95']:.3f})"
        return text
    return f"accuracy {metrics['accuracy']:.4f}, NLL {metrics['nll']:.4g}, ECE {metrics['ece']:.3f}"


def _load(parser: argparse.ArgumentParser, args: argparse.Namespace) -> LoadedData:
    """The data `args` name: a series' windows for --task forecast, else `load_data`."""
    given = [f"--{k.replace('_', '-')}" for k in FORECAST_FLAGS if getattr(args, k) is not None]
    if args.task != FORECAST:
        if given or not args.relative:
            flags = ", ".join(given or ["--no-relative"])
            parser.error(f"{flags} apply to --task forecast only")
        if args.data.startswith(SERIES_PREFIX):
            parser.error(f"{args.data} is a series: use --task forecast --window W --horizon H")
        return load_data(args.data, args.target, args.split, args.task)
    if args.window is None or args.horizon is None:
        parser.error("--task forecast needs --window W and --horizon H")
    if args.split is not None:
        parser.error("--split applies only to UCI folders")
    return load_forecast(
        args.data,
        args.window,
        args.horizon,
        args.target,
        args.test_steps,
        args.relative,
        args.time_column,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    writer = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 alone reports
    if not writer:  # every process checks the same flags: one copy of an error is enough
        parser.error = lambda message: parser.exit(2)  # type: ignore[method-assign]
    args = parser.parse_args(argv)
    options_of_method, foreign = method_options(args)
    if foreign:
        verb = "does" if len(foreign) == 1 else "do"
        parser.error(f"{', '.join(foreign)} {verb} not apply to --method {args.method}")
    if args.tau is not None and args.noise != "fixed":
        parser.error("--tau sets a fixed noise precision; use it with --noise fixed")
    if args.noise == "fixed" and args.tau is None:
        parser.error("--noise fixed needs --tau T (the noise precision in target units)")
    calibration = None if args.calibration == "none" else args.calibration
    if args.calibration is None:  # the default: only where it applies
        calibration = DEFAULT_CALIBRATION if args.val_fraction > 0 else None
    elif calibration is not None and args.val_fraction == 0:
        parser.error("--calibration is fitted on the validation rows; it needs --val-fraction > 0")
    if args.num_samples_default > args.max_num_samples:
        parser.error("--num-samples-default must not exceed --max-num-samples")
    name = args.name or slug(args.data, args.split)
    if not NAME_PATTERN.match(name):
        parser.error(f"--name {name!r} must match {NAME_PATTERN.pattern}")
    try:
        loaded = _load(parser, args)
    except (DataError, OSError) as exc:
        parser.error(str(exc))
    train = loaded.train
    if train.task == "classification" and args.noise != "homoscedastic":
        parser.error("--noise applies to regression only")
    if train.task == "classification" and calibration is not None:
        if args.calibration is not None:
            parser.error("--calibration applies to regression only")
        calibration = None
    if train.task == "regression" and args.ood_score != "auto":
        parser.error("--ood-score applies to classifiers; a regressor's is its epistemic std")
    if len(train) < MIN_ROWS:
        parser.error(f"{args.data}: {len(train)} training rows; need at least {MIN_ROWS}")
    arch_options = {
        key: value
        for key, value in (
            ("conv", args.conv),
            ("kernel_size", args.kernel_size),
            ("recurrent", args.recurrent),
        )
        if value is not None
    }
    unused = sorted(set(arch_options) - set(ARCHITECTURES[args.arch].defaults))
    if unused:
        flags = ", ".join("--" + key.replace("_", "-") for key in unused)
        verb = "does" if len(unused) == 1 else "do"
        parser.error(f"{flags} {verb} not apply to --arch {args.arch}")
    shape = list(train.input_shape)
    if len(shape) != ARCHITECTURES[args.arch].input_rank:
        suggestion = {1: "mlp", 2: "lstm or gru", 3: "cnn"}.get(len(shape), "none")
        parser.error(
            f"--arch {args.arch} takes inputs of rank {ARCHITECTURES[args.arch].input_rank}; "
            f"{args.data}'s are {shape} (use --arch {suggestion})"
        )
    if args.export_onnx:
        try:
            check_exportable(args.method, args.arch)
        except ExportError as exc:
            parser.error(f"--export-onnx: {exc}")
    processes = world_size()
    try:  # the method checks its own options (ranges, combinations) before any training
        METHODS[args.method](**options_of_method).check_spread(processes)
    except ValueError as exc:
        parser.error(str(exc))
    quiet = args.quiet or not writer
    options = FitOptions(
        lr=args.lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        patience=args.patience,
        seed=args.seed,
        progress=False if quiet else None,
        threads=args.threads,
    )
    log = (lambda *_: None) if quiet else (lambda msg: print(msg, file=sys.stderr))
    log(
        f"credence-train: {args.data}: {len(train)} training rows of shape {shape}, "
        f"{train.task} ({', '.join(train.output_names[:10])}"
        f"{', ...' if train.num_outputs > 10 else ''})"
        + (f"; {len(loaded.test)} test rows" if loaded.test is not None else "")
    )
    if processes > 1:
        log(f"credence-train: {args.method} spread over {processes} processes ({backend()})")
    start = time.perf_counter()
    with from_environment() as spread:
        result = train_model(
            train,
            loaded.test,
            method=args.method,
            method_options=options_of_method,
            arch=args.arch,
            hidden=args.hidden,
            activation=args.activation,
            arch_options=arch_options,
            noise=args.noise if train.task == "regression" else "homoscedastic",
            tau=args.tau,
            val_fraction=args.val_fraction,
            options=options,
            eval_samples=args.eval_samples,
            noise_refit=args.noise_refit,
            calibration=calibration,
            spread=spread,
            ood_score=args.ood_score,
        )
    if result is None:  # another process of a torchrun job: rank 0 writes the checkpoint
        return 0
    seconds = time.perf_counter() - start
    extra = {
        "args": vars(args),
        "data": {"spec": args.data, **loaded.spec},
        "seed": args.seed,
        "total_seconds": round(seconds, 3),
    }
    if processes > 1:
        extra["processes"] = {"world_size": processes, "backend": backend()}
    num_samples = {"default": args.num_samples_default, "max": args.max_num_samples}
    if args.export_onnx:  # model.onnx goes into the same staged write as the weights
        files, onnx_keys = export_files(result.model)
        manifest = {**build_manifest(result, train, extra, num_samples), **onnx_keys}
        files = {**files, **result_files(result)}
        path = save_checkpoint(result.model, args.out, name, manifest, extra_files=files)
    else:
        path = save_trained(result, train, args.out, name, extra, num_samples)
    fit = result.fit
    log(
        f"trained {args.method} in {fit.seconds:.1f}s: {fit.epochs_run} epochs "
        f"({fit.steps} steps), best epoch {fit.best_epoch}"
        + (" (stopped early)" if fit.stopped_early else "")
    )
    parts = [f"{split} {_format_metrics(m)}" for split, m in result.metrics.items()]
    print(" | ".join([*parts, f"checkpoint {path}"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
