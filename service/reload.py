"""Models on the fly: load, check and swap in a model's versions while the server serves.

A reload reads the model's folder again. A new version, or one whose files changed, is
loaded in a thread and test-run in full (every file's sha256 against the manifest, the
manifest itself, a forward pass: registry.load_checked); it gets its batcher, whose worker
processes load it too, and only then does it replace what served before, in one step with
no await inside it, between two requests. A version that fails is refused: the version
served before keeps serving, and the error is in the answer, the log and
`credence_model_reloads_total{outcome="refused"}`. The replaced versions' batchers retire:
the requests already queued on them finish there, then their workers stop and their
weights are freed.

One reload, load or unload runs at a time (a lock), whether a client asked or the poll
of the model directory (`model_poll_s`) found a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from service.batcher import Batcher
from service.errors import ApiError, Problem
from service.metrics import Metrics
from service.registry import (
    FailedModel,
    LoadedModel,
    ModelEntry,
    Registry,
    arch_of,
    load_checked,
)
from service.repository import OutsideModelDir, Repository
from service.settings import Settings

log = logging.getLogger("credence.reload")

RETIRE_MARGIN_S = 5.0  # past the request deadline, for a batch that overruns it


@dataclass
class Outcome:
    """What one reload did to one model's versions."""

    name: str
    loaded: list[int] = field(default_factory=list)
    unchanged: list[int] = field(default_factory=list)
    unloaded: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)  # version -> why

    def error(self, entry: ModelEntry | None) -> ApiError | None:
        """A 422 naming every refused version and what serves instead, or None."""
        if not self.refused:
            return None
        serving = entry.default_version if entry else None
        instead = f"v{serving} keeps serving" if serving else "no version of it is served"
        problems = [
            Problem(
                "checkpoint_refused",
                f"{self.name} v{version} was refused ({instead}): {why}",
                ("versions", version),
            )
            for version, why in self.refused.items()
        ]
        return ApiError(422, problems)


def describe_version(metrics: Metrics, loaded: LoadedModel, backend: str) -> None:
    """A loaded version's info and OOD baseline, for dashboards and alert rules."""
    spec = loaded.spec
    labels = (spec.name, str(spec.version))
    device = str(loaded.device)
    info = (*labels, spec.method, arch_of(spec), backend, device, loaded.precision)
    metrics.model_info.labels(*info).set(1)
    if spec.ood is not None:
        metrics.ood_reference_fpr.labels(*labels).set(spec.ood.fpr)


def forget_version(metrics: Metrics, loaded: LoadedModel, backend: str) -> None:
    spec = loaded.spec
    labels = (spec.name, str(spec.version))
    info = (*labels, spec.method, arch_of(spec), backend, str(loaded.device), loaded.precision)
    for gauge, values in ((metrics.model_info, info), (metrics.ood_reference_fpr, labels)):
        with contextlib.suppress(KeyError):
            gauge.remove(*values)


