"""Data loading: CSV files, UCI benchmark folders, toy problems."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.data import (
    SINE_GAP_GAP,
    TOY_TEST_SIZE,
    DataError,
    load_data,
    moons_sample,
    sine_gap_sample,
    slug,
)

UCI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "uci"
needs_uci = pytest.mark.skipif(
    not (UCI / "yacht").is_dir(), reason=f"UCI benchmark data not found at {UCI}"
)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------- CSV


def test_csv_regression_defaults_to_the_last_column(tmp_path):
    path = write(tmp_path / "houses.csv", "rooms,area,price\n3,70.5,200\n4,90,310.5\n2,40,150\n")
    loaded = load_data(str(path))
    train = loaded.train
    assert train.task == "regression"
    assert train.feature_names == ["rooms", "area"]
    assert train.output_names == ["price"]
    assert train.x.dtype == np.float32 and train.x.shape == (3, 2)
    assert train.y.dtype == np.float32 and train.y.shape == (3, 1)
    np.testing.assert_allclose(train.y[:, 0], [200, 310.5, 150])
    assert loaded.test is None


def test_csv_named_target_in_the_middle(tmp_path):
    path = write(tmp_path / "d.csv", "a,y,b\n1,10,2\n3,30,4\n")
    train = load_data(str(path), target="y").train
    assert train.feature_names == ["a", "b"]
    np.testing.assert_allclose(train.x, [[1, 2], [3, 4]])
    np.testing.assert_allclose(train.y[:, 0], [10, 30])


def test_csv_string_target_means_classification(tmp_path):
    path = write(tmp_path / "iris.csv", "w,h,kind\n1,2,setosa\n3,4,virginica\n5,6,setosa\n")
    train = load_data(str(path), target="kind").train
    assert train.task == "classification"
    assert train.output_names == ["setosa", "virginica"]  # sorted, so the order is stable
    assert train.y.dtype == np.int64
    assert train.y.tolist() == [0, 1, 0]


def test_csv_numeric_labels_with_task_classification(tmp_path):
    path = write(tmp_path / "d.csv", "x,label\n0.5,1\n0.1,0\n0.7,1.0\n0.2,2\n")
    train = load_data(str(path), task="classification").train
    assert train.output_names == ["0", "1", "2"]
    assert train.y.tolist() == [1, 0, 1, 2]


def test_csv_semicolon_delimiter(tmp_path):
    path = write(tmp_path / "d.csv", "a;b;y\n1;2;3\n4;5;6\n")
    assert load_data(str(path)).train.feature_names == ["a", "b"]


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ("a,b,y\n1,2,3\n", {"target": "price"}, "no column 'price'; available columns: a, b, y"),
        ("a,b,y\n1,2,3\n4,oops,6\n", {}, "feature column 'b', data row 2 (line 3)"),
        ("a,b,y\n1,,3\n", {}, "feature column 'b', data row 1 (line 2) is empty"),
        ("", {}, "the file is empty"),
        ("a,b,y\n", {}, "no data rows"),
        ("a,b,y\n1,2\n", {}, "data row 1 (line 2) has 2 fields, the header has 3"),
        ("a,y\n1,red\n2,red\n", {}, "single class 'red'"),
        ("a,y\n1,red\n2,blue\n", {"task": "regression"}, "use --task classification"),
    ],
)
def test_csv_errors_say_what_and_where(tmp_path, text, kwargs, message):
    path = write(tmp_path / "bad.csv", text)
    with pytest.raises(DataError) as info:
        load_data(str(path), **kwargs)
    assert message in str(info.value)


def test_missing_file_and_misplaced_options(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_data(str(tmp_path / "nope.csv"))
    path = write(tmp_path / "d.csv", "a,y\n1,2\n3,4\n")
    with pytest.raises(DataError, match="--split applies only to UCI folders"):
        load_data(str(path), split=0)
    with pytest.raises(DataError, match="do not apply to toy data"):
        load_data("toy:sine-gap", target="y")
    with pytest.raises(DataError, match="unknown toy 'nope'"):
        load_data("toy:nope")


# ----------------------------------------------------------------------------------- UCI


@needs_uci
def test_uci_split_rows_match_the_index_files():
    folder = UCI / "yacht"
    data = np.loadtxt(folder / "data.txt")
    features = np.loadtxt(folder / "index_features.txt", dtype=int, ndmin=1)
    target = np.loadtxt(folder / "index_target.txt", dtype=int, ndmin=1)
    train_rows = np.loadtxt(folder / "index_train_3.txt", dtype=int, ndmin=1)
    test_rows = np.loadtxt(folder / "index_test_3.txt", dtype=int, ndmin=1)
    assert not set(train_rows) & set(test_rows)

    loaded = load_data(str(folder), split=3)
    assert loaded.train.task == "regression"
    assert len(loaded.train) == len(train_rows) and len(loaded.test) == len(test_rows)
    assert len(loaded.train) + len(loaded.test) == len(data)
    np.testing.assert_allclose(loaded.train.x, data[train_rows][:, features], rtol=1e-6)
    np.testing.assert_allclose(loaded.test.y, data[test_rows][:, target], rtol=1e-6)
    assert loaded.spec["split"] == 3


@needs_uci
def test_uci_without_split_trains_on_every_row_and_rejects_bad_splits():
    loaded = load_data(str(UCI / "yacht"))
    assert loaded.test is None and len(loaded.train) == 308
    with pytest.raises(DataError, match="split 20 is out of range"):
        load_data(str(UCI / "yacht"), split=20)


def test_folder_that_is_not_uci(tmp_path):
    with pytest.raises(DataError, match="UCI format"):
        load_data(str(tmp_path))


# ----------------------------------------------------------------------------------- toys


def test_sine_gap_has_no_training_inputs_in_the_gap():
    loaded = load_data("toy:sine-gap")
    x = loaded.train.x[:, 0]
    lo, hi = SINE_GAP_GAP
    assert not np.any((x > lo) & (x < hi))
    assert loaded.train.task == "regression"
    assert len(loaded.test) == TOY_TEST_SIZE >= 2000
    # fresh draws: reproducible per seed, different across seeds
    a, b = sine_gap_sample(50, seed=1), sine_gap_sample(50, seed=1)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], sine_gap_sample(50, seed=2)[0])


def test_moons_two_balanced_classes():
    x, y = moons_sample(1000, seed=0)
    assert x.shape == (1000, 2) and set(np.unique(y)) == {0, 1}
    assert 0.4 < y.mean() < 0.6
    loaded = load_data("toy:moons")
    assert loaded.train.task == "classification"
    assert loaded.train.output_names == ["0", "1"]
    with pytest.raises(DataError, match="is a classification problem"):
        load_data("toy:moons", task="regression")


def test_slug():
    assert slug("toy:sine-gap") == "sine-gap"
    assert slug("/data/houses 2024.csv") == "houses-2024"
    assert slug("/x/uci/yacht", split=3) == "yacht-split3"
