"""keel._status, table by table: percentiles of the rings, the history behind the sparkline and
the error rates, a deployment's state and a group's readiness verdict."""

from __future__ import annotations

import calendar
import math
import time

import pytest

from keel._classify import ErrorKind, UpstreamError
from keel._health import BreakerState
from keel._status import (
    DeploymentFacts,
    History,
    Ring,
    State,
    Verdict,
    clock,
    error_rates,
    group_blocker,
    state_of,
)
from keel.config import parse_config
from keel.engine._deployment import Deployment
from keel.engine._router import Router
from keel.engine._snapshot import facts as facts_of


@pytest.mark.parametrize(
    ("samples", "size", "expected"),
    [
        ([], 8, [None, None, None]),
        ([0.5], 8, [0.5, 0.5, 0.5]),
        ([float(i) for i in range(1, 101)], 128, [50.0, 90.0, 99.0]),
        # only the last `size` samples count: 1..4 are overwritten by 5..12
        ([float(i) for i in range(1, 13)], 8, [8.0, 12.0, 12.0]),
        ([3.0, 1.0, 2.0], 8, [2.0, 3.0, 3.0]),
    ],
)
def test_ring_percentiles(samples: list[float], size: int, expected: list[float | None]) -> None:
    r = Ring(size)
    for s in samples:
        r.add(s)
    assert len(r) == min(len(samples), size)
    assert r.percentiles((50.0, 90.0, 99.0)) == expected


def test_history_steps_are_differences_of_the_counters() -> None:
    h = History(step=5.0, keep=3)
    h.sample(0.0, {})
    h.sample(5.0, {"success": 4, "server": 1})
    h.sample(10.0, {"success": 4, "server": 1})  # nothing happened
    h.sample(15.0, {"success": 9, "server": 1, "quota": 2, "cancelled": 1})
    # keep=3: the first (empty) step is gone
    assert h.series(16.0) == [(5.0, 5, 1), (10.0, 0, 0), (15.0, 8, 2)]
    # the last 10 s: the 15 s step, plus what happened since (pending totals)
    pending = {"success": 10, "server": 3, "quota": 2, "cancelled": 1}
    assert h.recent(16.0, 10.0, pending) == {"success": 6, "quota": 2, "cancelled": 1, "server": 2}
    assert h.series(16.0, pending)[-1] == (16.0, 3, 2)  # the step in progress


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ({}, (0, {})),
        ({"success": 10}, (10, {})),
        (
            {"success": 6, "cancelled": 2, "server": 1, "timeout": 1},
            (10, {"server": 0.1, "timeout": 0.1}),
        ),
        ({"quota": 1, "success": 0}, (1, {"quota": 1.0})),
    ],
)
def test_error_rates(counts: dict[str, int], expected: tuple[int, dict[str, float]]) -> None:
    assert error_rates(counts) == expected


def facts(**kw: object) -> DeploymentFacts:
    base: dict[str, object] = {
        "drained": False,
        "benched_until": 0.0,
        "bench_reason": "",
        "bench_code": "",
        "cooldown_until": 0.0,
        "breaker_open_until": 0.0,
        "breaker_half_open": False,
        "breaker_why": "",
    }
    return DeploymentFacts(**{**base, **kw})  # type: ignore[arg-type]


NOW = 100.0


@pytest.mark.parametrize(
    ("f", "expected"),
    [
        (facts(), Verdict(State.HEALTHY)),
        # a bench that ran out is no bench
        (facts(benched_until=99.0, bench_reason="quota"), Verdict(State.HEALTHY)),
        (
            facts(benched_until=200.0, bench_reason="quota", bench_code="insufficient_quota"),
            Verdict(State.BENCHED, 200.0, "key quota exhausted (insufficient_quota)"),
        ),
        (
            facts(benched_until=200.0, bench_reason="auth"),
            Verdict(State.BENCHED, 200.0, "key rejected"),
        ),
        (
            facts(breaker_open_until=130.0, breaker_why="unreachable 5 times in a row"),
            Verdict(State.EJECTED, 130.0, "unreachable 5 times in a row"),
        ),
        (
            facts(breaker_half_open=True),
            Verdict(State.PROBING, None, "circuit breaker half-open: the next attempt probes"),
        ),
        (
            facts(cooldown_until=160.0),
            Verdict(State.COOLING, 160.0, "cooling down after a long retry hint"),
        ),
        # the most severe first: drained over benched over ejected over cooling
        (
            facts(drained=True, benched_until=math.inf, breaker_open_until=130.0),
            Verdict(State.DRAINED, None, "drained by an operator"),
        ),
        (
            facts(
                benched_until=200.0,
                bench_reason="quota",
                breaker_open_until=130.0,
                cooldown_until=160.0,
            ),
            Verdict(State.BENCHED, 200.0, "key quota exhausted"),
        ),
        (
            facts(breaker_open_until=130.0, cooldown_until=160.0),
            Verdict(State.EJECTED, 130.0, "circuit breaker open"),
        ),
    ],
)
def test_state_of(f: DeploymentFacts, expected: Verdict) -> None:
    assert state_of(f, NOW) == expected


