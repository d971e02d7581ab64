"""What the status page and ``/readyz`` say about a deployment, without I/O. Pure.

* ``Ring``: the last ``size`` samples of one measure (attempt seconds, first-token seconds),
  written in place (a slot and a counter: no allocation per sample), read as percentiles only
  when someone asks.
* ``History``: a deployment's attempt counts by outcome, sampled every ``step`` seconds from
  the counters the engine keeps anyway (``Deployment.outcomes``): the sparkline of the last
  minutes and the error rate by kind, as differences between samples.
* ``state_of``: one deployment's state, the most severe first — drained by an operator, its
  key benched (quota, auth), breaker open (ejected), half-open, cooling down after a long
  retry hint, healthy — with until when and why.
* ``group_blocker``: why no deployment of a group could take a request now ("" when one
  could): what ``/readyz`` answers with.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

HEALTHY_OUTCOMES = frozenset(("success", "cancelled"))


class Ring:
    """The last ``size`` samples; ``add`` is two stores and an increment."""

    __slots__ = ("_n", "_values")

    def __init__(self, size: int = 256) -> None:
        self._values: list[float] = [0.0] * size
        self._n = 0

    def add(self, value: float) -> None:
        n = self._n
        self._values[n % len(self._values)] = value
        self._n = n + 1

    def __len__(self) -> int:
        return min(self._n, len(self._values))

    def percentiles(self, qs: Sequence[float]) -> list[float | None]:
        """Nearest-rank percentiles (0..100) of the samples kept; None without samples."""
        k = len(self)
        if not k:
            return [None for _ in qs]
        xs = sorted(self._values[:k])
        return [xs[max(0, min(k - 1, math.ceil(q / 100.0 * k) - 1))] for q in qs]


@dataclass(slots=True)
class History:
    """Attempt counts by outcome per ``step`` seconds, the last ``keep`` steps."""

    step: float = 5.0
    keep: int = 72  # six minutes of 5-second steps
    _last: dict[str, int] = field(default_factory=dict)
    _steps: deque[tuple[float, dict[str, int]]] = field(default_factory=deque)

    def sample(self, now: float, totals: Mapping[str, int]) -> None:
        """The cumulative counts at ``now``: what happened since the last sample is a step."""
        delta = {k: n - self._last.get(k, 0) for k, n in totals.items() if n != self._last.get(k)}
        self._last = dict(totals)
        self._steps.append((now, delta))
        while len(self._steps) > self.keep:
            self._steps.popleft()

    def series(
        self, now: float, pending: Mapping[str, int] | None = None
    ) -> list[tuple[float, int, int]]:
        """(end of the step, attempts, failed attempts) per step, oldest first; with
        ``pending`` (the cumulative totals now) the step in progress comes last."""
        steps = list(self._steps)
        if pending is not None:
            steps.append((now, {k: n - self._last.get(k, 0) for k, n in pending.items()}))
        out = []
        for t, delta in steps:
            failed = sum(n for k, n in delta.items() if k not in HEALTHY_OUTCOMES)
            out.append((t, sum(delta.values()), failed))
        return out

    def recent(self, now: float, span: float, pending: Mapping[str, int]) -> dict[str, int]:
        """Attempts by outcome over the last ``span`` seconds, the counts since the last
        sample (``pending``: the cumulative totals now) included."""
        out: dict[str, int] = {}
        for t, delta in self._steps:
            if t > now - span:
                for k, n in delta.items():
                    out[k] = out.get(k, 0) + n
        for k, n in pending.items():
            if (d := n - self._last.get(k, 0)) > 0:
                out[k] = out.get(k, 0) + d
        return out


def error_rates(counts: Mapping[str, int]) -> tuple[int, dict[str, float]]:
    """Attempts, and the share of them that failed by each kind of failure."""
    total = sum(counts.values())
    if not total:
        return 0, {}
    return total, {
        k: n / total for k, n in sorted(counts.items()) if k not in HEALTHY_OUTCOMES and n
    }


class State(StrEnum):
    HEALTHY = "healthy"
    DRAINED = "drained"
    BENCHED = "benched"  # its key is out of rotation (quota, billing, auth)
    EJECTED = "ejected"  # its breaker is open
    PROBING = "probing"  # half-open: the next attempt is a probe
    COOLING = "cooling"  # a retry hint longer than keel waits: tried only as a last resort


# Which states take no request at all; COOLING and PROBING still do (the last resort, a probe).
OUT = frozenset((State.DRAINED, State.BENCHED, State.EJECTED))

_KEY_FAULTS = {
    "quota": "key quota exhausted",
    "auth": "key rejected",
}


@dataclass(frozen=True, slots=True)
class DeploymentFacts:
    """What ``state_of`` reads: a deployment's health fields, on the monotonic clock."""

    drained: bool
    benched_until: float
    bench_reason: str  # the error kind that benched it
    bench_code: str  # the upstream's code for it (insufficient_quota, …), may be ""
    cooldown_until: float
    breaker_open_until: float
    breaker_half_open: bool
    breaker_why: str


@dataclass(frozen=True, slots=True)
class Verdict:
    state: State
    until: float | None = None  # monotonic; None: until an operator or an answer says
    why: str = ""


def state_of(f: DeploymentFacts, now: float) -> Verdict:
    if f.drained:
        return Verdict(State.DRAINED, None, "drained by an operator")
    if now < f.benched_until:
        why = _KEY_FAULTS.get(f.bench_reason, f.bench_reason or "key out of rotation")
        return Verdict(
            State.BENCHED, f.benched_until, f"{why} ({f.bench_code})" if f.bench_code else why
        )
    if now < f.breaker_open_until:
        return Verdict(State.EJECTED, f.breaker_open_until, f.breaker_why or "circuit breaker open")
    if f.breaker_half_open:
        return Verdict(State.PROBING, None, "circuit breaker half-open: the next attempt probes")
    if now < f.cooldown_until:
        return Verdict(State.COOLING, f.cooldown_until, "cooling down after a long retry hint")
    return Verdict(State.HEALTHY)


def clock(until: float | None, now: float, wall: float) -> str:
    """A monotonic ``until`` as the wall-clock time of day (UTC, HH:MM:SS)."""
    if until is None or math.isinf(until):
        return ""
    return time.strftime("%H:%M:%S", time.gmtime(wall + (until - now)))


def group_blocker(verdicts: Iterable[tuple[str, Verdict]], now: float, wall: float) -> str:
    """Why no deployment of a group could take a request now, naming each ("" when one
    could): "every deployment is benched: a: key quota exhausted (insufficient_quota) until
    13:20:04 UTC; b: …"."""
    vs = list(verdicts)
    if not vs or any(v.state not in OUT for _, v in vs):
        return ""
    states = {v.state for _, v in vs}
    whys = "; ".join(f"{name}: {_until(v, now, wall)}" for name, v in vs)
    if len(states) == 1:
        (state,) = states
        return f"every deployment is {_WORD[state]}: {whys}"
    return f"no deployment can take a request: {whys}"


_WORD = {State.DRAINED: "drained", State.BENCHED: "benched", State.EJECTED: "ejected"}


def _until(v: Verdict, now: float, wall: float) -> str:
    at = clock(v.until, now, wall)
    return f"{v.why} until {at} UTC" if at else v.why
