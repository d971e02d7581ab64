"""Limits, adaptive concurrency, breakers, balancing and admission, end to end in one process
per role: real simulators, a real ``keel serve``, counts read from the simulator's log and the
gateway's /metrics. (Several replicas sharing Redis: test_shared.py.)

Run with ``-s`` to see the measured figures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from gw_fixtures import unique
from keel.sim import key_fingerprint
from keel.testing import GatewayProcess, SimProcess, spawn_gateway, spawn_sim
from limits_helpers import (
    body,
    closed_loop,
    for_seconds,
    free_port,
    mean_concurrency,
    metric,
    post,
    wait_metric,
)


def dep(url: str, **kw: Any) -> dict[str, Any]:
    return {"base_url": url, "api_key": "sk-upstream", "model": "sim", **kw}


@pytest.fixture
def workdir(tmp_path) -> str:
    return str(tmp_path)


# --- adaptive concurrency ----------------------------------------------------------------------

C = 16
LATENCY = 0.2


def test_adaptive_concurrency_finds_the_upstreams_capacity(workdir) -> None:
    """The simulator answers 429 above C requests in flight; keel is not told C. After a
    warm-up keel holds the upstream's in-flight near C, under 2 % of attempts get a 429, and
    throughput is at least 90 % of what C slots can do."""
    with (
        spawn_sim("--max-concurrency", str(C), "--latency", str(LATENCY)) as sim,
        spawn_gateway({"models": {"m": {"deployments": [dep(sim.base_url)]}}}, workdir=workdir) as gw,
    ):  # fmt: skip
        warmup, steady = 1.0, 3.0
        t_start = time.monotonic()
        results = asyncio.run(
            closed_loop([gw.base_url], 2 * C, for_seconds(warmup + steady), lambda i: body(f"c{i}"))
        )
        # The steady window: after the warm-up, while every client worker is still sending.
        ts, te = t_start + warmup, min(r.t1 for r in results[-2 * C :])
        everything = sim.log()
        log = [e for e in everything if ts <= e.t_open < te]  # attempts in the window
        rejected = [e for e in log if e.status == 429]
        ok = [e for e in everything if e.status == 200 and e.t_close is not None]
        done = [e for e in ok if ts <= e.t_close < te]  # type: ignore[operator]
        duration = sum(e.t_close - e.t_open for e in done) / len(done)  # type: ignore[operator]
        capacity = C / duration  # what C slots of this upstream serve per second
        # Little's law: served/s = successful requests in flight / their duration. Exact over
        # the window; counting completions in it is off by up to one burst of C.
        in_flight = mean_concurrency(ok, ts, te)
        throughput = in_flight / duration
        counted = len(done) / (te - ts)
        limit = asyncio.run(metric(gw.url, "keel_concurrency_limit", deployment="m/0"))
        print(
            f"\nadaptive concurrency: C={C}, capacity {capacity:.1f} req/s, throughput "
            f"{throughput:.1f} req/s = {throughput / capacity:.1%} (completions counted: "
            f"{counted:.1f}/s), mean upstream in-flight {in_flight:.2f}, 429s "
            f"{len(rejected)}/{len(log)} attempts ({len(rejected) / len(log):.2%}), "
            f"keel's limit {limit}, client failures {sum(r.status != 200 for r in results)}"
        )
        assert all(r.status == 200 for r in results)
        assert len(rejected) / len(log) < 0.02
        assert throughput >= 0.9 * capacity
        assert limit is not None and C - 1 <= limit <= C + 1


# --- balancing -----------------------------------------------------------------------------------


def test_a_slow_deployment_gets_little_traffic_and_recovers_when_fast(workdir) -> None:
    """Two deployments, one three times slower: it gets at most 20 % of the traffic; once it
    is fast again its share comes back (peak-EWMA forgets with ``balancer.decay``)."""
    with (
        spawn_sim("--name", "fast", "--latency", "0.05") as fast,
        spawn_sim("--name", "slow", "--latency", "0.15") as slow,
    ):
        cfg = {
            "balancer": {"decay": 1.0},
            "models": {"m": {"deployments": [
                dep(fast.base_url, name="fast"), dep(slow.base_url, name="slow")]}},
        }  # fmt: skip
        with spawn_gateway(cfg, workdir=workdir) as gw:
            run = lambda s: asyncio.run(  # noqa: E731
                closed_loop([gw.base_url], 6, for_seconds(s), lambda i: body(f"s{i}"))
            )
            slow_phase = run(3.0)
            share = sum(r.deployment == "slow" for r in slow_phase) / len(slow_phase)
            slow.configure(latency=0.05)  # fast again
            recovery = run(4.0)
            later = [r for r in recovery if r.t0 >= recovery[0].t0 + 2.0]
            back = sum(r.deployment == "slow" for r in later) / len(later)
    print(
        f"\nbalancing: 3x slower deployment got {share:.1%} of {len(slow_phase)} requests; "
        f"2 s after it is fast again: {back:.1%} of {len(later)}"
    )
    assert all(r.status == 200 for r in slow_phase + recovery)
    assert share <= 0.20
    assert back >= 0.35


# --- breakers and benching -----------------------------------------------------------------------


def test_a_dead_deployment_costs_at_most_a_handful_of_attempts(workdir) -> None:
    """Connection refused: the breaker opens after at most 5 attempts reach the dead
    deployment (also under concurrency: suspects are limited), and no client sees a failure.
    (The balancer's failure penalty steers traffic away even before; a short decay makes it
    try the dead one again within the test, so the breaker has to do its part.)"""
    dead_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with spawn_sim("--name", "alive", "--latency", "0.01") as alive:
        cfg = {
            "balancer": {"decay": 0.2},
            "breaker": {"cooldown": 30},
            "models": {"m": {"deployments": [
                dep(dead_url, name="dead"), dep(alive.base_url, name="alive")]}},
        }  # fmt: skip
        with spawn_gateway(cfg, workdir=workdir) as gw:
            results = asyncio.run(
                closed_loop([gw.base_url], 8, for_seconds(3.0), lambda i: body(f"d{i}"))
            )
            dead = asyncio.run(
                metric(
                    gw.url, "keel_upstream_attempts_total", deployment="dead", outcome="connection"
                )
            )
            state = asyncio.run(metric(gw.url, "keel_breaker_state", deployment="dead"))
    print(
        f"\ndead deployment: {dead:.0f} attempts reached it, breaker state {state:.0f} (2 = open)"
    )
    assert all(r.status == 200 for r in results) and len(results) >= 200
    assert dead is not None and 1 <= dead <= 5
    assert state == 2


def _count(n: int):
    """``until`` for closed_loop: true once ``n`` requests have been started."""
    left = [n]

    def done() -> bool:
        left[0] -= 1
        return left[0] < 0

    return done


def test_a_quota_exhausted_key_is_taken_out_after_its_first_error(workdir) -> None:
    """The first quota error benches the key (loud log line, metric); no attempt on it starts
    after that, and every request is served by the other deployment."""
    with (
        spawn_sim("--name", "a", "--key-faults", "sk-broke=quota") as a,
        spawn_sim("--name", "b") as b,
    ):
        cfg = {
            "models": {"m": {"deployments": [
                {**dep(a.base_url, name="broke"), "api_key": "sk-broke"},
                dep(b.base_url, name="ok")]}},
        }  # fmt: skip
        with spawn_gateway(cfg, workdir=workdir) as gw:
            results = asyncio.run(
                closed_loop([gw.base_url], 4, _count(60), lambda i: body(f"q{i}"))
            )
            benched = asyncio.run(
                metric(gw.url, "keel_deployment_benched", deployment="broke", reason="quota")
            )
            quota = asyncio.run(
                metric(gw.url, "keel_upstream_attempts_total", deployment="broke", outcome="quota")
            )
            on_a = [e for e in a.log() if e.key == key_fingerprint("sk-broke")]
            output = gw.output_tail()
    first_error = min(e.t_close for e in on_a)  # type: ignore[type-var]
    latest = max(e.t_open for e in on_a) - first_error
    print(
        f"\nquota key: {len(on_a)} attempts on it of {len(results)} requests (4 in flight at a "
        f"time); the last one reached it {latest * 1000:.1f} ms after the first error; "
        f"benched metric {benched}"
    )
    assert all(r.status == 200 for r in results)
    # Taken out after the first error: only attempts already on the wire when it came back
    # (started by the 4 concurrent clients' first requests) can still arrive.
    assert len(on_a) <= 4 and latest < 0.05
    assert quota == len(on_a) and benched == 1.0
    assert "broke" in output and "taken out of rotation" in output
    assert "sk-broke" not in output  # never a key in a log line


# --- learning from the upstream -------------------------------------------------------------------


def test_limits_learned_from_ratelimit_headers_prevent_429s(workdir) -> None:
    """keel is told nothing; the upstream allows 20 requests per 1 s window and says so in
    x-ratelimit-* headers. keel adopts the limit and paces: almost no 429s after the first
    window, and no client failure."""
    with spawn_sim("--rate-limit", "20", "--rate-window", "1") as sim:
        cfg = {"models": {"m": {"deployments": [dep(sim.base_url)]}}}
        with spawn_gateway(cfg, workdir=workdir) as gw:
            t0 = time.monotonic()
            results = asyncio.run(
                closed_loop([gw.base_url], 8, for_seconds(4.0), lambda i: body(f"l{i}"))
            )
            learned = asyncio.run(
                metric(gw.url, "keel_learned_limit", deployment="m/0", unit="requests")
            )
            log = sim.log()
    later = [e for e in log if e.t_open >= t0 + 1.5]
    rejected = [e for e in later if e.status == 429]
    print(
        f"\nlearned limits: rpm {learned}, upstream 429s after the first window "
        f"{len(rejected)}/{len(later)}, served {sum(e.status == 200 for e in later)}"
    )
    assert all(r.status == 200 for r in results)
    assert learned == 1200
    assert len(rejected) <= 1


# --- client limits and priority -------------------------------------------------------------------


@pytest.fixture(scope="module")
def admission_gw(tmp_path_factory) -> Iterator[tuple[GatewayProcess, SimProcess]]:
    with spawn_sim("--name", "adm") as sim:
        cfg = {
            "server": {"api_keys": ["sk-open"]},
            "clients": {
                "paced": {"key": "sk-paced", "rpm": 3},
                "tokens": {"key": "sk-tokens", "tpm": 100},
                "single": {"key": "sk-single", "max_concurrency": 1},
                "bulk": {"key": "sk-bulk", "priority": "batch"},
            },
            "adaptive_concurrency": {"enabled": False},
            "queue": {"interactive_max_wait": 0.3, "batch_max_wait": 10.0},
            "models": {
                "m": {"deployments": [dep(sim.base_url)]},
                "one": {"deployments": [dep(sim.base_url, name="one", max_concurrency=1)]},
            },
        }
        with spawn_gateway(cfg, workdir=str(tmp_path_factory.mktemp("adm"))) as gw:
            yield gw, sim


def sdk(gw: GatewayProcess, key: str) -> AsyncOpenAI:
    """Use as ``async with``: closes its connections on this test's event loop."""
    return AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=20)