WALL = float(calendar.timegm((2026, 12, 1, 13, 0, 0, 0, 0, 0)))  # 13:00:00 UTC at NOW


def test_clock_is_the_wall_time_of_a_monotonic_instant() -> None:
    assert clock(NOW + 1204.0, NOW, WALL) == "13:20:04"
    assert clock(None, NOW, WALL) == clock(math.inf, NOW, WALL) == ""


QUOTA = Verdict(State.BENCHED, NOW + 1204.0, "key quota exhausted (insufficient_quota)")
OPEN = Verdict(State.EJECTED, NOW + 30.0, "unreachable 5 times in a row")
DRAINED = Verdict(State.DRAINED, None, "drained by an operator")


@pytest.mark.parametrize(
    ("verdicts", "expected"),
    [
        ([], ""),
        ([("a", Verdict(State.HEALTHY))], ""),
        # one deployment that can still take requests is enough (cooling, probing included)
        ([("a", QUOTA), ("b", Verdict(State.COOLING, NOW + 5, "x"))], ""),
        ([("a", QUOTA), ("b", Verdict(State.PROBING, None, "x"))], ""),
        (
            [("a", QUOTA), ("b", QUOTA)],
            "every deployment is benched: a: key quota exhausted (insufficient_quota) until "
            "13:20:04 UTC; b: key quota exhausted (insufficient_quota) until 13:20:04 UTC",
        ),
        ([("a", DRAINED)], "every deployment is drained: a: drained by an operator"),
        (
            [("a", QUOTA), ("b", OPEN), ("c", DRAINED)],
            "no deployment can take a request: a: key quota exhausted (insufficient_quota) "
            "until 13:20:04 UTC; b: unreachable 5 times in a row until 13:00:30 UTC; "
            "c: drained by an operator",
        ),
    ],
)
def test_group_blocker(verdicts: list[tuple[str, Verdict]], expected: str) -> None:
    assert group_blocker(verdicts, NOW, WALL) == expected


# -- operator actions on a deployment (keel.engine._deployment) ---------------------------------


def _deployment() -> Deployment:
    cfg = parse_config(
        {"models": {"m": {"deployments": [{"base_url": "http://127.0.0.1:9/v1", "name": "d"}]}}}
    )
    (dep,) = Router(cfg).groups["m"]
    return dep


QUOTA_ERR = UpstreamError(ErrorKind.QUOTA, "quota spent", status=429, code="insufficient_quota")


def test_drain_keeps_the_keys_own_bench_and_undrain_restores_it() -> None:
    dep = _deployment()
    now = time.monotonic()
    assert dep.drain() and not dep.drain()  # the second changes nothing
    assert dep.benched_until == math.inf and not dep.available(now)
    assert state_of(facts_of(dep, now), now).state is State.DRAINED
    # an attempt that was in flight fails with a key fault meanwhile: held, not lost
    dep.record_failure(QUOTA_ERR, bench_for=600.0, now=now)
    assert dep.benched_until == math.inf
    assert dep.undrain() and not dep.undrain()
    v = state_of(facts_of(dep, now), now)
    assert (v.state, v.until, v.why) == (
        State.BENCHED,
        now + 600.0,
        "key quota exhausted (insufficient_quota)",
    )
    assert dep.failures[-1][1:] == ("quota", 429, "quota spent")


def test_reset_forgets_bench_cooldown_pause_and_breaker_but_not_a_drain() -> None:
    dep = _deployment()
    now = time.monotonic()
    dep.record_failure(QUOTA_ERR, bench_for=600.0, now=now)
    dep.cool_down(300.0, now)
    dep.limiter.paused_until = now + 30.0
    dep.breaker.open(now)
    dep.latency.penalise(1.0, now)
    assert state_of(facts_of(dep, now), now).state is State.BENCHED
    dep.reset()
    assert dep.available(now) and dep.limiter.has_capacity(now)
    assert dep.breaker.state(now) is BreakerState.CLOSED and dep.breaker.would_admit(now)
    assert dep.latency.failing == 0.0
    assert state_of(facts_of(dep, now), now) == Verdict(State.HEALTHY)
    dep.drain()
    dep.reset()
    assert dep.drained and state_of(facts_of(dep, now), now).state is State.DRAINED
