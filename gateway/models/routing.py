"""Which version serves a request that names none: the highest loaded, or a pinned default, with an optional canary
that takes a fixed share of requests (``models.versions``; docs/versions.md).

The canary's choice is a pure function of the model name and a sticky key: the gateway draws one per call
(context.Call.route_key), never the caller's request id, so a stream's messages share one version while no caller
chooses its own; tests pass their keys and need no randomness.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

# A request's share in [0, 100): a canary with percent P takes the requests whose share is below P.
Share = Callable[[str, str], float]


class Reason(StrEnum):
    """Why a version served a request (the record's ``version_reason``)."""

    REQUESTED = "requested"  # the request named it
    DEFAULT = "default"  # the highest loaded version (no pinned default)
    PINNED = "pinned"  # models.versions.<model>.default
    CANARY = "canary"  # models.versions.<model>.canary took this request


@dataclass(frozen=True, slots=True)
class Canary:
    """A version that takes ``percent`` of the requests that name no version (both required: the defaults are
    out of range, so that the settings refuse a canary that leaves one out)."""

    version: int = 0
    percent: float = -1.0


@dataclass(frozen=True, slots=True)
class VersionRouting:
    """One model's routing: a pinned default (None: the highest loaded) and an optional canary."""

    default: int | None = None
    canary: Canary | None = None


def request_share(model: str, key: str) -> float:
    """A request's place in [0, 100), from SHA-256 of the model name and the sticky key: uniform over keys,
    independent between models (a request that is in one model's canary says nothing about another's)."""
    value = int.from_bytes(hashlib.sha256(f"{model}\0{key}".encode()).digest()[:8], "big")
    return value * 100.0 / 2**64


@dataclass(frozen=True, slots=True)
class Route:
    """The version chosen for a request and why; ``fallback``: what serves instead when the caller may not use
    the canary (policies decide per version)."""

    version: int
    reason: Reason
    fallback: Route | None = None


def choose(
    model: str,
    loaded: tuple[int, ...],
    routing: VersionRouting | None,
    *,
    key: str | None,
    share: Share = request_share,
) -> Route | None:
    """The version for a request that names none, among the ``loaded`` ones (ascending); None when there is none
    to serve (no version loaded, or the pinned one is not). ``key=None`` never picks the canary (metadata)."""
    if routing is None or routing.default is None:
        if not loaded:
            return None
        base = Route(loaded[-1], Reason.DEFAULT)
    elif routing.default in loaded:
        base = Route(routing.default, Reason.PINNED)
    else:
        return None
    canary = routing.canary if routing is not None else None
    if key is None or canary is None or canary.version not in loaded or canary.version == base.version:
        return base
    if share(model, key) < canary.percent:
        return Route(canary.version, Reason.CANARY, fallback=base)
    return base


def problems(
    routing: Mapping[str, VersionRouting], loaded: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[str, str]]:
    """Per model, the event and detail of what its routing cannot honour with the versions loaded now (logged on
    each change): a pinned default that is not loaded, or a canary that is not."""
    found: dict[str, tuple[str, str]] = {}
    for model, route in routing.items():
        versions = loaded.get(model, ())
        if route.default is not None and route.default not in versions:
            found[model] = (
                "model_pinned_version_missing",
                f"pinned default version {route.default} is not loaded: calls that name no version are refused "
                f"NOT_FOUND until it loads (models.versions.{model}.default)",
            )
        elif route.canary is not None and route.canary.version not in versions:
            found[model] = (
                "model_canary_version_missing",
                f"canary version {route.canary.version} is not loaded: every call that names no version gets the "
                f"{'pinned' if route.default is not None else 'highest'} version (models.versions.{model}.canary)",
            )
    return found
