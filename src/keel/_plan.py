"""The attempt plan: the one place that decides *try here*, *try elsewhere*, *wait* or *give up*.

Sans-IO, in the manner of h11: the driver (``keel.engine._driver``) asks ``next(now)`` for a
decision, carries it out, and reports what happened (``refused``, ``started``, ``failed``,
``succeeded``, ``committed``, ...). Nothing here awaits, sleeps or reads a clock; time comes in
as an argument, and the world (which deployments a group has, in the balancer's order, and
which have room right now) through two callables given at construction.

The policy, in the order the plan applies it:

1. walk the groups of the request (the model's group, then its fallbacks);
2. in each group try every candidate once — fail over before waiting: another deployment is
   usually faster than a backoff — then retry those whose error was retryable after a
   full-jitter backoff that honours the provider's hint, each up to
   ``max_retries_per_deployment`` times (counted per deployment: one held back for the
   moment keeps its turns; at most ``max_attempts`` rounds); a hint longer than
   ``max_retry_wait`` cools the deployment down instead;
3. give up at once on errors that would fail anywhere (``failover`` false), and when the
   attempt cap, the retry budget or the request deadline says so.

Attempts are spread over the whole plan: a deployment that could not be reached at all
(connection refused, unreachable: ``keel._health.unreachable``) is not retried in its
group's rounds but once more at the very end, after every fallback group has been tried — a
dead deployment costs one attempt per request (until its breaker opens), and the last
fallback is reached. A retry on a deployment whose limiter holds excess requests back itself
(``queued(dep)``: a learned concurrency limit or pace) after a load refusal waits for room
there instead of adding load, so it is not charged to the retry budget.

For streams it also decides what only the whole request can know: after the commit only
deployments that can *continue* the answer are candidates (never inside a tool call, never for
``n > 1``), a continuation that would exceed the client's token limit ends with ``length``,
output moderation ends with ``content_filter`` or fails over (the group's
``on_content_filter``), and a late first token is *hedged* on another deployment. A first
token far later than the deployment's usual one ends the attempt (``keel._cadence.FirstToken``,
carried out by the driver); each attempt of the request cut for lateness doubles the bound
for the next (``Try.patience``, RFC 6298's backoff of a retransmission timer): a big request
gets the time it needs, and a second stall is still cut long before ``first_token``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Generic, Literal, Protocol, TypeVar

from keel._backoff import RetryBudget, backoff_delay
from keel._classify import ErrorKind, UpstreamError
from keel._health import unreachable
from keel._hedge import HedgePolicy

# Refusals for load: a retry after one on a deployment that queues (``Plan.queued``) is free.
_LOAD = frozenset((ErrorKind.RATE_LIMIT, ErrorKind.OVERLOADED))


class Candidate(Protocol):
    """What the plan needs to know of a deployment."""

    @property
    def name(self) -> str: ...

    @property
    def continuation(self) -> str: ...  # "prefill" | "instruct" | "none"


D = TypeVar("D", bound=Candidate)


@dataclass(frozen=True, slots=True)
class Policy:
    """The retry settings the plan applies (``config.RetryPolicy`` plus the group's choices)."""

    max_attempts: int = 8
    max_retries_per_deployment: int = 3
    backoff_base: float = 0.1
    backoff_cap: float = 2.0
    max_retry_wait: float = 5.0
    quota_cooldown: float = 3600.0
    auth_cooldown: float = 300.0
    on_content_filter: Literal["pass", "failover"] = "pass"


# -- decisions ------------------------------------------------------------------------------------


class Try(Generic[D]):
    """Start an attempt on ``dep``.

    ``continuation``: the stream is committed; the attempt must continue the answer.
    ``hedge_after``: seconds after which, without a first token, ask ``hedge_target()``.
    ``patience``: how many attempts of this request were cut for lateness; the deployment's
    learned first-token bound (``keel._cadence.FirstToken``) is doubled that many times, up
    to the configured ``first_token`` — a late request may just be a big one. If the
    deployment's limiter cannot let the attempt through at once, ``queue_bound()`` says how
    long it may wait for it.

    (A plain class, as ``Plan`` and ``_Setbacks``: mypyc compiles no generic dataclass.)"""

    __slots__ = ("continuation", "dep", "hedge_after", "patience")

    def __init__(
        self,
        dep: D,
        continuation: bool = False,
        hedge_after: float | None = None,
        patience: int = 0,
    ) -> None:
        self.dep = dep
        self.continuation = continuation
        self.hedge_after = hedge_after
        self.patience = patience

    def __repr__(self) -> str:
        return (
            f"Try(dep={self.dep!r}, continuation={self.continuation}, "
            f"hedge_after={self.hedge_after}, patience={self.patience})"
        )


@dataclass(frozen=True, slots=True)
class Wait:
    """Back off until ``until`` (the clock of ``next``), then ask again."""

    until: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """No attempt will succeed: ``reason`` says why (empty: the errors of the attempts tell)."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class Finish:
    """End the (committed or not) answer well-formed with this ``finish_reason``: output
    moderation passed on as ``content_filter``, or a continuation past the token limit."""

    reason: Literal["content_filter", "length"]


Decision = Try[D] | Wait | GiveUp | Finish


@dataclass(frozen=True, slots=True)
class Penalty:
    """What a failure costs the deployment beyond the breaker's view: the key benched for
    ``bench_for`` seconds (auth, billing), or a cool-down for a hint too long to wait out."""

    bench_for: float | None = None
    cool_down: float | None = None


@dataclass(frozen=True, slots=True)
class Tried:
    """One failed attempt, for the final error message."""

    deployment: str
    error: UpstreamError


# -- the plan -------------------------------------------------------------------------------------


class _Setbacks(Generic[D]):
    """What went wrong so far in one request: made at its first failure, refusal or budgeted
    retry, so a request whose first attempt succeeds (nearly all of them) builds none of it."""

    __slots__ = (
        "again", "charged", "down", "held", "hints", "later", "load_refused", "refusals",
        "rounds", "tried",
    )  # fmt: skip

    def __init__(self) -> None:
        self.tried: list[Tried] = []
        self.again: list[D] = []  # retry these next round
        self.hints: list[float] = []  # their retry-after hints
        self.later: list[D] = []  # unreachable: once more after everything
        self.load_refused: set[int] = set()  # id() of deps that refused for load
        self.refusals: dict[int, str] = {}  # id(dep) → why it turned us away
        self.charged: set[int] = set()  # id() of deps running a budgeted retry
        self.down: set[int] = set()  # id() of deps found down (for the error)
        self.held: set[int] = set()  # id() of deps held back this round (``soon``)
        self.rounds: dict[int, int] = {}  # id(dep) → rounds it failed in


class Plan(Generic[D]):
    """One request's attempts. ``groups``: the group names in order; ``order(group)``: that
    group's candidates, best first (asked when the plan reaches it); ``has_room(dep)``: the
    deployment could take an attempt right now without queueing. ``deadline`` is on the
    clock of ``next()``: the whole request, waits included; ``max_wait``: seconds an attempt
    may queue at a deployment; ``hedge``: the group's policy, when it hedges;
    ``spliceable``: a committed answer can be continued (one choice); ``token_limit``: the
    client's max_tokens / max_completion_tokens; ``queued(dep)``: the deployment's limiter
    now holds excess requests back itself (a learned concurrency limit or pace), so a retry
    there after a load refusal waits for room, adding no load.

    A plain class with ``__slots__`` rather than a dataclass: mypyc compiles no generic
    dataclass, and the opt-in compiled build (setup.py) compiles this module."""

    __slots__ = (
        "_end", "_group", "_next", "_passed_over", "_pending", "_round", "_s", "_swept",
        "budget", "committed", "count", "deadline", "groups", "has_room", "hedge", "last",
        "max_wait", "order", "patience", "policy", "queued", "rng", "saturated", "spliceable",
        "token_limit", "tokens",
    )  # fmt: skip

    def __init__(
        self,
        groups: Sequence[str],
        order: Callable[[str], Sequence[D]],
        has_room: Callable[[D], bool],
        policy: Policy,
        budget: RetryBudget,
        deadline: float,
        max_wait: float = 10.0,
        hedge: HedgePolicy | None = None,
        spliceable: bool = True,
        token_limit: int | None = None,
        queued: Callable[[D], bool] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.groups = groups
        self.order = order
        self.has_room = has_room
        self.policy = policy
        self.budget = budget
        self.deadline = deadline
        self.max_wait = max_wait
        self.hedge = hedge
        self.spliceable = spliceable
        self.token_limit = token_limit
        self.queued = queued
        self.rng = rng
        # -- what happened (read by the driver for headers and errors)
        self.count = 0  # attempts started (hedges included)
        self.last: D | None = None  # the latest attempt's deployment (or the winning hedge's)
        # The last refusal: reason, retry_after.
        self.saturated: tuple[str, float | None] | None = None
        self.committed = False  # the client has seen part of the answer
        self.patience = 0  # attempts cut for lateness (timeouts): each doubles the next bound
        self.tokens = 0  # content chunks the client has seen
        # -- where the walk is
        self._group = -1
        self._round = 0
        self._pending: Sequence[D] = ()
        self._next = 0
        self._swept = False
        self._passed_over = False  # queue_bound offered no wait: a later candidate had room
        self._end: GiveUp | Finish | None = None
        self._s: _Setbacks[D] | None = None  # what went wrong so far (``_setbacks()``)
        budget.record_request()
        if hedge is not None:
            hedge.on_request()

    @property
    def tried(self) -> list[Tried]:
        """The failed attempts so far, in order (for the final error)."""
        return self._s.tried if self._s is not None else []

    def _setbacks(self) -> _Setbacks[D]:
        s = self._s
        if s is None:
            s = self._s = _Setbacks()
        return s

    # -- decisions --------------------------------------------------------------------------------

    def next(self, now: float) -> Decision[D]:
        """What to do now."""
        if self._end is not None:
            return self._end
        if self._group < 0 and self.groups:
            # The first ask: the first group's candidates (what the end of a round below comes
            # to as well, through retry bookkeeping that is still empty).
            self._group = 0
            self._pending = self.order(self.groups[0])
        while True:
            pending = self._pending
            while self._next < len(pending):
                dep = pending[self._next]
                self._next += 1
                if self.committed and not self.eligible(dep):  # before it, anyone may answer
                    continue
                limit = self.token_limit
                if self.committed and limit is not None and self.tokens >= limit:
                    return self._stop(Finish("length"))  # the cut fell on the client's limit
                if self.count >= self.policy.max_attempts:
                    return self._stop(GiveUp(f"gave up after {self.count} attempts"))
                if now >= self.deadline:
                    return self._stop(GiveUp("request deadline exceeded"))
                if self.count and not self._free_retry(dep):
                    if not self.budget.try_withdraw():
                        return self._stop(GiveUp(self._budget_reason()))
                    self._setbacks().charged.add(id(dep))  # its outcome goes back to the budget
                if self.hedge is None:
                    return Try(dep, self.committed, None, self.patience)
                hedge_after = None if self.committed else self.hedge.delay()
                return Try(dep, self.committed, hedge_after, self.patience)
            # This round of this group is over: retry what may succeed, or move on.
            # (after the commit, only those that can still continue the answer)
            s = self._s
            again = self._retries(s) if s is not None else []
            free = bool(again) and not self._swept and all(map(self._waits_for_room, again))
            if again and (free or self._round < self.policy.max_attempts):
                assert s is not None  # (retries exist only after a setback)
                # A round whose every retry waits for room at a deployment that queues (a
                # learned wall) is not a round of retries: it costs no rounds (the attempt
                # cap and the deadline still bound it) — a client must not fail on a wall
                # keel has learned because its refusals happened to fall on one request.
                if not free:
                    self._round += 1
                delay = backoff_delay(
                    max(1, self._round),
                    base=self.policy.backoff_base,
                    cap=self.policy.backoff_cap,
                    hint=max(s.hints) if s.hints else None,
                    rng=self.rng,
                )
                self._restart(again)
                if now + delay >= self.deadline:
                    return self._stop(GiveUp("request deadline exceeded"))
                return Wait(now + delay)
            self._group += 1
            if self._group >= len(self.groups):
                later = [d for d in s.later if self.eligible(d)] if s is not None else None
                if not later or self._swept:
                    return self._stop(GiveUp(self._all_down()))
                # Every group tried: the unreachable ones get their one more look, last.
                self._swept = True
                self._round = self.policy.max_attempts  # and no rounds after
                self._restart(later)
                delay = backoff_delay(
                    1, base=self.policy.backoff_base, cap=self.policy.backoff_cap, rng=self.rng
                )
                if now + delay >= self.deadline:
                    return self._stop(GiveUp("request deadline exceeded"))
                return Wait(now + delay)
            self._round = 0
            self._restart(self.order(self.groups[self._group]))

    def eligible(self, dep: D) -> bool:
        """Before the commit anyone may answer; after it only deployments that can continue,
        and never inside a tool call or for several choices (neither can be spliced)."""
        return not self.committed or (self.spliceable and dep.continuation != "none")

    def queue_bound(self, now: float) -> float:
        """Seconds the attempt just proposed may wait in its deployment's queue: none when a
        later candidate has room now (fail over instead), else the bound within the deadline.
        (Asked only when the limiter cannot let it through at once: the common case pays
        nothing for it.)"""
        later = self._pending[self._next :]
        self._passed_over = any(self.eligible(d) and self.has_room(d) for d in later)
        if self._passed_over:
            return 0.0
        return max(0.0, min(self.max_wait, self.deadline - now))

    def hedge_target(self, busy: D) -> D | None:
        """A late first token on ``busy``: the deployment to hedge on, or None (no budget,
        nobody else, or the answer has started)."""
        if self.hedge is None or self.committed or not self.hedge.can_hedge():
            return None
        group = self.groups[min(max(self._group, 0), len(self.groups) - 1)]
        for dep in self.order(group):
            if dep is not busy and self.eligible(dep):
                return dep
        return None

    # -- facts ------------------------------------------------------------------------------------

    def refused(
        self,
        dep: D,
        reason: str,
        retry_after: float | None,
        soon: bool,
        down: bool = False,
        open_to_it: bool = False,
    ) -> None:
        """The deployment's limiter or breaker turned the attempt away (nothing was sent).
        ``soon``: only for the moment — worth another look next round; ``down``: its breaker
        is open because it could not be reached; ``open_to_it``: its breaker admits and it is
        not drained (only its limiter said no). ``saturated`` names every deployment that
        turned it away (each with its own reason, which names the cause), with the soonest
        retry-after.

        One passed over because ``queue_bound`` offered it no wait (a later candidate had
        room) while it was only paused or paced keeps its turn for the next round: dropped
        instead, a request whose one attempt on the sibling failed spent its retries there
        alone (tests/test_library.py). Not one behind a learned limit (``queued``): there
        the wait is the limit's own, and a turn kept for it queued requests behind it."""
        passed_over, self._passed_over = self._passed_over, False
        if passed_over and open_to_it and not (self.queued is not None and self.queued(dep)):
            soon = True
        s = self._setbacks()
        if down:
            s.down.add(id(dep))
        refusals = s.refusals
        refusals[id(dep)] = reason
        back = retry_after
        if self.saturated is not None and self.saturated[1] is not None:
            back = self.saturated[1] if back is None else min(back, self.saturated[1])
        self.saturated = ("; ".join(refusals.values()), back)
        if soon:
            s.again.append(dep)
            s.held.add(id(dep))

    def started(self, dep: D) -> None:
        self.count += 1
        self.last = dep

    def hedged(self, dep: D) -> None:
        """A hedge on ``dep`` was let through by its limiter and started."""
        assert self.hedge is not None
        self.hedge.try_hedge()
        self.count += 1

    def failed(self, dep: D, err: UpstreamError, hedge: bool = False) -> Penalty | None:
        """An attempt on ``dep`` failed with ``err``; a hedge's failure only counts (the
        attempt it raced decides what happens next)."""
        s = self._setbacks()
        self._retried(dep, err.output_filter)  # a moderated answer is still an answer
        if err.output_filter and self.policy.on_content_filter == "failover":
            # Another provider's moderation may let the answer through; this one will not.
            err = replace(err, failover=True, retryable=False)
        s.tried.append(Tried(dep.name, err))
        if err.kind is ErrorKind.TIMEOUT:
            self.patience += 1  # a big request may need longer: the next bound is doubled
        penalty = self._penalty(err)
        if hedge:
            return penalty
        if err.output_filter and self.policy.on_content_filter == "pass":
            self._stop(Finish("content_filter"))
            return penalty
        if not err.failover:
            self._stop(GiveUp())
            return penalty
        if not err.retryable:
            return penalty
        if err.retry_after is not None and err.retry_after > self.policy.max_retry_wait:
            return Penalty(penalty.bench_for if penalty else None, err.retry_after)
        if unreachable(err):
            s.down.add(id(dep))
            # Not again in this group's rounds: the fallbacks first, this one at the end.
            if not self._swept and dep not in s.later:
                s.later.append(dep)
            return penalty
        if err.kind in _LOAD:
            s.load_refused.add(id(dep))
        s.again.append(dep)
        if err.retry_after is not None:
            s.hints.append(err.retry_after)
        return penalty

    def withdraw(self, dep: D) -> None:
        """``dep`` left rotation while this request ran (an operator drained it): no more
        attempts there — no retry round, no last look, no continuation."""
        s = self._s
        if s is not None:
            s.again = [d for d in s.again if d is not dep]
            s.later = [d for d in s.later if d is not dep]

    def succeeded(self, dep: D) -> None:
        """An attempt on ``dep`` completed the answer."""
        if self._s is not None and self._s.charged:
            self._retried(dep, True)

    def commit(self, dep: D) -> None:
        """The attempt on ``dep`` has shown the client the start of the answer (a hedge's
        winner may not be the latest attempt started). That is progress: the retry rounds
        start over, as TCP's backoff does on an ACK — a continuation refused once more (a
        storm's 429 with a 20 ms hint) must not end an answer the client is reading because
        the attempts before the commit used the rounds up (the attempt cap, the budget and
        the deadline still bound it)."""
        self.committed = True
        self.last = dep
        self._round = 0
        if self._s is not None:
            self._s.rounds.clear()

    def shown(self, tokens: int, tool_call: bool) -> None:
        """What the client has seen so far: ``tokens`` content chunks; a tool call (which
        cannot be spliced) ends all hope of continuing."""
        self.tokens = tokens
        if tool_call:
            self.spliceable = False

    def first_token(self, seconds: float) -> None:
        """The committed attempt's first token took ``seconds`` (the hedge's history)."""
        if self.hedge is not None:
            self.hedge.observe(seconds)

    # -- pieces -----------------------------------------------------------------------------------

    def _retried(self, dep: D, ok: bool) -> None:
        """The retry budget learns how its retries end: it grows with their success (a noisy
        fleet, where retries work) and shrinks to its floor when they fail (an outage)."""
        key = id(dep)
        s = self._s
        if s is not None and key in s.charged:
            s.charged.discard(key)
            self.budget.record_retry(ok)

    def _retries(self, s: _Setbacks[D]) -> list[D]:
        """Who is looked at again next round: those whose error was retryable, each up to
        ``max_retries_per_deployment`` times — counted per deployment, by the rounds it
        failed in: one held back for the moment (nothing sent: a fresh deployment's ramp, a
        failure streak's suspects) or refused for load where it queues (the retry waits for
        room) spent none. (Rounds counted for all at once let a deployment held back at
        start-up lose its turns to its sibling's failures: four attempts on one deployment
        of two, and at 46 % faults 4.5 % of requests failed that way.)"""
        limit = self.policy.max_retries_per_deployment
        out: list[D] = []
        for d in s.again:
            if not self.eligible(d):
                continue
            key = id(d)
            if key not in s.held and (self._swept or not self._waits_for_room(d)):
                n = s.rounds[key] = s.rounds.get(key, 0) + 1
                if n > limit:
                    continue  # its retries are spent
            out.append(d)
        return out

    def _waits_for_room(self, dep: D) -> bool:
        """Would a retry on ``dep`` be free (``_free_retry``, without taking it)?"""
        s = self._s
        return (
            s is not None
            and id(dep) in s.load_refused
            and self.queued is not None
            and self.queued(dep)
        )

    def _free_retry(self, dep: D) -> bool:
        """A retry on ``dep`` after its load refusal, where it will wait for room."""
        key = id(dep)
        s = self._s
        if s is None or key not in s.load_refused or self.queued is None:
            return False
        s.load_refused.discard(key)
        return self.queued(dep)

    def _all_down(self) -> str:
        """The error's cause when every deployment of the request's groups was found down
        (unreachable, or behind a breaker opened for that); else empty."""
        down = self._s.down if self._s is not None else None
        if not down:
            return ""
        for group in self.groups:
            if any(id(d) not in down for d in self.order(group)):
                return ""
        fallbacks = " and its fallbacks" if len(self.groups) > 1 else ""
        return f"every deployment of {self.groups[0]}{fallbacks} is down"

    def _budget_reason(self) -> str:
        # keel's own budget stopped the request: say so, and what it saw (the attempts' errors
        # follow in the message and name the upstream's part).
        if self.budget.exhausted_by_failures:
            return "keel's retry budget is spent: most recent retries failed"
        return "keel's retry budget is spent: too many retries at once"

    def _stop(self, end: GiveUp | Finish) -> GiveUp | Finish:
        self._end = end
        return end

    def _restart(self, pending: Sequence[D]) -> None:
        self._pending = pending
        self._next = 0
        s = self._s
        if s is not None:
            s.again = []
            s.hints = []
            s.held.clear()

    def _penalty(self, err: UpstreamError) -> Penalty | None:
        """A key-level failure (auth, billing) takes the deployment out for the operator's
        configured cooldown, not the classifier's default."""
        if not err.disable_key_for:
            return None
        p = self.policy
        return Penalty(p.quota_cooldown if err.kind is ErrorKind.QUOTA else p.auth_cooldown)
