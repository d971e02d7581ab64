"""The limits fast paths (nothing binding: no queue, no waiting) do exactly what the full
paths do, and step aside whenever anything could make a request wait or be refused."""

from __future__ import annotations

import time
from typing import Any

import pytest

from keel._health import Admit
from keel.config import parse_config
from keel.engine._admission import Admission
from keel.engine._deployment import Deployment
from keel.engine._limits import RequestCost, acquire, release, try_acquire
from keel.engine._router import Router

REQ = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 50}


def deployment(**kw: Any) -> Deployment:
    dep = {"base_url": "http://x/v1", **kw}
    cfg = parse_config({"models": {"m": {"deployments": [dep]}}})
    (d,) = Router(cfg).groups["m"]
    d.breaker.proven = True  # it has answered before (until then the breaker holds back)
    return d


def _buckets(d: Deployment) -> tuple[float, float]:
    lim = d.limiter
    assert lim.req is not None and lim.tok is not None
    return lim.req.tat, lim.tok.tat


async def test_try_acquire_books_what_acquire_books() -> None:
    """Same permit fields, same GCRA bookings, same in-flight count as the full path."""
    fast, slow = deployment(rpm=600, tpm=60_000), deployment(rpm=600, tpm=60_000)
    now = time.monotonic()
    p_fast = try_acquire(fast, RequestCost(REQ), now)
    assert p_fast is not None
    p_slow = await acquire(slow, RequestCost(REQ), 0, now)
    assert (p_fast.cost, p_fast.prompt_estimate, p_fast.in_flight, p_fast.epoch) == (
        p_slow.cost,
        p_slow.prompt_estimate,
        p_slow.in_flight,
        p_slow.epoch,
    )
    assert p_fast.how is p_slow.how and p_fast.lease is None
    assert fast.limiter.in_flight == slow.limiter.in_flight == 1
    # Both booked one request and the token estimate, from (about) the same moment.
    for a, b in zip(_buckets(fast), _buckets(slow), strict=True):
        assert a == pytest.approx(b, abs=0.05)
    for d, p in ((fast, p_fast), (slow, p_slow)):
        p.ok = True
        p.usage = {"prompt_tokens": 5, "completion_tokens": 7}
        release(d, p)
        assert d.limiter.in_flight == 0


async def test_try_acquire_steps_aside_when_anything_could_bind() -> None:
    now = time.monotonic()
    # a bucket not rested: the next request would have to wait (rpm 1 = one a minute)
    d = deployment(rpm=1, burst=0)
    assert try_acquire(d, RequestCost(REQ), now) is not None
    assert try_acquire(d, RequestCost(REQ), time.monotonic()) is None
    # concurrency full
    d = deployment(max_concurrency=1)
    p = try_acquire(d, RequestCost(REQ), now)
    assert p is not None
    assert try_acquire(d, RequestCost(REQ), now) is None
    release(d, p)
    assert try_acquire(d, RequestCost(REQ), time.monotonic()) is not None
    # a failure streak (suspects are counted by the breaker's admit) or an open breaker
    d = deployment()
    d.breaker.streak = 1
    assert try_acquire(d, RequestCost(REQ), now) is None
    d = deployment()
    d.breaker.open(now)
    assert try_acquire(d, RequestCost(REQ), now) is None
    # paused by the upstream, pacing learned from headers, someone queued
    d = deployment()
    d.limiter.paused_until = now + 5
    assert try_acquire(d, RequestCost(REQ), now) is None
    d = deployment()
    d.limiter.win_until = now + 5
    assert try_acquire(d, RequestCost(REQ), now) is None
    d = deployment()
    d.limiter.waiting = 1
    assert try_acquire(d, RequestCost(REQ), now) is None


def test_has_capacity_shortcut_agrees_with_the_full_check() -> None:
    """Rested buckets take the shortcut; busy ones (within the burst or past it) the full
    GCRA check: both say the same."""
    d = deployment(rpm=60, tpm=6000, burst=3)
    lim = d.limiter
    assert lim.req is not None and lim.tok is not None
    now = time.monotonic()
    for req_ahead, tok_ahead in ((-1.0, -1.0), (0.0, 0.0), (1.0, 0.0), (0.0, 2.5), (5.0, 5.0)):
        lim.req.tat, lim.tok.tat = now + req_ahead, now + tok_ahead
        assert lim.has_capacity(now) is (lim._local_wait(now, 1) <= 0.0)


