"""Per-deployment admission: may this attempt go to this deployment now, or after how long?

Three gates, in order, each cheap when the deployment has nothing to enforce:

1. **breaker** — an open breaker refuses at once (the plan fails over);
2. **concurrency slot** — ``max_concurrency`` (1/N of it while Redis is down) and the adaptive
   AIMD limit; when full, the request waits in a priority queue (interactive before batch)
   for a release, up to its wait bound;
3. **rate** — GCRA reservations for ``rpm``/``tpm`` (estimated tokens, reconciled with the
   usage afterwards) and for what the upstream taught us (x-ratelimit-* pacing, 429 pauses).
   Local, or one Redis round trip when shared. Slots are booked at most ``HORIZON`` ahead:
   longer waits happen in a head-of-line queue, again interactive first, so a batch backlog
   cannot book the next minute away from interactive requests.

``release`` reports the attempt's outcome to the breaker, the load evidence, the AIMD
controllers, the peak-EWMA latency and the token reconciliation, and frees
the slot for the next waiter.

**Load or noise.** A refusal (429 of any wording, 503 overloaded, 529) is evidence, not a
verdict: ``keel._evidence`` judges from the outcomes' in-flight counts and timing whether
refusals track concurrency, rate, or neither, and only then does a policy act:

* concurrency → the AIMD limit (``Aimd``) drops to what fit, and excess requests wait in this
  limiter's queue instead of being sent to collect a 429; no deployment-wide pause (a wall of
  in-flight requests is not lifted by waiting, only by finishing);
* rate → the learned pace (``RateAimd``, a GCRA) drops below the accepted rate, and a hint or
  an exhausted x-ratelimit window pauses the deployment;
* noise → nothing shrinks; the request's own retry still honours the hint;
* not enough evidence yet → the hint pauses the deployment (as before the evidence existed).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from keel._classify import ErrorKind, UpstreamError
from keel._concurrency import Aimd, Hold, RateAimd
from keel._evidence import Cause, LoadEvidence, Verdict
from keel._health import Admit, Breaker, BreakerGroup, PeakEwma, unreachable
from keel._ratelimit import Gcra, parse_ratelimit_headers, per_minute, window_pacing
from keel._tokens import Calibration, completion_budget, prompt_tokens
from keel.config import GatewayConfig
from keel.engine._shared import RemoteHealth, SharedDown, SharedState

if TYPE_CHECKING:
    from collections.abc import Mapping

    from keel.engine._deployment import Deployment

log = logging.getLogger("keel.limits")

PRIORITIES = {"interactive": 0, "batch": 1}
HORIZON = 0.25  # seconds: how far ahead a rate slot may be booked
LEASE_POLL = 0.005  # seconds between retries when the shared concurrency is full
PAUSE_MIN = 0.25  # a 429 hint shorter than this is the request's own retry, not a pause
# Seconds past its booked slot a request may still go. Later than that our event loop was
# stalled and the request would bunch up with the next slots in the upstream's window: it books
# again, once (a second stall sends it anyway: progress over precision).
LATE = 0.02
# Failures that say something about the deployment's health (the breaker's business).
BREAKER_FAILURES = frozenset(
    (
        ErrorKind.SERVER,
        ErrorKind.CONNECTION,
        ErrorKind.TIMEOUT,
        ErrorKind.PROTOCOL,
        ErrorKind.OVERLOADED,
        ErrorKind.NOT_FOUND,
    )
)
# Not the deployment's health: limits have their own machinery, keys are benched.
_NEUTRAL = frozenset((ErrorKind.RATE_LIMIT, ErrorKind.QUOTA, ErrorKind.AUTH))


# Refusals that may be about load: what the load evidence judges. Which of them are is the
# evidence's call, never the message's wording ("concurrent", "route", "rate" prove nothing).
_REFUSALS = frozenset((ErrorKind.RATE_LIMIT, ErrorKind.OVERLOADED))


# Seconds of concurrency verdicts before the step they found counts as a learned wall: a rate
# window's first burst looks like a step too, and its next refusals (below that step) say so
# within a window's length.
WALL_STABLE = 1.0
FAILURE_PENALTY = 1.0  # seconds per token assumed for a deployment that failed before any success


class Saturated(Exception):
    """No capacity on this deployment within the request's wait bound."""

    def __init__(self, reason: str, retry_after: float | None = None, soon: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        # Held back only for the moment (a failure streak's suspects in flight): worth another
        # look after a backoff. A full queue wait or an open breaker is not.
        self.soon = soon


class Costed(Protocol):
    """What a request will cost in tokens, as the client's and the deployment's TPM limits
    ask it: a ``Call`` (its operation's estimate, made at the first ask), or a ``RequestCost``."""

    def tokens(self) -> tuple[int, int | None]:
        """(estimated prompt tokens, the client's cap on output tokens or None)."""
        ...


def chat_tokens(body: Mapping[str, Any]) -> tuple[int, int | None]:
    """A chat completion body's ``Costed.tokens()``."""
    msgs = body.get("messages")
    return (
        prompt_tokens(msgs if isinstance(msgs, list) else [], body.get("tools")),
        completion_budget(body),
    )


class RequestCost:
    """A chat body's ``Costed``, estimated lazily and once (for a limit asked without a
    ``Call``)."""

    __slots__ = ("_tokens", "body")

    def __init__(self, body: Mapping[str, Any]) -> None:
        self.body = body
        self._tokens: tuple[int, int | None] | None = None

    def tokens(self) -> tuple[int, int | None]:
        t = self._tokens
        if t is None:
            t = self._tokens = chat_tokens(self.body)
        return t


@dataclass(slots=True, eq=False)
class Permit:
    started: float  # monotonic, when the attempt was let through
    in_flight: int  # the deployment's in-flight count at that moment, this attempt included
    epoch: int  # AIMD epoch at that moment
    cost: int = 0  # tokens reserved (0: no TPM limit)
    prompt_estimate: int = 0
    lease: str | None = None  # shared concurrency lease id
    how: Admit = Admit.NORMAL
    # The upstream answered with 2xx headers: let in (the load evidence counts it so while it
    # still runs; one sent a moment ago may be a refusal on its way back).
    answered: bool = False
    # the outcome, filled in by the driver
    ok: bool = False
    error: UpstreamError | None = None
    usage: Mapping[str, Any] | None = None
    released: bool = False


@dataclass(slots=True)
class _Booking:
    granted: bool
    wait: float
    full: bool = False  # shared concurrency full (not a rate wait)
    lease: str | None = None


@dataclass(slots=True)
class DeploymentLimiter:
    key: str  # stable id for shared state: the deployment's name
    health_key: str
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    burst: float
    config: GatewayConfig
    shared: SharedState | None = None
    aimd: Aimd | None = None
    req: Gcra | None = None
    tok: Gcra | None = None
    win: Gcra = field(default_factory=lambda: Gcra(0.0))  # pacing learned from headers
    win_until: float = 0.0
    paused_until: float = 0.0
    # What refusals are evidence of, and the pace learned from rate-shaped ones.
    evidence: LoadEvidence = field(default_factory=LoadEvidence)
    verdict: Verdict = field(default_factory=lambda: Verdict(Cause.UNKNOWN))
    rate_aimd: RateAimd = field(default_factory=RateAimd)
    paced: Gcra | None = None  # 1 / rate_aimd.rate, strictly paced
    # An exhausted x-ratelimit window seen on the refusal being handled: a pause, if the
    # evidence says the refusals are about the rate (learn_headers → _failed).
    _window_pause: float = 0.0
    down_reason: str = ""  # the last failure that never reached the upstream (for errors)
    # Refused for load without a word on when to come back: pause, probe, slow start.
    hold: Hold = field(default_factory=Hold)
    _unheld_cap: float = math.inf  # _configured_cap outside the hold
    _probe_refused: float = 0.0  # when a lone probe of the hold was last refused
    # When the evidence began to say "concurrency" (this run of such verdicts), and when it
    # last did: together they say whether the step is a learned wall (``at_wall``).
    _step_since: float = math.inf
    _step_seen: float = -math.inf
    learned_rpm: int | None = None
    learned_tpm: int | None = None
    calibration: Calibration = field(default_factory=Calibration)
    in_flight: int = 0
    # The attempts let through and not released yet (by id): their send times and in-flight
    # counts are load evidence too — a refusal comes back at once, a success streams for
    # seconds (keel._evidence). Insertion-ordered, so the oldest comes first.
    running: dict[int, Permit] = field(default_factory=dict)
    waiting: int = 0
    pacing: int = 0  # of in_flight, still waiting for their rate slot (not sent yet)
    _due: list[float] = field(default_factory=list)  # when the sleeping ones' slots come
    _waiters: list[tuple[int, int, asyncio.Future[None]]] = field(default_factory=list)
    _rate_head: object | None = None
    _rate_waiters: list[tuple[int, int, asyncio.Future[None]]] = field(default_factory=list)
    _saturated_until: float = 0.0
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    saturated_total: int = 0
    _configured_cap: float = math.inf

    def __post_init__(self) -> None:
        # The configured cap, never split (no shared state): what cap() answers per request.
        mc = self.max_concurrency
        self._configured_cap = float(max(1, mc)) if mc else math.inf
        if self.rpm:
            self.req = per_minute(self.rpm, self.burst)
        if self.tpm:
            self.tok = per_minute(self.tpm, self.burst)
        ac = self.config.adaptive_concurrency
        if ac.enabled:
            self.aimd = Aimd(
                backoff=ac.backoff,
                probe=ac.probe,
                min_limit=float(ac.min_limit),
                max_limit=float(self.max_concurrency or math.inf),
            )

    # -- views ---------------------------------------------------------------------------------

    def _shared_up(self) -> bool:
        return self.shared is not None and self.shared.up

    def _share(self) -> int:
        """1/N of each budget while Redis is configured but unreachable."""
        return self.shared.peers if self.shared is not None and not self.shared.up else 1

    def cap(self) -> float:
        aimd = self.aimd
        if (aimd is None or not aimd.active) and self.shared is None:  # the common case
            return self._configured_cap
        c = math.inf
        if self.max_concurrency:
            c = float(max(1, self.max_concurrency // self._share()))
        if self.aimd is not None and (s := self.aimd.slots) is not None:
            c = min(c, float(s))
        return min(c, self.hold.cap)

    def rate_limited(self, now: float) -> bool:
        return bool(
            self.req or self.tok or self.paced or now < self.win_until or now < self.paused_until
        )

    def has_capacity(self, now: float) -> bool:
        aimd = self.aimd
        # ``cap()``'s common case read here, without its frame (the balancer asks per request).
        if (aimd is None or not aimd.active) and self.shared is None:
            cap = self._configured_cap
        else:
            cap = self.cap()
        if self.waiting or self.in_flight >= cap or now < self.paused_until:
            return False
        if self._rate_head is not None or self._rate_waiters or now < self._saturated_until:
            return False
        req, tok, paced = self.req, self.tok, self.paced
        if not (req or tok or paced or now < self.win_until):
            return True
        if (
            (req is None or req.tat <= now)
            and (tok is None or tok.tat <= now)
            and (paced is None or paced.tat <= now)
            and (now >= self.win_until or self.win.tat <= now)
        ):
            return True  # every bucket rested: any request conforms now
        if self.shared is None or not self.shared.up:
            return self._local_wait(now, 1) <= 0.0
        return True

    # -- acquire -------------------------------------------------------------------------------

    def try_take(self, req: Costed, now: float) -> Permit | None:
        """The fast path of ``acquire``: a permit at once when nothing could make this
        request wait — no shared state, nobody queued, a free slot, every rate bucket rested
        (its theoretical arrival time not after now, so any request conforms and booking it
        at ``now`` is what ``_book`` would do). None: take the full path."""
        aimd = self.aimd
        if (
            self.shared is not None
            or self.waiting
            or self._rate_head is not None
            or self._rate_waiters
            or now < self._saturated_until
            or now < self.paused_until
            or now < self.win_until
            # ``cap()``, inline (no shared state here): its common case without its frame.
            or self.in_flight
            >= (self._configured_cap if aimd is None or not aimd.active else self.cap())
        ):
            return None
        rq, tok, paced = self.req, self.tok, self.paced
        if (rq is not None and rq.tat > now) or (tok is not None and tok.tat > now):
            return None
        if paced is not None:
            if paced.tat > now:
                return None
            paced.book(now, 1.0)
        cost = prompt = 0
        if tok is not None:
            prompt, most = req.tokens()
            cost = self.calibration.cost(prompt, most)
            if cost:
                tok.book(now, float(cost))
        if rq is not None:
            rq.book(now, 1.0)
        self.in_flight += 1
        epoch = aimd.epoch if aimd is not None else 0
        permit = Permit(now, self.in_flight, epoch, cost, prompt)
        self.running[id(permit)] = permit
        return permit

    async def acquire(self, req: Costed, priority: int, wait_until: float) -> Permit:
        """A permit, after waiting at most until ``wait_until`` (monotonic); else Saturated."""
        if self.waiting or self.in_flight >= self.cap():
            await self._queue_for_slot(priority, wait_until)
        else:
            self.in_flight += 1
        try:
            cost = 0
            prompt = 0
            if self.tok is not None:
                prompt, most = req.tokens()
                cost = self.calibration.cost(prompt, most)
            lease = None
            if self.rate_limited(time.monotonic()) or (self.max_concurrency and self._shared_up()):
                self.pacing += 1
                try:
                    lease = await self._rate(cost, priority, wait_until)
                finally:
                    self.pacing -= 1
        except BaseException:
            self.in_flight -= 1
            self._pump()
            raise
        epoch = self.aimd.epoch if self.aimd is not None else 0
        # What the upstream sees in flight: not the requests still waiting for their paced
        # slot here (they hold a slot of ours, not of the upstream's) — the load evidence
        # would read a rate wall's queue as a concurrency step. But those whose slot has come
        # are on their way with this one: a pause's end wakes them all at once, and each
        # counting only the ones already gone would read a wall's refusals as below its step.
        now = time.monotonic()
        sent = self.in_flight - self.pacing
        if self.pacing:
            sent += sum(1 for d in self._due if d <= now)
        permit = Permit(now, sent, epoch, cost, prompt, lease)
        self.running[id(permit)] = permit
        return permit

    async def _queue_for_slot(self, priority: int, wait_until: float) -> None:
        cfg = self.config.queue
        if self.waiting >= cfg.max_waiting:
            self.saturated_total += 1
            raise Saturated(f"{self.key}: {self.waiting} requests already waiting")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._seq), fut))
        self.waiting += 1
        try:
            async with asyncio.timeout(max(0.0, wait_until - time.monotonic())):
                await fut
        except TimeoutError:
            self.saturated_total += 1
            # When a slot frees is unknown; a second is the honest order of magnitude for an
            # LLM call, and keeps SDKs in front of keel from retrying at once.
            raise Saturated(self._full_reason(), 1.0) from None
        except BaseException:
            if fut.done() and not fut.cancelled():  # granted as we left: hand it on
                self.in_flight -= 1
                self._pump()
            raise
        finally:
            self.waiting -= 1
            fut.cancel()  # no-op when granted; lets _pump skip it when not

    def _full_reason(self) -> str:
        cap = self.cap()
        v = self.verdict
        if self.aimd is not None and self.aimd.active and v.cause is Cause.CONCURRENCY:
            return (
                f"{self.key}: upstream refused at its concurrency limit of ~{v.limit}; "
                f"{self.in_flight} in flight (keel's learned limit {cap:g}), "
                f"{self.waiting} waiting"
            )
        if self.hold.active:
            return (
                f"{self.key}: upstream refused for load without saying until when; probing it "
                f"one request at a time ({self.waiting} waiting)"
            )
        return f"{self.key}: {self.in_flight} requests in flight (limit {cap:g})"

    def _pump(self) -> None:
        """Hand free slots to the best waiters."""
        while self._waiters and self.in_flight < self.cap():
            _, _, fut = heapq.heappop(self._waiters)
            if fut.done():
                continue
            self.in_flight += 1
            fut.set_result(None)

    async def _rate(self, cost: int, priority: int, wait_until: float) -> str | None:
        """Book a rate slot (and the shared lease), sleep until it; the lease id."""
        for rebooked in (False, True):
            b = await self._book_in_turn(cost, priority, wait_until)
            if b.wait <= 0:
                break
            due = time.monotonic() + b.wait
            self._due.append(due)
            try:
                await asyncio.sleep(b.wait)
            except BaseException:
                self._drop_lease(b.lease)
                raise
            finally:
                self._due.remove(due)
            if rebooked or time.monotonic() - due <= LATE:
                break
            self._drop_lease(b.lease)  # the slot passed while we were stalled: book another
        return b.lease

    async def _book_in_turn(self, cost: int, priority: int, wait_until: float) -> _Booking:
        me = object()
        if self._rate_head is not None or self._rate_waiters:
            await self._rate_turn(priority, wait_until)
            self._rate_head = me
        elif time.monotonic() < self._saturated_until or not self._shared_up():
            self._rate_head = me  # serialise while saturated (local booking is instant anyway)
        try:
            while True:
                now = time.monotonic()
                budget = max(0.0, wait_until - now)
                b = await self._book(cost, min(HORIZON, budget))
                now = time.monotonic()
                if b.granted:
                    if b.wait > 0:
                        self._saturated_until = max(self._saturated_until, now + b.wait)
                    return b
                retry_in = LEASE_POLL if b.full else max(0.001, b.wait - HORIZON)
                if not b.full:
                    self._saturated_until = max(self._saturated_until, now + b.wait)
                if now + retry_in + (0.0 if b.full else HORIZON) > wait_until:
                    self.saturated_total += 1
                    what = "concurrency" if b.full else "rate limit"
                    raise Saturated(f"{self.key}: {what} full", None if b.full else b.wait)
                if self._rate_head is not me:
                    if self._rate_head is not None or self._rate_waiters:
                        await self._rate_turn(priority, wait_until)
                    self._rate_head = me
                await asyncio.sleep(retry_in)
        finally:
            if self._rate_head is me:
                self._rate_head = None
                self._next_rate_turn()

    async def _rate_turn(self, priority: int, wait_until: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._rate_waiters, (priority, next(self._seq), fut))
        try:
            async with asyncio.timeout(max(0.0, wait_until - time.monotonic())):
                await fut
        except TimeoutError:
            self.saturated_total += 1
            wait = max(0.0, self._saturated_until - time.monotonic())
            raise Saturated(f"{self.key}: rate limit full", wait or None) from None
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._next_rate_turn()  # our turn came as we left: pass it on
            raise
        finally:
            fut.cancel()

    def _next_rate_turn(self) -> None:
        if self._rate_head is not None:
            return
        while self._rate_waiters:
            _, _, fut = heapq.heappop(self._rate_waiters)
            if not fut.done():
                fut.set_result(None)
                return

    # -- booking: shared or local ----------------------------------------------------------------

    def _buckets(self, now: float, cost: int) -> list[tuple[Gcra, float]]:
        out: list[tuple[Gcra, float]] = []
        if self.req is not None:
            out.append((self.req, 1.0))
        if self.tok is not None and cost:
            out.append((self.tok, float(cost)))
        if now < self.win_until:
            out.append((self.win, 1.0))
        if self.paced is not None:
            out.append((self.paced, 1.0))
        return out

    def _local_wait(self, now: float, cost: int, share: int = 0) -> float:
        share = share or self._share()
        w = max(0.0, self.paused_until - now)
        for g, c in self._buckets(now, cost):
            if share == 1:
                w = max(w, g.wait(now, c))
            else:  # 1/N of the budget: N times the interval
                w = max(w, Gcra(g.interval * share, g.tolerance, g.tat).wait(now, c))
        return w

    async def _book(self, cost: int, max_wait: float) -> _Booking:
        share = self._share()
        shared = self.shared
        if shared is not None and shared.up:
            try:
                return await self._book_shared(shared, cost, max_wait)
            except SharedDown:
                # This call failed, whether or not Redis is declared down yet: never more
                # than the local 1/N, and a lease we could not take is a slot we do not have
                # (retried shortly; once Redis is down the local 1/N cap decides).
                # ``_shared_up()``, not ``shared.up``: mypy keeps the ``if``'s narrowing to True
                # across the await (which may have declared Redis down), and the compiled
                # module (setup.py) would trust it.
                if self.max_concurrency and (self._shared_up() or self.in_flight > self.cap()):
                    return _Booking(False, 0.0, full=True)
                share = shared.peers
        now = time.monotonic()
        w = self._local_wait(now, cost, share)
        if w > max_wait:
            return _Booking(False, w)
        for g, c in self._buckets(now, cost):
            g.book(now + w, c * share)
        return _Booking(True, w)

    async def _book_shared(self, shared: SharedState, cost: int, max_wait: float) -> _Booking:
        now = time.monotonic()
        pause = max(0.0, self.paused_until - now)
        if pause > max_wait:
            return _Booking(False, pause)
        keys: list[str] = []
        args: list[float | str] = []
        scale = shared.scale  # > 1 while some replicas are on their local fallback
        for name, g, c in (
            ("rpm", self.req, 1.0),
            ("tpm", self.tok if cost else None, float(cost)),
            ("win", self.win if now < self.win_until else None, 1.0),
            ("paced", self.paced, 1.0),
        ):
            if g is not None:
                keys.append(shared.key("limit", self.key, name))
                args += [g.interval * scale * 1000.0, g.tolerance * 1000.0, c]
        n = len(keys)
        lease = None
        if self.max_concurrency:
            keys.append(shared.key("leases", self.key))
            most = max(1, int(self.max_concurrency / scale))
            lease = (most, f"{shared.replica_id}:{next(self._seq)}")
        r = await shared.reserve(keys, args, n, max_wait - pause, lease)
        if r.status == 1:
            return _Booking(True, r.wait + pause, lease=lease[1] if lease else None)
        return _Booking(False, r.wait + pause, full=r.status == 2)

    def _drop_lease(self, lease: str | None) -> None:
        if lease is not None and self.shared is not None:
            self.shared.release(self.shared.key("leases", self.key), lease)

    # -- learning ------------------------------------------------------------------------------

    def pause(self, seconds: float) -> None:
        """Nothing goes to this deployment for ``seconds`` (every replica, when shared)."""
        until = time.monotonic() + seconds
        if until <= self.paused_until:
            return
        self.paused_until = until
        if self.shared is not None and seconds >= PAUSE_MIN:  # every replica's sync reads it
            self.shared.publish(self.health_key, "pause", seconds)

    def learn_headers(self, headers: Mapping[str, str], success: bool) -> None:
        """x-ratelimit-* of an upstream response: pace what is left of the current window
        over the time until it resets; on a success also adopt a tighter advertised limit (a
        429's headers may be boilerplate and describe only the moment)."""
        info = parse_ratelimit_headers(headers)
        if info is None:
            return
        now = time.monotonic()
        r = info.requests
        if not success:
            # An exhausted window: pause, unless it resets sooner than a pause is worth (the
            # refused request's own retry waits that out anyway).
            pacing = window_pacing(r, now)
            if (
                pacing is not None
                and pacing.interval == math.inf
                and pacing.until - now >= PAUSE_MIN
            ):
                if self.verdict.cause in (Cause.CONCURRENCY, Cause.NOISE):
                    # The evidence says refusals here are not about the rate: an "exhausted
                    # window" is boilerplate then; _failed decides with this refusal counted.
                    self._window_pause = pacing.until - now
                else:
                    self.pause(pacing.until - now)
            return
        if r.limit and (self.rpm is None or r.limit < self.rpm) and r.limit != self.learned_rpm:
            self.learned_rpm = r.limit
            self.req = per_minute(r.limit, self.burst)
            log.info(
                "deployment %s: learned rpm %d from the upstream", self.key, r.limit,
                extra={"event": "limit_learned", "deployment": self.key, "unit": "rpm",
                       "limit": r.limit},
            )  # fmt: skip
        t = info.tokens
        if t.limit and (self.tpm is None or t.limit < self.tpm) and t.limit != self.learned_tpm:
            self.learned_tpm = t.limit
            self.tok = per_minute(t.limit, self.burst)
            log.info(
                "deployment %s: learned tpm %d from the upstream", self.key, t.limit,
                extra={"event": "limit_learned", "deployment": self.key, "unit": "tpm",
                       "limit": t.limit},
            )  # fmt: skip
        pacing = window_pacing(r, now)
        if pacing is None:
            return
        if pacing.interval == math.inf:
            self.pause(pacing.until - now)
        elif self.req is None or pacing.interval > self.req.interval:
            # tighter than the per-minute limit: what is left of this window is short
            self.win.interval = pacing.interval
            self.win_until = pacing.until

    # -- load evidence ---------------------------------------------------------------------------

    def judge_refusal(self, permit: Permit, now: float) -> Verdict:
        """Record a refusal and say what the evidence makes of it (also kept as ``verdict``)."""
        self.evidence.record(permit.started, permit.in_flight, True)
        prev = self.verdict
        # this attempt's slot is freed after the verdict: the others are still running
        v = self.evidence.judge(now, self.others(permit))
        raised = v.cause is Cause.CONCURRENCY and (v.limit or 0) >= (prev.limit or 0)
        if not raised and self.at_wall(permit, now, slack=1):
            # A refusal at a learned wall, by a count that may lag the upstream's (answers
            # keel has read whose handlers the upstream has not closed yet: one or two under
            # CPU load): the wall's own. What fit below it still fits — a lower step or a run
            # of refusals (a "rate") read from it is that lag, not news (a real change refuses
            # further below). One of two below the step still goes to the hold if it comes in
            # a burst (``_refused``): a rate window misread as this wall is found that way.
            if v.cause is Cause.CONCURRENCY:
                self._step_seen = now
            return prev
        if v.cause is Cause.CONCURRENCY:
            if prev.cause is not Cause.CONCURRENCY:
                self._step_since = now
            self._step_seen = now
        else:
            self._step_since = math.inf
        self.verdict = v
        if v.cause is Cause.RATE and self.aimd is not None and self.aimd.active:
            # An early burst looked like a concurrency wall; the refusals since say rate.
            self.aimd.forget()
        return v

    def others(self, permit: Permit) -> list[tuple[float, int]]:
        """(send time, in flight at send) of the attempts running beside ``permit`` that the
        upstream has let in (answered 2xx): not those whose answer has not come yet — a
        pause's end sends twenty at once, and counted as let in while their refusals were on
        the way back they hid a concurrency wall's step (it read as a rate: 30 % of capacity)."""
        return [
            (p.started, p.in_flight)
            for p in self.running.values()
            if p.answered and p is not permit
        ]

    def at_wall(self, permit: Permit, now: float, slack: int = 0) -> bool:
        """Was this refusal sent at (or within ``slack`` counts below) a learned wall?"""
        v = self.verdict
        return v.limit is not None and permit.in_flight >= v.limit - slack and self.wall(now)

    def wall(self, now: float) -> bool:
        """Is there a learned concurrency wall: a step the evidence has found for
        ``WALL_STABLE`` seconds and confirmed within its horizon, with the adaptive limit
        enforcing it?"""
        return (
            self.verdict.cause is Cause.CONCURRENCY
            and self.aimd is not None
            and self.aimd.active
            and now - self._step_since >= WALL_STABLE
            and now - self._step_seen <= self.evidence.horizon
        )

    def learn_pace(self, accepted_rate: float, now: float) -> bool:
        """A rate-shaped refusal: pace below what the window let through."""
        if not self.rate_aimd.on_refusal(accepted_rate, now):
            return False
        self._set_pace(now)
        return True

    def _set_pace(self, now: float) -> None:
        rate = self.rate_aimd.rate
        if self.paced is None:
            self.paced = Gcra(1.0 / rate, 0.0, now)
        else:
            self.paced.interval = 1.0 / rate

    # -- the hold: TCP's slow start after a loss (keel._concurrency.Hold) ----------------------

    def held(self, permit: Permit, now: float) -> None:
        """A hint-less refusal for load that no verdict explains: hold the queue — when it
        is one of a burst (a stray 429 in a noisy fleet is not a closed window)."""
        if not self.hold.active and not self.evidence.burst(self.others(permit)):
            return
        news = not (self.hold.active and permit.started < self.hold.since)
        if news and (permit.in_flight == 1 or self.rate_aimd.active) and not self.wall(now):
            # Refused with nothing else in flight — not a concurrency limit: the request
            # rate — or refused at the pace keel keeps: pace below what the window let
            # through (one cut per RateAimd.hold). Not at a learned wall: there a lone
            # probe is refused while the upstream still counts the answers keel has just
            # read (its handlers not closed yet, under CPU load); forgetting the wall for
            # it let the whole queue in (CI: 21 of 237 refused, the limit cut to 5). A rate
            # window misread as a wall refuses below its step too, which ends the wall.
            if permit.in_flight == 1 and self.aimd is not None and self.aimd.active:
                self.aimd.forget()
            if self.learn_pace(self.evidence.accepted_rate(now), now):
                log.info(
                    "deployment %s: refused at %d in flight (the request rate): pacing at %.3g/s",
                    self.key,
                    permit.in_flight,
                    self.rate_aimd.rate,
                )
        if not self.hold.active:
            self._unheld_cap = self._configured_cap
        step = 1.0 / self.rate_aimd.rate if self.rate_aimd.active else 0.0
        pause = self.hold.on_refusal(permit.started, permit.in_flight, now, step)
        if pause and permit.in_flight == 1:
            self._probe_refused = now
        # the fast path (try_take) reads the configured cap: it holds too
        self._configured_cap = min(self._unheld_cap, self.hold.cap)
        if pause:
            self.pause(pause)

    def end_hold(self) -> None:
        if self.hold.active:
            self.hold.end()
            self._unhold()
            self._pump()

    def _unhold(self) -> None:
        """The hold's cap moved (a success, the end): so does the fast path's; the released
        slots go to the waiters in ``release_slot``."""
        cap = self.hold.cap
        self._configured_cap = min(self._unheld_cap, cap) if self.hold.active else self._unheld_cap

    def on_success_limited(self, permit: Permit) -> None:
        """A success while a hold or a learned pace is on (``_succeeded`` asks only then: the
        common success records its load evidence and nothing else here)."""
        if self.hold.active and permit.started >= self.hold.since:
            if self._probe_refused:
                # The window reopened, between the last refused probe and now: pace at what
                # it let through over the cycle (to the middle of that span).
                now = time.monotonic()
                mid = (self._probe_refused + now) / 2.0
                self._probe_refused = 0.0
                if self.rate_aimd.on_reopened(self.evidence.accepted_rate(now, mid), now):
                    self._set_pace(now)
                    log.info(
                        "deployment %s: a closed window reopened: pacing at %.3g/s",
                        self.key,
                        self.rate_aimd.rate,
                    )
            self.hold.on_success(permit.started)
            self._unhold()
        if self.paced is not None:
            self.rate_aimd.on_success()
            self.paced.interval = 1.0 / self.rate_aimd.rate

    # -- release -------------------------------------------------------------------------------

    def adjust_tokens(self, delta: int) -> None:
        if self.tok is None or not delta:
            return
        if self.shared is not None and self.shared.up:
            self.shared.adjust(
                self.shared.key("limit", self.key, "tpm"), delta * self.tok.interval * 1000.0
            )
        else:
            self.tok.adjust(delta * self._share())

    def release_slot(self, permit: Permit) -> None:
        self.in_flight -= 1
        self.running.pop(id(permit), None)
        if permit.lease is not None:
            self._drop_lease(permit.lease)
        if self._waiters:
            self._pump()


