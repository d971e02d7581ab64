"""A provider-style request limit: at most ``limit`` requests per window of ``seconds``. Pure.

Two shapes, because providers use both:

* **fixed** (default): windows aligned to multiples of ``seconds`` on the monotonic clock (the
  request log's ``t_open`` clock), so a test can recount them exactly from the log: window
  ``floor(t / s)``. A burst at the end of one window and the start of the next gets 2x through.
* **sliding**: at most ``limit`` admitted requests in any interval of ``seconds`` ending now
  (``--rate-sliding``); the retry hint is exact — when the oldest admitted request leaves the
  window. No burst at a boundary: what a careful provider (or a token-bucket proxy) enforces.

Only admitted requests count (a refused one used nothing). Successful answers may carry
OpenAI's ``x-ratelimit-*-requests`` headers (the limit stated per minute, as OpenAI does).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from keel.sim._errors import go_duration


@dataclass(slots=True)
class RequestWindow:
    limit: int = 0  # 0 = no limit
    seconds: float = 60.0
    sliding: bool = False
    index: int = -1
    count: int = 0
    _admitted: deque[float] = field(default_factory=deque)  # sliding: start times in window

    def _expire(self, now: float) -> None:
        horizon = now - self.seconds
        q = self._admitted
        while q and q[0] <= horizon:
            q.popleft()

    def admit(self, now: float) -> float | None:
        """Count a request at ``now``: None when admitted, else seconds until one more would
        be (the 429's retry hint)."""
        if not self.limit:
            return None
        if self.sliding:
            self._expire(now)
            if len(self._admitted) >= self.limit:
                return self._admitted[0] + self.seconds - now
            self._admitted.append(now)
            return None
        index = math.floor(now / self.seconds)
        if index != self.index:
            self.index, self.count = index, 0
        if self.count >= self.limit:
            return (index + 1) * self.seconds - now
        self.count += 1
        return None

    def used(self, now: float) -> tuple[int, float]:
        """(requests counted in the current window, seconds until the next slot frees)."""
        if self.sliding:
            self._expire(now)
            q = self._admitted
            return len(q), (q[0] + self.seconds - now) if q else 0.0
        index = math.floor(now / self.seconds)
        return (self.count if index == self.index else 0), (index + 1) * self.seconds - now

    def headers(self, now: float) -> dict[str, str]:
        if not self.limit:
            return {}
        used, reset = self.used(now)
        return {
            "x-ratelimit-limit-requests": str(round(self.limit * 60 / self.seconds)),
            "x-ratelimit-remaining-requests": str(max(0, self.limit - used)),
            "x-ratelimit-reset-requests": go_duration(reset),
        }