async def test_client_booking_fast_path_matches_the_checked_one() -> None:
    cfg = parse_config(
        {
            "clients": {"c": {"key": "k", "rpm": 600, "tpm": 60_000}},
            "models": {"m": {"deployments": [{"base_url": "http://x/v1"}]}},
        }
    )
    adm = Admission(cfg, None)
    p = adm.by_key["k"]
    assert p.req is not None and p.tok is not None
    ticket = await adm.admit(p, RequestCost(REQ))
    assert ticket is not None
    cost, lease = ticket
    assert cost > 0 and lease is None
    now = time.monotonic()
    # one request and the ticket's tokens booked from about now
    assert p.req.tat == pytest.approx(now + p.req.interval, abs=0.05)
    assert p.tok.tat == pytest.approx(now + cost * p.tok.interval, abs=0.05)
    adm.done(p, ticket, None)


def test_a_deployment_that_never_answered_goes_as_a_suspect() -> None:
    """Until its first success the breaker counts suspects (a dead deployment found at
    start-up costs ``failures`` attempts, not one per request of the first burst); the fast
    path lets them through as such, so a hedge can go to a fresh deployment."""
    dep = {"base_url": "http://x/v1"}
    (d,) = Router(parse_config({"models": {"m": {"deployments": [dep]}}})).groups["m"]
    now = time.monotonic()
    permits = [try_acquire(d, RequestCost(REQ), now) for _ in range(d.breaker.failures + 1)]
    assert [p.how if p else None for p in permits] == [Admit.SUSPECT] * 5 + [None]
    assert d.limiter.in_flight == 5
    first = permits[0]
    assert first is not None
    first.ok = True
    release(d, first)
    now = time.monotonic()
    assert d.breaker.ramping(now) and not d.breaker.healthy  # its starts paced, for a while
    assert try_acquire(d, RequestCost(REQ), now + 1.0) is not None  # a second on: no gate
    assert d.breaker.proven and d.breaker.healthy


def test_the_balancers_pair_path_orders_as_the_general_one() -> None:
    """Two ready deployments (``_balancer._pair``) are ordered exactly as ``p2c_order`` orders
    ``_scores``: every mix of known and unknown latency, load, weight and tie, same draws."""
    import random

    from keel._balance import p2c_order
    from keel.engine._balancer import _pair, _scores

    cfg = parse_config(
        {"models": {"m": {"deployments": [{"base_url": "http://a/v1"}, {"base_url": "http://b/v1"}]}}}
    )
    a, b = Router(cfg).groups["m"]
    pick = random.Random(7)
    now = 1000.0
    for i in range(2000):
        for d in (a, b):
            d.latency.samples = 0 if pick.random() < 0.2 else 1
            d.latency.value = pick.choice([0.0, 1e-6, 0.01, 0.5, 0.5, 3.0])
            d.latency.stamp = now - pick.choice([0.0, 0.0, 1.0, 50.0])
            d.limiter.in_flight = pick.choice([0, 0, 1, 3])
            d.limiter.waiting = pick.choice([0, 0, 2])
            d.weight = pick.choice([1.0, 1.0, 2.0, 0.5])
        seed = pick.random()
        general = p2c_order(_scores([a, b], now), [a.weight, b.weight], random.Random(seed))
        assert _pair(a, b, now, random.Random(seed)) == [[a, b][j] for j in general], i


def test_the_balancers_two_deployment_path_orders_as_the_general_one() -> None:
    """A group of two (``_balancer._two``: ranked first, room checked after) gets the order
    of the general path (``_sorted``: every deployment classified first), whatever has room,
    whatever its load; when both are full or one is out it steps aside."""
    import random

    from keel.engine._balancer import _sorted, _two

    cfg = parse_config(
        {
            "models": {
                "m": {
                    "deployments": [
                        {"base_url": "http://a/v1", "max_concurrency": 2},
                        {"base_url": "http://b/v1", "max_concurrency": 2},
                    ]
                }
            }
        }
    )
    a, b = Router(cfg).groups["m"]
    pick = random.Random(11)
    now = 1000.0
    stepped_aside = 0
    for i in range(3000):
        for d in (a, b):
            d.latency.samples = 1
            d.latency.value = pick.choice([0.01, 0.5, 0.5, 3.0])
            d.latency.stamp = now
            d.limiter.in_flight = pick.choice([0, 1, 2])  # 2: full
            d.weight = pick.choice([1.0, 2.0])
            d.benched_until = pick.choice([0.0] * 9 + [now + 1])
            d.cooldown_until = pick.choice([0.0] * 9 + [now + 1])
        seed = pick.random()
        fast = _two(a, b, now, random.Random(seed))
        if fast is None:
            stepped_aside += 1
            continue
        assert fast == _sorted([a, b], now, random.Random(seed)), i
    assert 0 < stepped_aside < 3000
