"""The attempt loop: the one place that decides *retry here*, *try elsewhere* or *give up*.

Everything else reports facts to it: the upstream adapter a classified ``UpstreamError``
(raised as ``AttemptFailed``), deployments their availability, the retry budget whether
extra attempts are affordable. The loop:

1. walks the groups of the plan (the model's group, then its fallbacks);
2. in each group tries every candidate once (fail over before waiting: another deployment
   is usually faster than a backoff), then retries the ones whose error was retryable after
   a full-jitter backoff that honours the provider's hint — up to ``max_retries_per_deployment``;
3. gives up at once on errors that would fail anywhere (``failover`` false), and whenever the
   attempt cap, the retry budget or the request deadline says so.

Before each attempt the deployment's limiter (``keel.gateway._limits``) lets it through: at
once, after a bounded wait in its queue (only when no later candidate has room right now), or
not at all (``Saturated``: next candidate; nobody sent anything to collect a 429). After it,
the outcome goes back to the limiter: breaker, adaptive concurrency, latency, token usage.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from keel._backoff import RetryBudget, backoff_delay
from keel._classify import ErrorKind, UpstreamError
from keel.config import RetryPolicy
from keel.gateway._deployment import Deployment
from keel.gateway._errors import Tried
from keel.gateway._limits import RequestCost, Saturated, acquire, release, try_acquire
from keel.gateway._router import Router
from keel.gateway._upstream import AttemptFailed

log = logging.getLogger("keel.attempts")
T = TypeVar("T")


class Exhausted(Exception):
    """No attempt succeeded; ``tried`` says what happened on each."""

    def __init__(
        self, tried: list[Tried], reason: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(reason or "all upstream attempts failed")
        self.tried = tried
        self.reason = reason
        self.retry_after = retry_after  # when capacity is expected back (nothing was tried)


@dataclass(slots=True)
class Attempts:
    """Per-request bookkeeping the loop and the attempt function share."""

    deadline: float  # loop time
    tried: list[Tried] = field(default_factory=list)
    count: int = 0
    last: Deployment | None = None
    # admission (set by the server): what the request costs, how urgent, how long it may wait
    cost: RequestCost = field(default_factory=lambda: RequestCost({}))
    priority: int = 0  # 0 interactive, 1 batch
    max_wait: float = 10.0  # seconds in a deployment's queue
    usage: Mapping[str, Any] | None = None  # the upstream's usage, set by a successful attempt
    saturated: Saturated | None = None  # why the last full deployment turned us away

    def headers(self, request_id: str) -> dict[str, str]:
        """Response headers that tell the client how its request was served."""
        h = {"x-request-id": request_id, "x-keel-attempts": str(self.count)}
        if self.last is not None:
            h["x-keel-deployment"] = self.last.name
        return h


def _bench_for(err: UpstreamError, policy: RetryPolicy) -> float | None:
    """How long a key-level failure (auth, billing) takes the deployment out: the operator's
    configured cooldown, not the classifier's default."""
    if not err.disable_key_for:
        return None
    return policy.quota_cooldown if err.kind is ErrorKind.QUOTA else policy.auth_cooldown


def _give_up(state: Attempts, router: Router, model: str, reason: str = "") -> Exhausted:
    if not state.tried:
        sat = state.saturated
        if sat is not None:
            return Exhausted([], reason or sat.reason, sat.retry_after)
        why, back = router.unavailable(model)  # all out: say why, and until when
        return Exhausted([], reason or why, back)
    return Exhausted(state.tried, reason)


def _wait_until(
    pending: list[Deployment],
    dep: Deployment,
    state: Attempts,
    eligible: Callable[[Deployment], bool] | None,
    loop: asyncio.AbstractEventLoop,
) -> float:
    """How long ``dep`` may keep us waiting: not at all when a later candidate has room now
    (fail over instead), else the queue bound within the deadline."""
    now = time.monotonic()
    later = pending[pending.index(dep) + 1 :]
    if any(d.limiter.has_capacity(now) and (eligible is None or eligible(d)) for d in later):
        return now
    return now + max(0.0, min(state.max_wait, state.deadline - loop.time()))


async def run_attempts(
    model: str,
    router: Router,
    policy: RetryPolicy,
    budget: RetryBudget,
    state: Attempts,
    attempt: Callable[[Deployment], Awaitable[T]],
    eligible: Callable[[Deployment], bool] | None = None,
    rng: random.Random | None = None,
) -> T:
    """``eligible`` (None: everyone) filters candidates, asked again before each attempt."""
    loop = asyncio.get_running_loop()
    budget.record_request()

    for group in router.plan(model):
        pending = router.order(group)
        if eligible is not None:
            pending = [d for d in pending if eligible(d)]
        for round_no in range(policy.max_retries_per_deployment + 1):
            again: list[Deployment] = []
            hints: list[float] = []
            for dep in pending:
                if eligible is not None and not eligible(dep):
                    continue
                if state.count >= policy.max_attempts:
                    raise _give_up(state, router, model, f"gave up after {state.count} attempts")
                if loop.time() >= state.deadline:
                    raise _give_up(state, router, model, "request deadline exceeded")
                if state.count and not budget.try_withdraw():
                    raise _give_up(
                        state,
                        router,
                        model,
                        "retry budget exhausted (an upstream outage is likely)",
                    )
                now = time.monotonic()
                try:  # at once when nothing is limiting, else wait in the deployment's queue
                    permit = try_acquire(dep, state.cost, now) or await acquire(
                        dep,
                        state.cost,
                        state.priority,
                        _wait_until(pending, dep, state, eligible, loop),
                        # Every breaker of the plan open: go anyway rather than fail (panic).
                        not dep.breaker.would_admit(now) and router.all_open(model, now),
                    )
                except Saturated as sat:
                    state.saturated = sat
                    if sat.soon:  # briefly held back: another look next round
                        again.append(dep)
                    continue
                state.count += 1
                state.last = dep
                dep.in_flight += 1
                state.usage = None
                try:
                    result = await attempt(dep)
                except AttemptFailed as failed:
                    err = failed.error
                    permit.error = err
                    state.tried.append(Tried(dep.name, err))
                    dep.record_failure(err, bench_for=_bench_for(err, policy))
                    log.info("attempt %d on %s failed: %s", state.count, dep.name, err.message)
                    if not err.failover:
                        raise _give_up(state, router, model) from None
                    if not err.retryable:
                        continue
                    if err.retry_after is not None and err.retry_after > policy.max_retry_wait:
                        dep.cool_down(err.retry_after)  # too long to wait: others take over
                        continue
                    again.append(dep)
                    if err.retry_after is not None:
                        hints.append(err.retry_after)
                else:
                    if state.last is dep:  # else a hedge on another deployment answered
                        permit.ok = True  # (and this attempt was cancelled: neutral)
                        dep.record_success()
                    return result
                finally:
                    dep.in_flight -= 1
                    permit.usage = state.usage
                    release(dep, permit)
            if not again or round_no == policy.max_retries_per_deployment:
                break
            delay = backoff_delay(
                round_no + 1,
                base=policy.backoff_base,
                cap=policy.backoff_cap,
                hint=max(hints) if hints else None,
                rng=rng,
            )
            if loop.time() + delay >= state.deadline:
                raise _give_up(state, router, model, "request deadline exceeded")
            await asyncio.sleep(delay)
            pending = again
    raise _give_up(state, router, model)
