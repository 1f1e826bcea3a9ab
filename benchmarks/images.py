"""Image classifiers with uncertainty: accuracy, calibration and out-of-distribution detection.

Trains an MC-dropout CNN and a 5-member CNN ensemble on Fashion-MNIST (Debian's
dataset-fashion-mnist: 60,000 training images, 10,000 test), each with credence-train's own
training code on this machine's cores, and an MC-dropout CNN on MNIST-5k for the reverse pair.
Reports, on the in-distribution test set: accuracy, NLL, Brier score and ECE (15 bins), with
and without temperature scaling (T fitted on the validation rows), and a reliability diagram;
and OOD detection (AUROC, AUPR, FPR at 95% TPR) by mutual information, predictive entropy,
max-softmax and the density of the penultimate features (training.density, fitted by the
trainer on the fit rows: the score the checkpoint's OOD flag serves) against MNIST-5k (all
5,000 images), Gaussian noise images (N(0.5, 1) clipped to [0, 1]) and uniform noise
images, 2,000 each.

    .venv/bin/python benchmarks/images.py [--quick] [--models models-images]

Writes docs/results/images.md and docs/results/images-reliability.png (--out NAME.md: and
NAME-reliability.png); the checkpoints go to --models.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from machine import machine_line, machine_record

from training.data import load_data
from training.density import density_scores
from training.fit import FitOptions, holdout_split
from training.images import noise_images
from training.metrics import (
    classification_metrics,
    fit_temperature,
    reliability_bins,
    sample_draws,
)
from training.ood import detection, detection_scores
from training.summaries import summarize
from training.train import DEFAULT_VAL_FRACTION, save_trained, train_model

DRAWS = 32
NOISE_IMAGES = 2000
SCORES = ("mutual_information", "entropy", "max_softmax", "feature_density")
PUBLISHED = (  # Fashion-MNIST in, MNIST out: AUROC
    "5-member deep ensemble 0.861; DUQ 0.955; Mahalanobis 0.942 (van Amersfoort et al. 2020, "
    "as re-quoted by Nguyen et al., Table 8). Max-softmax against uniform noise on MNIST: 0.99 "
    "(Hendrycks & Gimpel 2017, Table 2)."
)


@dataclass
class Run:
    name: str
    method: str
    method_options: dict
    conv: list[int]
    hidden: list[int]
    epochs: int
    data: str = "fashion-mnist"
    results: dict = field(default_factory=dict)


def runs(quick: bool) -> list[Run]:
    epochs = 2 if quick else None
    return [
        Run("mc-dropout-cnn", "mc_dropout", {"dropout": 0.1}, [32, 64], [128], epochs or 20),
        Run("ensemble-cnn", "ensemble", {"members": 5}, [16, 32], [64], epochs or 15),
        Run("laplace-cnn", "laplace", {}, [32, 64], [128], epochs or 15),
        Run(
            "mnist-mc-dropout-cnn",
            "mc_dropout",
            {"dropout": 0.1},
            [32, 64],
            [128],
            epochs or 40,
            data="mnist-5k",
        ),
    ]


def scores(draws: torch.Tensor, density: np.ndarray) -> dict[str, np.ndarray]:
    return detection_scores("classification", summarize("classification", draws, []), density)


def evaluate(run: Run, out_dir: Path, threads: int) -> None:
    loaded = load_data(run.data)
    train, test = loaded.train, loaded.test
    options = FitOptions(
        lr=1e-3,
        batch_size=128,
        epochs=run.epochs,
        patience=None,
        evaluations=5,
        val_samples=4,
        seed=0,
        threads=threads,
    )
    start = time.perf_counter()
    result = train_model(
        train,
        test,
        method=run.method,
        method_options=run.method_options,
        arch="cnn",
        hidden=run.hidden,
        arch_options={"conv": run.conv},
        options=options,
        eval_samples=DRAWS,
    )
    total = time.perf_counter() - start
    save_trained(result, train, out_dir, run.name)
    model = result.model
    _, val_rows = holdout_split(len(train), DEFAULT_VAL_FRACTION, options.seed)
    val = train.subset(val_rows)
    with torch.inference_mode():
        temperature = fit_temperature(sample_draws(model, val.x, DRAWS, 1), val.y)
        test_draws = sample_draws(model, test.x, DRAWS, 2)
        plain = classification_metrics(test_draws, test.y)
        scaled = classification_metrics(test_draws / temperature, test.y)
        in_scores = scores(test_draws, density_scores(model, result.density, test.x))
        probabilities = summarize("classification", test_draws, [])["probabilities"]
        scaled_probabilities = summarize("classification", test_draws / temperature, [])[
            "probabilities"
        ]
        other = "mnist-5k" if run.data == "fashion-mnist" else "fashion-mnist"
        other_data = load_data(other)
        outs = {
            other: np.concatenate(
                [other_data.train.x, other_data.test.x]
                if other == "mnist-5k"
                else [other_data.test.x]
            ),
            "gaussian noise": noise_images("gaussian", NOISE_IMAGES, train.input_shape, 3),
            "uniform noise": noise_images("uniform", NOISE_IMAGES, train.input_shape, 4),
        }
        ood = {}
        for name, x in outs.items():
            out_scores = scores(
                sample_draws(model, x, DRAWS, 5), density_scores(model, result.density, x)
            )
            ood[name] = {s: detection(in_scores[s], out_scores[s]) for s in SCORES}
    run.results = {
        "seconds": total,
        "fit_seconds": result.fit.seconds,
        "epochs": result.fit.epochs_run,
        "images_per_second": result.fit.epochs_run * result.config["fit_rows"] / result.fit.seconds,
        "plain": plain,
        "scaled": scaled,
        "temperature": temperature,
        "ood": ood,
        "reliability": reliability_bins(probabilities, torch.as_tensor(test.y)),
        "reliability_scaled": reliability_bins(scaled_probabilities, torch.as_tensor(test.y)),
    }


def plot(done: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(done), figsize=(4 * len(done), 4), squeeze=False)
    for ax, run in zip(axes[0], done, strict=True):
        for key, label in (("reliability", "as trained"), ("reliability_scaled", "temperature")):
            bins = run.results[key]
            ax.plot(bins["confidence"], bins["accuracy"], "o-", label=label)
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(title=f"{run.name} ({run.data})", xlabel="confidence", ylabel="accuracy")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def report(done: list[Run], command: str, threads: int, out: Path) -> str:
    lines = [
        "# Images: accuracy, calibration and OOD detection",
        "",
        f"Each model is trained by `train_model` (what credence-train runs) on {threads} "
        f'threads, then evaluated with {DRAWS} posterior draws per image. "training" is the '
        'fit (epochs and validation checks), "with evaluation" all of `train_model` (also '
        "the validation, OOD-reference and test draws); images/s counts the fit rows of every "
        "epoch over the fit's time. Temperature T is fitted on the validation rows (20% of the "
        "training images, held out by the trainer).",
        "",
        "| model | data | epochs | training (s) | with evaluation (s) | images/s trained | "
        "accuracy | NLL | Brier | ECE | T | NLL (T) | ECE (T) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in done:
        r, p, s = run.results, run.results["plain"], run.results["scaled"]
        lines.append(
            f"| {run.name} | {run.data} | {r['epochs']} | {r['fit_seconds']:.0f} | "
            f"{r['seconds']:.0f} | "
            f"{r['images_per_second']:.0f} | {p['accuracy']:.4f} | {p['nll']:.4f} | "
            f"{p['brier']:.4f} | {p['ece']:.4f} | {r['temperature']:.3f} | {s['nll']:.4f} | "
            f"{s['ece']:.4f} |"
        )
    lines += [
        "",
        "OOD detection, in-distribution test images against each OOD set (AUROC / AUPR / "
        "FPR at 95% TPR):",
        "",
        "| model | OOD set | " + " | ".join(SCORES) + " |",
        "|---|---|" + "---|" * len(SCORES),
    ]
    for run in done:
        for name, by_score in run.results["ood"].items():
            cells = [
                f"{m['auroc']:.3f} / {m['aupr']:.3f} / {m['fpr_at_95_tpr']:.3f}"
                for m in (by_score[s] for s in SCORES)
            ]
            lines.append(f"| {run.name} ({run.data}) | {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Published marks: {PUBLISHED}",
        "",
        f"![reliability diagrams]({out.stem}-reliability.png)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_line(machine_record(), threads)}",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs each (a smoke run)")
    parser.add_argument("--models", type=Path, default=Path("models-images"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help="comma-separated run names")
    parser.add_argument("--out", type=Path, default=Path("docs/results/images.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chosen = [r for r in runs(args.quick) if not args.only or r.name in args.only.split(",")]
    for run in chosen:
        print(f"{run.name}: training on {run.data} ...", file=sys.stderr, flush=True)
        evaluate(run, args.models, args.threads)
        print(f"{run.name}: {run.results['plain']} in {run.results['seconds']:.0f} s", flush=True)
    command = "python benchmarks/images.py " + " ".join(sys.argv[1:])
    text = report(chosen, command, args.threads, args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    plot(chosen, args.out.with_name(f"{args.out.stem}-reliability.png"))
    print(text)


if __name__ == "__main__":
    main()
