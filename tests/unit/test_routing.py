"""Version routing without a server: the pinned default, the canary's deterministic share, and what happens when a
routed version is not loaded."""

from __future__ import annotations

import pytest

from gateway.models.routing import Canary, Reason, Route, VersionRouting, choose, problems, request_share

LOADED = (1, 2, 3)


def test_without_routing_the_highest_loaded_version_is_the_default():
    assert choose("mlp", LOADED, None, key="r1") == Route(3, Reason.DEFAULT)
    assert choose("mlp", (), None, key="r1") is None


def test_a_pinned_default_serves_while_it_is_loaded_and_nothing_else_stands_in_for_it():
    pinned = VersionRouting(default=1)
    assert choose("mlp", LOADED, pinned, key="r1") == Route(1, Reason.PINNED)
    assert choose("mlp", (2, 3), pinned, key="r1") is None  # fail closed: not the highest instead
    assert "pinned default version 1 is not loaded" in problems({"mlp": pinned}, {"mlp": (2, 3)})["mlp"][1]


@pytest.mark.parametrize(("percent", "canaried"), [(0.0, 0), (100.0, 1000)])
def test_a_canary_of_0_or_100_percent_takes_none_or_all(percent, canaried):
    routing = VersionRouting(default=1, canary=Canary(version=2, percent=percent))
    routes = [choose("mlp", LOADED, routing, key=f"req-{i}") for i in range(1000)]
    assert sum(route.reason == Reason.CANARY for route in routes) == canaried
    assert {route.version for route in routes} == ({2} if canaried else {1})


def test_the_canary_share_is_close_to_its_percent_and_the_same_for_the_same_request_id():
    routing = VersionRouting(canary=Canary(version=2, percent=10.0))
    routes = [choose("mlp", LOADED, routing, key=f"req-{i}") for i in range(20000)]
    canaried = [route for route in routes if route.reason == Reason.CANARY]
    # SHA-256 of fixed ids: deterministic; binomial sd is ~42 here, the bound is over 9 sd wide.
    assert 1600 <= len(canaried) <= 2400
    assert all(route.version == 2 and route.fallback == Route(3, Reason.DEFAULT) for route in canaried)
    assert {route.version for route in routes if route.reason != Reason.CANARY} == {3}
    assert choose("mlp", LOADED, routing, key="req-7") == choose("mlp", LOADED, routing, key="req-7")
    assert 0.0 <= request_share("mlp", "x") < 100.0


def test_the_canary_is_chosen_by_the_injected_share_and_never_without_a_key():
    routing = VersionRouting(default=1, canary=Canary(version=3, percent=50.0))
    assert choose("mlp", LOADED, routing, key="k", share=lambda model, key: 49.9).reason == Reason.CANARY
    assert choose("mlp", LOADED, routing, key="k", share=lambda model, key: 50.0) == Route(1, Reason.PINNED)
    assert choose("mlp", LOADED, routing, key=None, share=lambda model, key: 0.0) == Route(1, Reason.PINNED)


def test_a_canary_that_is_not_loaded_sends_everyone_to_the_default_and_says_so():
    routing = VersionRouting(canary=Canary(version=4, percent=100.0))
    assert choose("mlp", LOADED, routing, key="k") == Route(3, Reason.DEFAULT)
    event, detail = problems({"mlp": routing}, {"mlp": LOADED})["mlp"]
    assert event == "model_canary_version_missing" and "canary version 4 is not loaded" in detail
    assert problems({"mlp": routing}, {"mlp": (1, 4)}) == {}