# --- the driver's two calls --------------------------------------------------------------------


def try_acquire(dep: Deployment, req: Costed, now: float) -> Permit | None:
    """``acquire`` without waiting, for the common case: a healthy closed breaker (``admit``
    would say NORMAL) and a limiter with nothing to enforce right now
    (``DeploymentLimiter.try_take``). None: call ``acquire``.

    A deployment that has not answered yet is let through as a suspect while fewer than
    ``failures`` are in flight (what ``admit`` decides): a hedge, which only ever tries this,
    may go to a fresh deployment too."""
    breaker = dep.breaker
    if breaker.healthy:
        return dep.limiter.try_take(req, now) if now >= breaker.open_until else None
    if breaker.streak or breaker.opens or now < breaker.open_until:
        return None
    permit = dep.limiter.try_take(req, now)  # never answered yet
    if permit is None:
        return None
    how = breaker.admit(now)
    if how is Admit.REFUSED:
        dep.limiter.release_slot(permit)
        return None
    permit.how = how
    return permit


async def acquire(
    dep: Deployment, req: Costed, priority: int, wait_until: float, panic: bool = False
) -> Permit:
    """Let one attempt through to ``dep`` (waiting at most until ``wait_until``, monotonic),
    or raise Saturated. ``panic``: every breaker of the plan is open, let it through anyway."""
    now = time.monotonic()
    # No panic for a deployment that could not be reached at all: sending to it anyway only
    # costs attempts (a request fails at once, saying so; the half-open probe finds it back).
    if panic and not dep.breaker.down:
        permit = await dep.limiter.acquire(req, priority, wait_until)
        permit.started = time.monotonic()
        return permit
    if not dep.breaker.would_admit(now):
        back = max(0.0, dep.breaker.open_until - now)
        raise Saturated(_open_reason(dep, back), back)
    if now < dep.limiter.paused_until and dep.limiter.paused_until > wait_until:
        raise Saturated(f"{dep.name}: paused by the upstream", dep.limiter.paused_until - now)
    while True:
        permit = await dep.limiter.acquire(req, priority, wait_until)
        if dep.drained:  # while it waited for room: nothing new goes there now
            dep.limiter.release_slot(permit)
            raise Saturated(f"{dep.name}: drained by an operator")
        now = time.monotonic()
        how = dep.breaker.admit(now)
        held = dep.breaker.held_for(now) if how is Admit.REFUSED else None
        if held is None or now + held > wait_until:
            break
        # Held back only until a suspect in flight proves itself (a failure streak, or a
        # deployment that has not answered yet): wait for that rather than turn the request
        # away — queue, don't fail. Not holding the slot: in-flight counts stay what the
        # upstream sees (the load evidence reads them).
        dep.limiter.release_slot(permit)
        await asyncio.sleep(held + 0.001)
    if how is Admit.REFUSED:  # opened, a probe started, or too many suspects in flight
        dep.limiter.release_slot(permit)
        is_open = dep.breaker.open_until > now
        reason = (
            "circuit breaker open"
            if is_open
            else "holding back during a failure streak"
            if dep.breaker.streak
            else "ramping up after its first answer"
            if dep.breaker.ramping(now)
            else "holding back until its first answer"
        )
        raise Saturated(
            f"{dep.name}: {reason}", max(0.0, dep.breaker.open_until - now), soon=not is_open
        )
    permit.how = how
    permit.started = now  # the breaker knows its suspects by this time
    return permit


