"""Every checkpoint under MODEL_DIR/<name>/<version>, loaded at startup and again when a
model is reloaded (service.reload).

A version that cannot be served (bad hash, malformed manifest, weights that do not fit,
a model whose output disagrees with its manifest) is kept with its error message so that
the API can say why, and is never served; every other version keeps serving. A model's
default version is the highest one that loaded.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from service.cuda_graphs import GraphedSampler
from service.errors import ApiError
from service.onnx_backend import load_onnx
from service.repository import OutsideModelDir, Repository
from service.settings import Settings
from training.architectures import arch_name
from training.calibration import Calibration, CalibrationError, parse_calibration
from training.checkpoint import CheckpointError, read_checkpoint, request_cap
from training.fit import is_small
from training.model import NoFeatures, PosteriorModel, draws_used
from training.ood import OodReference
from training.posteriors.mc_dropout import MCDropoutMLP

log = logging.getLogger("credence.registry")

DTYPES = {"float32": torch.float32, "float64": torch.float64}
TASKS = ("regression", "classification")


@dataclass(frozen=True)
class ModelSpec:
    """What the service needs from a manifest, checked once at load time."""

    name: str
    version: int
    task: str
    method: str
    input_shape: tuple[int, ...]
    dtype: torch.dtype
    feature_names: tuple[str, ...] | None
    output_names: tuple[str, ...]
    default_num_samples: int
    max_num_samples: int
    manifest: dict
    calibration: Calibration | None = None  # applied to every prediction (regression)
    set_size: int | None = None  # a finite posterior sample set's M (PosteriorModel.set_size)
    ood: OodReference | None = None  # each prediction's ood_score and flag (training.ood)

    @property
    def num_outputs(self) -> int:
        return len(self.output_names)

    def draws(self, num_samples: int) -> int:
        """The draws a request for num_samples gets, as its response reports them."""
        return draws_used(num_samples, self.set_size)


def _positive_int(value: object) -> bool:
    return type(value) is int and value > 0


def parse_spec(
    manifest: dict,
    settings: Settings,
    set_size: int | None = None,
    files: dict[str, bytes] | None = None,
) -> ModelSpec:
    """Validate the serving-relevant part of a manifest (and of the checkpoint's `files` it
    names: a feature-density OOD reference's tensors); CheckpointError says what is wrong."""

    def bad(message: str) -> CheckpointError:
        return CheckpointError(f"manifest: {message}")

    task = manifest.get("task")
    if task not in TASKS:
        raise bad(f"task must be one of {TASKS}, got {task!r}")
    spec_in, spec_out = manifest.get("input") or {}, manifest.get("output") or {}
    shape = spec_in.get("shape")
    if not isinstance(shape, list) or not shape or not all(map(_positive_int, shape)):
        raise bad(f"input.shape must be a non-empty list of positive integers, got {shape!r}")
    dtype_name = spec_in.get("dtype", "float32")
    if dtype_name not in DTYPES:
        raise bad(f"input.dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
    features = spec_in.get("feature_names")
    if features is not None:
        if len(shape) != 1 or not isinstance(features, list) or len(features) != shape[0]:
            raise bad(f"input.feature_names must list {shape} names for a 1-d input shape")
        if not all(isinstance(f, str) for f in features) or len(set(features)) != len(features):
            raise bad("input.feature_names must be distinct strings")
    names = spec_out.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise bad(f"output.names must be a non-empty list of strings, got {names!r}")
    samples = manifest.get("num_samples") or {}
    default, cap = samples.get("default"), samples.get("max")
    for key, value in (("default", default), ("max", cap)):
        if value is not None and not _positive_int(value):
            raise bad(f"num_samples.{key} must be a positive integer, got {value!r}")
    cap = request_cap(samples, set_size)
    try:
        calibration = parse_calibration(manifest.get("calibration"), task, len(names))
    except CalibrationError as exc:
        raise bad(str(exc)) from None
    ood = None
    if manifest.get("ood") is not None:
        try:
            ood = OodReference.parse(manifest["ood"], task, files, len(names))
        except ValueError as exc:
            raise bad(str(exc)) from None
    cap = min(cap or math.inf, settings.max_num_samples)
    default = draws_used(min(default or settings.default_num_samples, cap), set_size)
    return ModelSpec(
        name=manifest["name"],
        version=manifest["version"],
        task=task,
        method=str(manifest.get("method")),
        input_shape=tuple(shape),
        dtype=DTYPES[dtype_name],
        feature_names=tuple(features) if features is not None else None,
        output_names=tuple(names),
        default_num_samples=int(default),
        max_num_samples=int(cap),
        manifest=manifest,
        calibration=calibration,
        set_size=set_size,
        ood=ood,
    )


class Sampler(Protocol):
    """What serving needs of a model: a PosteriorModel, or a backend's stand-in for one."""

    @property
    def task(self) -> str: ...

    def sample(
        self,
        x: torch.Tensor,
        n: int,
        seeds: torch.Tensor,
        sizes: Sequence[int] | None = None,
    ) -> torch.Tensor: ...


def check_model(model: Sampler, spec: ModelSpec, device: torch.device) -> None:
    """One tiny forward pass: a model that disagrees with its manifest fails here, at load,
    never on a client's request."""
    if model.task != spec.task:
        raise CheckpointError(f"model task {model.task!r} differs from manifest {spec.task!r}")
    x = torch.zeros((2, *spec.input_shape), dtype=spec.dtype, device=device)
    draws = model.sample(x, 2, torch.zeros(2, dtype=torch.int64, device=device))
    per_output = 2 if spec.task == "regression" else 1
    expected = (2, 2, per_output * spec.num_outputs)
    if tuple(draws.shape) != expected:
        raise CheckpointError(
            f"model draws have shape {tuple(draws.shape)} but the manifest's "
            f"{spec.num_outputs} outputs need {expected}"
        )


def check_features(module: PosteriorModel, spec: ModelSpec, device: torch.device) -> None:
    """A feature-density OOD reference must fit the model's features: the torch module
    embeds the rows on every backend (ONNX graphs give draws only), so a density fitted on
    another network fails here, at load."""
    if spec.ood is None or spec.ood.density is None:
        return
    x = torch.zeros((2, *spec.input_shape), dtype=spec.dtype, device=device)
    try:
        features = module.embed_inputs(x)
    except NoFeatures as exc:
        raise CheckpointError(f"ood.score feature_density, but {exc}") from None
    density = spec.ood.density
    expected = (density.members, 2, density.features)
    if tuple(features.shape) != expected:
        raise CheckpointError(
            f"the model's features have shape {tuple(features.shape)} but its OOD density "
            f"was fitted on {density.members} x {density.features} ({expected} for 2 rows)"
        )


@dataclass(frozen=True)
class LoadedModel:
    spec: ModelSpec
    model: Sampler  # a PosteriorModel (torch backend) or an OnnxSampler (onnx backend)
    device: torch.device
    path: Path
    small: bool = False  # training.fit.is_small: its batches are many small ops
    precision: str = "float32"  # of the layers: settings.precision where the method has it
    # the torch module behind `model` (the same object on the eager backend): what :explain
    # differentiates, whichever backend serves the draws
    module: PosteriorModel | None = None

    @property
    def key(self) -> tuple[str, int]:
        return self.spec.name, self.spec.version


@dataclass(frozen=True)
class FailedModel:
    name: str
    version: int
    path: Path
    error: str


@dataclass
class ModelEntry:
    name: str
    versions: dict[int, LoadedModel | FailedModel] = field(default_factory=dict)
    # versions whose files changed on disk and could not be loaded again, with why: the
    # version loaded before keeps serving
    refused: dict[int, str] = field(default_factory=dict)

    @property
    def default_version(self) -> int | None:
        loaded = [v for v, m in self.versions.items() if isinstance(m, LoadedModel)]
        return max(loaded, default=None)

    @property
    def state(self) -> str:
        return "available" if self.default_version is not None else "unavailable"


def load_version(path: Path, device: torch.device, settings: Settings) -> LoadedModel:
    checkpoint = read_checkpoint(path)
    manifest = checkpoint.manifest
    if manifest.get("name") != path.parent.name or manifest.get("version") != int(path.name):
        raise CheckpointError(
            f"manifest names {manifest.get('name')!r} version {manifest.get('version')!r} "
            f"but the checkpoint sits in {path.parent.name}/{path.name}"
        )
    if settings.backend == "onnx":  # onnxruntime's CPU provider, whatever the device
        device = torch.device("cpu")
    module = checkpoint.build(device)
    spec = parse_spec(manifest, settings, module.set_size, checkpoint.files)
    small = is_small(module)
    precision = "float32"
    if settings.precision != "float32":
        if hasattr(module, "to_precision"):
            module = module.to_precision(getattr(torch, settings.precision))
            precision = settings.precision
        else:
            log.warning(
                "%s v%d: precision %s applies to MC-dropout MLPs; this %s model serves in float32",
                spec.name,
                spec.version,
                settings.precision,
                spec.method,
            )
    model: Sampler = module
    if settings.backend == "onnx":
        model = load_onnx(checkpoint, settings.torch_threads, small)
    elif settings.cuda_graphs:
        model = graphed(module, spec, device, settings)
    check_model(model, spec, device)
    check_features(module, spec, device)
    return LoadedModel(spec, model, device, path, small, precision, module)


def load_checked(
    repository: Repository, path: Path, device: torch.device, settings: Settings
) -> LoadedModel | FailedModel:
    """One version loaded and test-run (hashes, manifest, a forward pass), or the reason it
    cannot be served: a bug in one checkpoint must not stop the others."""
    name, version = path.parent.name, int(path.name)
    try:
        repository.check(path)
        loaded = load_version(path, device, settings)
    except (CheckpointError, OutsideModelDir) as exc:
        log.error("refused %s v%d: %s", name, version, exc)
        return FailedModel(name, version, path, str(exc))
    except Exception as exc:
        log.exception("failed to load %s v%d", name, version)
        return FailedModel(name, version, path, f"{path}: {type(exc).__name__}: {exc}")
    log.info("loaded %s v%d on %s", name, version, device)
    return loaded


def arch_of(spec: ModelSpec) -> str:
    return arch_name((spec.manifest.get("model") or {}).get("arch") or {})


def graphed(
    module: PosteriorModel, spec: ModelSpec, device: torch.device, settings: Settings
) -> Sampler:
    """The module's draws from CUDA graphs where they apply, else the module itself (with a
    warning that says why)."""
    why = None
    if device.type != "cuda":
        why = f"the model is on {device.type}, not CUDA"
    elif not isinstance(module, MCDropoutMLP):
        why = f"they apply to MC-dropout MLPs; this is a {spec.method} {arch_of(spec)}"
    if why is None:
        return GraphedSampler(module, settings.max_batch_rows)
    log.warning("%s v%d: cuda_graphs ignored: %s", spec.name, spec.version, why)
    return module


class Registry:
    """The models this server knows, by name and version."""

    def __init__(self, entries: dict[str, ModelEntry]):
        self.entries = dict(sorted(entries.items()))

    @classmethod
    def load(cls, model_dir: Path, device: torch.device, settings: Settings) -> Registry:
        repository = Repository(model_dir)
        entries: dict[str, ModelEntry] = {}
        if not model_dir.is_dir():
            log.error("model directory %s does not exist; serving no models", model_dir)
            return cls(entries)
        for name in repository.names():
            entry = entries[name] = ModelEntry(name)
            for version, path in repository.versions(name).items():
                entry.versions[version] = load_checked(repository, path, device, settings)
        return cls(entries)

    def put(self, entry: ModelEntry) -> None:
        """Serve `entry` in place of the model's entry (if any): one assignment, so a
        request sees the old entry or the new one, never a mix."""
        self.entries = dict(sorted({**self.entries, entry.name: entry}.items()))

    def drop(self, name: str) -> ModelEntry | None:
        entry = self.entries.get(name)
        self.entries = {k: v for k, v in self.entries.items() if k != name}
        return entry

    def loaded(self) -> list[LoadedModel]:
        return [m for e in self.entries.values() for m in e.versions.values() if _is_loaded(m)]

    def failed(self) -> list[FailedModel]:
        return [m for e in self.entries.values() for m in e.versions.values() if not _is_loaded(m)]

    def entry(self, name: str) -> ModelEntry:
        if name not in self.entries:
            known = ", ".join(self.entries) or "none"
            raise ApiError.single(
                404,
                "model_not_found",
                f"no model named {name!r} (known: {known})",
                ("path", "name"),
            )
        return self.entries[name]

    def resolve(self, name: str, version: str | int | None = None) -> LoadedModel:
        """The version a request asked for, or the default; 404 unknown, 503 failed to load."""
        entry = self.entry(name)
        if version is None:
            default = entry.default_version  # computed from the versions: once
            if default is None:
                errors = "; ".join(f"v{m.version}: {m.error}" for m in entry.versions.values())
                raise ApiError.single(
                    503,
                    "model_unavailable",
                    f"no version of {name!r} loaded: {errors}",
                    ("path", "name"),
                )
            return entry.versions[default]
        text = str(version)
        number = int(text) if re.fullmatch(r"[0-9]{1,18}", text) else None
        if number is None or number not in entry.versions:
            known = ", ".join(map(str, entry.versions))
            raise ApiError.single(
                404,
                "version_not_found",
                f"model {name!r} has no version {version!r} (versions: {known})",
                ("path", "version"),
            )
        found = entry.versions[number]
        if isinstance(found, FailedModel):
            raise ApiError.single(
                503,
                "model_unavailable",
                f"{name!r} version {number} failed to load: {found.error}",
                ("path", "version"),
            )
        return found


def _is_loaded(model: LoadedModel | FailedModel) -> bool:
    return isinstance(model, LoadedModel)
