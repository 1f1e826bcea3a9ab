"""Loading training data: CSV files, UCI benchmark folders, image sets (training.images) and
built-in toy problems.

Every source ends up as a `Dataset` (training.dataset), and `load_data`
returns the training rows plus, when the source defines them, held-out test rows for the
final report (a UCI split's test rows, or fresh draws from a toy's distribution).
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np

from training import images
from training.dataset import TASKS, DataError, Dataset, LoadedData, read_text
from training.series import SERIES_PREFIX

TOY_PREFIX = "toy:"


# --------------------------------------------------------------------------- toy problems

SINE_GAP_NOISE_SD = 0.1
SINE_GAP_GAP = (-1.0, 1.0)
SINE_GAP_SUPPORT = ((-3.0, -1.0), (1.0, 3.0))
SINE_GAP_TRAIN_SIZE = 1000
MOONS_NOISE_SD = 0.1
MOONS_TRAIN_SIZE = 400
TOY_TEST_SIZE = 2000
TOY_DATA_SEED = 0  # toy training rows are the same for every run; --seed varies the fit only


def sine_gap_function(x: np.ndarray) -> np.ndarray:
    """The noise-free regression function of toy:sine-gap."""
    return np.sin(2.0 * x) + np.sign(x)


def sine_gap_sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` fresh (x [n, 1], y [n, 1]) pairs from toy:sine-gap's training distribution.

    x is uniform on [-3, -1] U [1, 3], so nothing is observed inside the gap (-1, 1);
    y = sin(2x) + sign(x) + N(0, 0.1^2), a noise level known exactly for coverage tests.
    The two sides sit at levels about 2 apart and nothing observed says how or where the
    function gets from one to the other, so a posterior should be unsure inside the gap.
    """
    gen = np.random.default_rng(seed)
    (a, b), (c, d) = SINE_GAP_SUPPORT
    left = gen.random(n) < 0.5
    u = gen.random(n)
    x = np.where(left, a + (b - a) * u, c + (d - c) * u)
    y = sine_gap_function(x) + SINE_GAP_NOISE_SD * gen.standard_normal(n)
    return x[:, None].astype(np.float32), y[:, None].astype(np.float32)


def moons_sample(n: int, seed: int, noise: float = MOONS_NOISE_SD) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaving half-moons (classes 0 and 1, about n/2 each) with Gaussian jitter."""
    gen = np.random.default_rng(seed)
    label = (gen.random(n) < 0.5).astype(np.int64)
    t = np.pi * gen.random(n)
    upper = np.stack([np.cos(t), np.sin(t)], axis=1)
    lower = np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], axis=1)
    x = np.where(label[:, None] == 0, upper, lower) + noise * gen.standard_normal((n, 2))
    return x.astype(np.float32), label


def _sine_gap(n: int, seed: int) -> Dataset:
    x, y = sine_gap_sample(n, seed)
    return Dataset(x, y, ["x"], ["y"], "regression")


def _moons(n: int, seed: int) -> Dataset:
    x, y = moons_sample(n, seed)
    return Dataset(x, y, ["x1", "x2"], ["0", "1"], "classification")


TOYS = {"sine-gap": (_sine_gap, SINE_GAP_TRAIN_SIZE), "moons": (_moons, MOONS_TRAIN_SIZE)}


def load_toy(name: str) -> LoadedData:
    """A toy's fixed training rows and fresh test rows from the same distribution."""
    if name not in TOYS:
        raise DataError(f"unknown toy {name!r}; known: {', '.join(TOY_PREFIX + t for t in TOYS)}")
    make, size = TOYS[name]
    train = make(size, TOY_DATA_SEED)
    test = make(TOY_TEST_SIZE, TOY_DATA_SEED + 1)
    return LoadedData(train, test, {"kind": "toy", "name": name, "train_rows": size})


# --------------------------------------------------------------------------- CSV files


