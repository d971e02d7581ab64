"""Backoff schedule and retry budget. Pure: the clock and the random source are injected.

* Full-jitter exponential backoff (AWS Architecture Blog, "Exponential Backoff and Jitter"):
  ``uniform(0, min(cap, base * 2**n))`` spreads synchronized retries best. A provider's hint
  (retry-after & co.) is a floor, never shortened by jitter.
* Retry budget (Finagle's ``RetryBudget``): retries may add at most ``ratio`` of recent request
  traffic plus a small floor, so a provider outage cannot be multiplied by retries. Counts live
  in one-second buckets over a ``window`` of seconds; no per-request allocation.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field


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
    """Allow extra attempts up to ``floor_per_s * window + ratio * requests_in_window``."""

    ratio: float = 0.2
    floor_per_s: float = 5.0
    window: int = 10
    clock: Callable[[], float] = field(default=lambda: 0.0)
    _requests: list[int] = field(default_factory=list)
    _retries: list[int] = field(default_factory=list)
    _epoch: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._requests = [0] * self.window
        self._retries = [0] * self.window
        self._epoch = [-1] * self.window

    def _slot(self) -> int:
        second = int(self.clock())
        i = second % self.window
        if self._epoch[i] != second:  # a bucket from an older lap: recycle it
            self._epoch[i] = second
            self._requests[i] = 0
            self._retries[i] = 0
        return i

    def _live(self, counts: list[int]) -> int:
        oldest = int(self.clock()) - self.window + 1
        return sum(c for c, e in zip(counts, self._epoch, strict=True) if e >= oldest)

    def record_request(self) -> None:
        self._requests[self._slot()] += 1

    def try_withdraw(self) -> bool:
        """Take one retry from the budget; False means the budget is spent."""
        i = self._slot()
        allowed = self.floor_per_s * self.window + self.ratio * self._live(self._requests)
        if self._live(self._retries) + 1 > allowed:
            return False
        self._retries[i] += 1
        return True
