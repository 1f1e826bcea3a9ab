"""The feature density (training.density): the Gaussian discriminant analysis against closed
forms, every method's embedding, the stored tensors' checks and a checkpoint's round trip."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_settings, serve
from safetensors.torch import save as save_safetensors
from scipy.stats import multivariate_normal

from service.registry import FailedModel, Registry
from training import cli
from training import density as gda
from training.architectures import arch_config
from training.checkpoint import MANIFEST, latest_checkpoint, read_checkpoint
from training.data import Dataset
from training.density import DensityError, GaussianDensity, density_scores
from training.evaluate import stored_density
from training.fit import FitOptions
from training.methods import get_method
from training.model import NoFeatures
from training.onnx_export import export_checkpoint
from training.ood import OodReference
from training.train import save_trained, train_model


def _gaussian_rows(rng: np.random.Generator, means, covs, counts) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate(
        [rng.multivariate_normal(m, c, size=n) for m, c, n in zip(means, covs, counts, strict=True)]
    )
    y = np.concatenate([np.full(n, i) for i, n in enumerate(counts)])
    return x, y


MEANS = [np.array([0.0, 0.0, 0.0]), np.array([3.0, -1.0, 2.0]), np.array([-2.0, 4.0, 0.5])]
COVS = [
    np.eye(3),
    np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]]),
    np.diag([0.3, 2.0, 1.0]),
]


def _mixture_log_density(x: np.ndarray, weights, means, covs) -> np.ndarray:
    logs = [
        math.log(w) + multivariate_normal(m, c).logpdf(x)
        for w, m, c in zip(weights, means, covs, strict=True)
    ]
    return np.logaddexp.reduce(np.stack(logs), axis=0)


def test_the_score_is_minus_the_log_mixture_density_of_the_fitted_gaussians():
    """Exact: each class's sample mean and (unbiased) covariance, priors the class shares;
    the jitter (1e-6 of the mean variance) moves log densities by far less than 1e-4."""
    rng = np.random.default_rng(0)
    x, y = _gaussian_rows(rng, MEANS, COVS, [300, 200, 100])
    density = GaussianDensity.fit(torch.from_numpy(x)[None], torch.from_numpy(y))
    points = rng.normal(0, 3, size=(50, 3))
    weights = [300 / 600, 200 / 600, 100 / 600]
    means = [x[y == c].mean(0) for c in range(3)]
    covs = [np.cov(x[y == c].T) for c in range(3)]
    expected = -_mixture_log_density(points, weights, means, covs)
    got = density.score(torch.from_numpy(points)[None]).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_with_many_rows_the_score_approaches_the_true_mixture_density():
    """20,000 rows per class: the fitted parameters' error moves a log density by about
    D^2 / (2 n) = 2e-4 on average; 0.02 leaves room for the tails."""
    rng = np.random.default_rng(1)
    x, y = _gaussian_rows(rng, MEANS, COVS, [20000] * 3)
    density = GaussianDensity.fit(torch.from_numpy(x)[None], torch.from_numpy(y))
    points, _ = _gaussian_rows(rng, MEANS, COVS, [100] * 3)
    expected = -_mixture_log_density(points, [1 / 3] * 3, MEANS, COVS)
    got = density.score(torch.from_numpy(points)[None]).numpy()
    assert np.abs(got - expected).mean() < 0.02


def test_members_combine_by_their_mean_log_density():
    """Two members: the score is minus the average of their log densities, so rescaling one
    member's features (its own units) shifts every row's score by the same constant."""
    rng = np.random.default_rng(2)
    x, y = _gaussian_rows(rng, MEANS, COVS, [200] * 3)
    other = x @ rng.normal(size=(3, 3)) + 1.0
    features = torch.from_numpy(np.stack([x, other]))
    density = GaussianDensity.fit(features, torch.from_numpy(y))
    alone = [GaussianDensity.fit(features[k : k + 1], torch.from_numpy(y)) for k in range(2)]
    points = torch.from_numpy(np.stack([x[:20] + 1, other[:20] - 1]))
    expected = -(alone[0].log_density(points[:1]) + alone[1].log_density(points[1:])) / 2
    torch.testing.assert_close(density.score(points), expected[0])
    scaled = GaussianDensity.fit(torch.stack([features[0], 10 * features[1]]), torch.from_numpy(y))
    shift = scaled.score(torch.stack([points[0], 10 * points[1]])) - density.score(points)
    torch.testing.assert_close(shift, torch.full_like(shift, 3 * math.log(10) / 2))


def test_a_feature_that_never_varies_gets_a_jitter_and_flags_rows_that_move_it():
    rng = np.random.default_rng(3)
    x, y = _gaussian_rows(rng, MEANS, COVS, [100] * 3)
    x = np.concatenate([x, np.zeros((len(x), 1))], axis=1)  # a ReLU unit that never fires
    density = GaussianDensity.fit(torch.from_numpy(x)[None], torch.from_numpy(y))
    inside = density.score(torch.from_numpy(x[:10])[None])
    moved = x[:10].copy()
    moved[:, 3] = 0.5
    assert torch.isfinite(inside).all()
    assert (density.score(torch.from_numpy(moved)[None]) > inside.max() + 1e3).all()


def test_a_class_with_one_fit_row_is_left_out_of_the_mixture():
    x = torch.randn(1, 21, 2, dtype=torch.float64)
    y = torch.tensor([0] * 10 + [1] * 10 + [2])
    density = GaussianDensity.fit(x, y)
    assert density.classes.tolist() == [0, 1]
    torch.testing.assert_close(density.log_prior.exp(), torch.tensor([0.5, 0.5]).double())
    with pytest.raises(DensityError, match="no class has the 2 fit rows"):
        GaussianDensity.fit(x[:, :1], y[:1])


def test_scoring_checks_the_features_shape():
    density = GaussianDensity.fit(torch.randn(2, 20, 3), torch.arange(20) % 2)
    with pytest.raises(DensityError, match=r"features must be \[2, B, 3\]"):
        density.score(torch.randn(1, 5, 3))
    with pytest.raises(DensityError, match="fitted on 3 features per row, these rows have 4"):
        density.score(torch.randn(2, 5, 4))


def _stored(**change: torch.Tensor) -> bytes:
    features = torch.randn(1, 40, 3, generator=torch.Generator().manual_seed(0))
    density = GaussianDensity.fit(features, torch.arange(40) % 2)
    tensors = {name: getattr(density, name) for name in gda.TENSORS}
    merged = {**tensors, **change}
    return save_safetensors({k: v.contiguous() for k, v in merged.items() if v is not None})


def _lower(values: list[float]) -> torch.Tensor:
    return torch.diag(torch.tensor(values, dtype=torch.float64)).expand(1, 2, 3, 3).clone()


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"not a tensor file", "is not a safetensors file"),
        (_stored(classes=None), "must hold exactly"),
        (_stored(extra=torch.zeros(1)), "must hold exactly"),
        (_stored(means=torch.zeros(1, 2, 3)), "means must be float64"),
        (_stored(classes=torch.tensor([0.0, 1.0])), "classes must be int64"),
        (
            _stored(cholesky=_lower([1.0, 1.0, 1.0])[..., :2, :2]),
            r"cholesky must be \[1, 2, 3, 3\]",
        ),
        (_stored(cholesky=_lower([1.0, 0.0, 1.0])), "positive diagonal"),
        (_stored(cholesky=_lower([1.0, 1.0, 1.0]).transpose(-1, -2) + 1), "lower triangular"),
        (_stored(means=torch.full((1, 2, 3), math.nan).double()), "must be finite"),
        (_stored(log_prior=torch.tensor([0.0, 0.0]).double()), "summing to 1"),
        (_stored(classes=torch.tensor([0, 7])), r"class indices in \[0, 5\)"),
        (_stored(classes=torch.tensor([1, 1])), "distinct"),
    ],
)
def test_malformed_density_tensors_are_refused(data: bytes, says: str):
    with pytest.raises(DensityError, match=says):
        GaussianDensity.from_bytes(data, num_classes=5)


def test_stored_tensors_read_back_as_they_were():
    density = GaussianDensity.fit(torch.randn(2, 30, 4), torch.arange(30) % 3)
    back = GaussianDensity.from_bytes(density.to_bytes(), num_classes=3)
    for name in gda.TENSORS:
        assert torch.equal(getattr(back, name), getattr(density, name))


# ------------------------------------------------------------------ embeddings per method

STATS_MLP = {"x_mean": [0.0] * 6, "x_std": [1.0] * 6}
STATS_CNN = {"x_mean": 0.0, "x_std": 1.0}
LIKELIHOOD = {"kind": "categorical", "num_classes": 3}
CASES = [  # method, options, architecture, its options
    ("mc_dropout", {"dropout": 0.3}, "mlp", {}),
    ("mc_dropout", {"dropout": 0.3}, "cnn", {"conv": [4]}),
    ("mc_dropout", {"dropout": 0.3}, "gru", {"recurrent": [5]}),
    ("variational", {}, "mlp", {}),
    ("variational", {}, "cnn", {"conv": [4]}),
    ("variational", {}, "lstm", {"recurrent": [5]}),
    ("ensemble", {"members": 3}, "mlp", {}),
    ("ensemble", {"members": 3}, "cnn", {"conv": [4]}),
    ("sgld", {"chains": 1, "cycles": 2, "burnin_cycles": 0, "samples_per_cycle": 1}, "mlp", {}),
    ("laplace", {}, "mlp", {}),
    ("laplace", {}, "cnn", {"conv": [4]}),
]


def _model(method, options, arch, arch_options, hidden=(7,)):
    shape = {"mlp": [6], "cnn": [1, 8, 8], "gru": [4, 6], "lstm": [4, 6]}[arch]
    stats = STATS_MLP if arch in ("mlp", "gru", "lstm") else STATS_CNN
    config = arch_config(arch, shape, list(hidden), **arch_options)
    torch.manual_seed(0)
    model = get_method(method, **options).build(config, LIKELIHOOD, stats)
    return model, torch.randn(5, *shape)


def _mean_outputs(model, z: torch.Tensor) -> torch.Tensor:
    """The outputs of the deterministic network(s) the features belong to, [K, B, classes],
    computed without `embed`: dropout off (eval mode, no keys), weights at their means,
    every member, the MAP network."""
    if model.method == "mc_dropout":
        return model.body(z)[None] if hasattr(model, "body") else _mlp(model, z)
    if model.method == "variational":
        if hasattr(model, "mu"):
            return model._call(dict(zip(model.names, model.mu, strict=True)), z)[None]
        return _variational_mean(model, z)
    if model.method in ("ensemble", "sgld"):
        return model.run(z)
    return model.forward(z)[None]  # laplace


def _mlp(model, z: torch.Tensor) -> torch.Tensor:
    h = z
    for i, layer in enumerate(model.layers):
        h = layer(h)
        if i < len(model.layers) - 1:
            h = model.activation(h)
    return h[None]


def _variational_mean(model, z: torch.Tensor) -> torch.Tensor:
    h = z
    for conv in model.convs:
        h = F.conv2d(h, conv.weight_mu, conv.bias_mu, padding=conv.padding)
        h = F.max_pool2d(model.activation(h), 2)
    h = h.flatten(1)
    for i, layer in enumerate(model.layers):
        h = F.linear(h, layer.weight_mu, layer.bias_mu)
        if i < len(model.layers) - 1:
            h = model.activation(h)
    return h[None]


def _last(model, features: torch.Tensor) -> torch.Tensor:
    """The output layer(s) on the features: [K, B, D] -> [K, B, classes]."""
    if model.method == "mc_dropout":
        last = model.body.last if hasattr(model, "body") else model.layers[-1]
        return last(features)
    if model.method == "variational":
        if hasattr(model, "mu"):
            weights = dict(zip(model.names, model.mu, strict=True))
            return F.linear(features, weights["last.weight"], weights["last.bias"])
        layer = model.layers[-1]
        return F.linear(features, layer.weight_mu, layer.bias_mu)
    if model.method in ("ensemble", "sgld"):
        if hasattr(model, "stack"):
            params = dict(zip(model.names, model.stack, strict=True))
            weight, bias = params["last.weight"], params["last.bias"]
            return features @ weight.transpose(1, 2) + bias[:, None]
        return torch.baddbmm(model.biases[-1], features, model.weights[-1])
    return F.linear(features, model.last.weight, model.last.bias)


@pytest.mark.parametrize(("method", "options", "arch", "arch_options"), CASES)
def test_every_method_embeds_the_features_its_output_layer_reads(
    method, options, arch, arch_options
):
    """embed is deterministic (the same in training mode: dropout is off), one feature set
    per network, and the output layer on it gives the deterministic network's outputs."""
    model, z = _model(method, options, arch, arch_options)
    model.train()
    features = model.embed(z)
    k = model.set_size or 1
    assert features.shape[:2] == (k, 5) and features.dim() == 3
    model.eval()
    torch.testing.assert_close(model.embed(z), features)
    with torch.no_grad():
        expected = _mean_outputs(model, z)
        torch.testing.assert_close(_last(model, features), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("method", "options", "arch", "arch_options"), [c for c in CASES if c[2] == "mlp"]
)
def test_a_network_without_hidden_layers_has_no_features(method, options, arch, arch_options):
    model, z = _model(method, options, arch, arch_options, hidden=())
    with pytest.raises(NoFeatures, match="no feature layer"):
        model.embed(z)


