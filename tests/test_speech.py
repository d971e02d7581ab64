"""Text-to-speech through keel: ``Keel.speech`` and ``POST /v1/audio/speech`` on ``keel serve``,
against simulators that stream deterministic audio. Byte-exact audio; failures before the
first byte retried or failed over (counted in the simulators' logs); a caller that leaves
closes the upstream within 20 ms (the simulator's monotonic ``t_close``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from gw_fixtures import unique
from keel import Keel, KeelError
from keel.sim import LogEntry, audio_bytes
from keel.testing import GatewayProcess, SimProcess, spawn_gateway, spawn_sim

CLOSE_WITHIN = 0.02


@pytest.fixture(scope="module")
def tts() -> Iterator[tuple[SimProcess, SimProcess]]:
    with (
        spawn_sim("--name", "ta", "--audio-chunk", "256", "--audio-delay", "0.005") as a,
        spawn_sim("--name", "tb", "--audio-chunk", "256", "--audio-delay", "0.005") as b,
    ):
        yield a, b


def config(a: SimProcess, b: SimProcess) -> dict:
    return {
        "retry": {"backoff_base": 0.01, "backoff_cap": 0.05},
        "breaker": {"enabled": False},
        "models": {
            "tts": {
                "deployments": [
                    {"name": "ta", "base_url": a.base_url},
                    {"name": "tb", "base_url": b.base_url},
                ]
            },
            "tts-solo": {"deployments": [{"name": "ta-solo", "base_url": a.base_url}]},
        },
    }


@pytest.fixture
async def gw(tts: tuple[SimProcess, SimProcess]) -> AsyncIterator[Keel]:
    async with Keel.from_config(config(*tts)) as k:
        yield k


@pytest.fixture(scope="module")
def gateway(
    tts: tuple[SimProcess, SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    with spawn_gateway(config(*tts), workdir=str(tmp_path_factory.mktemp("gw"))) as g:
        yield g


def entries(tts: tuple[SimProcess, SimProcess], prompt: str) -> list[LogEntry]:
    return sorted((e for s in tts for e in s.log() if e.prompt == prompt), key=lambda e: e.t_open)


def body(text: str, model: str = "tts") -> dict:
    return {"model": model, "input": text, "voice": "alloy", "response_format": "pcm"}


@pytest.mark.parametrize("fault", ["e503", "e500", "reset", "r429", "trunc=0", "r429_ds"])
async def test_failure_before_first_byte_is_invisible(
    gw: Keel, tts: tuple[SimProcess, SimProcess], fault: str
) -> None:
    text = unique("音频 before the first byte")
    sp = await gw.speech(body(f"{text} [[sim:{fault}*1]]"))
    data = b"".join([c async for c in sp])
    assert data == audio_bytes(text)
    # Each simulator fails the prompt once: one deployment, the other (fail-over), then a
    # retry that answers.
    assert sp.headers["content-type"] == "audio/pcm" and sp.headers["x-keel-attempts"] == "3"
    log = entries(tts, text)
    assert len(log) == 3 and {log[0].sim, log[1].sim} == {"ta", "tb"}
    assert [e.fault for e in log] == [fault.split("=")[0]] * 2 + [None] and log[2].finished
    assert all(e.kind == "speech" for e in log)


async def test_broken_after_bytes_raises(gw: Keel) -> None:
    text = unique("broken audio")
    sp = await gw.speech(body(f"{text} [[sim:trunc=2]]", "tts-solo"))
    got = b""
    with pytest.raises(KeelError) as err:
        async for c in sp:
            got += c
    assert err.value.code == "upstream_stream_broken" and err.value.status == 502
    assert got == audio_bytes(text)[: len(got)] and 0 < len(got) < len(audio_bytes(text))


async def test_bad_requests(gw: Keel) -> None:
    with pytest.raises(KeelError) as e:
        await gw.speech({"model": "tts"})
    assert e.value.status == 400 and e.value.body["error"]["param"] == "input"
    with pytest.raises(KeelError) as e:
        await gw.speech(body("hi", "nope"))
    assert e.value.status == 404
    with pytest.raises(KeelError) as e:
        await gw.speech({**body("hi"), "response_format": "ogg"})
    assert e.value.status == 400


async def test_leaving_closes_the_upstream(gw: Keel, tts: tuple[SimProcess, SimProcess]) -> None:
    text = unique("a long sentence to leave " * 4)
    sp = await gw.speech(body(text, "tts-solo"))
    await sp.__anext__()
    left = time.monotonic()
    await sp.aclose()
    log = await asyncio.to_thread(
        tts[0].wait_for, lambda log: any(x.prompt == text[:80] and x.t_close for x in log)
    )
    [e] = [x for x in log if x.prompt == text[:80]]
    assert e.client_disconnected and not e.finished
    assert e.t_close is not None and e.t_close - left <= CLOSE_WITHIN


async def test_gateway_streams_through(
    gateway: GatewayProcess, tts: tuple[SimProcess, SimProcess]
) -> None:
    text = unique("通过网关")
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{gateway.base_url}/audio/speech", json=body(f"{text} [[sim:e503*1]]")
        ) as r:
            assert r.status == 200 and r.headers["content-type"] == "audio/pcm"
            assert r.headers["x-keel-attempts"] == "3"
            assert await r.read() == audio_bytes(text)
        async with s.post(f"{gateway.base_url}/audio/speech", json={"model": "tts"}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "input"
        text = unique("broken through the gateway")
        async with s.post(
            f"{gateway.base_url}/audio/speech", json=body(f"{text} [[sim:trunc=2]]", "tts-solo")
        ) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()  # truncated, never passed off as complete


async def test_gateway_client_leaves(
    gateway: GatewayProcess, tts: tuple[SimProcess, SimProcess]
) -> None:
    text = unique("leave the gateway mid-audio " * 3)
    async with aiohttp.ClientSession() as s:
        r = await s.post(f"{gateway.base_url}/audio/speech", json=body(text, "tts-solo"))
        await r.content.readany()
        left = time.monotonic()
        r.close()
    log = await asyncio.to_thread(
        tts[0].wait_for, lambda log: any(x.prompt == text[:80] and x.t_close for x in log)
    )
    [e] = [x for x in log if x.prompt == text[:80]]
    assert e.client_disconnected and e.t_close is not None
    assert e.t_close - left <= CLOSE_WITHIN, e.t_close - left
