"""No request outlives itself (issue 17, item 1).

A 10-minute soak once grew keel's memory by ~118 bytes per request, for good: aiohttp sets
one module-level exception instance on a released response's stream, every read of it raised
that same instance again, and each raise added the reading frames — which hold the request,
its sink and its attempts — to the instance's ``__traceback__``. Truncated, stalled and
abandoned streams are where that happens.

The gateway runs in this test's loop (``create_app`` + ``start_site``), the simulator as a
real process. After two rounds of such streams and a full collection:

* no ``aiohttp.web.BaseRequest`` is alive (nor any other object whose count grows with the
  number of requests: counted per type over ``gc.get_objects()``, so the test names none of
  keel's classes and catches what it does not know about);
* no live exception holds a traceback chain (or ``__context__`` chain) that grew between the
  rounds.
"""

from __future__ import annotations

import asyncio
import gc
import json
import types
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterator

import aiohttp
import pytest
from aiohttp import web

from gw_fixtures import unique
from keel.config import parse_config
from keel.gateway import create_app, start_site
from keel.testing import SimProcess, spawn_sim

PER_KIND = 12  # requests of each kind per round
IDLE = 0.3  # keel's idle timeout: a stalled stream is closed by keel's watchdog after this
# A stream stalled before its first token is cut after this (then retried): each round waits
# it out twice (12 such streams, 8 at a time), so it sets most of this test's length.
FIRST_TOKEN = 1.0


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with spawn_sim("--name", "a") as s:
        yield s


@pytest.fixture
async def gateway(sim: SimProcess) -> AsyncIterator[str]:
    cfg = parse_config(
        {
            "timeouts": {"idle": IDLE, "first_token": FIRST_TOKEN},
            "retry": {"backoff_base": 0.001, "backoff_cap": 0.01},
            "breaker": {"enabled": False},  # faults on every request are the point here
            "models": {"m": {"deployments": [{"base_url": sim.base_url, "api_key": "sk-x"}]}},
        }
    )
    runner, port = await start_site(create_app(cfg), "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}/v1/chat/completions"
    finally:
        await runner.cleanup()


def body(prompt: str, stream: bool = True) -> dict[str, object]:
    return {"model": "m", "stream": stream, "messages": [{"role": "user", "content": prompt}]}


async def finished_stream(s: aiohttp.ClientSession, url: str, directive: str) -> None:
    """A stream whose first attempt fails as ``directive`` says; keel ends it well-formed."""
    async with s.post(url, json=body(f"{unique('leak')} [[sim:{directive}]]")) as r:
        assert r.status == 200
        raw = await r.read()
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]


async def abandoned_stream(url: str) -> None:
    """The client reads the first frame and goes away mid-stream."""
    async with aiohttp.ClientSession() as own:  # its own connection: closing it is the abort
        r = await own.post(url, json=body(f"{unique('gone')} [[sim:delay=0.05,len=40]]"))
        assert r.status == 200
        await r.content.readuntil(b"\n\n")
        r.close()


async def failed_non_stream(s: aiohttp.ClientSession, url: str) -> None:
    payload = body(f"{unique('e500')} [[sim:e500*1]]", stream=False)
    async with s.post(url, json=payload) as r:
        assert r.status == 200, await r.text()
        json.loads(await r.read())


CONCURRENCY = 8  # bounds the connection pools, so that their size is not mistaken for a leak


async def one_round(url: str) -> None:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def limited(work: Awaitable[None]) -> None:
        async with gate:
            await work

    async with aiohttp.ClientSession() as s:
        work: list[Awaitable[None]] = []
        for _ in range(PER_KIND):
            work += [
                finished_stream(s, url, "trunc=2*1"),  # truncated mid-stream, continued
                finished_stream(s, url, "stall=2*1"),  # stalled mid-stream: keel's watchdog
                finished_stream(s, url, "stall=0*1"),  # stalled before the first token
                abandoned_stream(url),
                failed_non_stream(s, url),
            ]
        await asyncio.gather(*(limited(w) for w in work))
    # The handlers of abandoned streams end once aiohttp sees the disconnect.
    await _settle()


async def _settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0.02)
        if not _alive_requests():
            return


def _alive_requests() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, web.BaseRequest))


# Not counted: a loop timer that was cancelled stays in the loop's heap (with the context it
# was scheduled in) until asyncio purges cancelled timers, which it does once they are half
# of the heap — bounded, but it moves with the number of requests just finished.
_TRANSIENT = {"_contextvars.Context"}


# Nor: tracebacks and frames of other libraries only. Garbage that earlier tests left (an SDK
# client never closed) may be collected during this one and fail in its own ``aclose()``;
# what matters here is a traceback holding keel's or aiohttp's frames.
_OURS = ("/keel/", "/aiohttp/")


def _ours(o: types.TracebackType | types.FrameType) -> bool:
    if isinstance(o, types.FrameType):
        return any(p in o.f_code.co_filename for p in _OURS)
    tb: types.TracebackType | None = o
    while tb is not None:
        if any(p in tb.tb_frame.f_code.co_filename for p in _OURS):
            return True
        tb = tb.tb_next
    return False


def _census() -> Counter[str]:
    gc.collect()
    counts: Counter[str] = Counter()
    for o in gc.get_objects():
        if isinstance(o, asyncio.TimerHandle) and o.cancelled():
            continue
        if isinstance(o, types.TracebackType | types.FrameType) and not _ours(o):
            continue
        counts[f"{type(o).__module__}.{type(o).__qualname__}"] += 1
    for t in _TRANSIENT:
        del counts[t]
    return counts


def _chain(exc: BaseException) -> int:
    """Traceback entries of ``exc`` and of the exceptions it chains to."""
    n = 0
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        tb: types.TracebackType | None = e.__traceback__
        while tb is not None:
            n += 1
            tb = tb.tb_next
        e = e.__cause__ or e.__context__
    return n


def _exception_chains() -> dict[str, int]:
    gc.collect()
    chains: dict[str, int] = {}
    for o in gc.get_objects():
        if isinstance(o, BaseException):
            key = f"{type(o).__qualname__} at {id(o):#x}: {o!s:.60}"
            chains[key] = _chain(o)
    return chains


async def test_no_request_and_no_traceback_outlives_faulty_streams(gateway: str) -> None:
    await one_round(gateway)  # warm-up: pools, caches, lazily built tables
    _census()  # the first census itself creates a few hundred objects, once (lazy imports)
    chains_first = _exception_chains()
    first = _census()
    await one_round(gateway)
    chains_second = _exception_chains()
    second = _census()
    await one_round(gateway)
    third = _census()

    assert _alive_requests() == 0, "a request object survived its request"
    requests = 5 * PER_KIND
    # A leak grows with every round; callbacks and closes still pending when a census is
    # taken (on a loaded machine) are a backlog of about the same size each time, not growth.
    grown = {
        t: (second[t] - first[t], third[t] - second[t])
        for t in third
        if min(second[t] - first[t], third[t] - second[t]) >= requests // 2
    }
    assert not grown, f"object counts grew with each round of {requests} requests: {grown}"
    longer = {
        k: (chains_first[k], n) for k, n in chains_second.items() if n > chains_first.get(k, n)
    }
    assert not longer, f"live exceptions whose traceback chain grew: {longer}"
    worst = max(chains_second.values(), default=0)
    assert worst < 64, f"a live exception holds a {worst}-entry traceback chain"
