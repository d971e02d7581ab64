"""GET /v1/ws: many chat completions multiplexed on one socket, against real processes (two
simulators and ``keel serve``) with real WebSocket clients (aiohttp's and ``websockets``).

Upstream closes are checked in the simulator's log, whose ``t_close`` is a CLOCK_MONOTONIC
reading comparable with this process's ``time.monotonic()``. Run with ``-s`` for the figures.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
import websockets

from gw_fixtures import unique
from keel.config import parse_config
from keel.gateway._app import create_app
from keel.gateway._serve import start_site
from keel.sim import answer_text
from keel.testing import GatewayProcess, SimProcess, spawn_gateway
from ws_helpers import Reader, assert_prompt, create, one_closed, one_open, sim_entries


def ws_config(a: str, b: str, **extra: Any) -> dict[str, Any]:
    fast = {"first_token": 2.0, "idle": 1.0}
    return {
        "retry": {"backoff_base": 0.01, "backoff_cap": 0.05, "max_retries_per_deployment": 2},
        "breaker": {"enabled": False},  # faults are injected on purpose
        "models": {
            "m": {
                "deployments": [
                    {"base_url": a, "api_key": "sk-a", "timeouts": fast},
                    {"base_url": b, "api_key": "sk-b", "dialect": "dashscope", "timeouts": fast},
                ]
            },
            "solo": {"deployments": [{"base_url": a, "api_key": "sk-a", "timeouts": fast}]},
        },
        **extra,
    }


@pytest.fixture(scope="module")
def ws_gateway(
    sims: tuple[SimProcess, SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    a, b = sims
    cfg = ws_config(a.base_url, b.base_url, websocket={"max_message_bytes": 65536})
    with spawn_gateway(cfg, workdir=str(tmp_path_factory.mktemp("ws"))) as gw:
        yield gw


def ws_url(gw: GatewayProcess) -> str:
    return gw.url + "/v1/ws"


@pytest.fixture
async def reader(ws_gateway: GatewayProcess) -> AsyncIterator[Reader]:
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(ws_gateway)) as ws:
        yield Reader(ws)


# Faults on the first attempt of a prompt: retried, failed over, or continued by keel.
_FAULTS = [
    "",
    "[[sim:e500*1]]",
    "[[sim:r429*1]]",
    "[[sim:reset*1]]",
    "[[sim@a:trunc=4*1]]",
    "[[sim@a:err_mid=3*1]]",
    "[[sim:e503*1]]",
    "[[sim@a:stall=2*1]]",
    "[[sim:garbage]]",
    "[[sim:frag]]",
]


async def test_fifty_requests_multiplexed_on_one_socket_exact_through_faults(reader) -> None:
    prompts = {f"r{i}": f"{unique('mux')} {_FAULTS[i % len(_FAULTS)]}" for i in range(50)}
    t0 = time.monotonic()
    for rid, prompt in prompts.items():
        await reader.send(create(rid, prompt))
    outcomes = await reader.until_done(*prompts, within=60)
    elapsed = time.monotonic() - t0
    await reader.settle()
    for rid, prompt in prompts.items():
        o = outcomes[rid]
        assert o.errors == [], (rid, prompt, o.errors)
        assert o.text == answer_text(prompt), (rid, prompt)
        assert o.seqs == list(range(len(o.seqs)))  # contiguous per request
        assert len(o.streams) == 1 and o.done == 1
    assert len({s for o in outcomes.values() for s in o.streams}) == 50
    print(f"\n50 multiplexed streams through faults: {elapsed * 1000:.0f} ms, all exact")


async def test_a_failing_request_leaves_the_others_alone(reader) -> None:
    ok, bad = unique("fine"), unique("broken")
    await reader.send(create("ok", f"{ok} [[sim:len=60,delay=0.005]]"))
    await reader.send(create("bad", f"{bad} [[sim:e500]]", model="solo"))
    await reader.send(create("nomodel", "x", model="no-such-model"))
    out = await reader.until_done("ok", "bad", "nomodel")
    await reader.settle()
    assert out["ok"].text == answer_text(f"{ok} [[sim:len=60]]", 60) and not out["ok"].errors
    assert out["ok"].done == 1
    assert out["bad"].done == 1 and len(out["bad"].errors) == 1 and not out["bad"].chunks
    assert out["bad"].errors[0]["type"] == "server_error"
    (err,) = out["nomodel"].errors
    assert err["code"] == "model_not_found" and "no-such-model" in err["message"]


async def test_cancel_closes_that_upstream_within_20ms_and_nothing_else(reader, sims) -> None:
    sim = sims[0]
    lags = []
    for _ in range(5):
        victim, bystander = unique("cancel-ws"), unique("bystander")
        await reader.send(create("v", f"{victim} [[sim:len=400,delay=0.02]]", model="solo"))
        await reader.send(create("b", f"{bystander} [[sim:len=30,delay=0.01]]", model="solo"))
        await reader.until(lambda: len(reader.by_id.get("v", _empty()).chunks) >= 3)
        await sim_entries(sim, victim, one_open)
        t = time.monotonic()
        await reader.send({"type": "cancel", "id": "v"})
        (e,) = await sim_entries(sim, victim, one_closed)
        out = await reader.until_done("v", "b")
        await reader.settle()
        assert e.t_close is not None and e.client_disconnected and not e.finished
        lags.append(e.t_close - t)
        assert out["v"].done == 1 and out["v"].errors == []
        assert out["b"].text == answer_text(f"{bystander} [[sim:len=30]]", 30)
        assert out["b"].done == 1
        del reader.by_id["v"], reader.by_id["b"]
    print(f"\ncancel -> upstream closed: {', '.join(f'{x * 1000:.1f}' for x in lags)} ms")
    assert_prompt(lags)


def _empty() -> Any:
    from ws_helpers import Outcome

    return Outcome()


async def test_cancel_before_the_first_token_closes_the_upstream(reader, sims) -> None:
    sim = sims[0]
    lags = []
    for i in range(5):
        prompt = unique("cancel-early")
        rid = f"early{i}"
        await reader.send(create(rid, f"{prompt} [[sim:slow_first=5]]", model="solo"))
        await sim_entries(sim, prompt, lambda es: len(es) == 1 and es[0].t_close is None)
        t = time.monotonic()
        await reader.send({"type": "cancel", "id": rid})
        (e,) = await sim_entries(sim, prompt, one_closed)
        (out,) = (await reader.until_done(rid)).values()
        assert e.t_close is not None and e.client_disconnected
        assert out.done == 1 and not out.chunks and not out.errors
        lags.append(e.t_close - t)
    print(
        f"\ncancel before the first token -> upstream closed: {', '.join(f'{x * 1000:.1f}' for x in lags)} ms"
    )
    assert_prompt(lags)


async def test_closing_the_socket_closes_all_its_upstreams_within_20ms(ws_gateway, sims) -> None:
    sim = sims[0]
    prompts = [unique("socket-close") for _ in range(4)]
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(ws_url(ws_gateway))
        r = Reader(ws)
        for i, p in enumerate(prompts):
            await r.send(create(f"s{i}", f"{p} [[sim:len=400,delay=0.02]]", model="solo"))
        await r.until(
            lambda: all(len(r.by_id.get(f"s{i}", _empty()).chunks) >= 2 for i in range(4))
        )
        for p in prompts:
            await sim_entries(sim, p, one_open)
        t = time.monotonic()
        await ws.close()
    lags = []
    for p in prompts:
        (e,) = await sim_entries(sim, p, one_closed)
        assert e.t_close is not None and e.client_disconnected and not e.finished
        lags.append(e.t_close - t)
    print(f"\nsocket closed -> upstreams closed: {', '.join(f'{x * 1000:.1f}' for x in lags)} ms")
    assert_prompt(lags)


async def test_the_websockets_package_as_a_client(ws_gateway) -> None:
    """A second, independent WebSocket implementation: the frames are plain RFC 6455 text."""
    prompt = unique("websockets-pkg")
    async with websockets.connect(ws_url(ws_gateway).replace("http", "ws", 1)) as ws:
        await ws.send(orjson.dumps(create("w1", f"{prompt} [[sim:e500*1]]")).decode())
        await ws.send('{"type": "ping"}')
        chunks, kinds = [], []
        while True:
            m = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
            kinds.append(m["type"])
            if m["type"] == "chunk":
                assert m["id"] == "w1" and m["seq"] == len(chunks)
                chunks.append(m["chunk"])
            if m["type"] == "done":
                break
    assert "pong" in kinds and kinds.count("done") == 1 and "error" not in kinds
    assert "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
    ) == answer_text(prompt)


# --- bad input: an error naming the problem, the socket stays open ------------------------------


@pytest.mark.parametrize(
    ("frame", "code", "names"),
    [
        ("this is not json", "invalid_json", "not JSON"),
        ("[1, 2]", "invalid_message", "JSON object"),
        (
            '{"type": "chat.completions.delete", "id": "x"}',
            "unknown_type",
            "chat.completions.delete",
        ),
        ('{"id": "x"}', "unknown_type", "None"),
        ('{"type": "chat.completions.create", "body": {}}', "invalid_id", "'id'"),
        ('{"type": "chat.completions.create", "id": 7, "body": {}}', "invalid_id", "'id'"),
        ('{"type": "cancel", "id": "never-started"}', "unknown_id", "never-started"),
        ('{"type": "resume", "id": "q", "stream": "ks_nope", "after": "x"}', None, None),
        ('{"type": "auth"}', "invalid_token", "'token'"),
    ],
)
async def test_bad_messages_get_an_error_and_the_socket_stays_open(
    reader, frame, code, names
) -> None:
    await reader.ws.send_str(frame)
    if code is None:  # a resume with a bad 'after' is a request: error, then done
        (out,) = (await reader.until_done("q")).values()
        assert out.errors[0]["code"] == "invalid_after" and "'after'" in out.errors[0]["message"]
    else:
        m = await reader.loose_error()
        assert m["id"] is None and m["error"]["code"] == code, m
        assert names in m["error"]["message"], m
    await _still_serves(reader)


async def _still_serves(reader: Reader) -> None:
    prompt = unique("after-bad-input")
    rid = f"ok-{prompt[-8:]}"
    await reader.send(create(rid, prompt))
    (out,) = (await reader.until_done(rid)).values()
    assert out.text == answer_text(prompt) and out.done == 1


async def test_binary_frames_are_refused_by_name(reader) -> None:
    await reader.ws.send_bytes(b'{"type": "ping"}')
    m = await reader.loose_error()
    assert m["error"]["code"] == "binary" and "Binary frames" in m["error"]["message"]
    await _still_serves(reader)


@pytest.mark.parametrize(
    ("body", "code", "names"),
    [
        ("not an object", "invalid_body", "'body'"),
        ({"model": "m"}, None, "messages"),
        ({"model": "m", "messages": "hi"}, None, "messages"),
        (
            {"model": "no-such", "messages": [{"role": "user", "content": "x"}]},
            "model_not_found",
            "no-such",
        ),
    ],
)
async def test_a_bad_body_is_an_error_then_done_for_that_id(reader, body, code, names) -> None:
    await reader.send({"type": "chat.completions.create", "id": "badbody", "body": body})
    (out,) = (await reader.until_done("badbody")).values()
    await reader.settle()
    assert out.done == 1 and len(out.errors) == 1 and not out.chunks
    if code is not None:
        assert out.errors[0]["code"] == code
    assert names in out.errors[0]["message"], out.errors
    await _still_serves(reader)


async def test_a_duplicate_id_is_refused_and_the_running_one_goes_on(reader) -> None:
    prompt = unique("dup")
    await reader.send(create("d", f"{prompt} [[sim:len=40,delay=0.01]]"))
    await reader.send(create("d", "another"))
    m = await reader.loose_error()
    assert m["error"]["code"] == "duplicate_id" and "'d'" in m["error"]["message"]
    (out,) = (await reader.until_done("d")).values()
    await reader.settle()
    assert out.text == answer_text(f"{prompt} [[sim:len=40]]", 40) and out.done == 1


async def test_an_oversized_message_is_refused_and_the_socket_stays_open(reader) -> None:
    big = create("big", "x" * 70_000)
    await reader.send(big)
    m = await reader.loose_error()
    assert m["error"]["code"] == "message_too_large" and "65536" in m["error"]["message"]
    await _still_serves(reader)


async def test_non_stream_is_implied(reader) -> None:
    prompt = unique("implied")
    msg = create("i", prompt)
    msg["body"]["stream"] = False
    await reader.send(msg)
    (out,) = (await reader.until_done("i")).values()
    assert out.text == answer_text(prompt) and len(out.chunks) > 2


# --- auth, limits and heartbeats (a gateway in this process, with client keys) -----------------


@pytest.fixture
async def keyed(sims) -> AsyncIterator[str]:
    a, b = sims
    cfg = ws_config(
        a.base_url,
        b.base_url,
        server={"api_keys": ["sk-one", "sk-two"]},
        websocket={"heartbeat": 0.4, "max_requests": 3, "auth_timeout": 1.0},
    )
    runner, port = await start_site(create_app(parse_config(cfg)), "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}/v1/ws"
    finally:
        await runner.cleanup()


async def test_auth_by_header_and_a_bad_header_is_a_401_before_the_upgrade(keyed) -> None:
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await s.ws_connect(keyed, headers={"authorization": "Bearer sk-wrong"})
        assert info.value.status == 401
        async with s.ws_connect(keyed, headers={"authorization": "Bearer sk-one"}) as ws:
            r = Reader(ws)
            prompt = unique("header-auth")
            await r.send(create("h", prompt))
            (out,) = (await r.until_done("h")).values()
            assert out.text == answer_text(prompt)


async def test_in_band_auth_and_renewal_without_dropping_running_streams(keyed) -> None:
    async with aiohttp.ClientSession() as s, s.ws_connect(keyed) as ws:
        r = Reader(ws)
        await r.send(create("early", "too soon"))
        (early,) = (await r.until_done("early")).values()
        assert early.errors[0]["code"] == "invalid_api_key" and "auth" in early.errors[0]["message"]

        await r.send({"type": "auth", "token": "sk-one"})
        long = unique("renewal")
        await r.send(create("long", f"{long} [[sim:len=80,delay=0.01]]"))
        await r.until(lambda: len(r.by_id.get("long", _empty()).chunks) >= 5)
        await r.send({"type": "auth", "token": "sk-two"})  # a renewed token takes over
        short = unique("after-renewal")
        await r.send(create("short", short))
        await r.send({"type": "auth", "token": "sk-revoked"})  # a bad one: fail closed
        m = await r.loose_error()
        assert m["error"]["code"] == "invalid_api_key"
        await r.send(create("refused", "x"))
        out = await r.until_done("long", "short", "refused")
        assert out["long"].text == answer_text(f"{long} [[sim:len=80]]", 80)  # never dropped
        assert out["long"].errors == [] and out["short"].text == answer_text(short)
        assert out["refused"].errors[0]["code"] == "invalid_api_key"


async def test_unauthenticated_sockets_are_closed_after_the_auth_timeout(keyed) -> None:
    async with aiohttp.ClientSession() as s, s.ws_connect(keyed) as ws:
        t = time.monotonic()
        m = orjson.loads((await ws.receive(5)).data)
        assert m["type"] == "error" and "within 1s" in m["error"]["message"]
        closing = await ws.receive(5)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 1008 and 0.9 < time.monotonic() - t < 2.0


async def test_per_socket_request_limit(keyed) -> None:
    headers = {"authorization": "Bearer sk-one"}
    async with aiohttp.ClientSession() as s, s.ws_connect(keyed, headers=headers) as ws:
        r = Reader(ws)
        for i in range(4):
            await r.send(create(f"l{i}", f"{unique('limit')} [[sim:len=20,delay=0.02]]"))
        out = await r.until_done(*(f"l{i}" for i in range(4)))
        assert [o.errors[0]["code"] for o in out.values() if o.errors] == ["too_many_requests"]
        assert out["l3"].errors and "websocket.max_requests" in out["l3"].errors[0]["message"]


async def test_heartbeat_closes_a_dead_peer_and_its_upstream(keyed, sims) -> None:
    """A peer that stops answering pings (autoping off: a frozen laptop) is closed after the
    heartbeat, and its stream's upstream with it."""
    sim = sims[0]
    prompt = unique("dead-peer")
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(keyed, headers={"authorization": "Bearer sk-one"}, autoping=False)
        await ws.send_str(
            orjson.dumps(
                create("z", f"{prompt} [[sim:len=2000,delay=0.02]]", model="solo")
            ).decode()
        )
        await sim_entries(sim, prompt, one_open)
        t = time.monotonic()
        (e,) = await sim_entries(sim, prompt, one_closed, within=5)
        assert e.t_close is not None and e.client_disconnected and not e.finished
        print(
            f"\ndead peer: upstream closed {(e.t_close - t) * 1000:.0f} ms after it went quiet (heartbeat 0.4 s)"
        )
        assert e.t_close - t < 1.5
        await ws.close()
