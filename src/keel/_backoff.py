"""Backoff schedule and retry budget. Pure: the clock and the random source are injected.

* Full-jitter exponential backoff (AWS Architecture Blog, "Exponential Backoff and Jitter"):
  ``uniform(0, min(cap, base * 2**n))`` spreads synchronized retries best. A provider's hint
  (retry-after & co.) is a floor, never shortened by jitter.
* Retry budget (Finagle's ``RetryBudget``, with Google SRE's client-side throttling as the
  idea behind its ratio): retries may add a share of recent request traffic plus a small floor,
  so an outage cannot be multiplied by retries — but the share is earned: it follows how often
  recent retries *succeeded*. Retries that keep working are not a storm (two deployments with
  46 % random faults need ~0.85 retries per request, and each of them pays off); retries into a
  dead or saturated upstream are, and the share shrinks towards zero, leaving the floor:

      share = MAX_RATIO * (ok + 1) / (done + PRIOR)     (PRIOR chosen so that share = ratio
                                                        while no retry has ended yet)

  ``ok``/``done`` count retries that ended in the window (``record_retry``). Counts live in
  one-second buckets over a ``window`` of seconds; no per-request allocation.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_RATIO = 2.0  # retries per request when every recent retry succeeded


def backoff_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    hint: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number ``attempt`` (1 = first retry) on the same deployment.

    With a hint the wait is the hint plus a little jitter (≤ 10 % of base) so that many clients
    told "try again in 20ms" do not return in the same millisecond.
    """
    r = rng.random() if rng is not None else random.random()
    if hint is not None:
        return hint + r * base * 0.1
    ceiling = min(cap, base * math.pow(2.0, max(attempt - 1, 0)))
    return r * ceiling


@dataclass(slots=True)
class RetryBudget:
    """Allow extra attempts up to ``floor_per_s * window + share * requests_in_window``, where
    the share grows with the success of recent retries (``ratio`` before any has ended)."""

    ratio: float = 0.2
    floor_per_s: float = 5.0
    window: int = 10
    clock: Callable[[], float] = field(default=lambda: 0.0)
    _requests: list[int] = field(default_factory=list)
    _retries: list[int] = field(default_factory=list)
    _ok: list[int] = field(default_factory=list)
    _done: list[int] = field(default_factory=list)
    _epoch: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._requests = [0] * self.window
        self._retries = [0] * self.window
        self._ok = [0] * self.window
        self._done = [0] * self.window
        self._epoch = [-1] * self.window

    def _slot(self) -> int:
        second = int(self.clock())
        i = second % self.window
        if self._epoch[i] != second:  # a bucket from an older lap: recycle it
            self._epoch[i] = second
            self._requests[i] = self._retries[i] = self._ok[i] = self._done[i] = 0
        return i

    def _live(self, counts: list[int]) -> int:
        oldest = int(self.clock()) - self.window + 1
        return sum(c for c, e in zip(counts, self._epoch, strict=True) if e >= oldest)

    @property
    def share(self) -> float:
        """Retries allowed per recent request, earned by the success of recent retries."""
        if self.ratio <= 0.0:
            return 0.0
        prior = MAX_RATIO / self.ratio  # (0 + 1) / prior == ratio / MAX_RATIO
        return MAX_RATIO * (self._live(self._ok) + 1) / (self._live(self._done) + prior)

    def allowed(self) -> float:
        return self.floor_per_s * self.window + self.share * self._live(self._requests)

    def record_request(self) -> None:
        self._requests[self._slot()] += 1

    def try_withdraw(self) -> bool:
        """Take one retry from the budget; False means the budget is spent."""
        i = self._slot()
        if self._live(self._retries) + 1 > self.allowed():
            return False
        self._retries[i] += 1
        return True

    def record_retry(self, ok: bool) -> None:
        """A retry this budget allowed has ended: it succeeded, or failed (the plan reports
        it: ``keel._plan.Plan``)."""
        i = self._slot()
        self._done[i] += 1
        if ok:
            self._ok[i] += 1

    @property
    def exhausted_by_failures(self) -> bool:
        """Spent because recent retries kept failing (an outage or a saturated upstream), as
        opposed to spent by a burst of retries that were working."""
        done = self._live(self._done)
        return done >= 5 and self._live(self._ok) * 4 < done