def ask(text: str | None = None) -> list[dict[str, str]]:
    return [{"role": "user", "content": text if text is not None else unique()}]


async def test_client_rpm_limit_is_a_429_with_openai_headers(admission_gw) -> None:
    gw, _ = admission_gw
    async with sdk(gw, "sk-paced") as c:
        for _ in range(3):  # a minute's burst
            await c.chat.completions.create(model="m", messages=ask())
        with pytest.raises(openai.RateLimitError) as info:
            await c.chat.completions.create(model="m", messages=ask())
    h = info.value.response.headers
    shown = {k: v for k, v in h.items() if "rate" in k or "retry" in k}
    print(f"\nclient 429: {info.value.message!r} {shown}")
    assert info.value.code == "rate_limit_exceeded"
    assert h["x-ratelimit-limit-requests"] == "3" and h["x-ratelimit-remaining-requests"] == "0"
    assert 15 <= int(h["retry-after"]) <= 20  # one request per 20 s comes back
    assert h["x-ratelimit-reset-requests"].endswith("s") and h["x-should-retry"] == "true"
    assert "'paced'" in info.value.message and "sk-paced" not in info.value.response.text
    async with sdk(gw, "sk-open") as other:  # other clients are not affected
        await other.chat.completions.create(model="m", messages=ask())
    refused = await metric(
        gw.url, "keel_client_rate_limited_total", as_key="sk-open", client="paced", limit="requests"
    )
    assert refused == 1


