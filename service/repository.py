"""The model directory on disk: which checkpoints it holds, and whether they changed.

Names and versions come from clients (reload, load, unload) as well as from the directory,
so every path is checked before it is read: a name must match the checkpoint's
NAME_PATTERN (no `/`, no `..`, not absolute), a version must be ASCII digits, and the
folder, once symlinks are resolved, must lie inside the model directory. A symlink that
points elsewhere is refused, so a model directory cannot be made to read files outside it.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from service.errors import ApiError
from training.checkpoint import NAME_PATTERN

log = logging.getLogger("credence.repository")

VERSION_PATTERN = re.compile(r"[0-9]{1,18}")
REPORTED: set[str] = set()  # model folders already logged as leading out of MODEL_DIR


class OutsideModelDir(Exception):
    """A model folder, version folder or checkpoint file that resolves outside MODEL_DIR."""


def check_name(name: str) -> str:
    """A client's model name, or a 400 naming the problem."""
    if not NAME_PATTERN.match(name):
        raise ApiError.single(
            400,
            "invalid_name",
            f"model name {name!r} must match {NAME_PATTERN.pattern} (no '/', no '..')",
            ("path", "name"),
        )
    return name


def check_version(version: str) -> int:
    """A client's version, or a 400 naming the problem."""
    if not VERSION_PATTERN.fullmatch(version):
        raise ApiError.single(
            400,
            "invalid_version",
            f"version {version!r} must be a number (ASCII digits)",
            ("path", "version"),
        )
    return int(version)


def inside(path: Path, root: Path) -> Path:
    """`path` with symlinks resolved, or OutsideModelDir when that leaves `root`."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise OutsideModelDir(f"{path} resolves to {resolved}, outside the model directory")
    return resolved


@dataclass(frozen=True)
class Repository:
    """MODEL_DIR/<name>/<version>/ folders, read safely."""

    root: Path

    def names(self) -> list[str]:
        """Model folders with at least one version, in order (others are logged, skipped)."""
        if not self.root.is_dir():
            return []
        found = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if not NAME_PATTERN.match(folder.name):
                log.debug("skipping %s: not a model name", folder)
            elif self.versions(folder.name):
                found.append(folder.name)
        return found

    def folder(self, name: str) -> Path:
        """MODEL_DIR/<name>; OutsideModelDir if it is a symlink out."""
        folder = self.root / check_name(name)
        inside(folder, self.root)
        return folder

    def versions(self, name: str) -> dict[int, Path]:
        """The version folders of one model (digit names), ascending; empty if none. A
        version whose folder resolves outside MODEL_DIR is left out and logged."""
        try:
            folder = self.folder(name)
        except OutsideModelDir as exc:
            if name not in REPORTED:  # once, not at every poll of the directory
                REPORTED.add(name)
                log.error("refused model %s: %s", name, exc)
            return {}
        if not folder.is_dir():
            return {}
        found = {}
        for path in folder.iterdir():
            if path.is_dir() and VERSION_PATTERN.fullmatch(path.name):
                found[int(path.name)] = path
        return dict(sorted(found.items()))

    def check(self, path: Path) -> None:
        """OutsideModelDir unless the version folder and every file in it stay inside."""
        inside(path.parent, self.root)
        inside(path, self.root)
        for item in path.iterdir():
            inside(item, self.root)

    def fingerprint(self, path: Path) -> str:
        """A digest of the names, sizes and modification times of a version's files: it
        changes whenever a file is written, added or removed, for the price of a stat per
        file (a poll reads no checkpoint twice). Empty when the folder cannot be read."""
        digest = hashlib.sha256()
        try:
            for item in sorted(path.iterdir()):
                stat = item.stat()
                digest.update(f"{item.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            return ""
        return digest.hexdigest()