def holds_back(dep: Deployment) -> bool:
    """Does the deployment's limiter hold excess requests back itself, because the evidence
    says its refusals track load? Then a retry there waits for room and adds no load (the
    plan does not charge it to the retry budget)."""
    lim = dep.limiter
    if lim.hold.active:
        return True
    cause = lim.verdict.cause
    if cause is Cause.CONCURRENCY:
        return lim.aimd is not None and lim.aimd.active
    return cause is Cause.RATE and lim.paced is not None


def _open_reason(dep: Deployment, back: float) -> str:
    b = dep.breaker
    if b.down:
        return (
            f"{dep.name}: down ({dep.limiter.down_reason or 'unreachable'}); circuit breaker "
            f"open for {back:.1f}s"
        )
    return f"{dep.name}: circuit breaker open for {back:.1f}s"


def release(dep: Deployment, permit: Permit) -> None:
    """Report the attempt's outcome (``permit.ok`` / ``permit.error``) and free its slot."""
    if permit.released:
        return
    permit.released = True
    try:
        if permit.ok:
            _succeeded(dep, permit, time.monotonic())
        else:
            _failed(dep, permit, time.monotonic())
    finally:
        dep.limiter.release_slot(permit)


def _succeeded(dep: Deployment, permit: Permit, now: float) -> None:
    lim = dep.limiter
    dep.breaker.record(permit.how, permit.started, True, now)
    usage = permit.usage
    # The (prompt, completion) tokens the usage reports, read here (no helper frame per
    # success); None for a count that is not an int (a bool is an int subclass, a float is
    # not a count).
    prompt: int | None = None
    completion: int | None = None
    if usage is not None:
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if type(p) is int:
            prompt = p
        if type(c) is int:
            completion = c
    tokens = completion if completion else lim.calibration.typical_completion
    took = now - permit.started
    dep.latency.observe(took / (tokens if tokens > 1.0 else 1.0), now)
    dep.took.add(took)  # the status page's percentiles
    if lim.aimd is not None:
        lim.aimd.on_success(permit.in_flight, permit.epoch, now)
    lim.evidence.record(permit.started, permit.in_flight, False)
    if lim.hold.active or lim.paced is not None:
        lim.on_success_limited(permit)
    if usage is not None:
        if permit.cost and prompt is not None and completion is not None:
            lim.adjust_tokens(prompt + completion - permit.cost)
        if permit.prompt_estimate:
            lim.calibration.learn(permit.prompt_estimate, prompt, completion)
    dep.outcomes["success"] += 1


