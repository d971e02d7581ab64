"""Deployment health without I/O: the circuit breaker and the peak-EWMA latency estimate.

Breaker (closed → open → half-open → closed). What opens it distinguishes *down* from *noisy*:

* **plainly down**: ``failures`` consecutive attempts that could not reach the upstream at all
  (connection refused, timeouts; ``record(..., down=False)`` for the others), or at least ``min_requests``
  attempts in the last ``window`` seconds of which ``DOWN_RATIO`` (90 %) failed. Always opens.
  While a down-streak is running — and until a deployment's first success, so that a burst
  at start-up cannot all land on one that is dead — attempts started recently count as *suspects*:
  only ``failures - streak`` may be in flight at once, so a burst of requests cannot all land on
  a dead deployment (connection refused answers in a millisecond, so its suspects never last a
  second) before the streak opens the breaker.
* **the ramp** (TCP's slow start, paced): after its first success a fresh deployment is not
  handed every request that waited at that gate at once. Its starts are paced, from the gate's
  own pace (``failures`` per ``SUSPECT_HORIZON``) doubling every ``RAMP_DOUBLING`` seconds, until
  ``RAMP_END`` a second (a quarter of a second on; a slower ramp held the in-flight count low
  long enough to be a baseline, and random refusals after it looked like a concurrency step:
  tests/test_load_noise.py): a limit keel does not know yet — a rate window that
  says nothing but "too many requests" — refuses the few paced starts sent before the limiter
  has seen a burst of refusals and holds, not everything that waited (a 20 per 2 s window
  refused 15 of the 35 sent in its first 0.2 s; paced, 4).
* **a run of failures no bad luck explains**: ``failures`` in a row of any kind when the fleet
  (the group's deployments, pooled) is healthy, more when attempts fail anyway — as many as
  random faults at the fleet's failure rate would produce less than ``RUN_ALPHA`` of the time
  (46 %: 12); not judged before the window holds ``FLEET_MIN`` attempts. A deployment alone
  in its group has no fleet: ``failures`` in a row.
* **much worse than its siblings** (Envoy's outlier detection): with at least ``min_requests``
  attempts in the window, a failure ratio of at least ``RELATIVE_MARGIN`` above the pooled
  ratio of the other (closed) deployments of its group *and* twice it, by more than chance
  explains (``RELATIVE_Z`` standard errors: a small window of equal faults often reads
  unequal). When the whole fleet is noisy
  (a provider-wide incident, random faults everywhere) nobody is ejected for it: ejecting one
  would only pile its traffic onto equally noisy siblings. A relative ejection is refused when
  it would leave more than ``max_ejection`` of the group open (the rest would be overloaded);
  without siblings with data, ``failure_ratio`` is the absolute threshold.
* **open**: no attempts for the cooldown: ``cooldown`` doubled for each consecutive re-open up
  to ``max_cooldown``, never shorter than the Retry-After the failure carried.
* **half-open**: exactly one probe; success closes, failure re-opens with the longer cooldown.

Peak-EWMA (Finagle's load-balancer cost): a sample above the estimate replaces it at once (a
deployment that just got slow is avoided now, not after the average catches up); lower samples
blend in with a weight that depends on the time since the last sample. Between samples the
estimate decays towards zero with the same time constant, so a deployment nobody picks is
eventually picked again, and its share recovers once it is fast again. Failed attempts raise
a separate, bounded failure score instead of feeding the estimate (see ``FAILURE_WEIGHT``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum

from keel._classify import ErrorKind, UpstreamError


def unreachable(err: UpstreamError) -> bool:
    """Did the attempt fail without reaching the upstream at all: connection refused,
    unreachable, DNS? That is "plainly down" — unlike an answer that was an error (a 5xx, a
    reset after connecting, a broken stream) or a timeout (which the run rule judges)."""
    # Only connect-phase failures: a timeout before the response may be a request the upstream
    # accepted and is slow with (a stall, a long prompt), and several of those end at once.
    # aiohttp's connect-phase failures are ClientConnectorError & co.; the upstream adapter
    # names the exception's type (keel.engine._upstream.transport_failure).
    return err.kind is ErrorKind.CONNECTION and "ClientConnector" in err.message


class BreakerState(IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Admit(IntEnum):
    """How an attempt was let through (hand it back to ``Breaker.record``)."""

    REFUSED = 0
    NORMAL = 1
    SUSPECT = 2  # started during a failure streak
    PROBE = 3  # the half-open probe


SUSPECT_HORIZON = 0.1  # seconds: a suspect still running after this is not a fast failure
RAMP_DOUBLING = 0.05  # seconds: the ramp's pace doubles this often
RAMP_END = 2000.0  # starts per second: a ramp this fast is over (5.3 doublings from 50/s)
_BUCKETS = 10
DOWN_RATIO = 0.9  # failing this share of the window's attempts is plainly down
RELATIVE_MARGIN = 0.25  # fail this much more often than the siblings (and twice as often)
FLEET_MIN = 10  # attempts in the window before the fleet's failure ratio is trusted
RUN_ALPHA = 1e-4  # a run of failures this unlikely under the fleet's failure rate is no bad luck
# A relative ejection needs the difference to be this many standard errors (a two-proportion
# z-test): two deployments failing 47 % each read 64 % and 30 % after twenty-odd attempts often
# enough that one of them was ejected in one storm run in three, and its share of the traffic
# then exhausted retries on the other.
RELATIVE_Z = 4.0


def _beyond_chance(bad: int, n: int, sib_bad: int, sib_n: int) -> bool:
    """Is ``bad`` of ``n`` failing more often than ``sib_bad`` of ``sib_n`` by more than
    chance explains (``RELATIVE_Z`` standard errors of the difference, pooled)?"""
    p = (bad + sib_bad) / (n + sib_n)
    se = math.sqrt(p * (1.0 - p) * (1.0 / n + 1.0 / sib_n))
    return bad / n - sib_bad / sib_n >= RELATIVE_Z * se


@dataclass(eq=False, slots=True)
class BreakerGroup:
    """The breakers of one model group's deployments, for health relative to siblings."""

    members: list[Breaker] = field(default_factory=list)
    max_ejection: float = 0.5  # share of the group that relative ejections may leave open

    def add(self, breaker: Breaker) -> None:
        self.members.append(breaker)
        breaker.peers = self

    def siblings(self, me: Breaker, now: float) -> tuple[int, int] | None:
        """The other (closed) members' window, pooled: (failed, attempts), or None without
        enough data."""
        ok_n = bad_n = 0
        for b in self.members:
            if b is not me and now >= b.open_until:
                o, f = b._totals(now)
                ok_n += o
                bad_n += f
        if ok_n + bad_n < me.min_requests:
            return None
        return bad_n, ok_n + bad_n

    def may_eject(self, me: Breaker, now: float) -> bool:
        """Would one more open breaker stay within ``max_ejection`` of the group? (Alone in
        its group a deployment may always be opened: there is nobody to overload.)"""
        if len(self.members) < 2:
            return True
        open_now = sum(1 for b in self.members if b is not me and now < b.open_until)
        return open_now + 1 <= int(self.max_ejection * len(self.members))


