"""Hedging policy: when to start a second attempt, and how many we can afford. Pure.

A hedge fires when an attempt's first token is later than a threshold: a fixed number of
seconds, or a percentile of the first-token times the group has seen recently (so the hedge
adapts to each model's normal latency and only the tail is hedged). Hedges are capped at
``max_ratio`` of requests by a token bucket: every request earns ``max_ratio`` of a hedge,
every hedge spends one — extra upstream load stays bounded even when a provider slows down
for everyone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

SAMPLES = 256  # recent first-token times kept per group
MIN_SAMPLES = 20  # below this the percentile is noise: no percentile hedging yet
BURST = 10.0  # hedges that may be saved up (the bucket starts full: cold starts hedge too)


@dataclass(slots=True)
class HedgePolicy:
    after: float | None = None  # fixed threshold (seconds); None: use the percentile
    percentile: float = 0.95
    min_after: float = 0.2
    max_ratio: float = 0.1
    _recent: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    _sorted: list[float] = field(default_factory=list)
    _stale: bool = False
    _tokens: float = BURST
    hedges: int = 0
    requests: int = 0

    def observe(self, first_token_seconds: float) -> None:
        self._recent.append(first_token_seconds)
        self._stale = True

    def delay(self) -> float | None:
        """Seconds to wait for a first token before hedging; None = do not hedge yet."""
        if self.after is not None:
            return max(self.after, self.min_after)
        if len(self._recent) < MIN_SAMPLES:
            return None
        if self._stale:
            self._sorted = sorted(self._recent)
            self._stale = False
        i = min(len(self._sorted) - 1, int(self.percentile * len(self._sorted)))
        return max(self._sorted[i], self.min_after)

    def on_request(self) -> None:
        self.requests += 1
        self._tokens = min(BURST, self._tokens + self.max_ratio)

    def can_hedge(self) -> bool:
        """The budget has a hedge to spend (``try_hedge`` would succeed)."""
        return self._tokens >= 1.0

    def try_hedge(self) -> bool:
        """Spend one hedge from the budget."""
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        self.hedges += 1
        return True
