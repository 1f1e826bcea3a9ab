"""ONNX export and CREDENCE_BACKEND=onnx: the graph is the sampler, seeded masks included."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import (
    classification_manifest,
    classification_model,
    make_settings,
    regression_manifest,
    regression_model,
    serve,
)
from pydantic import ValidationError

from service.cli import load_settings
from service.onnx_backend import OnnxSampler
from service.settings import Settings
from training import cli as train_cli
from training import onnx_export, rng
from training.build import build_model
from training.checkpoint import ONNX, CheckpointError, read_checkpoint, save_checkpoint
from training.model import PosteriorModel
from training.onnx_export import ExportError, export_checkpoint, export_files, run_draws, session

STATS = {"x_mean": [0.5, -1.0, 2.0], "x_std": [1.5, 0.5, 3.0], "y_mean": [1.0], "y_std": [2.0]}
GAUSSIAN = {"kind": "gaussian", "num_targets": 1, "noise": "homoscedastic"}
MODELS = {  # every head, activation and dropout placement the exporter writes
    "homoscedastic": {"arch": {"in_features": 3, "hidden": [32, 16], "dropout": 0.1}},
    "heteroscedastic-gelu-input-dropout": {
        "arch": {
            "in_features": 3,
            "hidden": [24],
            "dropout": 0.3,
            "input_dropout": True,
            "activation": "gelu",
        },
        "likelihood": {"kind": "gaussian", "num_targets": 2, "noise": "heteroscedastic"},
        "stats": {**STATS, "y_mean": [1.0, -3.0], "y_std": [2.0, 0.25]},
    },
    "fixed-noise-tanh": {
        "arch": {"in_features": 3, "hidden": [17], "dropout": 0.2, "activation": "tanh"},
        "likelihood": {
            "kind": "gaussian",
            "num_targets": 1,
            "noise": "fixed",
            "noise_variance": 0.3,
        },
    },
    "classifier": {
        "arch": {"in_features": 3, "hidden": [20, 20], "dropout": 0.25},
        "likelihood": {"kind": "categorical", "num_classes": 4},
        "stats": {"x_mean": STATS["x_mean"], "x_std": STATS["x_std"]},
    },
    "no-dropout": {"arch": {"in_features": 3, "hidden": [8], "dropout": 0.0}},
    "ensemble": {"method": "ensemble", "arch": {"in_features": 3, "hidden": [8], "members": 5}},
}


def build(kind: str, seed: int = 0) -> PosteriorModel:
    spec = MODELS[kind]
    torch.manual_seed(seed)
    config = {
        "method": spec.get("method", "mc_dropout"),
        "arch": spec["arch"],
        "likelihood": spec.get("likelihood", GAUSSIAN),
    }
    return build_model(config, spec.get("stats", STATS))


def inputs(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs in original units around the training statistics, and one seed per row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.tensor(STATS["x_mean"]) + torch.tensor(STATS["x_std"]) * torch.randn(
        rows, 3, generator=gen
    )
    return x, torch.randint(0, 2**62, (rows,), generator=gen)


def onnx_draws(data: bytes, x: torch.Tensor, n: int, seeds: torch.Tensor, **kw) -> np.ndarray:
    return run_draws(session(data, **kw), x.numpy(), n, seeds.numpy())


@pytest.fixture(scope="module")
def graphs() -> dict[str, tuple[PosteriorModel, bytes]]:
    out = {}
    for kind in MODELS:
        model = build(kind)
        out[kind] = (model, export_files(model)[0][ONNX])
    return out


# --- the hash -----------------------------------------------------------------------------


@pytest.mark.parametrize(("stream", "size", "p"), [(0, 64, 0.9), (3, 33, 0.5), (7, 5, 0.05)])
@pytest.mark.parametrize("level", ["all", "none"])
def test_hash_stages_equal_training_rng_bit_for_bit(stream, size, p, level):
    gen = torch.Generator().manual_seed(stream)
    extremes = [0, 1, -1, 2**32 - 1, 2**32, 2**62 + 5, 2**63 - 1, -(2**63)]
    seeds = torch.cat(
        [torch.randint(-(2**63), 2**63 - 1, (40,), generator=gen), torch.tensor(extremes)]
    )
    n = 13
    probe = session(onnx_export.rng_probe(stream, size, p).SerializeToString(), level=level)
    names = [o.name for o in probe.get_outputs()]
    got = dict(zip(names, probe.run(None, {"seeds": seeds.numpy(), "n": np.array(n)}), strict=True))
    keys = rng.draw_keys(seeds, n, stream)
    np.testing.assert_array_equal(got["seed_keys"].astype(np.int64), rng.seed_keys(seeds).numpy())
    np.testing.assert_array_equal(got["draw_keys"].astype(np.int64), keys.numpy())
    np.testing.assert_array_equal(got["bits"].astype(np.int64), rng.bits(keys, size).numpy())
    np.testing.assert_array_equal(got["bernoulli"], rng.bernoulli(keys, size, p).numpy())


# --- the draws ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_draws_equal_pytorch_up_to_float_rounding(graphs, kind):
    """Same masks, same members: only the matrix products round differently."""
    model, data = graphs[kind]
    x, seeds = inputs(1000)
    seeds[500:] = seeds[0]  # half the rows share one seed, like the rows of one request
    expected = model.sample(x, 100, seeds).numpy()
    got = onnx_draws(data, x, 100, seeds)
    assert got.shape == expected.shape and got.dtype == np.float32
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * scale)


def test_predictive_mean_and_std_agree_within_monte_carlo_error(graphs):
    """Independent seeds for the two runtimes: a distributional test, not the same draws.

    Per input, z = (difference of the two estimates) / (its Monte-Carlo standard error), for
    the mean and the variance of the per-draw means (the delta-method error of a variance
    uses the fourth central moment). Distinct seeds per row make the 1,000 z's independent:
    under agreement they are close to N(0, 1), so max |z| < 5 fails by chance about once in
    2,000 runs, and mean z^2 lies within 0.25 of 1 (sd sqrt(2 / 1000) = 0.045).
    """
    model, data = graphs["homoscedastic"]
    n, rows = 200, 1000
    x, _ = inputs(rows, seed=1)
    seeds = torch.arange(rows, dtype=torch.int64)
    a = model.sample(x, n, seeds)[..., 0].double().numpy()  # per-draw means [n, rows]
    b = onnx_draws(data, x, n, seeds + 10**6)[..., 0].astype(np.float64)

    def moments(d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        mean, var = d.mean(0), d.var(0, ddof=1)
        m4 = ((d - mean) ** 4).mean(0)
        return mean, var / n, var, np.maximum(m4 - var**2, 1e-30) / n

    mean_a, se2_mean_a, var_a, se2_var_a = moments(a)
    mean_b, se2_mean_b, var_b, se2_var_b = moments(b)
    z_mean = (mean_a - mean_b) / np.sqrt(se2_mean_a + se2_mean_b)
    z_var = (var_a - var_b) / np.sqrt(se2_var_a + se2_var_b)
    for z in (z_mean, z_var):
        assert np.abs(z).max() < 5
        assert abs(np.mean(z**2) - 1) < 0.25
    assert np.all(var_b > 0)  # the ONNX draws do vary


def test_same_seed_same_draws_other_seed_other_draws(graphs):
    _, data = graphs["classifier"]
    x, _ = inputs(8)
    seeds = torch.full((8,), 42)
    first = onnx_draws(data, x, 50, seeds)
    again = onnx_draws(data, x, 50, seeds)  # a fresh session
    np.testing.assert_array_equal(first, again)
    other = onnx_draws(data, x, 50, seeds + 1)
    assert np.mean(first != other) > 0.9
    # a request's draws do not depend on the rows it is batched with
    mixed = torch.cat([seeds[:3], torch.arange(5) + 100])
    np.testing.assert_array_equal(onnx_draws(data, x, 50, mixed)[:, :3], first[:, :3])


def test_the_backend_gives_a_request_its_bits_alone_and_in_a_batch(graphs):
    """The server's onnx sampler runs the graph once per request, so a request's products
    have its own shape whatever it is batched with."""
    model, data = graphs["classifier"]
    sampler = OnnxSampler(data, model.task)
    x, _ = inputs(7)
    sizes = [2, 1, 4]
    seeds = torch.tensor([5, 5, 5, 9, 9, 9, 9])  # the first two requests share a seed
    batch = sampler.sample(x, 30, seeds, sizes)
    for a, b in ((0, 2), (2, 3), (3, 7)):
        assert torch.equal(sampler.sample(x[a:b], 30, seeds[a:b], [b - a]), batch[:, a:b])


def test_dropout_survives_graph_optimization(graphs, tmp_path):
    """ORT_ENABLE_ALL's optimized graph, written to disk and run as written, still has
    seeded masks: draws differ across the sample axis, with PyTorch's variance."""
    model, data = graphs["homoscedastic"]
    optimized = tmp_path / "optimized.onnx"
    session(data, level="all", optimized_path=optimized)
    ops = {node.op_type for node in onnx.load(str(optimized)).graph.node}
    assert {"BitwiseXor", "BitShift", "Less"} <= ops and "Dropout" not in ops
    x, seeds = inputs(4)
    n = 400
    got = onnx_draws(optimized.read_bytes(), x, n, seeds, level="none")[..., 0]
    expected = model.sample(x, n, seeds)[..., 0].numpy()
    for row in range(4):  # a new mask per draw (some masks drop only inactive units)
        assert len(np.unique(got[:, row])) == len(np.unique(expected[:, row])) > n / 2
    np.testing.assert_allclose(got.var(0), expected.var(0), rtol=1e-4)
    assert np.all(got.var(0) > 1e-4 * np.abs(got.mean(0)).max() ** 2)


