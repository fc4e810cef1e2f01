"""The model repository: ``<root>/<name>/<version>/model.onnx``, loaded at start and watched for changes.

Readers never lock: the loaded set is an immutable mapping replaced whole on every change, so a request sees
either the old or the new set. A removed or replaced version is dropped from the mapping; requests already
holding it finish on it, and ONNX Runtime frees it when the last reference goes (logged as unloaded).

A version whose file fails to load is left out and remembered with its reason (``failures``); one that loaded
before keeps serving its last good load. Only ``strict`` makes a failure at start stop the gateway.

Each load works on a private copy of the version folder (signature.staged): with ``models.signatures`` on, the
copy is verified against its signature before ONNX Runtime reads it, and every load names the copy's bytes by
their manifest digest (signature.digest), carried by the loaded version into records and metadata.
"""

from __future__ import annotations

import os
import re
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import structlog

from gateway import metrics
from gateway.errors import NotFoundError
from gateway.identifiers import NAME, shown
from gateway.models import routing as routes
from gateway.models import signature, triton_config
from gateway.models.placement import Placement
from gateway.models.routing import Reason, Route, VersionRouting
from gateway.models.runtime import ModelLoadError, ModelVersion, RuntimeOptions
from gateway.models.signature import SignatureError, SignaturePolicy
from gateway.watcher import Watcher

log = structlog.get_logger(__name__)

MODEL_FILE = "model.onnx"
_VERSION = re.compile(r"[1-9][0-9]{0,17}", re.ASCII)

# (path, inode, size, mtime_ns) of every file in a version folder: a new key means a file added, removed or
# rewritten (the model, its signature, any file the signature covers), and so a new load.
FileKey = tuple[tuple[str, int, int, int], ...]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model's name, its loaded versions (ascending) and the version a request naming none gets (the pinned
    default or the highest; None when its pinned default is not loaded)."""

    name: str
    versions: tuple[int, ...]
    default_version: int | None


Routed = tuple[ModelVersion, Reason]


@dataclass(frozen=True, slots=True)
class LoadFailure:
    """A version whose current file failed to load: the file, a one-line reason, and the file key it had."""

    path: Path
    reason: str
    key: FileKey


@dataclass(frozen=True, slots=True)
class _Loaded:
    model: ModelVersion
    key: FileKey


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """Everything readers need, published with one attribute store so a reader sees one consistent state."""

    loaded: Mapping[tuple[str, int], _Loaded]
    index: Mapping[str, ModelInfo]
    failed: Mapping[tuple[str, int], LoadFailure]
    generation: int = 0  # one more at each publication


@dataclass(frozen=True, slots=True)
class Listing:
    """What a scan found: each version's model file with its key, each entry that is no version, with why, and
    each model's Triton config.pbtxt as read."""

    versions: dict[tuple[str, int], tuple[Path, FileKey]]
    ignored: dict[str, str]
    configs: dict[str, triton_config.TritonConfig] = field(default_factory=dict)


def parse_version(text: str) -> int | None:
    """The version a folder name or a request names (ASCII digits, no leading zero), else None."""
    return int(text) if _VERSION.fullmatch(text) else None


def scan(root: Path) -> Listing:
    """Every well-named ``<name>/<version>/model.onnx`` under root, and every other entry with the reason it is
    not served."""
    listing = Listing({}, {})
    try:
        entries = _entries(root)
    except FileNotFoundError:
        return listing
    for entry in entries:
        if not entry.is_dir():
            listing.ignored[entry.path] = "a file where only model folders belong"
        elif not NAME.allows(entry.name):
            listing.ignored[entry.path] = "not a model name (a letter or digit, then letters, digits, '_', '.', '-')"
        else:
            _scan_model(entry, listing)
    return listing


def _scan_model(model: os.DirEntry[str], listing: Listing) -> None:
    try:
        entries = _entries(model.path)
    except OSError as exc:  # removed since the root was listed, or unreadable
        listing.ignored[model.path] = f"cannot list it: {exc.strerror}"
        return
    config = triton_config.read(Path(model.path))
    if config is not None:
        listing.configs[model.name] = config
    filename = triton_config.model_file(config, MODEL_FILE)
    for entry in entries:
        if entry.name == triton_config.CONFIG_FILE and entry.is_file():
            continue
        if not entry.is_dir():
            listing.ignored[entry.path] = f"a file where only version folders belong (<version>/{filename})"
        elif (version := parse_version(entry.name)) is None:
            listing.ignored[entry.path] = "not a version (a positive integer without leading zeros)"
        else:
            path = Path(entry.path) / filename
            try:
                path.stat()
                key = _folder_key(entry.path)
            except OSError as exc:
                listing.ignored[entry.path] = f"{filename}: {exc.strerror}"
                continue
            listing.versions[(model.name, version)] = (path, key)


