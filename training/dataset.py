"""The rows every data source ends up as: a `Dataset` (float32 inputs [N, *input_shape],
float32 [N, k] regression targets or int64 [N] class indices, names for the features and
outputs, the task), and `LoadedData`, training rows with optional test rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TASKS = ("regression", "classification")


class DataError(ValueError):
    """Data that cannot be loaded; the message says what is wrong and where."""


def read_text(path: Path) -> str:
    """A data file's text (a UTF-8 byte-order mark dropped), or a DataError saying why not."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such file") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text file") from exc


@dataclass
class Dataset:
    """Rows of one data set; `output_names` are target names or class labels (as strings)."""

    x: np.ndarray
    y: np.ndarray
    feature_names: list[str]
    output_names: list[str]
    task: str
    # a forecaster's windows (training.series): window, horizon, features, targets (feature
    # indices) and relative (outputs are changes from the window's last target values)
    forecast: dict | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise DataError(f"task must be one of {TASKS}, got {self.task!r}")
        self.x = np.asarray(self.x, dtype=np.float32)
        if self.x.ndim < 2:
            raise DataError(f"inputs must be [N, *input_shape], got shape {self.x.shape}")
        if self.task == "regression":
            self.y = np.asarray(self.y, dtype=np.float32)
            if self.y.ndim == 1:
                self.y = self.y[:, None]
        else:
            self.y = np.asarray(self.y, dtype=np.int64)
        if len(self.y) != len(self.x):
            raise DataError(f"{len(self.x)} input rows but {len(self.y)} targets")
        if self.x.ndim > 2 and self.feature_names:
            raise DataError("feature names apply to vector inputs [N, D] only")
        if self.x.ndim == 2 and len(self.feature_names) != self.x.shape[1]:
            raise DataError(
                f"{len(self.feature_names)} feature names for {self.x.shape[1]} input columns"
            )

    def __len__(self) -> int:
        return len(self.x)

    @property
    def num_features(self) -> int:
        return self.x.shape[1]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One row's shape: [D] for vectors, [C, H, W] for images, [T, F] for sequences."""
        return tuple(self.x.shape[1:])

    @property
    def num_outputs(self) -> int:
        """Targets (regression) or classes (classification)."""
        return len(self.output_names)

    def subset(self, rows: np.ndarray | Sequence[int]) -> Dataset:
        rows = np.asarray(rows, dtype=np.int64)
        return Dataset(
            self.x[rows],
            self.y[rows],
            self.feature_names,
            self.output_names,
            self.task,
            self.forecast,
        )


@dataclass
class LoadedData:
    """Training rows, optional test rows, and a JSON description of where they came from."""

    train: Dataset
    test: Dataset | None
    spec: dict = field(default_factory=dict)
