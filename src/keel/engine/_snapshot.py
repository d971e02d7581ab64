"""One read of the engine for operators: ``snapshot`` (the status page, ``GET /admin/state``)
and ``readiness`` (``GET /readyz``).

Nothing here runs per request. The numbers come from what the engine keeps anyway — each
deployment's health fields, limiter counters, outcome counts — and from two rings written
once per attempt (``Deployment.took``, ``Deployment.first_tokens``) and the failures it
records (``Deployment.failures``). The ``Monitor`` samples the outcome counts every few
seconds on a loop timer for the sparkline and the error rates (``keel._status.History``).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Any

from keel._health import BreakerState
from keel._status import DeploymentFacts, History, Verdict, error_rates, group_blocker, state_of

if TYPE_CHECKING:
    from keel.engine._deployment import Deployment
    from keel.engine._keel import Keel

STEP = 5.0  # seconds between two samples of the outcome counts
RATE_SPAN = 60.0  # seconds the error rates are measured over
PERCENTILES = (50.0, 90.0, 99.0)


class Monitor:
    """Samples every deployment's outcome counts each ``STEP`` seconds (a loop timer, no
    task): the history behind the sparkline and the error rates."""

    def __init__(self, keel: Keel) -> None:
        self.keel = keel
        self.histories: dict[str, History] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.started = time.time()

    def start(self) -> None:
        if self._timer is None:
            self._tick()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def history(self, dep: Deployment) -> History:
        h = self.histories.get(dep.name)
        if h is None:
            h = self.histories[dep.name] = History(step=STEP)
            h.sample(time.monotonic(), dep.outcomes)  # what came before is not a step
        return h

    def _tick(self) -> None:
        now = time.monotonic()
        names = set()
        for dep in self.keel.router.deployments():
            names.add(dep.name)
            self.history(dep).sample(now, dep.outcomes)
        for gone in set(self.histories) - names:  # removed by a reload
            del self.histories[gone]
        self._timer = asyncio.get_running_loop().call_later(STEP, self._tick)


def facts(dep: Deployment, now: float) -> DeploymentFacts:
    b = dep.breaker
    return DeploymentFacts(
        drained=dep.drained,
        benched_until=dep.benched_until,
        bench_reason=dep.bench_reason,
        bench_code=dep.bench_code,
        cooldown_until=dep.cooldown_until,
        breaker_open_until=b.open_until,
        breaker_half_open=b.state(now) is BreakerState.HALF_OPEN,
        breaker_why=b.why,
    )


def _seconds(until: float | None, now: float) -> float | None:
    return None if until is None or math.isinf(until) else round(until - now, 3)


def _ms(values: list[float | None]) -> dict[str, float | None]:
    return {
        f"p{q:g}": None if v is None else round(v * 1000.0, 1)
        for q, v in zip(PERCENTILES, values, strict=True)
    }


def deployment_view(dep: Deployment, monitor: Monitor, now: float, wall: float) -> dict[str, Any]:
    v = state_of(facts(dep, now), now)
    lim = dep.limiter
    cap = lim.cap()
    hist = monitor.history(dep)
    attempts, rates = error_rates(hist.recent(now, RATE_SPAN, dep.outcomes))
    series = hist.series(now, dep.outcomes)
    held = dep._held_bench if dep.drained and dep._held_bench[0] > now else None
    return {
        "name": dep.name,
        "group": dep.group,
        "endpoint": dep.endpoint,  # scheme, host and port: never a credential
        "model": dep.model,
        "state": v.state.value,
        "why": v.why,
        "until": _iso(v.until, now, wall),
        "in_seconds": _seconds(v.until, now),
        "key_benched": None
        if held is None
        else {"reason": held[1], "code": held[2], "until": _iso(held[0], now, wall)},
        "breaker": {
            "state": dep.breaker.state(now).name.lower(),
            "why": dep.breaker.why,
            "opened": dep.breaker.opened_total,
        },
        "in_flight": lim.in_flight,
        "limit": None if math.isinf(cap) else cap,
        "queued": lim.waiting,
        "latency_ms": _ms(dep.took.percentiles(PERCENTILES)),
        "first_token_ms": _ms(dep.first_tokens.percentiles(PERCENTILES)),
        "attempts_last_minute": attempts,
        "error_rate": {k: round(r, 4) for k, r in rates.items()},
        "outcomes": dict(dep.outcomes),
        "recent_failures": [
            {"at": _wall_iso(t), "kind": kind, "status": status, "message": msg}
            for t, kind, status, msg in reversed(dep.failures)
        ],
        "history": {  # per step, oldest first; the last is the step in progress
            "step": hist.step,
            "attempts": [n for _, n, _ in series],
            "failed": [f for _, _, f in series],
        },
    }


def snapshot(keel: Keel) -> dict[str, Any]:
    """Every model group and deployment, as the status page shows them (JSON-ready)."""
    now, wall = time.monotonic(), time.time()
    monitor = keel.monitor
    groups = []
    router = keel.router
    for name, deps in router.groups.items():
        views = [deployment_view(d, monitor, now, wall) for d in deps]
        blocker = _blocker(_served_by(keel, name), now, wall)
        groups.append(
            {
                "name": name,
                "ready": not blocker,
                "why": blocker,
                "fallbacks": list(keel.config.models[name].fallbacks),
                "deployments": views,
            }
        )
    return {
        "object": "keel.state",
        "at": _wall_iso(wall),
        "up_seconds": round(wall - monitor.started, 1),
        "ready": all(g["ready"] for g in groups),
        "groups": groups,
    }


def readiness(keel: Keel) -> dict[str, str]:
    """Group → why no deployment could take a request for it now (its own nor its fallback
    groups'); empty when every group can be served."""
    now, wall = time.monotonic(), time.time()
    out = {}
    for name in keel.router.groups:
        if why := _blocker(_served_by(keel, name), now, wall):
            out[name] = why
    return out


def _served_by(keel: Keel, group: str) -> list[Deployment]:
    """The deployments a request for ``group`` may go to: its own, then its fallbacks'."""
    router = keel.router
    return [d for g in router.plan(group) for d in router.groups.get(g, ())]


def _blocker(deps: list[Deployment], now: float, wall: float) -> str:
    verdicts: list[tuple[str, Verdict]] = [(d.name, state_of(facts(d, now), now)) for d in deps]
    return group_blocker(verdicts, now, wall)


def _iso(until: float | None, now: float, wall: float) -> str | None:
    if until is None or math.isinf(until):
        return None
    return _wall_iso(wall + (until - now))


def _wall_iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"