def _failed(dep: Deployment, permit: Permit, now: float) -> None:
    lim = dep.limiter
    err = permit.error
    health: bool | None = None
    verdict: Verdict | None = None
    if err is not None:
        health = False if err.kind in BREAKER_FAILURES else None if err.kind in _NEUTRAL else True
        if err.kind in _REFUSALS:
            verdict = lim.judge_refusal(permit, now)
            if verdict.cause in (Cause.CONCURRENCY, Cause.RATE):
                health = None  # refused for what keel sent: load, not the deployment's health
        else:  # it was let in: evidence that this in-flight count was not refused for load
            lim.evidence.record(permit.started, permit.in_flight, False)
    retry_after = err.retry_after if err is not None else None
    down = err is not None and unreachable(err)
    if down:
        assert err is not None
        lim.down_reason = err.message.removeprefix("upstream ")
    if dep.breaker.record(permit.how, permit.started, health, now, retry_after, down):
        period = dep.breaker.open_until - now
        log.warning(
            "deployment %s: circuit breaker open for %.1fs: %s (last: %s)",
            dep.name,
            period,
            dep.breaker.why,
            err.kind.value if err is not None else "failures",
            extra={"event": "ejected", "deployment": dep.name, "seconds": round(period, 3),
                   "why": dep.breaker.why},
        )  # fmt: skip
        if lim.shared is not None:
            lim.shared.publish(lim.health_key, "breaker", period)
    if err is None:
        dep.outcomes["cancelled"] += 1
        return
    window_pause, lim._window_pause = lim._window_pause, 0.0
    if verdict is not None:
        _refused(dep, permit, err, verdict, now, window_pause)
    if health is False:
        dep.latency.penalise(FAILURE_PENALTY, now)
    if lim.shared is not None:
        if err.disable_key_for and dep.benched_until > now:
            lim.shared.publish(lim.health_key, "bench", dep.benched_until - now, err.kind.value)
        elif dep.cooldown_until > now + PAUSE_MIN:
            lim.shared.publish(lim.health_key, "cooldown", dep.cooldown_until - now)
    dep.outcomes[err.kind.value] += 1


