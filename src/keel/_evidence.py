"""Load or noise: what a deployment's refusals (429s, overloaded answers) are evidence of. Pure.

A 429 does not say which limit it hit. DashScope answers "Too many requests in route. Please try
again later." whether the request rate or the number in flight was too high, a bare proxy just
``429 Too Many Requests``, and random 429s/503s happen in a healthy fleet too. So keel does not
read the message; it looks at *when* refusals happen:

* **concurrency**: refusals happen when many requests were in flight and not when few were —
  the refusal rate steps up at some in-flight count ``x`` (``limit = x - 1`` fit);
* **rate**: not that, but refusals come in runs — once a window is spent every request is
  refused until it reopens, whatever the in-flight count; the accepted start rate over the
  recent past is then what fits;
* **noise**: neither — refusals independent of load and of each other (a random 503): a
  policy must not shrink anything for them.

Both tests are one-sided binomial tails against the null hypothesis "refusals are independent
of load" (the refusal rate of the rest of the samples, with a Laplace prior so that a handful
of samples cannot look certain). A verdict needs a tail below ``alpha`` and at least
``min_refusals`` refusals behind it, so random faults almost never look like load (fewer than
one in a thousand refusals under 15 % random refusals: tests/test_load_policies.py) while a
real wall is recognised from its first bunch.

Samples are (send time, in flight at send including the request itself, refused?) of every
attempt that ended (a 500 or a reset was not refused for load: it counts as not refused, so
random failures cannot leave only refusals to look at). They are kept for
``horizon`` seconds (at most ``size``), so a wall that goes away is forgotten. The attempts
still *running* are evidence too, of being let in: a refusal comes back within milliseconds
while a success streams for seconds, so the ended samples alone over-represent refusals —
a storm's burst of sends returns its random refusals back to back while its successes are
still streaming, and read without the running ones it looked like a concurrency wall of ~2
(requests then queued 10 s behind a limit of 1). ``judge`` and ``burst`` take them as
(send time, in flight at send), the ones the upstream has answered 2xx (the caller's choice:
one whose answer has not come yet may be a refusal on its way back); before anything has
succeeded they are the only let-in samples there are: a wall's first burst is many refusals,
all sent with more in flight than are running now.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class Cause(StrEnum):
    UNKNOWN = "unknown"  # too little evidence yet
    CONCURRENCY = "concurrency"
    RATE = "rate"
    NOISE = "noise"


@dataclass(frozen=True, slots=True)
class Verdict:
    cause: Cause
    limit: int | None = None  # CONCURRENCY: the most in flight that fit
    rate: float | None = None  # RATE: accepted starts per second over the recent past

    def __str__(self) -> str:
        if self.cause is Cause.CONCURRENCY:
            return f"concurrency limit of ~{self.limit}"
        if self.cause is Cause.RATE and self.rate is not None:
            return f"rate limit of ~{self.rate:.3g}/s"
        return str(self.cause.value)


UNKNOWN = Verdict(Cause.UNKNOWN)
NOISE = Verdict(Cause.NOISE)


def _sent(sample: tuple[float, int, bool]) -> float:
    return sample[0]


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    total = 0.0
    for i in range(k, n + 1):
        total += math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                          + i * lp + (n - i) * lq)  # fmt: skip
    return min(1.0, total)


@dataclass(slots=True)
class LoadEvidence:
    horizon: float = 30.0  # seconds of samples kept
    size: int = 512
    alpha: float = 1e-4  # the tail a pattern must beat to count as load
    min_refusals: int = 3
    rate_span: float = 10.0  # seconds over which the accepted rate is measured
    lead: float = 0.5  # seconds of samples sent before the first refusal that still count
    noise_min: int = 40  # samples (while refusing) before "no pattern" means noise
    _t: deque[float] = field(default_factory=deque)
    _f: deque[int] = field(default_factory=deque)
    _r: deque[bool] = field(default_factory=deque)
    _cached: Verdict = UNKNOWN
    _dirty: bool = True

    def record(self, t: float, in_flight: int, refused: bool) -> None:
        """One outcome: sent at ``t`` with ``in_flight`` in flight (itself included)."""
        self._t.append(t)
        self._f.append(in_flight)
        self._r.append(refused)
        if len(self._t) > self.size:
            self._drop()
        self._dirty = True

    def _drop(self) -> None:
        self._t.popleft()
        self._f.popleft()
        self._r.popleft()

    def _expire(self, now: float) -> None:
        horizon = now - self.horizon
        while self._t and self._t[0] < horizon:
            self._drop()
            self._dirty = True

    def judge(self, now: float, running: Sequence[tuple[float, int]] = ()) -> Verdict:
        """What the refusals of the last ``horizon`` seconds are evidence of. ``running``:
        (send time, in flight at send) of the attempts still open on the deployment, let
        in so far (module docstring)."""
        self._expire(now)
        if self._dirty or running:
            self._cached = self._judge(now, running)
            self._dirty = False
        return self._cached

    def _judge(self, now: float, running: Sequence[tuple[float, int]]) -> Verdict:
        refused = sum(self._r)
        n = len(self._r)
        if refused < self.min_refusals:
            return UNKNOWN  # no refusals to explain
        if refused == n:
            # Nothing has succeeded yet. The first burst on a concurrency wall looks like
            # this: ``running`` let in and still working, every refusal sent with more than
            # that in flight. Anything else needs a success to compare with.
            # A wall refuses everything above it: many refusals, none at or below ``running``.
            k = len(running)
            if k and refused >= max(2 * self.min_refusals, k) and min(self._f) > k:
                return Verdict(Cause.CONCURRENCY, limit=k)
            return UNKNOWN
        samples = self._while_refusing(running)
        limit = self._concurrency(samples)
        if limit is not None:
            return Verdict(Cause.CONCURRENCY, limit=limit)
        if self._runs(samples):
            return Verdict(Cause.RATE, rate=self.accepted_rate(now))
        # No pattern — but a handful of samples could not have shown one: that is not yet
        # evidence that the refusals are random.
        return NOISE if len(samples) >= self.noise_min else UNKNOWN

    def _while_refusing(
        self, running: Sequence[tuple[float, int]] = ()
    ) -> list[tuple[float, int, bool]]:
        """The samples in the order they were *sent*, from ``lead`` seconds before the first
        refusal on. Sent order: samples arrive in the order the attempts ended, and a refusal
        ends at once while a success takes seconds, so a burst of sends (32 clients starting
        together) returns its random refusals back to back. From the first refusal on: both
        tests compare refusals with the outcomes around them, and a clean stretch before
        refusals began (a provider that just turned noisy) is no baseline for them — against
        it, the first random refusals would look concentrated anywhere. The ``running``
        attempts are among them, as let in."""
        order = [*zip(self._t, self._f, self._r, strict=True), *((t, f, False) for t, f in running)]
        order.sort(key=_sent)
        first = next(t for t, _, r in order if r) - self.lead
        return [s for s in order if s[0] >= first]

    def _concurrency(self, samples: list[tuple[float, int, bool]]) -> int | None:
        """The in-flight count above which refusals concentrate, as the most that fit; None
        when refusals do not depend on it."""
        ok_at: dict[int, int] = {}
        bad_at: dict[int, int] = {}
        n = len(samples)
        refused = 0
        for _, f, r in samples:
            refused += r
            d = bad_at if r else ok_at
            d[f] = d.get(f, 0) + 1
        levels = sorted(set(ok_at) | set(bad_at), reverse=True)
        best: tuple[float, int] | None = None
        n_hi = r_hi = 0
        for x in levels:  # hi = samples sent with at least x in flight
            r_hi += bad_at.get(x, 0)
            n_hi += bad_at.get(x, 0) + ok_at.get(x, 0)
            n_lo, r_lo = n - n_hi, refused - r_hi
            if n_lo == 0:
                break
            if r_hi < self.min_refusals or 2 * r_hi < n_hi:
                continue  # not enough refusals up here, or refusals no majority
            p_lo = (r_lo + 1) / (n_lo + 2)
            if r_hi / n_hi < 2.0 * p_lo:
                continue
            tail = binomial_tail(r_hi, n_hi, p_lo)
            if tail < self.alpha and (best is None or tail < best[0]):
                best = (tail, x)
        return None if best is None else max(1, best[1] - 1)

    def _runs(self, samples: list[tuple[float, int, bool]]) -> bool:
        """Do refusals follow refusals (in the order they were sent) far more often than
        their share says?"""
        after_refusal = both = refused = 0
        prev = False
        for _, _, r in samples:
            if prev:
                after_refusal += 1
                both += r
            prev = r
            refused += r
        if both < self.min_refusals or 2 * both < after_refusal:
            return False
        p = (refused + 1) / (len(samples) + 2)
        return binomial_tail(both, after_refusal, p) < self.alpha

    def burst(self, running: Sequence[tuple[float, int]] = (), last: int = 8) -> bool:
        """Are refusals at least half of the ``last`` outcomes recorded, and at least half of
        everything sent since the first of them (the ``running`` attempts, let in so far,
        included)? A closed window or a full upstream refuses everything sent at it; random
        refusals (5 % of attempts) make such a run about once in 2,500 outcomes — but among
        the first outcomes of a burst of sends they are the majority, since they come back
        first (module docstring): what was let in meanwhile and still runs tells them apart."""
        if len(self._r) < last:
            return False
        refused = 0
        since = math.inf
        for i in range(1, last + 1):
            if self._r[-i]:
                refused += 1
                since = min(since, self._t[-i])
        if 2 * refused < last:
            return False
        sent = refused_since = 0
        for t, r in zip(self._t, self._r, strict=True):
            if t >= since:
                sent += 1
                refused_since += r
        sent += sum(1 for t, _ in running if t >= since)
        return 2 * refused_since >= sent

    def accepted_rate(self, now: float, over_until: float | None = None) -> float:
        """Accepted starts per second over the last ``rate_span`` seconds (or since the
        first sample, if that is sooner), the span ending at ``over_until`` (default: now)."""
        since = now - self.rate_span
        first = next((t for t in self._t if t >= since), now)
        ok = sum(1 for t, r in zip(self._t, self._r, strict=True) if t >= since and not r)
        end = now if over_until is None else over_until
        return ok / max(end - first, 1.0)
