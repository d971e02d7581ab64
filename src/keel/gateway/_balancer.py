"""The balancer: one group's deployments for one request, best first.

* out: benched keys (quota/auth) and deployments whose breaker refuses attempts;
* first: deployments with capacity right now, the first of them picked by weighted
  power-of-two-choices on ``peak-EWMA latency per output token x (in flight + waiting + 1)``,
  the rest by that score (they are the fail-over order);
* then: deployments that are full (the attempt loop waits on the least loaded one);
* last: deployments cooling down after a long retry hint (tried only when nothing else is).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from keel._balance import p2c_order
from keel.gateway._deployment import Deployment


def _scores(deps: Sequence[Deployment], now: float) -> list[float]:
    # Plain loops, no comprehensions or sum(): this runs for every request.
    costs: list[float | None] = []
    total = 0.0
    known = 0
    for d in deps:
        c = d.latency.cost(now)
        if c is not None:
            total += c
            known += 1
        costs.append(c)
    # A deployment without samples yet is assumed to be average, not free (it would take
    # every request until its first answer) nor expensive (it would never get one).
    default = total / known if known else 1.0
    floor = default * 1e-3  # a long-idle deployment decays towards 0, not to nothing at all
    out: list[float] = []
    for d, c in zip(deps, costs, strict=True):
        lim = d.limiter
        cost = default if c is None else c if c > floor else floor
        out.append(cost * (lim.in_flight + lim.waiting + 1) / d.cfg.weight)
    return out


def order(deps: Sequence[Deployment], now: float, rng: random.Random) -> list[Deployment]:
    if len(deps) == 1:  # nothing to balance (the common single-deployment group)
        d = deps[0]
        return [] if now < d.benched_until or not d.breaker.would_admit(now) else [d]
    ready: list[Deployment] = []
    full: list[Deployment] = []
    cooling: list[Deployment] = []
    for d in deps:
        if now < d.benched_until or not d.breaker.would_admit(now):
            continue
        if now < d.cooldown_until:
            cooling.append(d)
        elif d.limiter.has_capacity(now):
            ready.append(d)
        else:
            full.append(d)
    if len(ready) > 1:
        picked = p2c_order(_scores(ready, now), [d.cfg.weight for d in ready], rng)
        ready = [ready[i] for i in picked]
    if len(full) > 1:
        full.sort(key=lambda d: (d.limiter.in_flight + d.limiter.waiting) / d.cfg.weight)
    if not (ready or full or cooling):
        # Panic (Envoy's term): every breaker of the group is open. Offer them anyway, so that
        # the attempt loop can fall back to other groups first and, when the whole plan is
        # open, still try (``Router.all_open``): a breaker that closes every door protects
        # nothing and fails requests that could succeed.
        return [d for d in deps if now >= d.benched_until]
    return ready + full + cooling
