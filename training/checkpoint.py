"""The checkpoint format: the one module that writes and reads it.

    MODEL_DIR/<name>/<version>/manifest.json        everything needed to rebuild and serve
    MODEL_DIR/<name>/<version>/weights.safetensors  tensors only, never pickled
    MODEL_DIR/<name>/<version>/model.onnx           optional

Manifest keys the caller of `save_checkpoint` supplies (the rest is filled in here):

    input        {"shape": [D, ...], "dtype": "float32", "feature_names": [...] or null}
    output       {"names": [...]}: target names (regression) or class labels (classification)
    num_samples  {"default": int, "max": int}: max caps a request's num_samples (see
                 `request_cap`); a finite sample set serves at most its M draws whatever
                 is asked (training.model.draws_used)
    calibration  null or the post-hoc calibration the server applies (training.calibration)
    ood          optional: in-distribution quantiles of the OOD score, which the server
                 turns into each prediction's ood_score and ood flag (training.ood); a
                 feature_density score's tensors are the file density.safetensors
    metrics, uncertainty_stats, training: free-form JSON about the fit (optional)

The manifest lists the sha256 of every other file; reading refuses any mismatch. Versions
are integers; a new one is written to a hidden temporary folder and renamed into place, so
a reader never sees half a checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from training.build import build_model
from training.calibration import CalibrationError, parse_calibration
from training.model import PosteriorModel

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
ONNX = "model.onnx"
REQUIRED_KEYS = ("input", "output", "num_samples")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CheckpointError(Exception):
    """A checkpoint that cannot be served: missing, malformed, or tampered with."""


def request_cap(limits: dict, set_size: int | None) -> int | None:
    """num_samples.max as a cap on requests, or None for no cap of the model's own.

    A set of M draws used to be written with max = M, refusing requests above M; those
    requests now get the M, so such a max caps nothing and old checkpoints serve them too.
    """
    cap = limits.get("max")
    return None if set_size is not None and cap == set_size else cap


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("credence-serve", "numpy", "safetensors", "onnx", "onnxruntime"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return versions


def list_versions(model_path: Path) -> list[int]:
    """Integer version folders under MODEL_DIR/<name>, ascending."""
    if not model_path.is_dir():
        return []
    return sorted(int(p.name) for p in model_path.iterdir() if p.is_dir() and p.name.isdigit())


def save_checkpoint(
    model: PosteriorModel,
    model_dir: str | Path,
    name: str,
    manifest: dict,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a new version of `name` and return its folder.

    `manifest` carries what only the caller knows (input/output spec, metrics, sampling
    defaults, calibration); the model config, normalization, hashes and versions are added.
    """
    if not NAME_PATTERN.match(name):
        raise ValueError(f"model name {name!r} must match {NAME_PATTERN.pattern}")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ValueError(f"manifest lacks {missing}")
    check_calibration(manifest, model.task)  # CalibrationError is a ValueError
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    files = {WEIGHTS: save_safetensors(state), **(extra_files or {})}
    root = Path(model_dir) / name
    root.mkdir(parents=True, exist_ok=True)
    while True:
        version = max(list_versions(root), default=0) + 1
        body = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "version": version,
            "task": model.task,
            "method": model.method,
            "model": model.config(),
            "normalization": model.normalizer.stats,
            **manifest,
            "library_versions": library_versions(),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": {f: {"sha256": _sha256(d), "bytes": len(d)} for f, d in files.items()},
        }
        # mkdir, not mkdtemp: a version folder gets the umask's mode like any other folder,
        # not mkdtemp's owner-only 0700, so a server running as another user (the Docker
        # image's) can read models trained on the host.
        staging = root / f".staging-{secrets.token_hex(8)}"
        staging.mkdir()
        for filename, data in files.items():
            (staging / filename).write_bytes(data)
        (staging / MANIFEST).write_text(json.dumps(body, indent=2) + "\n")
        try:
            os.rename(staging, root / str(version))
            return root / str(version)
        except OSError:  # another writer took this version number first
            shutil.rmtree(staging, ignore_errors=True)


def _replace_file(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to a hidden temporary file beside `path`, then rename it into place.

    `mode` replaces mkstemp's owner-only 0600, so the file reads like its siblings."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _write_manifest(path: Path, manifest: dict, mode: int) -> None:
    _replace_file(path / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), mode)


