"""A graceful shutdown (SIGTERM) with WebSockets and resumable streams open: an idle socket is
closed as going away (1001) at once instead of holding the drain, a running request finishes
and then its socket closes, and what ``server.drain_timeout`` cuts off ends well-formed — an error
naming the cut-off and ``done`` on a socket, an error frame and ``[DONE]`` on a resumable SSE
stream. Real processes."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import aiohttp
import orjson
import pytest

from gw_fixtures import unique
from keel.sim import answer_text
from keel.testing import SimProcess, spawn_gateway, spawn_sim
from test_shutdown import SLACK, config, exit_within, wait_output
from ws_helpers import Reader, create


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with spawn_sim("--name", "a") as s:
        yield s


async def test_sigterm_closes_idle_sockets_and_lets_running_requests_finish(sim, tmp_path) -> None:
    prompt = unique("ws-drain")
    with spawn_gateway(config(sim, 10.0), workdir=str(tmp_path)) as gw:
        async with aiohttp.ClientSession() as s:
            idle = await s.ws_connect(gw.url + "/v1/ws")
            busy = await s.ws_connect(gw.url + "/v1/ws")
            r = Reader(busy)
            await r.send(create("run", f"{prompt} [[sim:len=60,delay=0.03]]"))
            await r.until(lambda: "run" in r.by_id and len(r.by_id["run"].chunks) >= 2)
            t = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            msg = await idle.receive(5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert idle.close_code == 1001 and time.monotonic() - t < 1.0
            out = await r.until_done("run")
            closing = await busy.receive(5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert busy.close_code == 1001
        took = exit_within(gw, 10.0 + SLACK)
    assert out["run"].text == answer_text(f"{prompt} [[sim:len=60]]", 60) and not out["run"].errors
    assert took < 3.0  # the idle socket did not hold the drain for its 10 s


async def test_what_the_drain_timeout_cuts_off_ends_well_formed(sim, tmp_path) -> None:
    ws_prompt, sse_prompt = unique("ws-cut"), unique("sse-cut")
    with spawn_gateway(config(sim, 0.5), workdir=str(tmp_path)) as gw:
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(gw.url + "/v1/ws")
            r = Reader(ws)
            await r.send(create("stuck", f"{ws_prompt} [[sim:stall=2]]"))
            await r.until(lambda: "stuck" in r.by_id and len(r.by_id["stuck"].chunks) >= 2)
            resp = await s.post(
                gw.url + "/v1/chat/completions",
                json={
                    "model": "m",
                    "stream": True,
                    "messages": [{"role": "user", "content": f"{sse_prompt} [[sim:stall=2]]"}],
                },
                headers={"x-keel-resumable": "true"},
            )
            sid = resp.headers["x-keel-stream-id"]
            await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
            gw.proc.send_signal(signal.SIGTERM)
            (out,) = (await r.until_done("stuck", within=10)).values()
            closing = await ws.receive(5)
            tail = await asyncio.wait_for(resp.read(), 10)
        exit_within(gw, 0.5 + 1.0 + SLACK)
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert out.errors[0]["code"] == "server_shutting_down" and out.done == 1
    assert "drain_timeout" in out.errors[0]["message"]
    events = [e for e in tail.split(b"\n\n") if e.strip()]
    assert events[-1].endswith(b"data: [DONE]") and events[-1].startswith(f"id: {sid}:".encode())
    err = orjson.loads(events[-2].split(b"data: ", 1)[1])
    assert err["error"]["code"] == "server_shutting_down"


async def test_a_cancel_sent_during_the_drain_still_stops_its_upstream(sim, tmp_path) -> None:
    """A draining server still reads its WebSockets: the requests running on them can still be
    cancelled (and resumed), only new connections are refused."""
    prompt = unique("ws-drain-cancel")
    with spawn_gateway(config(sim, 30.0), workdir=str(tmp_path)) as gw:
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(gw.url + "/v1/ws")
            r = Reader(ws)
            await r.send(create("long", f"{prompt} [[sim:len=400,delay=0.05]]"))
            await r.until(lambda: "long" in r.by_id and len(r.by_id["long"].chunks) >= 2)
            gw.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_output, gw, r"shutting down: 1 request in flight")
            t = time.monotonic()
            await r.send({"type": "cancel", "id": "long"})
            out = await r.until_done("long", within=5.0)
            assert out["long"].done == 1
        took = exit_within(gw, 5.0 + SLACK)
    entries = [e for e in sim.log() if prompt.rsplit("#", 1)[1] in e.prompt]
    assert len(entries) == 1 and entries[0].client_disconnected
    assert entries[0].t_close is not None and entries[0].t_close - t < 0.5
    assert took < 5.0  # the cancelled request did not hold the drain for its 20 s
