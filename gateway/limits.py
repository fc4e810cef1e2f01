"""Admission limits: calls in flight on the whole server, and per principal calls in flight and open streams.

Checked at the call boundary once the caller is known and before its message is read, so that whoever holds
capacity is an authenticated principal, bounded by its own limits (a caller without a valid token is refused
before it can hold anything). Everything runs on the event loop: plain counters, no locks.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import ResourceExhaustedError

PrincipalKey = tuple[str, str]  # (token issuer, subject)


@dataclass(frozen=True, slots=True)
class PrincipalLimits:
    """What one principal (token issuer and subject) may hold at once."""

    max_in_flight: int = 64  # unary calls being served
    max_streams: int = 16  # streams open


class Slot:
    """One admitted call; ``release`` gives its capacity back (idempotent)."""

    __slots__ = ("_admission", "_key", "_kind")

    def __init__(self, admission: Admission, key: PrincipalKey | None, kind: str | None) -> None:
        self._admission, self._key, self._kind = admission, key, kind

    def release(self) -> None:
        """Give the capacity back; later calls do nothing."""
        if self._admission is not None:
            self._admission._release(self._key, self._kind)
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

    def admit_call(self) -> Slot:
        """Admit one call to the server; RESOURCE_EXHAUSTED past ``limits.max_concurrent_rpcs``."""
        if self._total >= self._max_total:
            raise ResourceExhaustedError(
                "the server is at its limit of concurrent calls (limits.max_concurrent_rpcs); retry later",
                reason="concurrent call limit",
            )
        self._total += 1
        return Slot(self, None, None)

    def admit_principal(self, key: PrincipalKey, *, stream: bool) -> Slot:
        """Admit one call of principal ``key`` (issuer, subject); RESOURCE_EXHAUSTED past its limit, naming which."""
        kind, limit, name = (
            ("streams", self._per_principal.max_streams, "limits.per_principal.max_streams")
            if stream
            else ("in_flight", self._per_principal.max_in_flight, "limits.per_principal.max_in_flight")
        )
        held = self._held.get((key, kind), 0)
        if held >= limit:
            what = "open streams" if stream else "calls in flight"
            raise ResourceExhaustedError(
                f"caller is at its limit of {limit} {what} ({name}); retry later", reason=f"per-principal {kind} limit"
            )
        self._held[(key, kind)] = held + 1
        return Slot(self, key, kind)

    def _release(self, key: PrincipalKey | None, kind: str | None) -> None:
        if key is None or kind is None:
            self._total -= 1
            return
        held = self._held[(key, kind)] - 1
        if held:
            self._held[(key, kind)] = held
        else:
            del self._held[(key, kind)]
