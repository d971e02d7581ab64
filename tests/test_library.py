"""keel as a library: ``Keel.chat`` / ``Keel.stream`` and the official SDK over
``Keel.transport()``, against the real simulators, with the same behaviour as ``keel serve``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import httpx
import httpx2
import openai
import orjson
import pytest

from gw_fixtures import UPSTREAM_KEY_A, UPSTREAM_KEY_B, unique
from keel import Keel, KeelError
from keel.sim import LogEntry, answer_text
from keel.testing import SimProcess, spawn_gateway

CLOSE_WITHIN = 0.02  # seconds from leaving the iteration to the upstream connection's close
CLIENT_KEY = "sk-library-client"


def config(a: SimProcess, b: SimProcess, **extra: Any) -> dict[str, Any]:
    return {
        "retry": {"backoff_base": 0.01, "backoff_cap": 0.05},
        "breaker": {"enabled": False},
        "models": {
            # a then b (openai: instruct continuation; dashscope: prefill)
            "pair": {
                "deployments": [
                    {"name": "lib-a", "base_url": a.base_url, "api_key": UPSTREAM_KEY_A},
                    {
                        "name": "lib-b",
                        "base_url": b.base_url,
                        "api_key": UPSTREAM_KEY_B,
                        "dialect": "dashscope",
                    },
                ]
            },
            "solo": {  # one deployment that continues streams by prefill
                "deployments": [
                    {
                        "name": "lib-solo",
                        "base_url": b.base_url,
                        "api_key": UPSTREAM_KEY_B,
                        "dialect": "dashscope",
                    }
                ]
            },
            "stuck": {  # one deployment that cannot continue a stream
                "deployments": [
                    {
                        "name": "lib-stuck",
                        "base_url": a.base_url,
                        "api_key": UPSTREAM_KEY_A,
                        "continuation": "none",
                    }
                ]
            },
        },
        **extra,
    }


@pytest.fixture
async def gw(sims: tuple[SimProcess, SimProcess]) -> AsyncIterator[Keel]:
    async with Keel.from_config(config(*sims)) as k:
        yield k


def user(prompt: str, model: str = "pair", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], **kw}


def entries(sim: SimProcess, prompt: str) -> list[LogEntry]:
    """The simulator's entries for a ``unique()`` prompt (it logs prompts without directives:
    the unique tag at the end names them)."""
    tag = prompt.rsplit("#", 1)[1]
    return [e for e in sim.log() if tag in e.prompt]


async def wait_closed(sims: tuple[SimProcess, ...], prompt: str) -> LogEntry:
    """The one upstream request for ``prompt``, once it is closed (polled in a thread, so this
    loop keeps running)."""

    def closed() -> list[LogEntry]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            es = [e for s in sims for e in entries(s, prompt)]
            if es and all(e.t_close is not None for e in es):
                return es
            time.sleep(0.005)
        raise TimeoutError(prompt)

    (e,) = await asyncio.to_thread(closed)
    return e


# -- gw.chat / gw.stream ---------------------------------------------------------------------------


async def test_chat_gets_the_exact_answer_through_a_failure(
    gw: Keel, sims: tuple[SimProcess, SimProcess]
) -> None:
    prompt = unique("lib chat [[sim:e500*1]]")
    done = await gw.chat(user(prompt))
    assert done["object"] == "chat.completion"
    assert done["choices"][0]["message"]["content"] == answer_text(prompt)
    assert done["choices"][0]["finish_reason"] == "stop"
    # Each simulator fails the prompt once: a fail-over, then a retry answers.
    statuses = sorted(e.status or 0 for s in sims for e in entries(s, prompt))
    assert statuses == [200, 500, 500]


async def test_stream_gets_the_exact_answer_through_a_mid_stream_cut(
    gw: Keel, sims: tuple[SimProcess, SimProcess]
) -> None:
    prompt = unique("lib stream [[sim:trunc=5*1]]")
    body = user(prompt, model="solo", stream_options={"include_usage": True})
    chunks = [c async for c in gw.stream(body)]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == answer_text(prompt)
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "stop"
    # The repair is on record in the terminal chunk: where, by whom, how.
    first_five = [c["choices"][0]["delta"].get("content") or "" for c in chunks[:6]]
    assert finish[0]["keel"] == {
        "attempts": 2,
        "continued": [
            {"at_char": len("".join(first_five)), "deployment": "lib-solo", "mode": "prefill"}
        ],
    }
    assert chunks[-1]["usage"]["completion_tokens"] > 0 and chunks[-1]["choices"] == []


async def test_an_unknown_model_raises_keel_error(gw: Keel) -> None:
    with pytest.raises(KeelError) as info:
        await gw.chat(user("hi", model="nope"))
    assert info.value.status == 404
    assert info.value.body["error"]["code"] == "model_not_found"
    with pytest.raises(KeelError) as info:
        async for _ in gw.stream(user("hi", model="nope")):
            pass
    assert info.value.status == 404


async def test_bad_input_raises_a_400(gw: Keel) -> None:
    with pytest.raises(KeelError) as info:
        await gw.chat({"model": "pair", "messages": []})
    assert info.value.status == 400 and info.value.body["error"]["param"] == "messages"


async def test_a_stream_that_cannot_be_completed_raises_after_its_chunks(gw: Keel) -> None:
    prompt = unique("lib broken [[sim:trunc=3]]")
    got: list[str] = []
    with pytest.raises(KeelError) as info:
        async for c in gw.stream(user(prompt, model="stuck")):
            got.append(c["choices"][0]["delta"].get("content") or "")
    assert "".join(got) == "".join(answer_text(prompt))[: len("".join(got))] and got
    assert info.value.status == 502
    assert "truncated" in info.value.message or "closed" in info.value.message


async def _leave(gw: Keel, how: str, prompt: str) -> float:
    """Read two chunks of a slow stream, then leave it ``how``; the monotonic time of leaving."""
    body = user(prompt)
    if how == "break":
        async for _ in gw.stream(body):
            break  # the iterator is dropped here
        return time.monotonic()  # (a hair after the drop: the close can only look later)
    if how == "aclose":
        s = gw.stream(body)
        await s.__anext__()
        t = time.monotonic()
        await s.aclose()
        return t
    reading = asyncio.Event()

    async def consume() -> None:
        async for _ in gw.stream(body):
            reading.set()

    task = asyncio.create_task(consume())
    await reading.wait()
    t = time.monotonic()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return t


@pytest.mark.parametrize("how", ["break", "aclose", "cancel"])
async def test_leaving_a_stream_closes_the_upstream_within_20ms(
    gw: Keel, sims: tuple[SimProcess, SimProcess], how: str
) -> None:
    prompt = unique(f"lib leave {how} [[sim:len=400,delay=0.05]]")
    t_left = await _leave(gw, how, prompt)
    e = await wait_closed(sims, prompt)
    assert e.client_disconnected and not e.finished
    assert e.t_close is not None
    lag = e.t_close - t_left
    assert lag < CLOSE_WITHIN, f"upstream closed {lag * 1000:.1f} ms after leaving ({how})"


async def test_client_limits_apply_to_a_library_caller_with_a_key(
    sims: tuple[SimProcess, SimProcess],
) -> None:
    cfg = config(*sims, clients={"lib": {"key": CLIENT_KEY, "rpm": 1}})
    async with Keel.from_config(cfg) as k:
        await k.chat(user(unique("lib limited")), api_key=CLIENT_KEY)
        with pytest.raises(KeelError) as info:
            await k.chat(user(unique("lib limited")), api_key=CLIENT_KEY)
        assert info.value.status == 429 and "retry-after" in info.value.headers
        with pytest.raises(KeelError) as info:
            await k.chat(user("x"), api_key="sk-wrong")
        assert info.value.status == 401


# -- the official SDK over gw.transport() -----------------------------------------------------------

CLIENTS: dict[str, Callable[[Keel], Any]] = {
    "httpx": lambda k: httpx.AsyncClient(transport=k.transport()),
    "httpx2": lambda k: httpx2.AsyncClient(transport=k.transport()),
}


@pytest.fixture(params=sorted(CLIENTS))
async def sdk(request: pytest.FixtureRequest, gw: Keel) -> AsyncIterator[openai.AsyncOpenAI]:
    http = CLIENTS[request.param](gw)
    client = openai.AsyncOpenAI(
        base_url="http://keel/v1", api_key="unused", max_retries=0, http_client=http
    )
    yield client
    await client.close()


async def test_sdk_chat_and_stream_in_process(
    sdk: openai.AsyncOpenAI, sims: tuple[SimProcess, SimProcess]
) -> None:
    prompt = unique("sdk chat [[sim:e500*1]]")
    raw = await sdk.chat.completions.with_raw_response.create(
        model="pair", messages=[{"role": "user", "content": prompt}]
    )
    done = raw.parse()
    assert done.choices[0].message.content == answer_text(prompt)
    assert raw.headers["x-keel-attempts"] == "3"  # each simulator fails it once
    assert raw.headers["x-keel-deployment"] in ("lib-a", "lib-b")
    prompt = unique("sdk stream [[sim:trunc=4*1]]")
    stream = await sdk.chat.completions.create(
        model="pair", messages=[{"role": "user", "content": prompt}], stream=True
    )
    text = ""
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == answer_text(prompt)


async def test_sdk_errors_are_the_sdks_own(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        await sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert nf.value.code == "model_not_found"
    models = await sdk.models.list()
    assert sorted(m.id for m in models.data) == ["pair", "solo", "stuck"]
    prompt = unique("sdk broken [[sim:trunc=3]]")
    stream = await sdk.chat.completions.create(
        model="stuck", messages=[{"role": "user", "content": prompt}], stream=True
    )
    seen = 0
    with pytest.raises(openai.APIError):
        async for _chunk in stream:
            seen += 1
    assert seen >= 3  # the chunks first, then the error frame


async def test_sdk_closing_a_stream_closes_the_upstream_within_20ms(
    sdk: openai.AsyncOpenAI, sims: tuple[SimProcess, SimProcess]
) -> None:
    prompt = unique("sdk leave [[sim:len=400,delay=0.05]]")
    stream = await sdk.chat.completions.create(
        model="pair", messages=[{"role": "user", "content": prompt}], stream=True
    )
    async for _ in stream:
        break
    t = time.monotonic()
    await stream.close()
    e = await wait_closed(sims, prompt)
    assert e.client_disconnected and e.t_close is not None
    assert e.t_close - t < CLOSE_WITHIN


async def test_sdk_rate_limit_error_from_client_limits(sims: tuple[SimProcess, SimProcess]) -> None:
    cfg = config(*sims, clients={"lib": {"key": CLIENT_KEY, "rpm": 1}})
    async with Keel.from_config(cfg) as k:
        client = openai.AsyncOpenAI(
            base_url="http://keel/v1",
            api_key=CLIENT_KEY,
            max_retries=0,
            http_client=httpx.AsyncClient(transport=k.transport()),
        )
        msgs = [{"role": "user", "content": unique("sdk limited")}]
        await client.chat.completions.create(model="pair", messages=msgs)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="pair", messages=msgs)  # type: ignore[arg-type]
        await client.close()


# -- the same answers as keel serve -------------------------------------------------------------------

REQUESTS = [
    ("POST", "/v1/chat/completions", orjson.dumps(user("same", model="nope"))),
    ("POST", "/v1/chat/completions", b"{not json"),
    ("POST", "/v1/chat/completions", orjson.dumps({"model": "pair", "messages": "x"})),
    ("GET", "/v1/chat/completions", b""),
    ("GET", "/v1/nothing-here", b""),
    ("POST", "/v1/chat/completions", orjson.dumps(user("same [[sim:ctx]]", model="solo"))),
]


async def test_the_transport_answers_as_the_gateway_does(
    sims: tuple[SimProcess, SimProcess], tmp_path: Any
) -> None:
    cfg = config(*sims)
    with spawn_gateway(cfg, workdir=str(tmp_path)) as served:
        root = served.url
        async with (
            Keel.from_config(cfg) as k,
            httpx.AsyncClient(transport=k.transport()) as local,
            aiohttp.ClientSession() as http,
        ):
            for method, path, body in REQUESTS:
                headers = {"content-type": "application/json"}
                async with http.request(method, root + path, data=body, headers=headers) as r:
                    want = (r.status, orjson.loads(await r.read()), _stable(r.headers))
                got_r = await local.request(
                    method, "http://keel" + path, content=body, headers=headers
                )
                got = (got_r.status_code, orjson.loads(got_r.content), _stable(got_r.headers))
                assert got == want, (method, path)


def _stable(headers: Any) -> dict[str, str]:
    """The headers that must match (ids and dates differ between any two responses)."""
    keep = ("content-type", "x-should-retry", "retry-after", "allow", "x-keel-attempts")
    return {k: headers[k].split(";")[0] for k in keep if k in headers}


async def test_a_deployment_passed_over_for_a_sibling_with_room_keeps_its_turn(
    sims: tuple[SimProcess, SimProcess],
) -> None:
    """The favoured deployment (weight; paced at one start a second) fails its first attempt;
    the sibling fails every attempt. Each round the favoured one comes first, its next start
    still a second away, and is passed over because the sibling has room — which must leave
    it its turn: once the sibling's retries are spent, the request waits for the favoured
    one's next start and gets the exact answer. (Dropped from the plan instead, the request
    failed after five attempts, none of them a second look at the favoured one: a storm lost
    requests that way.)"""
    a, b = sims
    cfg = {
        "retry": {"backoff_base": 0.01, "backoff_cap": 0.05},
        "breaker": {"enabled": False},
        "models": {
            "favoured": {
                "deployments": [
                    {"name": "fav-a", "base_url": a.base_url, "api_key": UPSTREAM_KEY_A,
                     "weight": 1000, "rpm": 60},
                    {"name": "fav-b", "base_url": b.base_url, "api_key": UPSTREAM_KEY_B,
                     "dialect": "dashscope", "weight": 1},
                ]
            }
        },
    }  # fmt: skip
    prompt = unique("passed over [[sim@a:e500*1]] [[sim@b:e500]]")
    async with Keel.from_config(cfg) as k:
        done = await k.chat(user(prompt, model="favoured"))
    assert done["choices"][0]["message"]["content"] == answer_text(prompt)
    assert [e.status for e in entries(a, prompt)] == [500, 200]
    assert [e.status for e in entries(b, prompt)] == [500] * 4  # its 1 + 3 retries, all spent
