"""A provider-style request limit: at most ``limit`` requests per fixed window. Pure, no I/O.

Windows are aligned to multiples of ``seconds`` on the monotonic clock (the request log's
``t_open`` clock), so a test can recount them exactly from the log: window ``floor(t / s)``.
Successful answers carry OpenAI's ``x-ratelimit-*-requests`` headers (the limit stated per
minute, as OpenAI does), which is what keel learns from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from keel.sim._errors import go_duration


@dataclass(slots=True)
class RequestWindow:
    limit: int = 0  # 0 = no limit
    seconds: float = 60.0
    index: int = -1
    count: int = 0

    def admit(self, now: float) -> float | None:
        """Count a request at ``now``: None when admitted, else seconds until the window
        resets (the 429's retry hint)."""
        if not self.limit:
            return None
        index = math.floor(now / self.seconds)
        if index != self.index:
            self.index, self.count = index, 0
        if self.count >= self.limit:
            return (index + 1) * self.seconds - now
        self.count += 1
        return None

    def headers(self, now: float) -> dict[str, str]:
        if not self.limit:
            return {}
        index = math.floor(now / self.seconds)
        used = self.count if index == self.index else 0
        return {
            "x-ratelimit-limit-requests": str(round(self.limit * 60 / self.seconds)),
            "x-ratelimit-remaining-requests": str(max(0, self.limit - used)),
            "x-ratelimit-reset-requests": go_duration((index + 1) * self.seconds - now),
        }