@dataclass(slots=True)
class Breaker:
    failures: int = 5
    failure_ratio: float = 0.5
    min_requests: int = 20
    window: float = 10.0
    cooldown: float = 5.0
    max_cooldown: float = 60.0
    open_until: float = 0.0
    opens: int = (
        0  # consecutive opens without a successful probe; >0 after the cooldown = half-open
    )
    streak: int = 0  # consecutive failures that never reached the upstream
    run: int = 0  # consecutive failures of any kind
    probing: bool = False
    opened_total: int = 0
    down: bool = False  # open because it could not be reached at all (no panic for that)
    why: str = ""  # what opened it last (for logs and errors)
    # Until its first success a deployment is treated like one in a failure streak (at most
    # ``failures`` attempts at once in its first moments): a dead one found at start-up costs
    # ``failures`` attempts, not one per request of the first burst. Then the ramp.
    proven: bool = False
    # From the first success on, until the ramp is over (``proven``), starts are paced.
    ramp_since: float = math.inf
    _ramp_next: float = 0.0  # the ramp's next start, no sooner
    _suspects: list[float] = field(default_factory=list)  # start times of suspects in flight
    _ok: list[int] = field(default_factory=lambda: [0] * _BUCKETS)
    _bad: list[int] = field(default_factory=lambda: [0] * _BUCKETS)
    _slot_epoch: list[int] = field(default_factory=lambda: [-1] * _BUCKETS)
    peers: BreakerGroup | None = field(default=None, repr=False)

    def state(self, now: float) -> BreakerState:
        if now < self.open_until:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN if self.opens else BreakerState.CLOSED

    def admit(self, now: float) -> Admit:
        if not self.streak and not self.opens and self.proven:  # the common case
            return Admit.NORMAL
        st = self.state(now)
        if st is BreakerState.OPEN:
            return Admit.REFUSED
        if st is BreakerState.HALF_OPEN:
            if self.probing:
                return Admit.REFUSED
            self.probing = True
            return Admit.PROBE
        if not self.streak and now >= self.ramp_since:
            return self._ramp(now)
        if self.streak or not self.proven:
            horizon = now - SUSPECT_HORIZON
            live = sum(1 for t in self._suspects if t > horizon)
            if self.streak + live >= self.failures:
                return Admit.REFUSED
            self._suspects.append(now)
            return Admit.SUSPECT
        return Admit.NORMAL

    def _ramp(self, now: float) -> Admit:
        """A start in the ramp: at most one per ``1 / rate``; the ramp is over (``proven``)
        once that rate reaches ``RAMP_END``."""
        rate = self.failures / SUSPECT_HORIZON * 2.0 ** ((now - self.ramp_since) / RAMP_DOUBLING)
        if rate >= RAMP_END:
            self.proven = True
            self.ramp_since = math.inf
            return Admit.NORMAL
        if now < self._ramp_next:
            return Admit.REFUSED
        self._ramp_next = now + 1.0 / rate
        return Admit.NORMAL

    def ramping(self, now: float) -> bool:
        """Is the deployment in its ramp (answered, starts still paced)?"""
        return not self.proven and now >= self.ramp_since

    def held_for(self, now: float) -> float | None:
        """When ``admit`` refused only because of suspects in flight or the ramp's pace:
        seconds until the oldest of them stops counting, or the ramp's next start. None when
        it refused for another reason."""
        if self.state(now) is not BreakerState.CLOSED:
            return None
        if not self.streak and now >= self.ramp_since:
            return max(0.0, self._ramp_next - now)
        if not self._suspects:
            return None
        horizon = now - SUSPECT_HORIZON
        live = [t for t in self._suspects if t > horizon]
        return min(live) - horizon if live else 0.0

    def would_admit(self, now: float) -> bool:
        """``admit`` without side effects (for ordering candidates)."""
        if now < self.open_until:
            return False
        return not (self.opens and self.probing)

    @property
    def healthy(self) -> bool:
        """Closed, answered before and past the ramp, no failure streak: ``admit`` would say
        NORMAL and change nothing."""
        return not self.streak and not self.opens and self.proven

    def record(
        self,
        how: Admit,
        started: float,
        ok: bool | None,
        now: float,
        retry_after: float | None = None,
        down: bool = True,
    ) -> bool:
        """The outcome of an attempt admitted as ``how`` at ``started``: ``ok`` None is
        neither (cancelled, or not the deployment's fault). ``down`` False: a failure that
        was an answer (a 5xx, a broken stream), which counts towards the failure ratio but not
        towards the streak of attempts that could not reach the upstream at all. True when
        this opened the breaker."""
        if ok and how is Admit.NORMAL and not self.opens:  # the common case, every request
            self.streak = self.run = 0
            self._ok[self._slot(now)] += 1
            return False
        if how is Admit.SUSPECT:
            try:
                self._suspects.remove(started)
            except ValueError:
                pass
        elif how is Admit.PROBE:
            self.probing = False
        if ok is None:
            return False
        if ok:
            self.streak = self.run = 0
            if not self.proven and self.ramp_since == math.inf:
                self.ramp_since = self._ramp_next = now  # answered: the ramp starts
            i = self._slot(now)
            self._ok[i] += 1
            if how is Admit.PROBE or (self.opens and now >= self.open_until):
                self.opens = 0  # closed again
            return False
        if self.state(now) is BreakerState.OPEN:
            return False  # an attempt that started before it opened: already counted
        if how is Admit.PROBE:
            self.open(now, retry_after)
            self.down = down
            self.why = "the probe failed"
            return True
        if down:
            self.streak += 1
        self.run += 1
        self._count(now, ok=False)
        why = ""
        if self.streak >= self.failures:
            why = f"unreachable {self.streak} times in a row"
        elif self.run >= (needed := self._run_needed(now)) and self._may_eject(now):
            why = f"{self.run} failures in a row (more than bad luck explains: {needed:g})"
        else:
            why = self._ratio_trips(now)
        if why:
            down_now = self.streak >= self.failures  # before open() resets the streak
            self.open(now, retry_after)
            self.down = down_now
            self.why = why
        return bool(why)

    def _may_eject(self, now: float) -> bool:
        return self.peers is None or self.peers.may_eject(self, now)

    def _fleet_ratio(self, now: float) -> float | None:
        """How often attempts fail anyway: the pooled failure ratio of the group's closed
        deployments, this one included, once the window holds ``FLEET_MIN`` attempts; None
        before that."""
        ok_n, bad_n = self._totals(now)
        assert self.peers is not None
        for b in self.peers.members:
            if b is not self and now >= b.open_until:
                o, f = b._totals(now)
                ok_n += o
                bad_n += f
        return bad_n / (ok_n + bad_n) if ok_n + bad_n >= FLEET_MIN else None

    def _run_needed(self, now: float) -> float:
        """Consecutive failures (of any kind) that say more than bad luck: ``failures`` in a
        healthy fleet; when attempts fail at rate p anyway, a run that random faults would
        produce less than ``RUN_ALPHA`` of the time (p = 46 %: 12 in a row). Before the
        window knows the fleet, the run is not judged: a streak of unreachable attempts still
        opens, and the first seconds of a noisy fleet do not eject anyone."""
        if self.peers is None or len(self.peers.members) < 2:
            return float(self.failures)  # alone: no fleet to compare with, the classic rule
        p = self._fleet_ratio(now)
        if p is None:
            return math.inf
        if p <= 0.0:
            return float(self.failures)
        if p >= 0.99:
            return math.inf
        return max(float(self.failures), math.ceil(math.log(RUN_ALPHA) / math.log(p)))

    def _ratio_trips(self, now: float) -> str:
        """Why the window's failure ratio opens the breaker ("" when it does not)."""
        ok_n, bad_n = self._totals(now)
        n = ok_n + bad_n
        if n < self.min_requests:
            return ""
        mine = bad_n / n
        if mine >= DOWN_RATIO:  # plainly failing, whatever the siblings do
            return f"{bad_n} of {n} attempts failed"
        peers = self.peers
        if peers is None or len(peers.members) < 2:  # alone: nobody to compare with
            return f"{bad_n} of {n} attempts failed" if mine >= self.failure_ratio else ""
        pooled = peers.siblings(self, now)
        if pooled is None:  # the siblings are open or idle: nothing to be worse than
            return ""
        sib_bad, sib_n = pooled
        sib = sib_bad / sib_n
        if mine < sib + RELATIVE_MARGIN or mine < 2.0 * sib:
            return ""  # the fleet is noisy, not this deployment
        if not _beyond_chance(bad_n, n, sib_bad, sib_n):
            return ""  # worse in this window, but by no more than luck deals equal ones
        if not peers.may_eject(self, now):
            return ""
        return f"{mine:.0%} of attempts failed, its group {sib:.0%}"

    def open(self, now: float, retry_after: float | None = None) -> float:
        """Open for the next cooldown; returns the open period in seconds."""
        period = min(self.max_cooldown, self.cooldown * (2.0 ** min(self.opens, 30)))
        if retry_after is not None:
            period = max(period, retry_after)
        self.open_until = max(self.open_until, now + period)
        self.opens += 1
        self.opened_total += 1
        self.streak = self.run = 0
        self._suspects.clear()
        for i in range(_BUCKETS):  # a fresh start after the cooldown
            self._ok[i] = self._bad[i] = 0
        return period

    def reset(self) -> None:
        """Closed, as after a successful probe: an operator put the deployment back. The
        window starts afresh (its failures are what got it opened); a probe still in flight
        is judged when it ends, like any probe."""
        self.open_until = 0.0
        self.opens = self.streak = self.run = 0
        self.probing = self.down = False
        self.why = ""
        self._suspects.clear()
        for i in range(_BUCKETS):
            self._ok[i] = self._bad[i] = 0

    def force_open(self, until: float) -> bool:
        """Another replica opened this deployment's breaker until ``until`` (our clock)."""
        if until <= self.open_until:
            return False
        self.open_until = until
        self.opens = max(self.opens, 1)
        self.streak = 0
        return True

    def _slot(self, now: float) -> int:
        tick = int(now * _BUCKETS / self.window)
        i = tick % _BUCKETS
        if self._slot_epoch[i] != tick:
            self._slot_epoch[i] = tick
            self._ok[i] = self._bad[i] = 0
        return i

    def _count(self, now: float, *, ok: bool) -> None:
        i = self._slot(now)
        if ok:
            self._ok[i] += 1
        else:
            self._bad[i] += 1

    def _totals(self, now: float) -> tuple[int, int]:
        oldest = int(now * _BUCKETS / self.window) - _BUCKETS + 1
        ok_n = bad_n = 0
        for i in range(_BUCKETS):
            if self._slot_epoch[i] >= oldest:
                ok_n += self._ok[i]
                bad_n += self._bad[i]
        return ok_n, bad_n