# --- the service --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """reg, clf: exported; plain: no model.onnx; vi: a variational model (does not export)."""
    root = tmp_path_factory.mktemp("onnx-models")
    for name, model, manifest in (
        ("reg", regression_model(), regression_manifest()),
        ("clf", classification_model(), classification_manifest()),
    ):
        export_checkpoint(read_checkpoint(save_checkpoint(model, root, name, manifest)))
    save_checkpoint(regression_model(1), root, "plain", regression_manifest())
    torch.manual_seed(0)
    config = {"method": "variational", "arch": {"in_features": 3, "hidden": [8]}}
    vi = build_model({**config, "likelihood": GAUSSIAN}, {**STATS, "x_mean": [0.0] * 3})
    save_checkpoint(vi, root, "vi", regression_manifest())
    return root


def assert_close_json(a: object, b: object, path: str = "") -> None:
    """Same structure and strings; numbers equal to float32 rounding of the draws."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            assert_close_json(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            assert_close_json(u, v, f"{path}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (path, a, b)
    else:
        assert a == b, path


def test_served_onnx_answers_equal_torch_answers(model_dir):
    requests = {
        "reg": [[0.1, 0.2, 0.3], [1.0, -1.0, 0.0]],
        "clf": [[0.5, 0.25, -1.0, 2.0]],
    }
    answers = {}
    for backend in ("torch", "onnx"):
        with serve(make_settings(model_dir, backend=backend)) as client:
            for name, rows in requests.items():
                body = {"instances": rows, "parameters": {"seed": 7, "credible_levels": [0.5, 0.9]}}
                response = client.post(f"/v1/models/{name}:predict", json=body)
                assert response.status_code == 200, response.text
                answers[backend, name] = response.json()
            if backend == "onnx":  # batched with other requests: the same bytes as alone
                url, body = (
                    "/v1/models/reg:predict",
                    {
                        "instances": requests["reg"],
                        "parameters": {"seed": 7, "credible_levels": [0.5, 0.9]},
                    },
                )
                others = [
                    (url, {"instances": [[0.5, 0.5, 0.5]] * 3, "parameters": {"seed": s}})
                    for s in (1, 2)
                ]
                batched = client.gather(others[0], (url, body), others[1])
                assert batched[1].json() == answers["onnx", "reg"]
    for name in requests:
        assert_close_json(answers["torch", name], answers["onnx", name])
    # in a worker process the same graph and session options give the same bytes
    with serve(make_settings(model_dir, backend="onnx", batch_workers=1)) as client:
        for name, rows in requests.items():
            body = {"instances": rows, "parameters": {"seed": 7, "credible_levels": [0.5, 0.9]}}
            response = client.post(f"/v1/models/{name}:predict", json=body)
            assert response.json() == answers["onnx", name]
            # the worker computes: the server dropped its own session
            assert client.app.state.registry.resolve(name).model.session is None


def test_onnx_backend_names_the_model_without_model_onnx_and_how_to_export(model_dir):
    with serve(make_settings(model_dir, backend="onnx")) as client:
        plain = client.get("/v1/models/plain").json()["versions"][0]
        assert plain["state"] == "failed"
        assert "'plain' version 1 has no model.onnx" in plain["error"]
        assert f"credence-export --model {model_dir / 'plain' / '1'}" in plain["error"]
        response = client.post("/v1/models/plain:predict", json={"instances": [[0.0, 0.0, 0.0]]})
        assert response.status_code == 503 and "credence-export" in response.text
        vi = client.get("/v1/models/vi").json()["versions"][0]["error"]
        assert "'variational' does not export to ONNX" in vi and "CREDENCE_BACKEND=torch" in vi
        assert client.get("/readyz").json()["loaded"] == ["clf/1", "reg/1"]
    with serve(make_settings(model_dir)) as client:  # the torch backend serves them all
        assert client.get("/readyz").json()["failed"] == []


# --- the export commands and errors -------------------------------------------------------


def test_unsupported_method_says_which_methods_export(model_dir, capsys):
    vi = read_checkpoint(model_dir / "vi" / "1")
    with pytest.raises(
        ExportError, match=r"'variational' cannot be exported.*ensemble.*mc_dropout"
    ):
        export_checkpoint(vi)
    assert ONNX not in read_checkpoint(model_dir / "vi" / "1").manifest["files"]
    with pytest.raises(SystemExit) as info:
        onnx_export.main(["--model", str(model_dir / "vi")])
    assert info.value.code == 2 and "methods that export are" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # refused before any training
        train_cli.main(["--data", "toy:sine-gap", "--method", "variational", "--export-onnx"])
    assert info.value.code == 2
    assert "--export-onnx: method 'variational' cannot be exported" in capsys.readouterr().err


def test_credence_export_lists_model_onnx_with_its_sha256(tmp_path, capsys):
    save_checkpoint(regression_model(0), tmp_path, "m", regression_manifest())
    save_checkpoint(regression_model(1), tmp_path, "m", regression_manifest())
    assert onnx_export.main(["--model", str(tmp_path / "m")]) == 0  # the highest version
    assert f"wrote {tmp_path / 'm' / '2' / ONNX}" in capsys.readouterr().out
    assert not (tmp_path / "m" / "1" / ONNX).exists()
    checkpoint = read_checkpoint(tmp_path / "m" / "2")  # verifies every listed sha256
    manifest = checkpoint.manifest
    assert manifest["files"][ONNX]["bytes"] == len(checkpoint.files[ONNX])
    assert manifest["onnx"]["opset"] == onnx_export.OPSET
    assert not list((tmp_path / "m" / "2").glob(".*"))  # no temporary files left behind
    modes = {(tmp_path / "m" / "2" / f).stat().st_mode for f in (ONNX, "manifest.json")}
    assert modes == {(tmp_path / "m" / "2" / "weights.safetensors").stat().st_mode}
    assert onnx_export.main(["--model", str(tmp_path / "m" / "2")]) == 0  # idempotent
    assert read_checkpoint(tmp_path / "m" / "2").manifest["files"] == manifest["files"]
    onnx_file = tmp_path / "m" / "2" / ONNX
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match=r"sha256 of model\.onnx does not match"):
        read_checkpoint(tmp_path / "m" / "2")


def test_credence_train_export_onnx_writes_it_with_the_checkpoint(tmp_path):
    argv = ["--data=toy:moons", "--epochs=2", "--hidden=8", "--quiet", "--export-onnx"]
    assert train_cli.main([*argv, f"--out={tmp_path}", "--name=moons"]) == 0
    checkpoint = read_checkpoint(tmp_path / "moons" / "1")
    assert ONNX in checkpoint.manifest["files"]
    model = checkpoint.build()
    x, seeds = inputs(64)
    x = x[:, :2]
    np.testing.assert_allclose(
        onnx_draws(checkpoint.files[ONNX], x, 30, seeds),
        model.sample(x, 30, seeds).numpy(),
        rtol=1e-5,
        atol=1e-5,
    )
    assert json.loads((tmp_path / "moons" / "1" / "manifest.json").read_text())["onnx"]


# --- settings -----------------------------------------------------------------------------


def test_backend_setting_from_environment_and_flag(monkeypatch: pytest.MonkeyPatch):
    assert Settings().backend == "torch"
    monkeypatch.setenv("CREDENCE_BACKEND", "ONNX")
    assert Settings().backend == "onnx"
    assert load_settings(["--backend", "torch"]).backend == "torch"
    with pytest.raises(ValidationError, match="torch"):
        Settings(backend="tensorrt")
    with pytest.raises(ValidationError, match="backend onnx runs on onnxruntime's CPU"):
        Settings(backend="onnx", device="cuda")
    with pytest.raises(ValidationError, match="precision 'bfloat16' needs backend torch"):
        Settings(backend="onnx", precision="bfloat16")
    with pytest.raises(ValidationError, match="cuda_graphs needs backend torch"):
        Settings(backend="onnx", cuda_graphs=True)


def test_explain_on_the_onnx_backend_differentiates_the_checkpoints_torch_module(model_dir):
    """onnxruntime draws no gradients: :explain uses the torch module the checkpoint builds,
    and answers what the torch backend answers."""
    body = {"instances": [[0.1, 0.2, 0.3]], "parameters": {"seed": 7, "steps": 8}}
    answers = []
    for backend in ("torch", "onnx"):
        with serve(make_settings(model_dir, backend=backend)) as client:
            response = client.post("/v1/models/reg:explain", json=body)
            assert response.status_code == 200, response.text
            answers.append(response.json())
    assert answers[0] == answers[1]