def test_embedding_by_request_is_each_requests_own():
    model, z = _model("ensemble", {"members": 3}, "cnn", {"conv": [4]})
    whole = model.embed_inputs(z)
    by_request = model.embed_inputs(z, [2, 3])
    alone = model.embed_inputs(z[2:].clone())
    assert torch.equal(by_request[:, 2:], alone)
    torch.testing.assert_close(by_request, whole)
    many = torch.cat([z] * 8)  # 40 rows: a loop over members, where few rows take one vmap
    torch.testing.assert_close(model.embed(many), model.embed(z).repeat(1, 8, 1))


# ------------------------------------------------------------------ training and checkpoints


def _blobs(n: int, seed: int) -> Dataset:
    """Three classes of 6-d Gaussian blobs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 6)).astype(np.float32) + 3 * np.eye(3, 6, dtype=np.float32)[y]
    return Dataset(x, y, [f"x{i}" for i in range(6)], ["a", "b", "c"], "classification")


@pytest.fixture(scope="module")
def blobs_checkpoint(tmp_path_factory):
    data = _blobs(300, 0)
    result = train_model(
        data, method="mc_dropout", hidden=[16], options=FitOptions(seed=0, epochs=30)
    )
    root = tmp_path_factory.mktemp("density")
    return result, data, save_trained(result, data, root, "blobs")


def test_training_stores_the_density_the_flag_reads(blobs_checkpoint):
    result, data, path = blobs_checkpoint
    checkpoint = read_checkpoint(path)
    entry = checkpoint.manifest["ood"]
    assert entry["score"] == "feature_density" == checkpoint.manifest["training"]["ood_score"]
    assert entry["density"] == {**result.density.manifest(), "file": gda.FILE}
    assert set(entry["others"]) == {"mutual_information", "entropy", "max_softmax"}
    assert gda.FILE in checkpoint.manifest["files"]
    stored = stored_density(checkpoint)
    for name in gda.TENSORS:
        assert torch.equal(getattr(stored, name), getattr(result.density, name))
    reference = OodReference.parse(entry, "classification", checkpoint.files, 3)
    model = checkpoint.build()
    features = model.embed_inputs(torch.from_numpy(data.x[:20]))
    scores = reference.density.score(features).numpy()
    fields = reference.fields({}, features)
    np.testing.assert_allclose(
        fields["ood_score"].numpy(), np.interp(scores, entry["quantiles"], entry["levels"])
    )
    assert fields["ood"].tolist() == (scores > entry["threshold"]).tolist()


def test_mutual_information_is_kept_on_request():
    data = _blobs(120, 1)
    result = train_model(
        data,
        method="mc_dropout",
        hidden=[8],
        options=FitOptions(seed=0, epochs=3),
        ood_score="mutual_information",
    )
    assert result.density is None and result.ood["score"] == "mutual_information"
    assert "density" not in result.ood
    with pytest.raises(ValueError, match="feature_density: a network without hidden layers"):
        train_model(data, hidden=[], options=FitOptions(epochs=1), ood_score="feature_density")
    auto = train_model(data, hidden=[], options=FitOptions(seed=0, epochs=1))
    assert auto.ood["score"] == "mutual_information"  # no feature layer: the epistemic score
    with pytest.raises(ValueError, match="ood_score must be one of"):
        train_model(data, options=FitOptions(epochs=1), ood_score="energy")


def _rewrite(path, data: bytes | None = None, entry_change: dict | None = None) -> None:
    """Replace the density file (and list its new hash) or change the ood entry."""
    manifest = json.loads((path / MANIFEST).read_text())
    if data is not None:
        (path / gda.FILE).write_bytes(data)
        manifest["files"][gda.FILE] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
    if entry_change:
        manifest["ood"]["density"].update(entry_change)
    (path / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"data": b"garbage"}, "density.safetensors is not a safetensors file"),
        (
            {"data": GaussianDensity.fit(torch.randn(1, 40, 5), torch.arange(40) % 3).to_bytes()},
            "ood.density.features is 16; density.safetensors has 5",
        ),
        ({"entry_change": {"members": 2}}, "ood.density.members is 2"),
        ({"entry_change": {"file": "other.bin"}}, "ood.density must name its file"),
    ],
)
def test_a_checkpoint_with_malformed_density_is_refused_at_load(
    blobs_checkpoint, tmp_path, change, says
):
    path = blobs_checkpoint[2]
    copy = tmp_path / "blobs" / "1"
    copy.mkdir(parents=True)
    for item in path.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    _rewrite(copy, change.get("data"), change.get("entry_change"))
    registry = Registry.load(tmp_path, torch.device("cpu"), make_settings(tmp_path))
    (failed,) = registry.failed()
    assert isinstance(failed, FailedModel) and says in failed.error, failed.error


def test_a_density_of_other_features_is_refused_at_load(blobs_checkpoint, tmp_path):
    """Tensors that parse but do not fit the network: found by the load's test embedding."""
    path = blobs_checkpoint[2]
    copy = tmp_path / "blobs" / "1"
    copy.mkdir(parents=True)
    for item in path.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    other = GaussianDensity.fit(torch.randn(1, 40, 9), torch.arange(40) % 3)
    _rewrite(copy, other.to_bytes(), {"features": 9})
    (failed,) = Registry.load(tmp_path, torch.device("cpu"), make_settings(tmp_path)).failed()
    assert "was fitted on 1 x 9" in failed.error, failed.error


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_the_density_flag_is_served_on_every_backend(blobs_checkpoint, tmp_path, backend):
    """The ONNX graph gives draws only; the features come from the torch module the server
    loads beside it, so an exported model flags the same rows, with worker processes too."""
    result, data, path = blobs_checkpoint
    copy = tmp_path / "blobs" / "1"
    copy.mkdir(parents=True)
    for item in path.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    if backend == "onnx":
        export_checkpoint(read_checkpoint(copy))
    rows = np.concatenate([data.x[:8], data.x[:4] + 6])
    expected = density_scores(result.model, result.density, rows)
    entry = result.ood
    with serve(make_settings(tmp_path, backend=backend, batch_workers=1)) as client:
        response = client.post(
            "/v1/models/blobs:predict", json={"instances": rows.tolist(), "parameters": {"seed": 3}}
        )
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    np.testing.assert_allclose(
        [p["ood_score"] for p in predictions],
        np.interp(expected, entry["quantiles"], entry["levels"]),
        rtol=1e-6,
    )
    assert [p["ood"] for p in predictions] == (expected > entry["threshold"]).tolist()
    assert all(p["ood"] for p in predictions[8:])  # rows moved 6 sd off every class