# A failed attempt says how often a deployment fails, not how fast it answers. So failures do
# not feed the latency estimate (where ``max(2 x estimate, penalty)`` once compounded to +Inf):
# they raise a failure score ``failing`` (an EWMA over outcomes, 0..1) that multiplies the cost
# by up to 1 + FAILURE_WEIGHT. Bounded, at most that multiple of the healthy cost; forgotten
# with each success (x (1 - FAILURE_ALPHA)) and with time (like the estimate); and a uniform
# error rate scales every deployment's cost alike, so it does not disturb their balance.
FAILURE_WEIGHT = 9.0  # a deployment failing every attempt costs 10 times its latency
FAILURE_ALPHA = 0.2  # the weight of one outcome in the failure score
_FORGOTTEN = 1e-3  # a failure score this small is zero (keeps the common path branch-free)


@dataclass(slots=True)
class PeakEwma:
    decay: float = 5.0  # seconds
    value: float = 0.0
    stamp: float = 0.0
    samples: int = 0  # successes observed
    failing: float = 0.0  # failure score, 0..1 (see FAILURE_WEIGHT)
    failing_stamp: float = 0.0

    def observe(self, sample: float, now: float) -> None:
        """A successful attempt's latency (per token)."""
        if self.samples == 0 or sample > self.value:  # the first also replaces a placeholder
            self.value = sample
        else:
            dt = now - self.stamp
            w = math.exp(-dt / self.decay) if dt > 0.0 else 1.0
            self.value = self.value * w + sample * (1.0 - w)
        self.stamp = now
        self.samples += 1
        if self.failing:
            f = self._failing(now) * (1.0 - FAILURE_ALPHA)
            self.failing = f if f > _FORGOTTEN else 0.0
            self.failing_stamp = now

    def penalise(self, floor: float, now: float) -> None:
        """A failed attempt that was the deployment's fault. ``floor``: the latency (per token)
        to assume while no success has been observed (a deployment failing from the start
        must not look average)."""
        self.failing = self._failing(now) * (1.0 - FAILURE_ALPHA) + FAILURE_ALPHA
        self.failing_stamp = now
        if not self.samples:
            self.value = floor
        # The estimate's decay towards zero stands for "not tried lately", and this was a try:
        # it holds (restamped), or a deployment failing fast would soon look the fastest.
        self.stamp = now

    def cost(self, now: float) -> float | None:
        """The decayed estimate, scaled by the failure score; None before the first outcome."""
        if not self.samples and not self.failing:
            return None
        dt = now - self.stamp  # a plain branch, not max(): this runs per request
        c = self.value * math.exp(-dt / self.decay) if dt > 0.0 else self.value
        if self.failing:
            c *= 1.0 + FAILURE_WEIGHT * self._failing(now)
        return c

    def _failing(self, now: float) -> float:
        dt = now - self.failing_stamp
        return self.failing * math.exp(-dt / self.decay) if dt > 0.0 else self.failing