class ModelManager:
    """Holds the registry and the batchers the predict path reads, and changes them."""

    def __init__(
        self,
        registry: Registry,
        batchers: dict[tuple[str, int], Batcher],
        settings: Settings,
        metrics: Metrics,
        device: torch.device,
        new_batcher: Callable[[LoadedModel], Batcher],
    ):
        self.registry, self.batchers = registry, batchers
        self.settings, self.metrics, self.device = settings, metrics, device
        self.new_batcher = new_batcher
        self.repository = Repository(settings.model_dir)
        self.lock = asyncio.Lock()
        self.unloaded: set[str] = set()  # unloaded by a client: the poll leaves them be
        self.retiring: set[asyncio.Task] = set()
        self.poller: asyncio.Task | None = None
        # the files each known version was last loaded (or refused) from
        self.seen = {
            (entry.name, version): self.repository.fingerprint(model.path)
            for entry in registry.entries.values()
            for version, model in entry.versions.items()
        }

    def check_folder(self, name: str) -> None:
        """A 400 for a name that is not a model name or whose folder leads out of MODEL_DIR."""
        try:
            self.repository.folder(name)
        except OutsideModelDir as exc:
            raise ApiError.single(400, "outside_model_dir", str(exc), ("path", "name")) from None

    async def reload(self, name: str, only: int | None = None, retry: bool = True) -> Outcome:
        """Load what is new or changed in MODEL_DIR/<name> (or only version `only`), swap it
        in, and retire what it replaces or what is gone from disk. `retry`: load a version
        that failed before even if its files did not change (a client asking does; the
        poll does not, so a broken checkpoint is not read again every few seconds)."""
        self.check_folder(name)
        async with self.lock:
            on_disk = await asyncio.to_thread(self.repository.versions, name)
            current = self.registry.entries.get(name)
            if not on_disk and current is None:
                raise ApiError.single(
                    404,
                    "model_not_found",
                    f"no model folder {name!r} with a version in the model directory",
                    ("path", "name"),
                )
            if only is not None and only not in on_disk:
                raise ApiError.single(
                    404,
                    "version_not_found",
                    f"model {name!r} has no version folder {only} "
                    f"(on disk: {', '.join(map(str, on_disk)) or 'none'})",
                    ("path", "version"),
                )
            self.unloaded.discard(name)
            old = dict(current.versions) if current else {}
            refused_before = dict(current.refused) if current else {}
            targets = {only: on_disk[only]} if only is not None else on_disk
            outcome, versions, started = Outcome(name), {}, []
            refused_now: dict[int, str] = {}
            for version, path in targets.items():
                fingerprint = await asyncio.to_thread(self.repository.fingerprint, path)
                before = old.get(version)
                same = self.seen.get((name, version)) == fingerprint
                if before is not None and same and (isinstance(before, LoadedModel) or not retry):
                    versions[version] = before
                    outcome.unchanged.append(version)
                    continue
                candidate, batcher = await self._load(path, fingerprint)
                self.seen[name, version] = fingerprint
                if batcher is not None:
                    versions[version] = candidate
                    started.append(batcher)
                    outcome.loaded.append(version)
                    continue
                outcome.refused[version] = candidate.error
                self.metrics.reloads.labels(name, "refused").inc()
                self.metrics.load_failures.labels(name, str(version)).inc()
                if isinstance(before, LoadedModel):  # what served keeps serving
                    versions[version], refused_now[version] = before, candidate.error
                else:
                    versions[version] = candidate
            if only is not None:  # the other versions stay as they are
                versions = {**{v: m for v, m in old.items() if v != only}, **versions}
            else:
                outcome.unloaded = [v for v in old if v not in on_disk]
            # a refusal stands while the refused files do (unchanged) or was not looked at
            kept = {
                v: why
                for v, why in refused_before.items()
                if v in outcome.unchanged or (only is not None and v != only)
            }
            entry = ModelEntry(name, dict(sorted(versions.items())), {**kept, **refused_now})
            self._swap(name, entry if entry.versions else None, old, started)
            for version in outcome.loaded:
                log.info("reload: %s v%d loaded and serving", name, version)
                self.metrics.reloads.labels(name, "loaded").inc()
            for version in outcome.unloaded:
                log.info("reload: %s v%d is gone from disk: unloaded", name, version)
                self.metrics.reloads.labels(name, "unloaded").inc()
            for version, why in outcome.refused.items():
                log.error("reload: refused %s v%d: %s", name, version, why)
            return outcome

    async def _load(
        self, path: Path, fingerprint: str
    ) -> tuple[LoadedModel | FailedModel, Batcher | None]:
        """A version loaded, checked and with its batcher ready, or why it cannot serve."""
        name, version = path.parent.name, int(path.name)
        loaded = await asyncio.to_thread(
            load_checked, self.repository, path, self.device, self.settings
        )
        if isinstance(loaded, FailedModel):
            return loaded, None
        if await asyncio.to_thread(self.repository.fingerprint, path) != fingerprint:
            why = "its files changed while it was being loaded (reload once they are written)"
            return FailedModel(name, version, path, why), None
        batcher = self.new_batcher(loaded)
        batcher.start()
        errors = await batcher.ready()
        if errors:
            await batcher.stop()
            why = f"its batch workers could not load it: {'; '.join(errors)}"
            return FailedModel(name, version, path, why), None
        return loaded, batcher

    def _swap(
        self,
        name: str,
        entry: ModelEntry | None,
        old: dict[int, LoadedModel | FailedModel],
        started: list[Batcher],
    ) -> None:
        """Serve `entry` (None: nothing of `name`) with its new batchers, and retire the
        batchers of the versions it no longer serves. No await: atomic for requests."""
        serving = {id(m) for m in (entry.versions.values() if entry else ())}
        gone = [m for m in old.values() if isinstance(m, LoadedModel) and id(m) not in serving]
        retired = [self.batchers.pop(m.key) for m in gone if m.key in self.batchers]
        for batcher in started:
            self.batchers[batcher.loaded.key] = batcher
        if entry is None:
            self.registry.drop(name)
        else:
            self.registry.put(entry)
        backend = self.settings.backend
        for model in gone:
            forget_version(self.metrics, model, backend)
        for batcher in started:
            describe_version(self.metrics, batcher.loaded, backend)
        self.metrics.model_versions.labels("loaded").set(len(self.registry.loaded()))
        self.metrics.model_versions.labels("failed").set(len(self.registry.failed()))
        grace = self.settings.request_timeout_s + RETIRE_MARGIN_S
        for batcher in retired:
            task = asyncio.get_running_loop().create_task(batcher.retire(grace))
            self.retiring.add(task)
            task.add_done_callback(self.retiring.discard)

    async def unload(self, name: str, by_client: bool = True) -> list[int]:
        """Stop serving every version of `name`; the poll leaves a model a client unloaded
        alone until a client loads it again. The versions unloaded."""
        self.check_folder(name)
        async with self.lock:
            entry = self.registry.entries.get(name)
            if entry is None and not await asyncio.to_thread(self.repository.versions, name):
                raise ApiError.single(
                    404, "model_not_found", f"no model named {name!r}", ("path", "name")
                )
            if by_client:
                self.unloaded.add(name)
            if entry is None:
                return []
            self._swap(name, None, entry.versions, [])
            for key in [k for k in self.seen if k[0] == name]:
                del self.seen[key]
            for version in entry.versions:
                log.info("unloaded %s v%d", name, version)
                self.metrics.reloads.labels(name, "unloaded").inc()
            return list(entry.versions)

    def index(self, ready_only: bool = False) -> list[dict]:
        """Triton's repository index: every version on disk or served, with its state."""
        rows = []
        names = sorted(set(self.repository.names()) | set(self.registry.entries))
        for name in names:
            entry = self.registry.entries.get(name)
            if entry is None:
                reason = "unloaded" if name in self.unloaded else "not loaded"
                for version in self.repository.versions(name):
                    rows.append(
                        {
                            "name": name,
                            "version": str(version),
                            "state": "UNAVAILABLE",
                            "reason": reason,
                        }
                    )
                continue
            for version, model in entry.versions.items():
                row = {"name": name, "version": str(version)}
                if isinstance(model, LoadedModel):
                    row["state"] = "READY"
                    if version in entry.refused:
                        row["reason"] = f"a rewrite was refused: {entry.refused[version]}"
                else:
                    row.update(state="UNAVAILABLE", reason=model.error)
                rows.append(row)
        return [r for r in rows if r["state"] == "READY"] if ready_only else rows

    def snapshot(self) -> dict[str, dict[int, str]]:
        """Every model folder's versions and their fingerprints (a stat per file)."""
        repository = self.repository
        return {
            name: {v: repository.fingerprint(p) for v, p in repository.versions(name).items()}
            for name in repository.names()
        }

    async def poll_once(self) -> None:
        """Reload each model whose folder changed; unload each whose folder is gone."""
        found = await asyncio.to_thread(self.snapshot)
        for name, versions in found.items():
            if name in self.unloaded:
                continue
            entry = self.registry.entries.get(name)
            known = {v: self.seen.get((name, v)) for v in (entry.versions if entry else ())}
            if known != versions:
                with contextlib.suppress(ApiError):  # gone meanwhile
                    await self.reload(name, retry=False)
        for name in set(self.registry.entries) - set(found):
            log.info("model folder %s is gone", name)
            with contextlib.suppress(ApiError):
                await self.unload(name, by_client=False)

    async def poll(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.poll_once()
            except Exception:  # a bad scan must not end the polling
                log.exception("polling %s failed", self.repository.root)

    def start_polling(self) -> None:
        if self.settings.model_poll_s > 0:
            self.poller = asyncio.get_running_loop().create_task(
                self.poll(self.settings.model_poll_s), name="model directory poll"
            )

    async def close(self) -> None:
        """Stop polling and wait for the retiring batchers (their requests are answered)."""
        if self.poller is not None:
            self.poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.poller
        await asyncio.gather(*self.retiring, return_exceptions=True)
