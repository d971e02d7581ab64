"""Cancellation: a client that goes away stops the upstream work it started.

Issue 3's promise: when the client leaves (stream or not), keel closes the upstream connection
within 100 ms and starts no further attempt. Each phase is driven with real processes and
checked in the simulator's log, whose ``t_open``/``t_close`` are CLOCK_MONOTONIC readings,
comparable with this process's ``time.monotonic()`` taken right before the client closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI

from gw_fixtures import UPSTREAM_KEY_A, unique
from keel.sim import LogEntry, answer_text
from keel.testing import GatewayProcess, SimProcess, spawn_gateway

CLOSE_WITHIN = 0.1  # seconds from the client's close to the upstream connection's close


@pytest.fixture(scope="module")
def cancel_gateway(
    sims: tuple[SimProcess, SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """A gateway whose own timeouts never fire during these tests, so any upstream close the
    simulator records can only come from the client leaving."""
    a, _ = sims
    slow = {"first_token": 60.0, "idle": 60.0, "total": 120.0}
    cfg: dict[str, Any] = {
        "retry": {
            "backoff_base": 0.01,
            "backoff_cap": 0.05,
            "max_retry_wait": 30.0,
            "max_retries_per_deployment": 2,
        },
        "models": {
            "one": {
                "deployments": [
                    {"base_url": a.base_url, "api_key": UPSTREAM_KEY_A, "timeouts": slow}
                ]
            }
        },
    }
    with spawn_gateway(cfg, workdir=str(tmp_path_factory.mktemp("cancel"))) as gw:
        yield gw


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def body(prompt: str, stream: bool) -> dict[str, Any]:
    return {"model": "one", "messages": [{"role": "user", "content": prompt}], "stream": stream}


async def until(
    sim: SimProcess, prompt: str, cond: Callable[[list[LogEntry]], bool]
) -> list[LogEntry]:
    """Await a condition on the simulator's entries for ``prompt`` (polled in a thread so this
    event loop keeps serving the client under test)."""

    def pred(log: list[LogEntry]) -> bool:
        return cond([e for e in log if prompt in e.prompt])

    log = await asyncio.to_thread(sim.wait_for, pred, 10.0)
    return [e for e in log if prompt in e.prompt]


def in_flight(status: int | None) -> Callable[[list[LogEntry]], bool]:
    """One entry, still open, in the given phase (status None: before the response headers)."""
    return lambda es: len(es) == 1 and es[0].t_close is None and es[0].status == status


def closed(es: list[LogEntry]) -> bool:
    return bool(es) and all(e.t_close is not None for e in es)


async def assert_closed_promptly(sim: SimProcess, prompt: str, t_client_close: float) -> None:
    entries = await until(sim, prompt, closed)
    assert len(entries) == 1, [(e.status, e.fault, e.t_open) for e in entries]
    (e,) = entries
    assert e.t_close is not None
    assert e.client_disconnected, "the upstream request ended by itself, not by keel leaving"
    lag = e.t_close - t_client_close
    assert lag < CLOSE_WITHIN, f"upstream closed {lag * 1000:.1f} ms after the client left"
    assert not e.finished


async def cancel(task: asyncio.Task[Any]) -> float:
    """Make the client go away by cancelling its request (aiohttp closes the connection)."""
    t = time.monotonic()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return t


# --- before the first byte ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "directive", "phase"),
    [
        (False, "slow_first=5", None),  # non-stream, upstream has not answered
        (True, "slow_first=5", None),  # stream, upstream has not sent its headers
        (True, "slow_token=5", 200),  # stream, upstream headers in, no content yet
    ],
    ids=["non-stream", "stream-before-headers", "stream-before-content"],
)
async def test_client_leaving_before_the_first_byte_closes_the_upstream(
    cancel_gateway, sims, session, stream, directive, phase
) -> None:
    sim = sims[0]
    prompt = unique("cancel")
    req = body(f"{prompt} [[sim:{directive}]]", stream)
    task = asyncio.create_task(
        session.post(cancel_gateway.base_url + "/chat/completions", json=req)
    )
    await until(sim, prompt, in_flight(phase))
    assert not task.done()  # the client has seen nothing yet
    t = await cancel(task)
    await assert_closed_promptly(sim, prompt, t)


# --- mid-stream --------------------------------------------------------------------------------


async def test_client_leaving_mid_stream_closes_the_upstream(cancel_gateway, sims, session) -> None:
    sim = sims[0]
    prompt = unique("cancel")
    req = body(f"{prompt} [[sim:len=400,delay=0.05]]", True)
    async with session.post(cancel_gateway.base_url + "/chat/completions", json=req) as r:
        assert r.status == 200
        seen = b""
        while seen.count(b'"content":') < 4:  # the role chunk and a few tokens
            data = await r.content.readany()
            assert data, "the stream ended early"
            seen += data
        t = time.monotonic()
        r.close()
    await assert_closed_promptly(sim, prompt, t)
    (e,) = await until(sim, prompt, closed)
    assert 0 < e.tokens < 400


async def test_sdk_stream_closed_mid_stream_closes_the_upstream(cancel_gateway, sims) -> None:
    """The same through the official openai SDK: ``await stream.close()`` after a few chunks."""
    sim = sims[0]
    prompt = unique("cancel sdk")
    async with AsyncOpenAI(
        base_url=cancel_gateway.base_url, api_key="sk-client", max_retries=0, timeout=20
    ) as client:
        stream = await client.chat.completions.create(
            model="one",
            messages=[{"role": "user", "content": f"{prompt} [[sim:len=400,delay=0.05]]"}],
            stream=True,
        )
        text = ""
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            if len(text) > 10:
                break
        t = time.monotonic()
        await stream.close()
    assert answer_text(prompt, 400).startswith(text)
    await assert_closed_promptly(sim, prompt, t)


# --- during a retry backoff --------------------------------------------------------------------


async def test_client_leaving_during_retry_backoff_starts_no_further_attempt(
    cancel_gateway, sims, session
) -> None:
    """The first attempt gets a 429 with a 0.3 s hint; the client leaves while keel waits. A
    control request with the same hint, started after the client left, proves (by its own
    retry succeeding) that the cancelled request's retry would have been due by then."""
    sim = sims[0]
    url = cancel_gateway.base_url + "/chat/completions"
    prompt = unique("cancel backoff")
    req = body(f"{prompt} [[sim:r429=0.3*1]]", False)
    task = asyncio.create_task(session.post(url, json=req))
    (first,) = await until(sim, prompt, lambda es: len(es) == 1 and es[0].t_close is not None)
    assert first.status == 429
    assert not task.done()  # keel is waiting to retry
    await cancel(task)

    control = unique("control")
    async with session.post(url, json=body(f"{control} [[sim:r429=0.3*1]]", False)) as r:
        assert r.status == 200
        assert r.headers["x-keel-attempts"] == "2"
        done = await r.json()
    assert done["choices"][0]["message"]["content"] == answer_text(control)
    assert len(await until(sim, control, closed)) == 2

    entries = await until(sim, prompt, closed)
    assert len(entries) == 1, "keel started another attempt for a client that had left"


# --- the client's own timeout --------------------------------------------------------------


async def test_sdk_timeout_gets_keels_error_before_it_fires_and_the_upstream_is_closed(
    cancel_gateway, sims
) -> None:
    """The SDK sends its read timeout (x-stainless-read-timeout); for a non-stream request
    keel gives up just before it with an OpenAI-shaped error and closes the upstream attempt,
    instead of the client timing out while keel works on for nobody."""
    import openai

    prompt = unique("client patience")
    async with AsyncOpenAI(
        base_url=cancel_gateway.base_url, api_key="sk-client", max_retries=0, timeout=1.0
    ) as client:
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as info:  # not APITimeoutError
            await client.chat.completions.create(
                model="one",
                messages=[{"role": "user", "content": f"{prompt} [[sim:slow_first=5]]"}],
            )
        elapsed = time.monotonic() - t0
    assert 0.8 < elapsed < 1.0, elapsed
    assert info.value.status_code == 504, info.value.body
    assert "deadline" in str(info.value.message) or "timed out" in str(info.value.message)
    (e,) = await until(sims[0], prompt, closed)
    assert e.client_disconnected and not e.finished
    assert e.t_close is not None and e.t_close - t0 < 1.0  # closed by keel, before the SDK gave up