def _refused(
    dep: Deployment,
    permit: Permit,
    err: UpstreamError,
    v: Verdict,
    now: float,
    window_pause: float,
) -> None:
    """A load-shaped refusal: act on what the evidence says it is (module docstring)."""
    lim = dep.limiter
    aimd = lim.aimd
    if v.cause is Cause.NOISE:
        lim.end_hold()  # random refusals: holding back would not spare any
        return  # nothing shrinks, the request's own retry waits its hint
    if v.cause is Cause.CONCURRENCY and v.limit is not None:
        # Only a refusal above the step the evidence found is about it (one below it is
        # something else, and the evidence will say so), or one at a learned wall; the step
        # is a steadier estimate of the wall than this refusal's own in-flight count, and a
        # learned wall's refusals never cut below backoff x the step. A refusal *at* the
        # step says the step itself did not fit: the capacity known is one less, so the
        # limit probes slowly above it instead of regrowing fast to the refused count (a
        # step read one too high under CPU load refused 1 attempt in 7: CI, 37 of 255).
        wall = lim.at_wall(permit, now)
        floor = v.limit * aimd.backoff if wall and aimd is not None else 0.0
        if (
            aimd is not None
            and (permit.in_flight > v.limit or wall)
            and aimd.on_overload(min(permit.in_flight, v.limit + 1), permit.epoch, now, floor)
        ):
            log.info(
                "deployment %s: refusals track concurrency (%s): limit now %d",
                dep.name,
                v,
                aimd.slots or 0,
                extra={"event": "limit_learned", "deployment": dep.name, "unit": "concurrency",
                       "limit": aimd.slots or 0},
            )  # fmt: skip
        if wall or (
            permit.in_flight > v.limit
            and not lim.hold.active
            and not lim.evidence.burst(lim.others(permit))
        ):
            return  # waiting does not lift a concurrency wall; finishing requests does
        # Below the step, in a burst of refusals, or a hold is on: the hold judges them (a
        # burst starts one) — else a rate window misjudged as a concurrency step (its first
        # burst looks like one) would take one instant refusal after another.
    if v.cause is Cause.RATE and v.rate is not None and lim.learn_pace(v.rate, now):
        log.info(
            "deployment %s: refusals track the request rate (%s): pacing at %.3g/s",
            dep.name,
            v,
            lim.rate_aimd.rate,
            extra={"event": "limit_learned", "deployment": dep.name, "unit": "rps",
                   "limit": lim.rate_aimd.rate},
        )  # fmt: skip
    # RATE or not yet known: a hint the loop will wait out anyway holds back this deployment's
    # other requests too; a longer one is the loop's cooldown (fail over, still last resort).
    retry_after = err.retry_after
    if (
        err.kind is ErrorKind.RATE_LIMIT
        and retry_after is not None
        and PAUSE_MIN <= retry_after <= lim.config.retry.max_retry_wait
    ):
        lim.pause(retry_after)
    elif window_pause:
        lim.pause(window_pause)
    elif retry_after is None and err.kind is ErrorKind.RATE_LIMIT:
        # "Too many requests" and no word on when there is room again (DashScope, a bare
        # proxy): hold the queue and probe, so a closed window costs a handful of attempts,
        # not one per request waiting. (A 503 says the provider is busy, not that keel sends
        # too much: the breaker and the evidence judge those.)
        lim.held(permit, now)