async def test_client_tpm_and_concurrency_limits(admission_gw) -> None:
    gw, _ = admission_gw
    async with sdk(gw, "sk-tokens") as c:
        await c.chat.completions.create(model="m", messages=ask("x" * 200))
        with pytest.raises(openai.RateLimitError) as info:  # ~60 + 24 of 100 tokens used
            await c.chat.completions.create(model="m", messages=ask("y" * 200))
    assert info.value.response.headers["x-ratelimit-limit-tokens"] == "100"
    async with sdk(gw, "sk-single") as single:
        slow = asyncio.create_task(
            single.chat.completions.create(
                model="m", messages=ask(f"{unique()} [[sim:slow_first=0.5]]")
            )
        )
        await wait_metric(
            gw.url,
            "keel_deployment_in_flight",
            lambda v: v == 1,
            as_key="sk-open",
            deployment="m/0",
        )
        with pytest.raises(openai.RateLimitError) as info:
            await single.chat.completions.create(model="m", messages=ask())
        assert "concurrent" in info.value.message
        await slow
        await single.chat.completions.create(model="m", messages=ask())  # free again


async def test_unknown_key_and_bad_priority(admission_gw) -> None:
    gw, _ = admission_gw
    async with sdk(gw, "sk-nope") as c:
        with pytest.raises(openai.AuthenticationError):
            await c.chat.completions.create(model="m", messages=ask("x"))
    async with sdk(gw, "sk-open") as c:
        with pytest.raises(openai.BadRequestError) as info:
            await c.chat.completions.create(
                model="m", messages=ask("x"), extra_headers={"x-keel-priority": "urgent"}
            )
    assert info.value.code == "invalid_priority"


