"""Training as a library call: data in, fitted model + metrics + checkpoint manifest out.

`train_model` is what `credence-train` runs, and what tests and benchmarks call directly
(no subprocess): hold out a seeded validation split (a forecaster's latest windows, kept
clear of the fitted ones: training.series), standardize with the statistics of the rows the
model is fit on, build the method's model, fit with early stopping, refit the noise and fit
the post-hoc calibration on the validation rows, then evaluate on the validation rows (and
on the test rows when the data has them) from posterior draws.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training import ood
from training.architectures import arch_config
from training.calibration import METHODS as CALIBRATION_METHODS
from training.calibration import fit_calibration, summarize
from training.checkpoint import save_checkpoint
from training.data import Dataset
from training.density import FILE as DENSITY_FILE
from training.density import GaussianDensity, density_scores, fit_density
from training.distributed import SINGLE, Spread
from training.fit import (
    FitOptions,
    FitResult,
    auto_threads,
    holdout_split,
    refit_noise,
    standardization,
    torch_threads,
)
from training.likelihoods import NOISE_KINDS
from training.methods import get_method
from training.metrics import metrics_from_draws, sample_draws, uncertainty_stats
from training.model import NoFeatures, PosteriorModel, draws_used
from training.series import chronological_split

DEFAULT_VAL_FRACTION = 0.2
EVAL_SAMPLES = 100
MIN_ROWS = 4  # two to fit on and two to validate on, at the least
NUM_SAMPLES = {"default": 100, "max": 1000}
INITIAL_NOISE_VARIANCE = 0.1  # standardized units; learned noise starts here


@dataclass
class TrainResult:
    """The fitted model, its metrics per split and what the fit did.

    `metrics["validation"]` is measured on the rows that chose the best epoch and the noise,
    so it is optimistic; `metrics["test"]` (when the data has test rows) is the honest one.
    """

    model: PosteriorModel
    metrics: dict[str, dict]
    uncertainty_stats: dict
    fit: FitResult
    config: dict[str, Any] = field(default_factory=dict)
    calibration: dict | None = None  # manifest["calibration"]: see training.calibration
    ood: dict | None = None  # manifest["ood"]: see training.ood
    density: GaussianDensity | None = None  # the feature density, when it scores OOD


def likelihood_config(
    data: Dataset, stats: dict, noise: str = "homoscedastic", tau: float | None = None
) -> dict:
    """Head config: categorical for classifiers, else Gaussian with the chosen noise model.

    `tau` is the noise precision in ORIGINAL target units (as in Gal's code); in standardized
    units the fixed noise variance is 1 / (tau * y_std^2).
    """
    if data.task == "classification":
        return {"kind": "categorical", "num_classes": data.num_outputs}
    if noise not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
    config: dict[str, Any] = {"kind": "gaussian", "num_targets": data.num_outputs, "noise": noise}
    if noise == "fixed":
        if tau is None or tau <= 0:
            raise ValueError("fixed noise needs a positive --tau (noise precision)")
        variances = {1.0 / (tau * s**2) for s in stats["y_std"]}
        if len(variances) > 1:
            raise ValueError("fixed noise with --tau supports a single target")
        config["noise_variance"] = variances.pop()
    elif tau is not None:
        raise ValueError("--tau applies only to --noise fixed")
    else:
        config["noise_variance"] = INITIAL_NOISE_VARIANCE
    return config


def train_model(
    train: Dataset,
    test: Dataset | None = None,
    *,
    method: str = "mc_dropout",
    method_options: dict[str, Any] | None = None,
    arch: str = "mlp",
    hidden: tuple[int, ...] | list[int] | None = None,
    activation: str = "relu",
    arch_options: dict[str, Any] | None = None,
    noise: str = "homoscedastic",
    tau: float | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    options: FitOptions | None = None,
    eval_samples: int = EVAL_SAMPLES,
    noise_refit: bool = True,
    calibration: str | None = None,
    spread: Spread = SINGLE,
    ood_score: str = "auto",
) -> TrainResult | None:
    """Fit `method` on architecture `arch` (training.architectures: None for `hidden` or
    in `arch_options` keeps its default) on `train` and evaluate; `options.seed` fixes split,
    init and dropout.

    With `spread` (a process of a torchrun job: training.distributed) the method's members
    or chains are trained by every process together, and only rank 0 evaluates: it returns
    the result, the other processes None.

    `calibration` (regression only: "variance", "isotonic", "conformal" or None) is fitted on
    the validation rows' draws after the noise refit. Those rows also chose the best epoch and
    the noise, so the calibration is slightly optimistic about them, and the calibrated
    validation metrics are in-sample; the test metrics are the honest ones.

    `ood_score` (training.ood.SCORE_CHOICES) is what the served OOD flag reads: "auto" is a
    classifier's feature density (training.density, fitted on the fit rows) when its network
    has a feature layer, else the epistemic score; a regressor's is its epistemic std.
    """
    options = options or FitOptions()
    if calibration == "none":
        calibration = None
    if calibration is not None:
        if calibration not in CALIBRATION_METHODS:
            raise ValueError(f"calibration must be one of {CALIBRATION_METHODS} or None")
        if train.task != "regression":
            raise ValueError("post-hoc calibration applies to regression models only")
        if val_fraction <= 0:
            raise ValueError("calibration is fitted on validation rows: needs val_fraction > 0")
    if len(train) < MIN_ROWS:
        raise ValueError(f"need at least {MIN_ROWS} training rows, got {len(train)}")
    if train.task == "classification" and train.num_outputs < 2:
        raise ValueError("classification needs at least two classes")
    if ood_score not in ood.SCORE_CHOICES:
        raise ValueError(f"ood_score must be one of {ood.SCORE_CHOICES}, got {ood_score!r}")
    if train.task == "regression" and ood_score != "auto":
        raise ValueError("--ood-score applies to classifiers; a regressor's is its epistemic std")
    approximation = get_method(method, **(method_options or {}))
    approximation.check_spread(spread.world_size)
    architecture = arch_config(arch, train.input_shape, hidden, activation, **(arch_options or {}))
    if train.forecast is not None:  # windows in time order: validate on the latest
        fit_rows, val_rows = chronological_split(
            len(train), val_fraction, train.forecast["horizon"]
        )
    else:
        fit_rows, val_rows = holdout_split(len(train), val_fraction, options.seed)
    fit_set = train.subset(fit_rows)
    val_set = train.subset(val_rows) if len(val_rows) else None
    stats = standardization(fit_set)
    likelihood = likelihood_config(train, stats, noise, tau)
    with torch.random.fork_rng(devices=[]):  # seeded init and dropout; caller's RNG untouched
        torch.manual_seed(options.seed)
        model = approximation.build(architecture, likelihood, stats)
        by_density = _scores_by_density(model, train.task, ood_score, fit_set)
        result = approximation.train(model, fit_set, val_set, options, spread)
    if spread.rank != 0:
        return None
    eval_samples = draws_used(eval_samples, model.set_size)
    metrics: dict[str, dict] = {}
    with torch_threads(options.threads or auto_threads(model)):
        refit = None
        if noise_refit and val_set is not None:
            refit = refit_noise(model, val_set, eval_samples, options.seed)
        reference = val_set if val_set is not None else fit_set
        draws = sample_draws(model, reference.x, eval_samples, options.seed)
        fitted = None
        if calibration is not None and val_set is not None:
            fitted = fit_calibration(calibration, draws, val_set.y)
        split = "validation" if val_set is not None else "train"
        metrics[split] = metrics_from_draws(train.task, draws, reference.y, fitted)
        stats_out = uncertainty_stats(train.task, draws, split=split)
        # the scores the server will see: each row a request of its own (one seed for all
        # would share their Monte-Carlo error, and shift the whole reference with it), with
        # the calibration the server applies
        own = sample_draws(model, reference.x, eval_samples, options.seed, per_row=True)
        # fitted on the fit rows, its reference scores on the validation rows: held out, so
        # their quantiles are what new in-distribution rows score (without validation rows
        # the reference is the fit rows', and the flag fires on new rows more often)
        density = fit_density(model, fit_set.x, fit_set.y) if by_density else None
        ood_reference = ood.reference(
            train.task,
            summarize(train.task, own, [], fitted),
            eval_samples,
            density=density,
            density_scores=None if density is None else density_scores(model, density, reference.x),
        )
        if test is not None and len(test):
            test_draws = sample_draws(model, test.x, eval_samples, options.seed)
            metrics["test"] = metrics_from_draws(train.task, test_draws, test.y, fitted)
    config = {
        "method": method,
        "method_options": approximation.options,
        "arch": architecture,
        "noise": noise if train.task == "regression" else None,
        "tau": tau,
        "val_fraction": val_fraction,
        "fit_rows": len(fit_set),
        "validation_rows": len(val_rows),
        "eval_samples": eval_samples,
        "noise_refit": refit,
        "calibration": calibration,
        "ood_score": ood_reference["score"],
        "options": dataclasses.asdict(options),
    }
    return TrainResult(model, metrics, stats_out, result, config, fitted, ood_reference, density)


def _scores_by_density(model: PosteriorModel, task: str, choice: str, rows: Dataset) -> bool:
    """Whether the OOD flag will read the feature density: asked for, or "auto" on a
    classifier whose network has a feature layer (tried on two rows before training, so that
    a model without one is refused before its fit, not after)."""
    if task != "classification" or choice == "mutual_information":
        return False
    try:
        model.embed_inputs(torch.as_tensor(rows.x[:2]))
    except NoFeatures as exc:
        if choice == ood.FEATURE_DENSITY:
            raise ValueError(f"--ood-score feature_density: {exc}") from None
        return False
    return True


def sample_limits(model: PosteriorModel, requested: dict[str, int] | None = None) -> dict:
    """Default and maximum num_samples per request. A stored set of M draws (ensemble
    members, SG-MCMC samples) defaults to all M; a request above M gets the M, so the
    maximum is the same as any model's."""
    limits = dict(requested or NUM_SAMPLES)
    limits["default"] = draws_used(limits["default"], model.set_size)
    return limits


def build_manifest(
    result: TrainResult,
    data: Dataset,
    extra: dict | None = None,
    num_samples: dict[str, int] | None = None,
) -> dict:
    """The caller-supplied manifest keys (see training.checkpoint) for a trained model."""
    return {
        "input": {
            "shape": list(data.input_shape),
            "dtype": "float32",
            "feature_names": list(data.feature_names) if data.x.ndim == 2 else None,
        },
        "output": {"names": list(data.output_names)},
        "num_samples": sample_limits(result.model, num_samples),
        "calibration": result.calibration,
        "metrics": result.metrics,
        "uncertainty_stats": result.uncertainty_stats,
        "ood": result.ood,
        **({"forecast": dict(data.forecast)} if data.forecast is not None else {}),
        "training": {
            **result.config,
            "epochs_run": result.fit.epochs_run,
            "best_epoch": result.fit.best_epoch,
            "steps": result.fit.steps,
            "stopped_early": result.fit.stopped_early,
            "best_val_log_likelihood": result.fit.best_val_log_likelihood,
            "seconds": round(result.fit.seconds, 3),
            "method_metrics": getattr(result.fit, "metrics", {}),
            **(extra or {}),
        },
    }


def save_trained(
    result: TrainResult,
    data: Dataset,
    out_dir: str | Path,
    name: str,
    extra: dict | None = None,
    num_samples: dict[str, int] | None = None,
) -> Path:
    """Write `result.model` as a new checkpoint version of `name`; returns its folder."""
    manifest = build_manifest(result, data, extra, num_samples)
    return save_checkpoint(result.model, out_dir, name, manifest, result_files(result))


def result_files(result: TrainResult) -> dict[str, bytes]:
    """The checkpoint files a trained model brings beside its weights: the feature density
    its OOD flag reads, if any."""
    return {} if result.density is None else {DENSITY_FILE: result.density.to_bytes()}
