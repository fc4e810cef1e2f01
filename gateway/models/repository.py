"""The model repository: ``<root>/<name>/<version>/model.onnx``, loaded at start and watched for changes.

Readers never lock: the loaded set is an immutable mapping replaced whole on every change, so a request sees
either the old or the new set. A removed or replaced version is dropped from the mapping; requests already
holding it finish on it, and ONNX Runtime frees it when the last reference goes (logged as unloaded).
"""

from __future__ import annotations

import os
import re
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import structlog

from gateway.errors import NotFoundError
from gateway.identifiers import NAME, shown
from gateway.models.placement import Placement
from gateway.models.runtime import ModelLoadError, ModelVersion, RuntimeOptions
from gateway.watcher import Watcher

log = structlog.get_logger(__name__)

MODEL_FILE = "model.onnx"
_VERSION = re.compile(r"[1-9][0-9]{0,17}", re.ASCII)

FileKey = tuple[int, int, int]  # (inode, size, mtime_ns): a new key means a new or rewritten file


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model's name, its loaded versions (ascending) and the default (highest) version."""

    name: str
    versions: tuple[int, ...]
    default_version: int | None


@dataclass(frozen=True, slots=True)
class _Loaded:
    model: ModelVersion
    key: FileKey


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """Everything readers need, published with one attribute store so a reader sees one consistent state."""

    loaded: Mapping[tuple[str, int], _Loaded]
    index: Mapping[str, ModelInfo]


def parse_version(text: str) -> int | None:
    """The version a folder name or a request names (ASCII digits, no leading zero), else None."""
    return int(text) if _VERSION.fullmatch(text) else None


def scan(root: Path) -> dict[tuple[str, int], tuple[Path, FileKey]]:
    """Every well-named ``<name>/<version>/model.onnx`` under root, with its file key."""
    found: dict[tuple[str, int], tuple[Path, FileKey]] = {}
    try:
        names = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return found
    for name_entry in names:
        if not (name_entry.is_dir() and NAME.allows(name_entry.name)):
            continue
        for version_entry in os.scandir(name_entry.path):
            if not (version_entry.is_dir() and parse_version(version_entry.name) is not None):
                continue
            path = Path(version_entry.path) / MODEL_FILE
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            found[(name_entry.name, int(version_entry.name))] = (path, (st.st_ino, st.st_size, st.st_mtime_ns))
    return found


class ModelRepository:
    """Loaded model versions by name; resolves a requested version to a loaded one."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        options: RuntimeOptions,
        placement: Placement,
        poll_interval_s: float,
        on_publish: Callable[[list[ModelInfo], list[str]], None] | None = None,
    ) -> None:
        """``on_publish(models, removed_names)`` is called after each change (health statuses follow it)."""
        self.root = Path(root)
        self._options = options
        self._placement = placement
        self._on_publish = on_publish
        self._snapshot = _Snapshot(MappingProxyType({}), MappingProxyType({}))
        self._refused: dict[tuple[str, int], FileKey] = {}
        self._write_lock = threading.Lock()
        self._watcher = Watcher(
            name="models", fingerprint=lambda: scan(self.root), on_change=self.rescan, interval_s=poll_interval_s
        )

    def load_all(self) -> None:
        """Load every version at start; any unloadable one is a startup error (ModelLoadError)."""
        if not self.root.is_dir():
            raise ModelLoadError(f"model repository {self.root} is not a directory")
        with self._write_lock:
            loaded = {}
            for (name, version), (path, key) in scan(self.root).items():
                model = ModelVersion(
                    name=name, version=version, path=path, options=self._options, placement=self._placement
                )
                loaded[(name, version)] = _Loaded(model, key)
                self._log_loaded(model)
            self._publish(loaded)
        if not loaded:
            log.warning("model_repository_empty", root=str(self.root))

    def start(self) -> None:
        """Start watching the repository for added, changed and removed versions."""
        self._watcher.start()

    def stop(self) -> None:
        """Stop watching."""
        self._watcher.stop()

    def rescan(self) -> None:
        """Apply what changed on disk: load new or rewritten versions, drop removed ones."""
        with self._write_lock:
            current = dict(self._snapshot.loaded)
            found = scan(self.root)
            changed = False
            for ident in list(current):
                if ident not in found:
                    del current[ident]
                    changed = True
                    log.info("model_version_removed", model=ident[0], version=ident[1])
            for ident, (path, key) in found.items():
                existing = current.get(ident)
                if (existing and existing.key == key) or self._refused.get(ident) == key:
                    continue
                try:
                    model = ModelVersion(
                        name=ident[0], version=ident[1], path=path, options=self._options, placement=self._placement
                    )
                except ModelLoadError as exc:
                    # Remember the refusal so a broken file is logged once, not on every poll; a rewrite retries.
                    self._refused[ident] = key
                    log.error("model_version_refused", model=ident[0], version=ident[1], error=str(exc))
                    continue
                self._refused.pop(ident, None)
                current[ident] = _Loaded(model, key)
                changed = True
                self._log_loaded(model, reloaded=existing is not None)
            if changed:
                self._publish(current)

    def _publish(self, loaded: dict[tuple[str, int], _Loaded]) -> None:
        versions: dict[str, list[int]] = {}
        for name, version in loaded:
            versions.setdefault(name, []).append(version)
        index = {name: ModelInfo(name, tuple(sorted(vs)), max(vs)) for name, vs in sorted(versions.items())}
        removed = [name for name in self._snapshot.index if name not in index]
        self._snapshot = _Snapshot(MappingProxyType(loaded), MappingProxyType(index))
        if self._on_publish is not None:
            self._on_publish(list(index.values()), removed)

    @staticmethod
    def _log_loaded(model: ModelVersion, *, reloaded: bool = False) -> None:
        log.info(
            "model_version_reloaded" if reloaded else "model_version_loaded",
            model=model.name,
            version=model.version,
            path=str(model.path),
        )
        weakref.finalize(model, log.info, "model_version_unloaded", model=model.name, version=model.version)

    def models(self) -> list[ModelInfo]:
        """Every loaded model, by name."""
        return list(self._snapshot.index.values())

    def info(self, name: str) -> ModelInfo | None:
        """One model's versions and default, or None when it does not exist."""
        return self._snapshot.index.get(name)

    def resolve(self, name: str, version: int | None) -> ModelVersion:
        """The loaded model version to run; NOT_FOUND for an unknown model or version."""
        snapshot = self._snapshot
        info = snapshot.index.get(name)
        if info is None:
            raise NotFoundError(f"model '{shown(name)}' not found")
        wanted = info.default_version if version is None else version
        loaded = snapshot.loaded.get((name, wanted)) if wanted is not None else None
        if loaded is None:
            raise NotFoundError(f"model '{shown(name)}' has no version {version}")
        return loaded.model
