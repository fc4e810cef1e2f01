"""Admission limits: calls in flight on the whole server, per principal calls in flight and open streams, and what
one caller's refusals may cost (past a number in a window, its calls are refused for a while).

Checked at the call boundary once the caller is known and before its message is read, so that whoever holds
capacity is an authenticated principal, bounded by its own limits (a caller without a valid token is refused
before it can hold anything). Everything runs on the event loop: plain counters, no locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import ResourceExhaustedError

PrincipalKey = tuple[str, str]  # (token issuer, subject)
# Who a refusal is counted against: ("principal", issuer, subject) once a token is verified, else ("certificate",
# SHA-256 of the client certificate), which the handshake proved and which costs nothing to take.
CallerKey = tuple[str, ...]
# The statuses that are the caller's doing: the refusals counted. RESOURCE_EXHAUSTED is not among them, so that
# the refusals of a blocked caller do not prolong its block, nor does the server's own load count against it.
COUNTED_REFUSALS = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND", "INVALID_ARGUMENT", "UNIMPLEMENTED"})
# Callers tracked at once; past it the windows that have ended are dropped, then all counts (blocks are kept).
_TRACKED = 10_000


@dataclass(frozen=True, slots=True)
class PrincipalLimits:
    """What one principal (token issuer and subject) may hold at once."""

    max_in_flight: int = 64  # unary calls being served
    max_streams: int = 16  # streams open
    # Past this many refusals (calls or stream messages) in refusal_window_s, the caller's streams are ended and its
    # calls refused for refusal_block_s (0: no limit): what one caller's refusals may cost in audit records.
    max_refusals: int = 100
    refusal_window_s: float = 10.0
    refusal_block_s: float = 30.0


class Slot:
    """One admitted call: its place among the server's calls and, where it has one, its principal's;
    ``release`` gives them back (idempotent)."""

    __slots__ = ("_admission", "_held")

    def __init__(self, admission: Admission, held: tuple[PrincipalKey, str] | None) -> None:
        self._admission, self._held = admission, held

    def release(self) -> None:
        """Give the capacity back; later calls do nothing."""
        if self._admission is not None:
            self._admission._release(self._held)
            self._admission = None  # type: ignore[assignment]


class Admission:
    """Counts calls in flight (server-wide) and, per principal, unary calls in flight and open streams."""

    def __init__(self, *, max_concurrent_rpcs: int, per_principal: PrincipalLimits) -> None:
        self._max_total = max_concurrent_rpcs
        self._per_principal = per_principal
        self._total = 0
        self._held: dict[tuple[PrincipalKey, str], int] = {}  # (principal, kind) -> count; absent at zero

    @property
    def in_flight(self) -> int:
        """Calls admitted and not released: for metrics and tests."""
        return self._total

    def admit(self, principal: PrincipalKey | None, *, stream: bool) -> Slot:
        """Admit one call of ``principal`` (issuer, subject; None: a call without one, the dev_no_auth mode):
        RESOURCE_EXHAUSTED past the principal's limit, naming which, then past ``limits.max_concurrent_rpcs``."""
        held = None
        if principal is not None:
            held = (principal, "streams" if stream else "in_flight")
            count = self._held.get(held, 0)
            limit = self._per_principal.max_streams if stream else self._per_principal.max_in_flight
            if count >= limit:
                name, what = ("max_streams", "open streams") if stream else ("max_in_flight", "calls in flight")
                raise ResourceExhaustedError(
                    f"caller is at its limit of {limit} {what} (limits.per_principal.{name}); retry later",
                    reason=f"per-principal {held[1]} limit",
                )
        if self._total >= self._max_total:
            raise ResourceExhaustedError(
                "the server is at its limit of concurrent calls (limits.max_concurrent_rpcs); retry later",
                reason="concurrent call limit",
            )
        self._total += 1
        if held is not None:
            self._held[held] = count + 1
        return Slot(self, held)

    def _release(self, held: tuple[PrincipalKey, str] | None) -> None:
        self._total -= 1
        if held is not None:
            count = self._held[held] - 1
            if count:
                self._held[held] = count
            else:
                del self._held[held]


class RefusalLimit:
    """Counts each caller's refusals in a fixed window; at ``max_refusals`` in ``window_s`` the caller is blocked
    for ``block_s``: its streams end at their next message and its calls are refused at admission (each still with
    its record, before its message is read). Runs on the event loop: plain dicts, no locks."""

    def __init__(self, limits: PrincipalLimits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._max = limits.max_refusals
        self._window_s = limits.refusal_window_s
        self._block_s = limits.refusal_block_s
        self._clock = clock
        self._counts: dict[CallerKey, tuple[float, int]] = {}  # key -> (window start, refusals in it)
        self._blocked: dict[CallerKey, float] = {}  # key -> clock time the block ends

    def check(self, key: CallerKey | None) -> None:
        """RESOURCE_EXHAUSTED while ``key`` is blocked."""
        if key is None or not self._blocked:
            return
        until = self._blocked.get(key)
        if until is None:
            return
        if self._clock() >= until:
            del self._blocked[key]
            return
        raise ResourceExhaustedError(
            f"too many refused requests from this caller (limits.per_principal.max_refusals is {self._max} in "
            f"{self._window_s:g} s); retry later",
            reason="refusal limit",
        )

    def note(self, key: CallerKey | None, code: str) -> bool:
        """Count a refusal of ``key`` with status ``code`` (others are ignored); True when it starts a block."""
        if key is None or not self._max or code not in COUNTED_REFUSALS:
            return False
        now = self._clock()
        start, count = self._counts.get(key, (now, 0))
        if now - start >= self._window_s:
            start, count = now, 0
        count += 1
        if count < self._max:
            if len(self._counts) >= _TRACKED and key not in self._counts:
                self._prune(now)
            self._counts[key] = (start, count)
            return False
        self._counts.pop(key, None)
        if len(self._blocked) >= _TRACKED:
            self._blocked = {k: until for k, until in self._blocked.items() if until > now}
        self._blocked[key] = now + self._block_s
        return True

    def _prune(self, now: float) -> None:
        self._counts = {k: v for k, v in self._counts.items() if now - v[0] < self._window_s}
        if len(self._counts) >= _TRACKED:
            self._counts.clear()
