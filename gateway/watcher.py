"""Polling file watcher, and the reloading store built on it: files (JWKS, policies, CRL, certificates, models)
are reloaded on change, and a file that fails to load leaves the previous value in force.

Polling, not inotify: it works the same on every filesystem (bind mounts, Kubernetes ConfigMap symlink swaps),
and a fingerprint of (inode, size, mtime, ctime) catches in-place edits, atomic renames, and a chmod or chown
(so fixing a key file's mode takes effect without a restart).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

import structlog

from gateway import metrics

log = structlog.get_logger(__name__)

Fingerprint = object  # compared with ==, never hashed
T = TypeVar("T")


def file_fingerprint(paths: Iterable[str | os.PathLike[str]]) -> Fingerprint:
    """Identity of some files' current contents and permissions; a missing file has its own fingerprint."""
    prints: list[tuple[str, tuple[int, int, int, int] | None]] = []
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            prints.append((str(path), None))
            continue
        prints.append((str(path), (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)))
    return tuple(prints)


def tree_fingerprint(directory: str | os.PathLike[str], patterns: Iterable[str]) -> Fingerprint:
    """Fingerprint of every file below ``directory`` matching one of ``patterns`` (``Path.glob``; ``**/`` recurses)."""
    root = Path(directory)
    files = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
    return file_fingerprint(files)


class Watcher:
    """Calls ``on_change`` from a daemon thread whenever ``fingerprint()`` changes.

    ``on_change`` owns validation and logging; an exception it raises is logged and the watcher keeps going,
    so a broken file never stops later reloads.
    """

    def __init__(
        self,
        *,
        name: str,
        fingerprint: Callable[[], Fingerprint],
        on_change: Callable[[], None],
        interval_s: float,
    ) -> None:
        self.name = name
        self._fingerprint = fingerprint
        self._on_change = on_change
        self._interval_s = interval_s
        self._last = fingerprint()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start polling in a daemon thread."""
        if self._interval_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"watch-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def check_now(self) -> bool:
        """Poll once, synchronously; returns whether a change was seen."""
        with self._lock:
            current = self._fingerprint()
            if current == self._last:
                return False
            self._last = current
            try:
                self._on_change()
            except Exception:
                log.exception("watcher_callback_failed", watcher=self.name)
            return True

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.check_now()
            except Exception:
                log.exception("watcher_poll_failed", watcher=self.name)


def _no_fields(*_values: object) -> Mapping[str, Any]:
    return {}


class ReloadingStore(Generic[T]):
    """A value loaded from files at start and reloaded whenever they change: a new value is swapped in whole and
    logged as ``reloaded``; a load that raises ``refused`` is logged as ``failed`` and the old value keeps serving.

    ``load(previous)`` gets the value in force (None at start) so it can refuse a change relative to it; at start
    its error propagates, a startup error. ``reloaded_fields(old, new)`` and ``failed_fields(old)`` add log fields.
    """

    def __init__(
        self,
        *,
        name: str,
        fingerprint: Callable[[], Fingerprint],
        load: Callable[[T | None], T],
        refused: type[Exception],
        interval_s: float,
        reloaded: str,
        failed: str,
        reloaded_fields: Callable[[T, T], Mapping[str, Any]] = _no_fields,
        failed_fields: Callable[[T], Mapping[str, Any]] = _no_fields,
    ) -> None:
        self._load = load
        self._refused = refused
        self._reloaded, self._failed = reloaded, failed
        self._reloaded_fields, self._failed_fields = reloaded_fields, failed_fields
        # Fingerprint before loading: a file replaced in between is then seen as a change and loaded again.
        self._watcher = Watcher(name=name, fingerprint=fingerprint, on_change=self._reload, interval_s=interval_s)
        self._loaded = metrics.LAST_RELOAD.labels(store=name)
        self._failures = metrics.RELOAD_FAILURES.labels(store=name)  # at 0 from the start: see metrics.start_counting
        self._current = load(None)
        self._loaded.set_to_current_time()

    @property
    def current(self) -> T:
        """The value in force (read it once per use: a reload swaps the whole value)."""
        return self._current

    def start(self) -> None:
        """Poll the files in a daemon thread."""
        self._watcher.start()

    def stop(self) -> None:
        """Stop polling."""
        self._watcher.stop()

    def check_now(self) -> bool:
        """Poll once, synchronously; returns whether a change was seen (loaded or refused)."""
        return self._watcher.check_now()

    def _reload(self) -> None:
        old = self._current
        try:
            new = self._load(old)
        except self._refused as exc:
            self._failures.inc()
            log.error(self._failed, **self._failed_fields(old), error=str(exc))
            return
        # One attribute store: a reader sees the old value or the new one, never a mix.
        self._current = new
        self._loaded.set_to_current_time()
        log.info(self._reloaded, **self._reloaded_fields(old, new))