async def test_interactive_requests_are_admitted_before_batch_under_saturation(
    admission_gw,
) -> None:
    """One slot (max_concurrency 1), held by a slow request; 4 batch requests queue, then 3
    interactive ones: the upstream sees all interactive ones before the remaining batch ones.
    Batch requests wait longer before being refused: with the slot held past the interactive
    wait bound, an interactive request is refused (503) while a batch one waits and succeeds."""
    gw, sim = admission_gw
    tag = unique("prio")
    url = gw.base_url

    async def send(s: aiohttp.ClientSession, name: str, prio: str, extra: str = ""):
        return await post(
            s, url, body(f"{tag} {name}{extra}", model="one"),
            {"authorization": "Bearer sk-open", "x-keel-priority": prio}, tag=name,
        )  # fmt: skip

    def waiting(n: int):
        return wait_metric(
            gw.url, "keel_deployment_waiting", lambda v: v == n, as_key="sk-open", deployment="one"
        )

    async with aiohttp.ClientSession() as s:
        hold = asyncio.create_task(send(s, "hold", "batch", " [[sim:slow_first=0.8]]"))
        await wait_metric(
            gw.url,
            "keel_deployment_in_flight",
            lambda v: v == 1,
            as_key="sk-open",
            deployment="one",
        )
        batch = [asyncio.create_task(send(s, f"b{i}", "batch")) for i in range(4)]
        await waiting(4)
        inter = [asyncio.create_task(send(s, f"i{i}", "interactive")) for i in range(3)]
        await waiting(7)
        results = await asyncio.gather(hold, *batch, *inter)
    order = [
        e.prompt.split()[-1] for e in sorted(sim.log(), key=lambda e: e.t_open) if tag in e.prompt
    ]
    print(f"\npriority: upstream order {order}; statuses {[(r.tag, r.status) for r in results]}")
    # interactive_max_wait is 0.3 s and the slot is held 0.8 s: the interactive requests are
    # refused; the batch ones wait (batch_max_wait 10 s) and are served.
    assert [r.status for r in results[:5]] == [200] * 5
    assert all(r.status == 503 and r.headers["retry-after"] == "1" for r in results[5:])

    # Now with a slot that frees in time: interactive first.
    tag2 = unique("prio2")
    async with aiohttp.ClientSession() as s:
        tag = tag2
        hold = asyncio.create_task(send(s, "hold", "batch", " [[sim:slow_first=0.15]]"))
        await wait_metric(
            gw.url,
            "keel_deployment_in_flight",
            lambda v: v == 1,
            as_key="sk-open",
            deployment="one",
        )
        batch = [asyncio.create_task(send(s, f"b{i}", "batch")) for i in range(4)]
        await waiting(4)
        inter = [asyncio.create_task(send(s, f"i{i}", "interactive")) for i in range(3)]
        await waiting(7)
        results = await asyncio.gather(hold, *batch, *inter)
    order = [
        e.prompt.split()[-1] for e in sorted(sim.log(), key=lambda e: e.t_open) if tag2 in e.prompt
    ]
    print(f"priority: upstream order {order}")
    assert all(r.status == 200 for r in results)
    # (requests of one kind were sent concurrently: their mutual order is not defined)
    assert order[0] == "hold" and set(order[1:4]) == {"i0", "i1", "i2"}
    assert set(order[4:]) == {"b0", "b1", "b2", "b3"}
