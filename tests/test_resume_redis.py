"""Resume on another replica: two ``keel serve`` processes share a real redis-server (started
on a free port by the test); a stream that one of them runs is resumed through the other."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from gw_fixtures import unique
from keel.sim import answer_text
from keel.testing import GatewayProcess, SimProcess, spawn_gateway
from limits_helpers import RedisServer, needs_redis
from test_resume import ALICE, _events, chat, resume_config
from ws_helpers import (
    WORST_WITHIN,
    CutProxy,
    Reader,
    create,
    one_closed,
    one_open,
    sim_entries,
    text_of,
)

pytestmark = needs_redis

GRACE = 1.0


@pytest.fixture(scope="module")
def replicas(
    sims: tuple[SimProcess, SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    redis = RedisServer()
    redis.start()
    cfg = resume_config(sims[0].base_url, redis_url=redis.url, resume={"grace": GRACE})
    work = str(tmp_path_factory.mktemp("replicas"))
    try:
        with spawn_gateway(cfg, workdir=work) as a, spawn_gateway(cfg, workdir=work) as b:
            yield a, b
    finally:
        redis.kill()


@pytest.fixture
async def proxy_a(replicas) -> AsyncIterator[CutProxy]:
    host, port = replicas[0].url.removeprefix("http://").rsplit(":", 1)
    p = await CutProxy(host, int(port)).start()
    try:
        yield p
    finally:
        await p.close()


async def _read_ws_until_drop(
    ws: aiohttp.ClientWebSocketResponse, proxy: CutProxy, n: int
) -> tuple[str, list[int], list[dict[str, Any]]]:
    seqs: list[int] = []
    chunks: list[dict[str, Any]] = []
    sid = ""
    while True:
        msg = await ws.receive(10)
        if msg.type != aiohttp.WSMsgType.TEXT:
            return sid, seqs, chunks
        m = orjson.loads(msg.data)
        assert m["type"] == "chunk", m
        sid = m["stream"]
        seqs.append(m["seq"])
        chunks.append(m["chunk"])
        if len(chunks) == n:
            proxy.cut()


async def test_ws_stream_on_one_replica_resumed_on_the_other(replicas, proxy_a, sims) -> None:
    """B follows while A still generates — longer than A's grace: B's reader keeps A's
    stream alive, and the live tail comes through Redis."""
    sim = sims[0]
    _, b = replicas
    prompt = unique("cross-replica-ws")
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(proxy_a.url + "/v1/ws", headers=ALICE)
        await ws.send_str(
            orjson.dumps(
                create("x", f"{prompt} [[sim:len=120,delay=0.02]]", resumable=True)
            ).decode()
        )
        sid, seqs, chunks = await _read_ws_until_drop(ws, proxy_a, 5)
        t = time.monotonic()
        async with s.ws_connect(b.url + "/v1/ws", headers=ALICE) as ws_b:
            r = Reader(ws_b)
            await r.send({"type": "resume", "id": "x", "stream": sid, "after": seqs[-1]})
            (out,) = (await r.until_done("x")).values()
            await r.settle()
    assert time.monotonic() - t > GRACE  # it outlived A's grace because B followed it
    assert out.errors == [] and out.done == 1
    all_seqs = seqs + out.seqs
    assert all_seqs == list(range(len(all_seqs)))
    assert text_of(chunks) + out.text == answer_text(prompt, 120)
    (e,) = await sim_entries(sim, prompt, one_closed)
    assert e.finished and not e.client_disconnected


async def test_sse_stream_resumed_on_the_other_replica_after_its_end(
    replicas, proxy_a, sims
) -> None:
    sim = sims[0]
    _, b = replicas
    prompt = unique("cross-replica-sse")
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            proxy_a.url + "/v1/chat/completions",
            json=chat(f"{prompt} [[sim:len=30,delay=0.01]]"),
            headers={**ALICE, "x-keel-resumable": "true"},
        )
        sid = resp.headers["x-keel-stream-id"]
        got = b""
        while got.count(b"\n\n") < 4:
            got += await resp.content.readany()
        proxy_a.cut()
        resp.close()
        text = got.decode()
        seen = _events(text[: text.rindex("\n\n") + 2])
        await sim_entries(sim, prompt, one_closed)  # A has finished it meanwhile
        async with s.get(
            b.url + f"/v1/streams/{sid}", headers={**ALICE, "last-event-id": seen[-1]["id"]}
        ) as again:
            assert again.status == 200 and again.headers["x-keel-stream-id"] == sid
            rest = _events(await again.text())
        async with s.get(
            b.url + f"/v1/streams/{sid}", headers={**ALICE, "last-event-id": rest[-1]["id"]}
        ) as end:
            assert end.status == 204
        async with s.get(
            b.url + f"/v1/streams/{sid}", headers={"authorization": "Bearer sk-bob"}
        ) as other:
            assert other.status == 404
    events = seen + rest
    assert [e["id"] for e in events] == [f"{sid}:{i}" for i in range(len(events))]
    assert text_of([orjson.loads(e["data"]) for e in events[:-1]]) == answer_text(prompt, 30)


async def test_delete_on_the_other_replica_closes_the_upstream(replicas, sims) -> None:
    sim = sims[0]
    a, b = replicas
    prompt = unique("cross-replica-delete")
    async with aiohttp.ClientSession() as s:
        async with s.post(
            a.url + "/v1/chat/completions",
            json=chat(f"{prompt} [[sim:len=500,delay=0.02]]"),
            headers={**ALICE, "x-keel-resumable": "true"},
        ) as resp:
            sid = resp.headers["x-keel-stream-id"]
        await sim_entries(sim, prompt, one_open)
        t = time.monotonic()
        async with s.delete(b.url + f"/v1/streams/{sid}", headers=ALICE) as d:
            assert d.status == 200
        (e,) = await sim_entries(sim, prompt, one_closed)
    assert e.t_close is not None and e.client_disconnected and not e.finished
    lag = e.t_close - t
    print(f"\nDELETE on replica B -> A's upstream closed: {lag * 1000:.1f} ms")
    assert lag < WORST_WITHIN  # a Redis publish and the owner's subscriber in between


async def test_redis_down_never_fails_a_stream_and_the_owner_still_resumes(sims, tmp_path) -> None:
    """With Redis gone, a resumable stream completes and its owner serves the resume from
    memory; a resume on another replica would fail (404), never hang."""
    sim = sims[0]
    redis = RedisServer()
    redis.start()
    cfg = resume_config(sims[0].base_url, redis_url=redis.url)
    try:
        with spawn_gateway(cfg, workdir=str(tmp_path)) as a:
            redis.kill()
            host, port = a.url.removeprefix("http://").rsplit(":", 1)
            proxy = await CutProxy(host, int(port)).start()
            prompt = unique("redis-down")
            try:
                async with aiohttp.ClientSession() as s:
                    ws = await s.ws_connect(proxy.url + "/v1/ws", headers=ALICE)
                    msg = create("d", f"{prompt} [[sim:len=40,delay=0.01]]", resumable=True)
                    t = time.monotonic()
                    await ws.send_str(orjson.dumps(msg).decode())
                    sid, seqs, chunks = await _read_ws_until_drop(ws, proxy, 6)
                    async with s.ws_connect(a.url + "/v1/ws", headers=ALICE) as ws2:
                        r = Reader(ws2)
                        await r.send(
                            {"type": "resume", "id": "d", "stream": sid, "after": seqs[-1]}
                        )
                        (out,) = (await r.until_done("d")).values()
                    took = time.monotonic() - t
            finally:
                await proxy.close()
    finally:
        redis.kill()
    assert out.errors == [] and text_of(chunks) + out.text == answer_text(prompt, 40)
    assert seqs + out.seqs == list(range(len(seqs) + len(out.seqs)))
    assert took < 3.0  # 40 chunks 10 ms apart, and no wait on the dead Redis
    (e,) = await sim_entries(sim, prompt, one_closed)
    assert e.finished
