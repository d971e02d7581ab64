"""Adaptive concurrency: find how many requests a deployment really takes at once. Pure.

Why AIMD driven by overload responses and not a latency gradient (Vegas / Netflix Gradient2):
LLM providers say "too many" explicitly (429 "Too many concurrent requests", 503 overloaded,
529) and often reject *before* queueing, so latency does not rise as the limit approaches; and
an answer's latency depends mostly on its length, which a latency controller would misread as
congestion. Measured against ``keel sim --max-concurrency C`` (tests/test_limits.py): this
controller holds ~0.95-1.0 C with about 1 % of attempts rejected.

The limit starts unbounded: a deployment that never says "too many" costs nothing. On the first
overload signal it drops to just below the in-flight count that was refused, then:

* **evidence first**: it is only told about refusals that ``keel._evidence`` attributes to
  concurrency (refusals concentrated above an in-flight count), so random refusals (a 503 in a
  healthy fleet, a 429 from a rate window) never reach it. ``corroborate`` of the last
  ``window`` outcomes must still be refusals (1 by default: the evidence did the
  corroborating; one refused probe above the known ceiling is the signal to step back);
* **multiplicative decrease** (x ``backoff``) on overload, at most once per *epoch*: responses
  to requests sent before the last decrease describe the old limit, so a burst of 429s from
  one overfull moment counts once;
* **additive increase** on success, only while the limit is actually used: one slot per
  round of ``limit`` successes up to the capacity the last overload revealed (the *ceiling*),
  then ``probe`` slots per round above it — slow probing is what keeps rejected attempts
  near 1 % once the real capacity is known. The ceiling is forgotten ``memory`` seconds after
  the last overload, so a one-off 429 (an RPM window, another client's burst) does not slow
  the recovery for good.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class Aimd:
    backoff: float = 0.9
    probe: float = 0.1  # slots per round of successes above the known ceiling
    memory: float = 30.0  # seconds after the last overload until the ceiling is forgotten
    min_limit: float = 1.0
    window: int = 50  # recent outcomes kept as evidence
    corroborate: int = 1  # refusals among them before the limit moves
    max_limit: float = math.inf
    limit: float = math.inf
    # The capacity the last overload revealed (refused in-flight - 1), raised by successes at
    # higher in-flight counts: below it the limit recovers fast, above it it only probes.
    ceiling: float = 0.0
    epoch: int = 0
    overloads: int = 0
    last_overload: float = 0.0
    active: bool = False  # False until the first overload signal: no limit at all
    _recent: deque[bool] = field(default_factory=deque)  # True = refused

    def __post_init__(self) -> None:
        self._recent = deque(maxlen=self.window)

    @property
    def slots(self) -> int | None:
        """The current whole-request limit, or None while unlimited."""
        if not self.active:
            return None if self.max_limit == math.inf else int(self.max_limit)
        return max(1, int(self.limit))

    def on_success(self, in_flight_at_send: int, epoch: int, now: float) -> None:
        """A request sent with ``in_flight_at_send`` requests in flight (itself included)
        succeeded."""
        self._recent.append(False)
        if not self.active:
            return
        if in_flight_at_send > self.ceiling and epoch == self.epoch:
            self.ceiling = float(in_flight_at_send)  # more works than we knew
        if in_flight_at_send < int(self.limit):
            return  # the limit was not what held this request back: no evidence to grow
        fast = self.limit < self.ceiling or now - self.last_overload > self.memory
        step = 1.0 if fast else self.probe
        self.limit = min(self.max_limit, self.limit + step / self.limit)

    def forget(self) -> None:
        """Back to unlimited: the evidence no longer says refusals track concurrency."""
        self.active = False
        self.limit = math.inf
        self.ceiling = 0.0
        self._recent.clear()
        self.epoch += 1

    def on_overload(
        self, in_flight_at_send: int, epoch: int, now: float, floor: float = 0.0
    ) -> bool:
        """The upstream refused a request for load; True when the limit was lowered.
        ``floor``: never below this (a learned wall's ``backoff`` x its step: a refusal at the
        wall by a count that lags the upstream's by one is no reason to cut again and again)."""
        if epoch != self.epoch and self.active:
            return False  # sent before the last decrease: already accounted for
        self._recent.append(True)
        if sum(self._recent) < self.corroborate:
            return False  # a stray refusal is not evidence of a capacity limit
        self._recent.clear()  # the next decrease needs fresh evidence
        self.overloads += 1
        self.last_overload = now
        # At most in_flight - 1 fit (this one did not); keep a margin below that.
        known = max(self.min_limit, float(in_flight_at_send - 1))
        base = min(self.limit, known) if self.active else known
        self.ceiling = min(self.ceiling, known) if self.active else known
        self.limit = max(self.min_limit, min(self.max_limit, max(floor, base * self.backoff)))
        self.active = True
        self.epoch += 1
        return True


@dataclass(slots=True)
class RateAimd:
    """The request rate a deployment takes, learned from refusals that track the rate (see
    ``keel._evidence``): the pace keel sends at when the provider says nothing about its limit
    (DashScope's "Too many requests in route", a bare proxy's 429; no x-ratelimit-* headers).

    Unlimited until the first rate verdict; then the pace drops to ``backoff`` x the accepted
    start rate the evidence measured (what the window let through), at most once per ``hold``
    seconds (refusals of requests already sent at the old pace are no new evidence), and grows
    by ``probe`` requests/s per success — about 1 % a second at the pace, so it finds a raised
    limit again without a sawtooth of refusals."""

    backoff: float = 0.9
    probe: float = 0.01  # requests/s added per success
    hold: float = 1.0
    min_rate: float = 0.1  # requests/s
    rate: float = math.inf
    last_cut: float = -math.inf
    cuts: int = 0

    @property
    def active(self) -> bool:
        return self.rate != math.inf

    def on_refusal(self, accepted_rate: float, now: float) -> bool:
        """A refusal the evidence says tracks the rate; True when the pace was lowered."""
        if now - self.last_cut < self.hold:
            return False
        self.rate = max(self.min_rate, min(self.rate, accepted_rate) * self.backoff)
        self.last_cut = now
        self.cuts += 1
        return True

    def on_reopened(self, accepted_rate: float, now: float) -> bool:
        """A window that refused the lone probes of a hold let one through again: over that
        whole cycle, what it let through is what it takes (the cut at the first refusal
        could only see the burst before it). True when the pace was lowered."""
        if accepted_rate >= self.rate:
            return False
        self.rate = max(self.min_rate, accepted_rate)
        self.last_cut = now
        self.cuts += 1
        return True

    def on_success(self) -> None:
        if self.rate != math.inf:
            self.rate += self.probe


HOLD_PAUSE = 1.0  # seconds: the first pause of a hold (a window is rarely shorter)
HOLD_PAUSE_MAX = 4.0  # seconds: the longest (a per-minute window: ~15 probes)


@dataclass(slots=True)
class Hold:
    """A deployment refused for load without a word on when to come back and no verdict that
    explains it (DashScope's "Too many requests in route", a bare proxy's 429, a 503
    overloaded): sending the queue after it would only collect more refusals. TCP's answer to
    a loss: pause, let one probe through; a refused probe doubles the pause (up to
    ``HOLD_PAUSE_MAX``), each success lets one more in flight (slow start) until as many may
    be in flight as when the refusals began, and the hold ends; a refusal during the slow
    start halves what may be in flight (fast recovery). Refusals and successes of attempts
    sent before the pause ended (or, in the slow start, before the last refusal) are no news
    about it."""

    active: bool = False
    since: float = -math.inf  # attempts sent before this are no news
    cap: float = math.inf  # in flight allowed: 1 after a refusal, +1 per success
    exit: float = 2.0  # the hold ends when this many may be in flight again
    pause: float = HOLD_PAUSE

    def on_refusal(self, sent: float, in_flight: int, now: float, step: float = 0.0) -> float:
        """A hint-less refusal of an attempt sent at ``sent`` with ``in_flight`` in flight:
        the seconds to pause the deployment (0: no pause; ``cap`` may have changed). ``step``: the
        paced interval, when the deployment is paced (the first pause is at least that)."""
        if self.active and sent < self.since:
            return 0.0
        self.since = now
        if self.active and self.cap > 1.0:
            # Refused during the slow start: halve, like TCP's fast recovery — going back to
            # one probe for every refusal would let random refusals keep the queue held.
            self.cap = max(1.0, math.floor(self.cap / 2.0))
            return 0.0
        if self.active:
            if in_flight > 1:
                return 0.0  # not the probe: others were in flight with it
            self.pause = min(HOLD_PAUSE_MAX, self.pause * 2.0)  # the probe was refused
        else:
            self.active = True
            self.exit = float(max(2, in_flight))
            self.pause = max(HOLD_PAUSE, step)
        self.cap = 1.0
        # What goes before the pause ends was let through before the hold (a paced slot
        # booked earlier): only what goes after it is the probe.
        self.since = now + self.pause
        return self.pause

    def on_success(self, sent: float) -> bool:
        """An attempt sent at ``sent`` succeeded; True when that ended the hold."""
        if not self.active or sent < self.since:
            return False
        if self.cap + 1.0 >= self.exit:
            self.end()
            return True
        self.cap += 1.0
        return False

    def end(self) -> None:
        self.active = False
        self.cap = math.inf
