"""Resumable streams: the client's connection drops (a TCP proxy the test cuts: both ends see
a reset), keel keeps the upstream generating, and the client comes back — over the WebSocket
(``resume``), over HTTP (``GET /v1/streams/{id}`` with ``Last-Event-ID``), or by itself (an
EventSource client). Every resume must give exactly the chunks after the last one seen: the
joined text is the simulator's exact answer, seqs are contiguous, one ``done``, and the
simulator saw one upstream request that finished (nothing was restarted)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from openai import AsyncOpenAI

from gw_fixtures import unique
from keel.sim import answer_text
from keel.testing import GatewayProcess, SimProcess, spawn_gateway
from ws_helpers import (
    WORST_WITHIN,
    CutProxy,
    Event,
    EventSource,
    Reader,
    assert_prompt,
    create,
    one_closed,
    one_open,
    sim_entries,
    text_of,
)


def resume_config(a: str, **extra: Any) -> dict[str, Any]:
    slow = {"first_token": 10.0, "idle": 10.0}
    return {
        "server": {"api_keys": ["sk-alice", "sk-bob"]},
        "models": {"m": {"deployments": [{"base_url": a, "api_key": "sk-a", "timeouts": slow}]}},
        **extra,
    }


ALICE = {"authorization": "Bearer sk-alice"}
BOB = {"authorization": "Bearer sk-bob"}


@pytest.fixture(scope="module")
def gw(
    sims: tuple[SimProcess, SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    with spawn_gateway(
        resume_config(sims[0].base_url), workdir=str(tmp_path_factory.mktemp("resume"))
    ) as g:
        yield g


@pytest.fixture
async def proxy(gw: GatewayProcess) -> AsyncIterator[CutProxy]:
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    p = await CutProxy(host, int(port)).start()
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def chat(prompt: str, **kw: Any) -> dict[str, Any]:
    return {"model": "m", "stream": True, "messages": [{"role": "user", "content": prompt}], **kw}


# --- over the WebSocket -------------------------------------------------------------------------


async def _ws_drop_and_resume(
    gw: GatewayProcess,
    proxy: CutProxy,
    sim: SimProcess,
    prompt: str,
    seen: int,
    wait_end: bool = False,
) -> tuple[list[int], str, int]:
    """Start a resumable stream through the proxy, cut the network after ``seen`` chunks,
    resume on a new socket. Returns (all seqs, joined text, done count)."""
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(proxy.url + "/v1/ws", headers=ALICE)
        r = Reader(ws)
        await r.send(create("r1", prompt, resumable=True))
        first: list[dict[str, Any]] = []
        seqs: list[int] = []
        sid = None
        while len(first) < seen:
            m = await r.next()
            assert m["type"] == "chunk", m
            sid = m["stream"]
            seqs.append(m["seq"])
            first.append(m["chunk"])
        proxy.cut()  # the network drops
        while True:  # what had arrived before the drop still counts as seen
            msg = await ws.receive(5)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            m = orjson.loads(msg.data)
            assert m["type"] == "chunk", m
            seqs.append(m["seq"])
            first.append(m["chunk"])
        if wait_end:
            await sim_entries(sim, prompt.split(" [[")[0], one_closed)
        after = seqs[-1] if seqs else -1
        async with s.ws_connect(gw.url + "/v1/ws", headers=ALICE) as ws2:
            r2 = Reader(ws2)
            assert sid is not None
            await r2.send({"type": "resume", "id": "r1", "stream": sid, "after": after})
            (out,) = (await r2.until_done("r1")).values()
            await r2.settle()
            assert out.errors == [] and out.streams == {sid}
            return seqs + out.seqs, text_of(first) + out.text, out.done


@pytest.mark.parametrize("seen", [1, 7, 20])
async def test_ws_resume_mid_stream(gw, proxy, sims, seen) -> None:
    sim = sims[0]
    prompt = unique("ws-resume")
    seqs, text, done = await _ws_drop_and_resume(
        gw, proxy, sim, f"{prompt} [[sim:len=40,delay=0.02]]", seen
    )
    assert text == answer_text(prompt, 40)
    assert seqs == list(range(len(seqs))) and done == 1
    (e,) = await sim_entries(sim, prompt, one_closed)
    assert e.finished and not e.client_disconnected  # one upstream request, generated to the end


async def test_ws_resume_after_the_end_within_the_grace(gw, proxy, sims) -> None:
    sim = sims[0]
    prompt = unique("ws-after-end")
    seqs, text, done = await _ws_drop_and_resume(
        gw, proxy, sim, f"{prompt} [[sim:len=30,delay=0.01]]", 3, wait_end=True
    )
    assert text == answer_text(prompt, 30) and seqs == list(range(len(seqs))) and done == 1


async def test_ws_resume_before_the_first_chunk(gw, proxy, sims) -> None:
    """The network drops while the upstream has not answered yet. keel's stream id comes with
    the first chunk, so a client that wants to resume from before it names the stream itself
    (``"stream"`` in the create message)."""
    sim = sims[0]
    prompt = unique("ws-before-first")
    sid = "mine-" + prompt[-8:] + "-ws"
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(proxy.url + "/v1/ws", headers=ALICE)
        r = Reader(ws)
        await r.send(
            create("r", f"{prompt} [[sim:slow_first=0.3,len=20]]", resumable=True, stream=sid)
        )
        await sim_entries(sim, prompt, lambda es: len(es) == 1)  # the upstream is working
        assert not r.by_id
        proxy.cut()
        async with s.ws_connect(gw.url + "/v1/ws", headers=ALICE) as ws2:
            r2 = Reader(ws2)
            await r2.send({"type": "resume", "id": "r", "stream": sid, "after": -1})
            (out,) = (await r2.until_done("r")).values()
    assert out.errors == [] and out.streams == {sid} and out.done == 1
    assert out.text == answer_text(prompt, 20) and out.seqs == list(range(len(out.seqs)))
    (e,) = await sim_entries(sim, prompt, one_closed)
    assert e.finished


async def test_sse_resume_before_the_first_chunk(gw, proxy, sims) -> None:
    """The same over HTTP: the POST names its stream (``x-keel-stream-id``) and the network
    drops before the response headers came (they come with the first chunk)."""
    sim = sims[0]
    prompt = unique("sse-before-first")
    sid = "mine-" + prompt[-8:] + "-sse"
    async with aiohttp.ClientSession() as s:
        post = asyncio.create_task(
            s.post(
                proxy.url + "/v1/chat/completions",
                json=chat(f"{prompt} [[sim:slow_first=0.3,len=25]]"),
                headers={**ALICE, "x-keel-resumable": "true", "x-keel-stream-id": sid},
            )
        )
        await sim_entries(sim, prompt, lambda es: len(es) == 1)
        assert not post.done()
        proxy.cut()
        with pytest.raises(aiohttp.ClientError):
            await post
        async with s.get(gw.url + f"/v1/streams/{sid}", headers=ALICE) as again:
            assert again.status == 200
            body = await again.text()
        bad = {**ALICE, "x-keel-resumable": "true", "x-keel-stream-id": "no way"}
        async with s.post(gw.url + "/v1/chat/completions", json=chat("x"), headers=bad) as r:
            assert r.status == 400 and "x-keel-stream-id" in (await r.json())["error"]["message"]
    events = _events(body)
    assert [e["id"] for e in events] == [f"{sid}:{i}" for i in range(len(events))]
    assert text_of([orjson.loads(e["data"]) for e in events[:-1]]) == answer_text(prompt, 25)
    assert events[-1]["data"] == "[DONE]"
    (e,) = await sim_entries(sim, prompt, one_closed)
    assert e.finished


async def test_socket_close_keeps_resumable_streams_and_stops_the_others(gw, sims) -> None:
    sim = sims[0]
    keep, stop = unique("keep"), unique("stop")
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(gw.url + "/v1/ws", headers=ALICE)
        r = Reader(ws)
        await r.send(create("k", f"{keep} [[sim:len=30,delay=0.02]]", resumable=True))
        await r.send(create("s", f"{stop} [[sim:len=300,delay=0.02]]"))
        await sim_entries(sim, keep, one_open)
        await sim_entries(sim, stop, one_open)
        t = time.monotonic()
        await ws.close()
    (stopped,) = await sim_entries(sim, stop, one_closed)
    (kept,) = await sim_entries(sim, keep, one_closed)
    assert stopped.client_disconnected and stopped.t_close is not None
    assert stopped.t_close - t < WORST_WITHIN
    assert kept.finished and not kept.client_disconnected


async def test_ws_cancel_of_a_resumable_stream_stops_it_for_good(gw, sims, session) -> None:
    sim = sims[0]
    prompt = unique("cancel-resumable")
    async with session.ws_connect(gw.url + "/v1/ws", headers=ALICE) as ws:
        r = Reader(ws)
        await r.send(create("c", f"{prompt} [[sim:len=300,delay=0.02]]", resumable=True))
        await r.until(lambda: len(r.by_id.get("c").chunks) >= 2 if "c" in r.by_id else False)
        sid = next(iter(r.by_id["c"].streams))
        t = time.monotonic()
        await r.send({"type": "cancel", "id": "c"})
        (e,) = await sim_entries(sim, prompt, one_closed)
        await r.until_done("c")
        await r.send({"type": "resume", "id": "c2", "stream": sid, "after": 0})
        (gone,) = (await r.until_done("c2")).values()
    assert e.t_close is not None and e.t_close - t < WORST_WITHIN
    assert r.by_id["c"].done == 1
    assert gone.errors[0]["code"] == "stream_not_found"


async def test_another_client_cannot_resume_a_stream(gw, session) -> None:
    prompt = unique("not-yours")
    async with session.post(
        gw.url + "/v1/chat/completions",
        json=chat(prompt),
        headers={**ALICE, "x-keel-resumable": "true"},
    ) as resp:
        sid = resp.headers["x-keel-stream-id"]
        await resp.read()
    async with session.get(gw.url + f"/v1/streams/{sid}", headers=BOB) as other:
        assert other.status == 404 and (await other.json())["error"]["code"] == "stream_not_found"
    async with session.get(
        gw.url + f"/v1/streams/{sid}", headers={"authorization": "Bearer x"}
    ) as anon:
        assert anon.status == 401


# --- over HTTP (SSE) ----------------------------------------------------------------------------


def _events(body: str) -> list[dict[str, str]]:
    out = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append(fields)
    return out


async def test_sse_resume_with_last_event_id(gw, proxy, sims) -> None:
    sim = sims[0]
    prompt = unique("sse-resume")
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            proxy.url + "/v1/chat/completions",
            json=chat(f"{prompt} [[sim:len=50,delay=0.01]]"),
            headers={**ALICE, "x-keel-resumable": "true"},
        )
        assert resp.status == 200
        sid = resp.headers["x-keel-stream-id"]
        got = b""
        while got.count(b"\n\n") < 8:
            got += await resp.content.readany()
        proxy.cut()
        resp.close()
        seen = _events(got.decode()[: got.decode().rindex("\n\n") + 2])
        last = seen[-1]["id"]
        async with s.get(
            gw.url + f"/v1/streams/{sid}", headers={**ALICE, "last-event-id": last}
        ) as again:
            assert again.status == 200 and again.headers["x-keel-stream-id"] == sid
            rest = _events(await again.text())
        async with s.get(
            gw.url + f"/v1/streams/{sid}", headers={**ALICE, "last-event-id": rest[-1]["id"]}
        ) as end:
            assert end.status == 204  # seen it all: an EventSource stops here
        async with s.get(gw.url + f"/v1/streams/{sid}?after=x", headers=ALICE) as bad:
            assert bad.status == 400 and "after" in (await bad.json())["error"]["message"]
        async with s.get(
            gw.url + f"/v1/streams/{sid}", headers={**ALICE, "last-event-id": "ks_other:3"}
        ) as bad:
            assert bad.status == 400 and "another stream" in (await bad.json())["error"]["message"]
    events = seen + rest
    ids = [e["id"] for e in events]
    assert ids[:-1] == [f"{sid}:{i}" for i in range(len(ids) - 1)]  # no duplicate, no gap
    assert events[-1]["data"] == "[DONE]" and ids[-1] == f"{sid}:{len(ids) - 1}"
    assert text_of([orjson.loads(e["data"]) for e in events[:-1]]) == answer_text(prompt, 50)
    (e,) = await sim_entries(sim, prompt, one_closed)
    assert e.finished


async def _event_source(
    url: str, proxy: CutProxy, cut_after: int, **kw: Any
) -> tuple[list[Event], int]:
    """Follow ``url`` with an EventSource; the network drops after ``cut_after`` events."""
    events = []
    async with aiohttp.ClientSession() as s:
        source = EventSource(s, url, **kw)
        async for event in source.events():
            events.append(event)
            if len(events) == cut_after:
                proxy.cut()
    return events, source.connects


async def test_an_event_source_reconnects_by_itself_and_misses_nothing(
    gw, proxy, sims, session
) -> None:
    sim = sims[0]
    prompt = unique("eventsource")
    async with session.post(
        gw.url + "/v1/chat/completions",
        json=chat(f"{prompt} [[sim:len=40,delay=0.01]]"),
        headers={**ALICE, "x-keel-resumable": "true"},
    ) as resp:
        sid = resp.headers["x-keel-stream-id"]
    # The POST's reader left at once; the stream goes on. An EventSource follows it.
    events, connects = await _event_source(
        proxy.url + f"/v1/streams/{sid}", proxy, 5, headers=ALICE
    )
    assert proxy.cuts == 1 and connects == 3  # the first, after the drop, and the 204
    ids = [e.id for e in events]
    assert ids == [f"{sid}:{i}" for i in range(len(ids))]
    assert events[-1].data == "[DONE]"
    assert text_of([orjson.loads(e.data) for e in events[:-1]]) == answer_text(prompt, 40)
    (e,) = await sim_entries(sim, prompt, one_closed)
    assert e.finished


async def test_a_post_event_source_reconnects_by_itself_with_last_event_id(gw, proxy, sims) -> None:
    """A POST-capable EventSource re-sends its POST with ``Last-Event-Id`` when the network
    drops: keel resumes that stream instead of starting a second one."""
    sim = sims[0]
    prompt = unique("post-eventsource")
    events, connects = await _event_source(
        proxy.url + "/v1/chat/completions",
        proxy,
        6,
        method="POST",
        json=chat(f"{prompt} [[sim:len=40,delay=0.01]]"),
        headers={**ALICE, "x-keel-resumable": "true"},
    )
    assert connects == 3
    ids = [e.id for e in events]
    sid = ids[0].rsplit(":", 1)[0]
    assert ids == [f"{sid}:{i}" for i in range(len(ids))]
    assert text_of([orjson.loads(e.data) for e in events[:-1]]) == answer_text(prompt, 40)
    (e,) = await sim_entries(sim, prompt, one_closed)  # one upstream request, not two
    assert e.finished


async def test_the_openai_sdk_reads_resumable_and_plain_streams(gw) -> None:
    async with AsyncOpenAI(base_url=gw.url + "/v1", api_key="sk-alice", max_retries=0) as client:
        for headers in ({"x-keel-resumable": "true"}, {}):
            prompt = unique("sdk")
            raw = await client.chat.completions.with_raw_response.create(
                model="m",
                messages=[{"role": "user", "content": prompt}],
                stream=True,
                extra_headers=headers,
            )
            assert ("x-keel-stream-id" in raw.headers) == bool(headers)
            text = ""
            async for chunk in raw.parse():
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
            assert text == answer_text(prompt)


async def test_a_plain_stream_still_closes_its_upstream_when_the_client_leaves(
    gw, sims, session
) -> None:
    sim = sims[0]
    prompt = unique("plain-leaves")
    async with session.post(
        gw.url + "/v1/chat/completions",
        json=chat(f"{prompt} [[sim:len=300,delay=0.02]]"),
        headers={**ALICE, "x-keel-resumable": "false"},
    ) as resp:
        assert "x-keel-stream-id" not in resp.headers
        await resp.content.readany()
        await sim_entries(sim, prompt, one_open)
        t = time.monotonic()
        resp.close()
    (e,) = await sim_entries(sim, prompt, one_closed)
    assert e.client_disconnected and e.t_close is not None and e.t_close - t < WORST_WITHIN


async def test_delete_cancels_at_once(gw, sims, session) -> None:
    sim = sims[0]
    lags = []
    for _ in range(3):
        prompt = unique("delete")
        async with session.post(
            gw.url + "/v1/chat/completions",
            json=chat(f"{prompt} [[sim:len=300,delay=0.02]]"),
            headers={**ALICE, "x-keel-resumable": "true"},
        ) as resp:
            sid = resp.headers["x-keel-stream-id"]
            await sim_entries(sim, prompt, one_open)
            async with session.delete(gw.url + f"/v1/streams/{sid}", headers=BOB) as other:
                assert other.status == 404  # not Bob's to cancel
            t = time.monotonic()
            async with session.delete(gw.url + f"/v1/streams/{sid}", headers=ALICE) as d:
                assert d.status == 200
                assert (await d.json()) == {"id": sid, "object": "stream", "deleted": True}
            tail = _events(await resp.text())  # the reader still attached hears why, then [DONE]
        (e,) = await sim_entries(sim, prompt, one_closed)
        assert e.t_close is not None and e.client_disconnected
        lags.append(e.t_close - t)
        assert orjson.loads(tail[-2]["data"])["error"]["code"] == "stream_cancelled"
        assert tail[-1]["data"] == "[DONE]"
        async with session.get(gw.url + f"/v1/streams/{sid}", headers=ALICE) as again:
            assert again.status == 404
    print(f"\nDELETE -> upstream closed: {', '.join(f'{x * 1000:.1f}' for x in lags)} ms")
    assert_prompt(lags)


async def test_unknown_methods_and_streams(gw, session) -> None:
    async with session.put(gw.url + "/v1/streams/ks_x", headers=ALICE) as r:
        assert r.status == 405 and "GET" in r.headers["allow"]
    async with session.get(gw.url + "/v1/streams/ks_never", headers=ALICE) as r:
        assert r.status == 404 and "ks_never" in (await r.json())["error"]["message"]


# --- the grace ----------------------------------------------------------------------------------


async def test_nobody_back_within_the_grace_closes_the_upstream(sims, tmp_path) -> None:
    sim = sims[0]
    grace = 0.5
    cfg = resume_config(sims[0].base_url, resume={"grace": grace})
    prompt = unique("grace")
    with spawn_gateway(cfg, workdir=str(tmp_path)) as g:
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(g.url + "/v1/ws", headers=ALICE) as ws:
                r = Reader(ws)
                await r.send(create("g", f"{prompt} [[sim:len=1000,delay=0.02]]", resumable=True))
                await r.until(lambda: "g" in r.by_id and len(r.by_id["g"].chunks) >= 2)
                sid = next(iter(r.by_id["g"].streams))
                t = time.monotonic()
            (e,) = await sim_entries(sim, prompt, one_closed, within=5)
            async with s.get(g.url + f"/v1/streams/{sid}", headers=ALICE) as again:
                assert again.status == 404
    assert e.t_close is not None and e.client_disconnected and not e.finished
    lag = e.t_close - t
    print(f"\nresume grace {grace} s: upstream closed {lag * 1000:.0f} ms after the client left")
    assert grace <= lag < grace + 0.15