def test_credence_train_chooses_the_served_score(tmp_path, capsys):
    common = ["--epochs", "2", "--out", str(tmp_path), "--quiet"]
    for choice, expected in (("auto", "feature_density"), ("mutual_information", None)):
        argv = ["--data", "toy:moons", "--ood-score", choice, "--name", choice, *common]
        assert cli.main(argv) == 0
        checkpoint = latest_checkpoint(tmp_path, choice)
        assert checkpoint.manifest["ood"]["score"] == (expected or "mutual_information")
        assert (gda.FILE in checkpoint.files) == (expected is not None)
    with pytest.raises(SystemExit):
        cli.main(["--data", "toy:sine-gap", "--ood-score", "feature_density", *common])
    assert "--ood-score applies to classifiers" in capsys.readouterr().err


def test_the_model_detail_names_the_served_score(blobs_checkpoint):
    path = blobs_checkpoint[2]
    with serve(make_settings(path.parent.parent)) as client:
        detail = client.get("/v1/models/blobs").json()
    assert detail["ood"] == {"score": "feature_density", "fpr": 0.05}


def test_a_mutual_information_checkpoint_serves_as_before(tmp_path):
    """No density file, no embedding: the flag reads the draws' mutual information, placed
    among the validation rows' as every checkpoint before the feature density did."""
    data = _blobs(200, 2)
    result = train_model(
        data,
        method="mc_dropout",
        hidden=[8],
        options=FitOptions(seed=0, epochs=5),
        eval_samples=50,
        ood_score="mutual_information",
    )
    path = save_trained(result, data, tmp_path, "mi")
    assert gda.FILE not in read_checkpoint(path).files
    rows = data.x[:6].tolist()
    with serve(make_settings(tmp_path)) as client:
        body = {"instances": rows, "parameters": {"seed": 1, "num_samples": 50}}
        predictions = client.post("/v1/models/mi:predict", json=body).json()["predictions"]
        assert client.get("/v1/models/mi").json()["ood"]["score"] == "mutual_information"
    entry = result.ood
    scores = np.array([p["mutual_information"] for p in predictions])
    np.testing.assert_allclose(
        [p["ood_score"] for p in predictions],
        np.interp(scores, entry["quantiles"], entry["levels"]),
        rtol=1e-9,
    )
    assert [p["ood"] for p in predictions] == (scores > entry["threshold"]).tolist()
