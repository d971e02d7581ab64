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
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from keel._backoff import RetryBudget, backoff_delay
from keel._classify import ErrorKind, UpstreamError
from keel.config import RetryPolicy
from keel.gateway._deployment import Deployment
from keel.gateway._errors import Tried
from keel.gateway._router import Router
from keel.gateway._upstream import AttemptFailed

log = logging.getLogger("keel.attempts")
T = TypeVar("T")


class Exhausted(Exception):
    """No attempt succeeded; ``tried`` says what happened on each."""

    def __init__(self, tried: list[Tried], reason: str = "") -> None:
        super().__init__(reason or "all upstream attempts failed")
        self.tried = tried
        self.reason = reason


@dataclass(slots=True)
class Attempts:
    """Per-request bookkeeping the loop and the attempt function share."""

    deadline: float  # loop time
    tried: list[Tried] = field(default_factory=list)
    count: int = 0
    last: Deployment | None = None

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


async def run_attempts(
    model: str,
    router: Router,
    policy: RetryPolicy,
    budget: RetryBudget,
    state: Attempts,
    attempt: Callable[[Deployment], Awaitable[T]],
    eligible: Callable[[Deployment], bool] = lambda d: True,
    rng: random.Random | None = None,
) -> T:
    loop = asyncio.get_running_loop()
    budget.record_request()

    def give_up(reason: str = "") -> Exhausted:
        if not state.tried:
            return Exhausted([], reason or "no upstream deployment is available")
        return Exhausted(state.tried, reason)

    for group in router.plan(model):
        pending = [d for d in router.order(group) if eligible(d)]
        for round_no in range(policy.max_retries_per_deployment + 1):
            again: list[Deployment] = []
            hints: list[float] = []
            for dep in pending:
                if not eligible(dep):
                    continue
                if state.count >= policy.max_attempts:
                    raise give_up(f"gave up after {state.count} attempts")
                if loop.time() >= state.deadline:
                    raise give_up("request deadline exceeded")
                if state.count and not budget.try_withdraw():
                    raise give_up("retry budget exhausted (an upstream outage is likely)")
                state.count += 1
                state.last = dep
                dep.in_flight += 1
                try:
                    result = await attempt(dep)
                except AttemptFailed as failed:
                    err = failed.error
                    state.tried.append(Tried(dep.name, err))
                    dep.record_failure(err, bench_for=_bench_for(err, policy))
                    log.info("attempt %d on %s failed: %s", state.count, dep.name, err.message)
                    if not err.failover:
                        raise give_up() from None
                    if not err.retryable:
                        continue
                    if err.retry_after is not None and err.retry_after > policy.max_retry_wait:
                        dep.cool_down(err.retry_after)  # too long to wait: others take over
                        continue
                    again.append(dep)
                    if err.retry_after is not None:
                        hints.append(err.retry_after)
                else:
                    dep.record_success()
                    return result
                finally:
                    dep.in_flight -= 1
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
                raise give_up("request deadline exceeded")
            await asyncio.sleep(delay)
            pending = again
    raise give_up()
