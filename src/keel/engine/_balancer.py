"""The balancer: one group's deployments for one request, best first.

* out: benched keys (quota/auth) and deployments whose breaker refuses attempts;
* first: deployments with capacity right now, the first of them picked by weighted
  power-of-two-choices on ``peak-EWMA latency per output token x (in flight + waiting + 1)``,
  the rest by that score (they are the fail-over order);
* then: deployments that are full (the driver waits on the least loaded one);
* last: deployments cooling down after a long retry hint (tried only when nothing else is).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from operator import attrgetter

from keel._balance import p2c_order
from keel.engine._deployment import Deployment


def _scores(deps: Sequence[Deployment], now: float) -> list[float]:
    # Plain loops over indices, no comprehensions, zip() or sum(): this runs for every request.
    n = len(deps)
    costs: list[float | None] = [None] * n
    total = 0.0
    known = 0
    for i in range(n):
        c = costs[i] = deps[i].latency.cost(now)
        if c is not None:
            total += c
            known += 1
    # A deployment without samples yet is assumed to be average, not free (it would take
    # every request until its first answer) nor expensive (it would never get one).
    default = total / known if known else 1.0
    floor = default * 1e-3  # a long-idle deployment decays towards 0, not to nothing at all
    out: list[float] = [0.0] * n
    for i in range(n):
        d, c = deps[i], costs[i]
        lim = d.limiter
        cost = default if c is None else c if c > floor else floor
        out[i] = cost * (lim.in_flight + lim.waiting + 1) / d.weight
    return out


_weight = attrgetter("weight")


def _best_first(ready: list[Deployment], now: float, rng: random.Random) -> list[Deployment]:
    if len(ready) == 2:
        return _pair(ready[0], ready[1], now, rng)
    # map() rather than comprehensions: no function frame of their own, per request.
    picked = p2c_order(_scores(ready, now), list(map(_weight, ready)), rng)
    return list(map(ready.__getitem__, picked))


def _pair(a: Deployment, b: Deployment, now: float, rng: random.Random) -> list[Deployment]:
    """``_best_first`` of two: the scores of ``_scores`` and the choice of ``p2c_order``
    (both are drawn, the better goes first, a tie by weight at random), without their lists
    and calls — the common group of two deployments, on every request."""
    ca, cb = a.latency.cost(now), b.latency.cost(now)
    if ca is None:
        ca = cb = 1.0 if cb is None else cb  # unknown: the known average (or 1.0)
        default = ca
    elif cb is None:
        cb = default = ca
    else:
        default = (ca + cb) / 2
    floor = default * 1e-3
    la, lb = a.limiter, b.limiter
    sa = (ca if ca > floor else floor) * (la.in_flight + la.waiting + 1) / a.weight
    sb = (cb if cb > floor else floor) * (lb.in_flight + lb.waiting + 1) / b.weight
    if sa == sb:
        return [a, b] if rng.random() * (a.weight + b.weight) < a.weight else [b, a]
    return [a, b] if sa < sb else [b, a]


def _two(a: Deployment, b: Deployment, now: float, rng: random.Random) -> list[Deployment] | None:
    """``order`` of a group of two, both in rotation and neither cooling (the common group
    of two): ranked first, room checked after. The better one goes first if it has room
    (the other, with room or full, comes second either way), else the other if that has
    room; both full: None (``order`` sorts them by load). The order ``order`` gives, with one
    room check instead of two."""
    if (
        now < a.benched_until
        or now < b.benched_until
        or now < a.cooldown_until
        or now < b.cooldown_until
        or not a.breaker.would_admit(now)
        or not b.breaker.would_admit(now)
    ):
        return None
    pair = _pair(a, b, now, rng)
    if pair[0].limiter.has_capacity(now):
        return pair
    if pair[1].limiter.has_capacity(now):
        pair.reverse()
        return pair
    return None


def order(deps: Sequence[Deployment], now: float, rng: random.Random) -> list[Deployment]:
    if len(deps) == 1:  # nothing to balance (the common single-deployment group)
        d = deps[0]
        return [] if now < d.benched_until or not d.breaker.would_admit(now) else [d]
    if len(deps) == 2 and (pair := _two(deps[0], deps[1], now, rng)) is not None:
        return pair
    return _sorted(deps, now, rng)


def _sorted(deps: Sequence[Deployment], now: float, rng: random.Random) -> list[Deployment]:
    """``order`` in general: every deployment classified, then each class in its order."""
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
        ready = _best_first(ready, now, rng)
    if ready and not (full or cooling):
        return ready  # the common case: everyone healthy with room
    if len(full) > 1:
        full.sort(key=lambda d: (d.limiter.in_flight + d.limiter.waiting) / d.weight)
    if not (ready or full or cooling):
        # Panic (Envoy's term): every breaker of the group is open. Offer them anyway, so that
        # the plan can fall back to other groups first and, when the whole plan is
        # open, still try (``Router.all_open``): a breaker that closes every door protects
        # nothing and fails requests that could succeed.
        return [d for d in deps if now >= d.benched_until]
    return ready + full + cooling