def _folder_key(folder: str) -> FileKey:
    """Every file under a version folder, hidden ones included (a signature covers them too), with its stat."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(parent, name)
            st = os.stat(full)
            found.append((os.path.relpath(full, folder), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(found)


def _entries(folder: str | os.PathLike[str]) -> list[os.DirEntry[str]]:
    """A folder's entries by name, less hidden ones: a dot name is where a version is staged before the rename
    that publishes it, or a tool's file, and is skipped without a word."""
    with os.scandir(folder) as found:
        return sorted((entry for entry in found if not entry.name.startswith(".")), key=lambda e: e.name)


class ModelRepository:
    """Loaded model versions by name; resolves a requested version to a loaded one."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        options: RuntimeOptions,
        placement: Placement,
        poll_interval_s: float,
        strict: bool = False,
        signatures: SignaturePolicy | None = None,
        max_version_bytes: int = signature.DEFAULT_MAX_VERSION_BYTES,
        routing: Mapping[str, VersionRouting] | None = None,
        share: routes.Share = routes.request_share,
    ) -> None:
        """``strict``: a version that fails to load at start is a startup error instead of being left out.
        ``signatures``: which models' versions must carry a valid signature (default: none).
        ``max_version_bytes``: the most a version folder may hold (each load copies it: signature.staged).
        ``routing``: pinned defaults and canaries by model (routing.py); ``share`` places a request in a canary."""
        self.root = Path(root)
        self._max_version_bytes = max_version_bytes
        self._routing = dict(routing or {})
        self._share = share
        self._routing_problems: dict[str, tuple[str, str]] = {}  # as last logged
        self._options = options
        self._signatures = signatures or SignaturePolicy()
        self._placement = placement
        self._strict = strict
        self._snapshot = _Snapshot(MappingProxyType({}), MappingProxyType({}), MappingProxyType({}))
        self._published: set[str] = set()  # the models whose loaded versions the metrics last showed
        self._ignored: dict[str, str] = {}  # as last logged: each entry is logged once, not on every poll
        self._configs: dict[str, triton_config.TritonConfig] = {}  # as last logged
        self._write_lock = threading.Lock()
        self._failures = metrics.RELOAD_FAILURES.labels(store="models")  # at 0 from the start
        self._watcher = Watcher(
            name="models", fingerprint=lambda: scan(self.root), on_change=self.rescan, interval_s=poll_interval_s
        )

    def load_all(self) -> None:
        """Load every version at start; one that fails is logged and left out (with ``strict``, raised)."""
        if not self.root.is_dir():
            raise ModelLoadError(self.root, "the model repository is not a directory")
        self._apply(scan(self.root), strict=self._strict)
        if not self._snapshot.index:
            log.warning("model_repository_empty", root=str(self.root), failed=len(self._snapshot.failed))

    def start(self) -> None:
        """Start watching the repository for added, changed and removed versions."""
        self._watcher.start()

    def stop(self) -> None:
        """Stop watching."""
        self._watcher.stop()

    def reload_now(self) -> bool:
        """Check the repository once, synchronously (SIGHUP); returns whether a change was seen."""
        return self._watcher.check_now()

    def rescan(self) -> None:
        """Apply what changed on disk: load new or rewritten versions, drop removed ones."""
        self._apply(scan(self.root), strict=False)

    def _apply(self, listing: Listing, *, strict: bool) -> None:
        with self._write_lock:
            self._log_ignored(listing.ignored)
            self._log_configs(listing.configs)
            loaded = dict(self._snapshot.loaded)
            failed = {ident: f for ident, f in self._snapshot.failed.items() if ident in listing.versions}
            changed = len(failed) != len(self._snapshot.failed)
            refused = False
            for ident in [ident for ident in loaded if ident not in listing.versions]:
                del loaded[ident]
                changed = True
                log.info("model_version_removed", model=ident[0], version=ident[1])
            for ident, (path, key) in listing.versions.items():
                existing, tried = loaded.get(ident), failed.get(ident)
                if (existing and (existing.key, existing.model.path) == (key, path)) or (
                    tried and (tried.key, tried.path) == (key, path)
                ):
                    continue  # unchanged since it last loaded or failed: a broken file is tried (and logged) once
                changed = True
                outcome = self._load(ident, path, key, strict=strict, still_serving=existing is not None)
                if isinstance(outcome, LoadFailure):
                    failed[ident] = outcome
                    refused = True
                    continue
                failed.pop(ident, None)
                loaded[ident] = _Loaded(outcome, key)
                self._log_loaded(outcome, reloaded=existing is not None)
            if changed:
                self._publish(loaded, failed)
            if changed and not refused:  # the store's last success: a scan whose every change loaded
                metrics.LAST_RELOAD.labels(store="models").set_to_current_time()

    def _load(
        self, ident: tuple[str, int], path: Path, key: FileKey, *, strict: bool, still_serving: bool
    ) -> ModelVersion | LoadFailure:
        """One version's file loaded, or why not (logged; raised when ``strict``)."""
        name, version = ident
        try:
            return self._load_staged(name, version, path, still_serving=still_serving)
        except ModelLoadError as exc:
            if strict:
                raise
            metrics.MODEL_LOAD_FAILURES.labels(model=name).inc()
            self._failures.inc()
            log.error(
                "model_load_failed",
                model=name,
                version=version,
                path=str(path),
                reason=exc.reason,
                still_serving=still_serving,
            )
            return LoadFailure(path, exc.reason, key)

    def _load_staged(self, name: str, version: int, path: Path, *, still_serving: bool) -> ModelVersion:
        """Copy the version folder privately, verify the copy (per the model's mode), name its bytes, load it."""
        mode = self._signatures.mode_for(name)
        try:
            with signature.staged(path.parent, max_bytes=self._max_version_bytes) as copy:
                signed = False
                if mode != "off":
                    try:
                        signature.verify(copy, self._signatures.trust)
                        signed = True
                    except SignatureError as exc:
                        self._signature_invalid(name, version, mode, exc.reason, still_serving=still_serving)
                        if mode == "required":
                            raise ModelLoadError(path, f"signature not valid: {exc.reason}") from None
                try:
                    digest = signature.digest(copy)
                except SignatureError as exc:
                    raise ModelLoadError(path, exc.reason) from None
                return ModelVersion(
                    name=name,
                    version=version,
                    path=path,
                    options=self._options,
                    placement=self._placement,
                    load_from=copy / path.name,
                    digest=digest,
                    signed=signed,
                )
        except OSError as exc:  # the folder changed or vanished while it was copied
            raise ModelLoadError(path, f"cannot copy the version folder: {exc.strerror or exc}") from None
        except SignatureError as exc:  # a link to a folder or a special file: refused before it is read
            raise ModelLoadError(path, f"cannot copy the version folder: {exc.reason}") from None

    @staticmethod
    def _signature_invalid(name: str, version: int, mode: str, reason: str, *, still_serving: bool) -> None:
        metrics.MODEL_SIGNATURE_FAILURES.labels(model=name, mode=mode).inc()
        refused = mode == "required"
        (log.error if refused else log.warning)(
            "model_signature_invalid",
            model=name,
            version=version,
            reason=reason,
            mode=mode,
            action="refused" if refused else "served",
            still_serving=still_serving and refused,
        )

    def _log_configs(self, configs: dict[str, triton_config.TritonConfig]) -> None:
        """Each model's config.pbtxt, once per change: what is honoured, what is not and where it lives instead."""
        for model, config in configs.items():
            if self._configs.get(model) == config:
                continue
            if config.error is not None:
                log.warning(
                    "model_config_pbtxt_invalid",
                    model=model,
                    reason=config.error,
                    detail=f"not used: each version loads {MODEL_FILE}",
                )
                continue
            log.info(
                "model_config_pbtxt_read",
                model=model,
                honoured=list(config.honoured),
                ignored=dict(config.ignored),
                model_file=triton_config.model_file(config, MODEL_FILE),
            )
            for warning in config.warnings:
                log.warning("model_config_pbtxt_mismatch", model=model, detail=warning)
        self._configs = configs

    def _log_ignored(self, ignored: dict[str, str]) -> None:
        for path, reason in ignored.items():
            if self._ignored.get(path) != reason:
                log.warning("model_entry_ignored", path=path, reason=reason)
        self._ignored = ignored

    def _publish(self, loaded: dict[tuple[str, int], _Loaded], failed: dict[tuple[str, int], LoadFailure]) -> None:
        versions: dict[str, list[int]] = {}
        for name, version in loaded:
            versions.setdefault(name, []).append(version)
        index = {name: self._info(name, tuple(sorted(vs))) for name, vs in sorted(versions.items())}
        self._log_routing({name: info.versions for name, info in index.items()})
        self._snapshot = _Snapshot(
            MappingProxyType(loaded), MappingProxyType(index), MappingProxyType(failed), self._snapshot.generation + 1
        )
        for name in self._published - versions.keys():  # removed: 0, as every worker's file can say it
            metrics.MODEL_VERSIONS.labels(model=name).set(0)
        for name, vs in versions.items():
            metrics.MODEL_VERSIONS.labels(model=name).set(len(vs))
        self._published = set(versions)

    def _info(self, name: str, versions: tuple[int, ...]) -> ModelInfo:
        route = routes.choose(name, versions, self._routing.get(name), key=None)
        return ModelInfo(name, versions, route.version if route else None)

    def _log_routing(self, loaded: Mapping[str, tuple[int, ...]]) -> None:
        found = routes.problems(self._routing, loaded)
        for model, (event, detail) in found.items():
            if self._routing_problems.get(model) != (event, detail):
                (log.error if event == "model_pinned_version_missing" else log.warning)(
                    event, model=model, loaded=list(loaded.get(model, ())), detail=detail
                )
        for model in self._routing_problems.keys() - found.keys():
            log.info("model_version_routing_restored", model=model, loaded=list(loaded.get(model, ())))
        self._routing_problems = found

    @staticmethod
    def _log_loaded(model: ModelVersion, *, reloaded: bool = False) -> None:
        log.info(
            "model_version_reloaded" if reloaded else "model_version_loaded",
            model=model.name,
            version=model.version,
            path=str(model.path),
            digest=model.digest,
            signed=model.signed,
            provider=model.provider,
        )
        weakref.finalize(model, log.info, "model_version_unloaded", model=model.name, version=model.version)

    def models(self) -> list[ModelInfo]:
        """Every loaded model, by name."""
        return list(self._snapshot.index.values())

    def failures(self) -> Mapping[tuple[str, int], LoadFailure]:
        """Versions whose current file failed to load, and why; one that loaded before still serves that load."""
        return self._snapshot.failed

    @property
    def generation(self) -> int:
        """Changes with every load or reload: what ``route`` answers may have changed with it."""
        return self._snapshot.generation

    def drawn(self, name: str) -> bool:
        """Whether a request naming no version of ``name`` may be placed by its call's draw (a canary is set)."""
        routing = self._routing.get(name)
        return routing is not None and routing.canary is not None

    def info(self, name: str) -> ModelInfo | None:
        """One model's versions and default, or None when it does not exist."""
        return self._snapshot.index.get(name)

    def resolve(self, name: str, version: int | None) -> ModelVersion:
        """The loaded model version to run (a request naming none gets the default, never the canary); NOT_FOUND
        for an unknown model or version."""
        return self.route(name, version, key=None)[0]

    def route(self, name: str, version: int | None, *, key: str | None) -> tuple[ModelVersion, Reason, Routed | None]:
        """The loaded version to run, why (routing.Reason), and what serves instead when the caller may not use a
        canary; ``key`` (the call's random draw, Call.route_key) places a request that names no version in or out
        of the model's canary. NOT_FOUND for an unknown model or version, or a pinned default that is not loaded."""
        snapshot = self._snapshot
        info = snapshot.index.get(name)
        if info is None:
            raise NotFoundError(f"model '{shown(name)}' not found")
        chosen = (
            Route(version, Reason.REQUESTED)
            if version is not None
            else routes.choose(name, info.versions, self._routing.get(name), key=key, share=self._share)
        )
        if chosen is None:
            raise NotFoundError(f"model '{shown(name)}' has no default version loaded")
        loaded = snapshot.loaded.get((name, chosen.version))
        if loaded is None:
            raise NotFoundError(f"model '{shown(name)}' has no version {version}")
        base = chosen.fallback
        fallback = snapshot.loaded.get((name, base.version)) if base is not None else None
        return loaded.model, chosen.reason, (fallback.model, base.reason) if fallback and base else None
