"""Shared fixtures: small random-weight checkpoints on disk and clients for the service."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from anyio.from_thread import BlockingPortal, start_blocking_portal
from fastapi import FastAPI

from service.app import create_app
from service.settings import Settings
from training.build import build_model
from training.checkpoint import WEIGHTS, save_checkpoint
from training.model import PosteriorModel

FEATURES = ["a", "b", "c"]
CLASSES = ["setosa", "versicolor", "virginica"]

REGRESSION = {
    "method": "mc_dropout",
    "arch": {"in_features": 3, "hidden": [16], "dropout": 0.1},
    "likelihood": {"kind": "gaussian", "num_targets": 1, "noise": "homoscedastic"},
}
CLASSIFICATION = {
    "method": "mc_dropout",
    "arch": {"in_features": 4, "hidden": [16], "dropout": 0.2},
    "likelihood": {"kind": "categorical", "num_classes": 3},
}


def regression_model(seed: int = 0) -> PosteriorModel:
    torch.manual_seed(seed)
    stats = {"x_mean": [0.0] * 3, "x_std": [1.0] * 3, "y_mean": [0.5], "y_std": [2.0]}
    return build_model(REGRESSION, stats)


def classification_model(seed: int = 0) -> PosteriorModel:
    torch.manual_seed(seed)
    return build_model(CLASSIFICATION, {"x_mean": [0.0] * 4, "x_std": [1.0] * 4})


def regression_manifest() -> dict:
    return {
        "input": {"shape": [3], "dtype": "float32", "feature_names": FEATURES},
        "output": {"names": ["y"]},
        "num_samples": {"default": 50, "max": 500},
        "calibration": None,
        "metrics": {"test_rmse": 0.5},
    }


def classification_manifest() -> dict:
    return {
        "input": {"shape": [4], "dtype": "float32", "feature_names": None},
        "output": {"names": CLASSES},
        "num_samples": {"default": 40, "max": 400},
        "calibration": None,
        "metrics": {"test_accuracy": 0.9},
    }


def tamper(version_dir: Path) -> None:
    """Flip one bit of the last byte of the weights (tensor data, so the file still parses)."""
    weights = version_dir / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """reg, clf: one good version each; twin: v1 good, v2 tampered; broken: v1 tampered."""
    root = tmp_path_factory.mktemp("models")
    save_checkpoint(regression_model(), root, "reg", regression_manifest())
    save_checkpoint(classification_model(), root, "clf", classification_manifest())
    save_checkpoint(regression_model(1), root, "twin", regression_manifest())
    tamper(save_checkpoint(regression_model(2), root, "twin", regression_manifest()))
    tamper(save_checkpoint(regression_model(3), root, "broken", regression_manifest()))
    return root


def make_settings(model_dir: Path, **overrides: object) -> Settings:
    values = {"model_dir": model_dir, "device": "cpu", "max_batch_delay_ms": 1.0}
    return Settings(**{**values, **overrides})


@asynccontextmanager
async def async_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client with the app's lifespan running (models loaded, batchers on)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


class Client:
    """Blocking calls into an app whose event loop runs on a portal thread, so that tests
    stay plain functions and one app can serve a whole module; `gather` sends requests
    concurrently, which is what the batcher needs to see."""

    def __init__(self, app: FastAPI, portal: BlockingPortal, client: httpx.AsyncClient):
        self.app, self.portal, self.client = app, portal, client

    def get(self, url: str, **kwargs: object) -> httpx.Response:
        return self.portal.call(partial(self.client.get, url, **kwargs))

    def post(self, url: str, **kwargs: object) -> httpx.Response:
        return self.portal.call(partial(self.client.post, url, **kwargs))

    def gather(self, *calls: tuple[str, dict]) -> list[httpx.Response]:
        """POST each (url, json body) at once; the responses in the same order."""

        async def send() -> list[httpx.Response]:
            return await asyncio.gather(*(self.client.post(u, json=b) for u, b in calls))

        return self.portal.call(send)


@contextmanager
def serve(settings: Settings) -> Iterator[Client]:
    app = create_app(settings)
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(async_client(app)) as client,
    ):
        yield Client(app, portal, client)


@pytest.fixture(scope="module")
def client(model_dir: Path) -> Iterator[Client]:
    with serve(make_settings(model_dir)) as client:
        yield client


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        metric, _, rest = key.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if metric == name and got == want:
            return float(value)
    return 0.0


def reordering_tolerance(model: PosteriorModel, draws: torch.Tensor) -> dict[str, float]:
    """rtol and atol for two float32 evaluations of the same draws whose products add their
    terms in different orders (other kernels, other chunks). Each is within gamma_K times
    sum_k |x_k w_k| of the exact product, gamma_K = K u / (1 - K u), u = 2^-24 (Higham 2002,
    eq. 3.4), and an error passes through at most every layer; for these small random
    layers sum_k |x_k w_k| is within a factor 4 of the largest output (the margin for
    cancellation), so the outputs agree to 2 * layers * gamma_K * 4 of that scale."""
    widths = [p.shape[-1] for p in model.parameters() if p.dim() >= 2]
    fan_in, layers = max(widths), len(widths)
    u = 2.0**-24
    gamma = fan_in * u / (1 - fan_in * u)
    tol = 2 * layers * gamma * 4
    return {"rtol": tol, "atol": tol * float(draws.abs().max())}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def listening(settings: Settings) -> Iterator[str]:
    """The app on a real uvicorn server, 127.0.0.1 and a free port, in a thread: for clients
    that need a socket (tritonclient, raw HTTP). Yields "127.0.0.1:PORT"."""
    with listening_app(create_app(settings)) as address:
        yield address


@contextmanager
def listening_app(app: FastAPI) -> Iterator[str]:
    """`listening` for an app the test holds on to (to look at its state)."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
