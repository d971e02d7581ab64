"""Rate-limit math without I/O: GCRA reservations and what upstream rate-limit headers teach.

GCRA (the generic cell rate algorithm, a.k.a. virtual scheduling) keeps one number per limit,
the *theoretical arrival time* (TAT): when the limit would be fully rested if every request so
far had been sent exactly at the paced rate. One number is why the same math runs unchanged as
a Lua script in Redis (``keel.engine._shared``), where every gateway replica shares the TAT.

Reservations instead of yes/no: ``reserve`` says *when* a request may go (now, or after a wait
of at most ``max_wait``) and books that slot at once, so N waiting requests get N distinct slots
without polling. A request that would have to wait longer books nothing and learns how long it
would have been, so the caller can try another deployment or refuse with an honest retry-after.

Units: ``interval`` is seconds per unit (``60 / rpm`` for requests, ``60 / tpm`` per token),
``tolerance`` is seconds of burst allowed above the paced rate (0 = strictly paced, which is
what a provider that quantises "per minute" limits into seconds expects).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from keel._hints import parse_go_duration


@dataclass(slots=True)
class Gcra:
    interval: float  # seconds per unit; 0 = no rate (only pauses apply)
    tolerance: float = 0.0  # seconds of burst above the paced rate
    tat: float = 0.0  # theoretical arrival time, same clock as ``now``

    def _capacity(self, inc: float) -> float:
        # A single request larger than the burst must still fit an idle limit, or a 4k-token
        # prompt could never pass a limit whose burst is 1k tokens.
        return max(inc, self.interval + self.tolerance)

    def wait(self, now: float, cost: float = 1.0) -> float:
        """Seconds until a request of ``cost`` units conforms (0 = now). Books nothing."""
        inc = cost * self.interval
        base = self.tat if self.tat > now else now
        return max(0.0, base + inc - self._capacity(inc) - now)

    def reserve(self, now: float, cost: float = 1.0, max_wait: float = 0.0) -> float | None:
        """Book a slot: the wait in seconds (≤ ``max_wait``), or None (nothing booked)."""
        w = self.wait(now, cost)
        if w > max_wait:
            return None
        self.book(now + w, cost)
        return w

    def book(self, at: float, cost: float = 1.0) -> None:
        """Count a request sent at ``at`` (used when several limits agree on one send time)."""
        self.tat = (self.tat if self.tat > at else at) + cost * self.interval

    def adjust(self, delta: float) -> None:
        """Correct the booked cost by ``delta`` units (negative = refund), e.g. when the
        upstream's usage differs from the estimate reserved before the call."""
        self.tat += delta * self.interval

    def pause_until(self, t: float) -> None:
        """Nothing conforms before ``t`` (a 429's retry-after, a window with nothing left)."""
        self.tat = max(self.tat, t + self.tolerance)

    def remaining(self, now: float) -> int:
        """Unit requests that would conform back to back right now (for x-ratelimit-*)."""
        if self.interval <= 0:
            return 0
        base = self.tat if self.tat > now else now
        return max(0, math.floor((now + self.interval + self.tolerance - base) / self.interval))

    def reset(self, now: float) -> float:
        """Seconds until the limit is fully rested."""
        return max(0.0, self.tat - now)


def per_minute(limit: float, burst_seconds: float = 0.0) -> Gcra:
    """A GCRA for ``limit`` units per minute that may burst ``burst_seconds`` worth of them."""
    interval = 60.0 / limit
    return Gcra(interval=interval, tolerance=max(0.0, burst_seconds - interval))


# --- learning from the upstream -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WindowInfo:
    """One ``x-ratelimit-*-{requests,tokens}`` triple. ``limit`` is per minute (OpenAI's
    semantics); ``reset`` is seconds until the window has all of ``limit`` again."""

    limit: int | None
    remaining: int | None
    reset: float | None


@dataclass(frozen=True, slots=True)
class RateLimitInfo:
    requests: WindowInfo
    tokens: WindowInfo


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        n = int(float(value.strip()))
    except ValueError:
        return None
    return n if n >= 0 else None  # Azure sends -1 for "unknown"


def _window(h: Mapping[str, str], name: str) -> WindowInfo:
    reset_raw = h.get(f"x-ratelimit-reset-{name}")
    reset = parse_go_duration(reset_raw) if reset_raw is not None else None
    return WindowInfo(
        _int(h.get(f"x-ratelimit-limit-{name}")),
        _int(h.get(f"x-ratelimit-remaining-{name}")),
        reset if reset is not None and reset > 0 else None,
    )


def parse_ratelimit_headers(h: Mapping[str, str]) -> RateLimitInfo | None:
    """The OpenAI-style ``x-ratelimit-*`` headers of a response (a case-insensitive mapping),
    or None when it has none (the common case costs two lookups)."""
    if "x-ratelimit-remaining-requests" not in h and "x-ratelimit-remaining-tokens" not in h:
        return None
    return RateLimitInfo(_window(h, "requests"), _window(h, "tokens"))


@dataclass(frozen=True, slots=True)
class Pacing:
    """What a window header asks of us: at most one unit every ``interval`` seconds until
    ``until`` (``interval`` inf = nothing at all before ``until``)."""

    interval: float
    until: float


def window_pacing(w: WindowInfo, now: float) -> Pacing | None:
    """Spread what is left of the upstream's window over the time until it resets, so the
    last request of the window does not collect a 429. None when the header leaves room to
    spare (more than enough for the window at our current rate is not our business)."""
    if w.remaining is None or w.reset is None:
        return None
    if w.remaining == 0:
        return Pacing(math.inf, now + w.reset)
    return Pacing(w.reset / w.remaining, now + w.reset)


def go_duration(seconds: float) -> str:
    """Seconds as a Go duration the way OpenAI writes ``x-ratelimit-reset-*`` (``1s``,
    ``6m0s``, ``644ms``)."""
    if seconds < 1.0:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    m, s = divmod(whole, 60)
    return f"{m}m{s}s" if m else f"{s}s"