def add_files(path: str | Path, files: dict[str, bytes], manifest_keys: dict | None = None) -> None:
    """Add or replace files of an existing version (e.g. model.onnx), with their sha256.

    The checkpoint is verified first. The manifest is the commit point: each file goes in by
    rename, and a file that is being replaced is unlisted before it changes, so a reader
    sees a manifest whose listed files match it at every moment. `manifest_keys` are set
    at the top level of the manifest (never its file list or identity).
    """
    path = Path(path)
    manifest = dict(read_checkpoint(path).manifest)
    protected = {"files", "name", "version", "format_version", "task", "method", "model"}
    if set(manifest_keys or {}) & protected:
        raise ValueError(f"add_files may not change {sorted(set(manifest_keys) & protected)}")
    for filename in files:
        if filename in (MANIFEST, WEIGHTS) or Path(filename).name != filename:
            raise ValueError(f"add_files cannot write {filename!r}")
    mode = (path / WEIGHTS).stat().st_mode & 0o777  # as save_checkpoint wrote its files
    listed = dict(manifest["files"])
    changed = [f for f, d in files.items() if f in listed and listed[f]["sha256"] != _sha256(d)]
    if changed:
        unlisted = {k: v for k, v in listed.items() if k not in changed}
        _write_manifest(path, {**manifest, "files": unlisted}, mode)
    for filename, data in files.items():
        _replace_file(path / filename, data, mode)
    listed.update({f: {"sha256": _sha256(d), "bytes": len(d)} for f, d in files.items()})
    _write_manifest(path, {**manifest, **(manifest_keys or {}), "files": listed}, mode)


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: its manifest and the bytes of its files."""

    path: Path
    manifest: dict
    files: dict[str, bytes]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> int:
        return self.manifest["version"]

    def build(self, device: str | torch.device = "cpu") -> PosteriorModel:
        """The model with its weights, in eval mode, on `device`."""
        try:
            model = build_model(self.manifest["model"], self.manifest["normalization"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: cannot rebuild the model: {exc!r}") from exc
        try:
            model.load_state_dict(load_safetensors(self.files[WEIGHTS]), strict=True)
        except (RuntimeError, KeyError) as exc:
            raise CheckpointError(f"{self.path}: weights do not fit the model: {exc}") from exc
        return model.to(device).eval()


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify MODEL_DIR/<name>/<version>; raises CheckpointError saying why not."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no {MANIFEST}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: {MANIFEST} is not valid JSON: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported "
            f"(this build reads {FORMAT_VERSION})"
        )
    listed = manifest.get("files", {})
    if WEIGHTS not in listed:
        raise CheckpointError(f"{path}: {MANIFEST} lists no {WEIGHTS}")
    files = {}
    for filename, entry in listed.items():
        if Path(filename).name != filename:
            raise CheckpointError(f"{path}: file name {filename!r} in {MANIFEST} is not plain")
        try:
            data = (path / filename).read_bytes()
        except FileNotFoundError as exc:
            raise CheckpointError(f"{path}: {filename} listed in {MANIFEST} is missing") from exc
        if _sha256(data) != entry.get("sha256"):
            raise CheckpointError(
                f"{path}: sha256 of {filename} does not match {MANIFEST} "
                "(the file was changed or corrupted); refusing to load it"
            )
        files[filename] = data
    try:
        check_calibration(manifest, manifest.get("task"))
    except CalibrationError as exc:
        raise CheckpointError(f"{path}: {MANIFEST}: {exc}") from exc
    return Checkpoint(path, manifest, files)


def check_calibration(manifest: dict, task: str | None) -> None:
    """Refuse a calibration field that the server could not apply (CalibrationError)."""
    names = (manifest.get("output") or {}).get("names")
    targets = len(names) if isinstance(names, list) else None
    parse_calibration(manifest.get("calibration"), task, targets)


def latest_checkpoint(model_dir: str | Path, name: str) -> Checkpoint:
    versions = list_versions(Path(model_dir) / name)
    if not versions:
        raise CheckpointError(f"no versions of {name!r} under {model_dir}")
    return read_checkpoint(Path(model_dir) / name / str(versions[-1]))