def wire(dep: Deployment, config: GatewayConfig, shared: SharedState | None) -> None:
    """Give a deployment its limiter, breaker and latency estimate from the config."""
    cfg = dep.cfg
    health_key = shared.key("health", dep.name) if shared is not None else dep.name
    dep.limiter = DeploymentLimiter(
        key=dep.name,
        health_key=health_key,
        rpm=cfg.rpm,
        tpm=cfg.tpm,
        max_concurrency=cfg.max_concurrency,
        burst=cfg.burst,
        config=config,
        shared=shared,
    )
    b = config.breaker
    never = 2**62  # a disabled breaker is one whose thresholds are never reached
    dep.breaker = Breaker(
        failures=b.failures if b.enabled else never,
        failure_ratio=b.failure_ratio,
        min_requests=b.min_requests if b.enabled else never,
        window=b.window,
        cooldown=b.cooldown,
        max_cooldown=b.max_cooldown,
        proven=not b.enabled,  # a disabled breaker holds nothing back, not even at start-up
    )
    dep.latency = PeakEwma(decay=config.balancer.decay)


def link_siblings(deps: list[Deployment]) -> None:
    """The deployments of one model group judge each other's health (relative ejection)."""
    group = BreakerGroup()
    for dep in deps:
        group.add(dep.breaker)


def apply_remote_health(deps: list[Deployment], health: Mapping[str, RemoteHealth]) -> None:
    """What other replicas decided (SharedState's sync): honour it here."""
    now = time.monotonic()
    for dep in deps:
        h = health.get(dep.limiter.health_key)
        if h is None:
            continue
        if h.breaker > 0 and dep.breaker.force_open(now + h.breaker):
            log.warning("deployment %s: circuit breaker opened by another replica", dep.name)
        if h.bench > 0 and now + h.bench > dep.benched_until + 1.0:
            dep.benched_until = now + h.bench
            dep.bench_reason = h.bench_reason
            log.error(
                "deployment %s taken out of rotation for %.0fs by another replica: %s",
                dep.name,
                h.bench,
                h.bench_reason,
            )
        if h.cooldown > 0:
            dep.cooldown_until = max(dep.cooldown_until, now + h.cooldown)
        if h.pause > 0:
            dep.limiter.paused_until = max(dep.limiter.paused_until, now + h.pause)