def _as_float(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _label(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def load_csv(path: str | Path, target: str | None = None, task: str | None = None) -> LoadedData:
    """A CSV file with a header row; `target` (default: the last column) is predicted from
    every other column. A non-numeric target makes a classifier over its distinct values."""
    path = Path(path)
    text = read_text(path)
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise DataError(f"{path}: the file is empty")
    try:
        dialect = csv.Sniffer().sniff(lines[0], delimiters=",;\t")
        delimiter = dialect.delimiter
    except csv.Error:
        delimiter = ","
    rows = [row for row in csv.reader(lines, delimiter=delimiter) if any(c.strip() for c in row)]
    header = [name.strip() for name in rows[0]]
    body = rows[1:]
    if not body:
        raise DataError(f"{path}: a header row but no data rows")
    if len(header) < 2:
        raise DataError(f"{path}: need at least one feature column and a target column")
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise DataError(
                f"{path}: data row {i + 1} (line {i + 2}) has {len(row)} fields, "
                f"the header has {len(header)}"
            )
    target = header[-1] if target is None else target
    if target not in header:
        raise DataError(f"{path}: no column {target!r}; available columns: {', '.join(header)}")
    t = header.index(target)
    features = [name for j, name in enumerate(header) if j != t]
    x = np.empty((len(body), len(features)), dtype=np.float64)
    for i, row in enumerate(body):
        cells = [cell.strip() for j, cell in enumerate(row) if j != t]
        for j, cell in enumerate(cells):
            number = _as_float(cell)
            if number is None:
                what = "is empty" if cell == "" else f"is not a finite number: {cell!r}"
                raise DataError(
                    f"{path}: feature column {features[j]!r}, data row {i + 1} "
                    f"(line {i + 2}) {what}"
                )
            x[i, j] = number
    raw = [row[t].strip() for row in body]
    numbers = [_as_float(value) for value in raw]
    numeric = all(value is not None for value in numbers)
    task = task or ("regression" if numeric else "classification")
    if task == "regression":
        if not numeric:
            i = next(i for i, value in enumerate(numbers) if value is None)
            raise DataError(
                f"{path}: regression target {target!r} is not numeric at data row {i + 1} "
                f"(line {i + 2}): {raw[i]!r}; use --task classification for class labels"
            )
        train = Dataset(x, np.array(numbers)[:, None], features, [target], "regression")
    else:
        if any(value == "" for value in raw):
            i = raw.index("")
            raise DataError(f"{path}: target {target!r} is empty at data row {i + 1}")
        if numeric:  # numeric labels, ordered by value and named without a trailing ".0"
            classes = sorted(set(numbers))
            labels = [_label(value) for value in classes]
            index = {value: k for k, value in enumerate(classes)}
            y = np.array([index[value] for value in numbers])
        else:
            labels = sorted(set(raw))
            index = {value: k for k, value in enumerate(labels)}
            y = np.array([index[value] for value in raw])
        if len(labels) < 2:
            raise DataError(f"{path}: target {target!r} has a single class {labels[0]!r}")
        train = Dataset(x, y, features, labels, "classification")
    spec = {"kind": "csv", "path": str(path), "target": target}
    return LoadedData(train, None, spec)


# --------------------------------------------------------------------------- UCI folders

UCI_FILES = ("data.txt", "index_features.txt", "index_target.txt")


def is_uci_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and all((Path(path) / f).is_file() for f in UCI_FILES)


def _indices(path: Path) -> np.ndarray:
    # ndmin=1: several of these files hold a single number (and no trailing newline)
    return np.loadtxt(path, dtype=np.int64, ndmin=1)


def uci_num_splits(path: str | Path) -> int:
    path = Path(path)
    if (path / "n_splits.txt").is_file():
        return int(_indices(path / "n_splits.txt")[0])
    return len(list(path.glob("index_train_*.txt")))


def load_uci(path: str | Path, split: int | None = None, task: str | None = None) -> LoadedData:
    """A UCI benchmark folder (see the data's README); `split` K trains on the rows of
    index_train_K and reports on index_test_K; without a split every row is training data."""
    path = Path(path)
    data = np.loadtxt(path / "data.txt", ndmin=2)
    features = _indices(path / "index_features.txt")
    target = _indices(path / "index_target.txt")
    task = task or "regression"
    names = [f"x{j}" for j in features]
    outputs = [f"y{j}" for j in target]
    y = data[:, target]
    if task == "classification":
        if len(target) != 1:
            raise DataError(f"{path}: classification needs one target column")
        classes, y = np.unique(y[:, 0], return_inverse=True)
        outputs = [_label(float(c)) for c in classes]
    full = Dataset(data[:, features], y, names, outputs, task)
    spec = {"kind": "uci", "path": str(path), "name": path.name, "split": split}
    if split is None:
        return LoadedData(full, None, spec)
    n_splits = uci_num_splits(path)
    if not 0 <= split < n_splits:
        raise DataError(f"{path}: split {split} is out of range; it has splits 0..{n_splits - 1}")
    train = _indices(path / f"index_train_{split}.txt")
    test = _indices(path / f"index_test_{split}.txt")
    return LoadedData(full.subset(train), full.subset(test), spec)


# --------------------------------------------------------------------------- dispatch


def load_data(
    spec: str,
    target: str | None = None,
    split: int | None = None,
    task: str | None = None,
) -> LoadedData:
    """Load `spec`: `toy:NAME`, an image set (training.images), a UCI folder, a folder of
    class folders of images, or a CSV file; `task` overrides the inferred one."""

    if task is not None and task not in TASKS:
        raise DataError(f"task must be one of {TASKS}, got {task!r}")
    if spec.startswith(TOY_PREFIX):
        if target is not None or split is not None:
            raise DataError("--target and --split do not apply to toy data")
        loaded = load_toy(spec[len(TOY_PREFIX) :])
        if task is not None and task != loaded.train.task:
            raise DataError(f"{spec} is a {loaded.train.task} problem, not {task}")
        return loaded
    path = Path(spec)
    if spec in images.IMAGE_SETS or (path.is_dir() and images.is_image_folder(path)):
        if target is not None or split is not None:
            raise DataError("--target and --split do not apply to image data")
        if task not in (None, "classification"):
            raise DataError(f"{spec} is a classification problem, not {task}")
        if spec in images.IMAGE_SETS:
            return images.IMAGE_SETS[spec]()
        return images.load_image_folder(path)
    if path.is_dir():
        if not is_uci_folder(path):
            raise DataError(
                f"{path}: a folder must be in the UCI format ({', '.join(UCI_FILES)}, "
                "index_train_K.txt, index_test_K.txt) or hold one folder of images per class"
            )
        if target is not None:
            raise DataError("--target does not apply to a UCI folder (index_target.txt names it)")
        return load_uci(path, split, task)
    if split is not None:
        raise DataError("--split applies only to UCI folders")
    if not path.exists():
        raise DataError(
            f"{spec}: no such file or folder (expected a CSV file, a UCI folder, a folder of "
            f"image folders, one of {', '.join(TOY_PREFIX + t for t in TOYS)}, or an image set: "
            f"{', '.join(images.IMAGE_SETS)})"
        )
    return load_csv(path, target, task)


def slug(spec: str, split: int | None = None) -> str:
    """A checkpoint name derived from a data spec: `toy:sine-gap` -> `sine-gap`,
    `series:co2` -> `co2`, `.../uci/yacht` with split 3 -> `yacht-split3`, `houses.csv` ->
    `houses`."""
    prefix = next((p for p in (TOY_PREFIX, SERIES_PREFIX) if spec.startswith(p)), None)
    if prefix is not None:
        base = spec[len(prefix) :]
    else:
        path = Path(spec)
        base = path.name if path.is_dir() else path.stem
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._") or "model"
    if split is not None:
        name = f"{name}-split{split}"
    return name[:64]
