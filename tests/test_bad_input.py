"""Bad input: every mistake a client can make gets an OpenAI-shaped 4xx naming the problem —
never a 500, never a dropped connection (the next request on the same keep-alive connection
works)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from gw_fixtures import UPSTREAM_KEY_A, unique
from keel.sim import answer_text
from keel.testing import GatewayProcess, SimProcess, spawn_gateway

MAX_BODY = 65536  # server.max_body_bytes in gw_fixtures.gateway_config
CLIENT_KEY = "sk-keel-client-0123456789"


def msgs(prompt: str = "hi") -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def ok_body(prompt: str) -> dict[str, Any]:
    return {"model": "solo", "messages": msgs(prompt)}


class Conn:
    """One aiohttp session limited to a single connection, counting the TCP connections it
    opens: a bad request followed by a good one must reuse the first connection."""

    def __init__(self, base: str, headers: dict[str, str] | None = None) -> None:
        self.base = base
        self.opened = 0
        trace = aiohttp.TraceConfig()

        async def on_create(*_: Any) -> None:
            self.opened += 1

        trace.on_connection_create_end.append(on_create)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1),
            trace_configs=[trace],
            headers=headers,
        )

    async def request(self, method: str, path: str, **kw: Any) -> tuple[int, dict[str, Any], Any]:
        async with self.session.request(method, self.base + path, **kw) as r:
            raw = await r.read()
            assert r.content_type == "application/json", (r.status, raw[:200])
            return r.status, json.loads(raw), r.headers

    async def still_usable(self) -> None:
        """A valid request right after succeeds, on the same connection."""
        prompt = unique("after bad input")
        status, done, _ = await self.request("POST", "/chat/completions", json=ok_body(prompt))
        assert status == 200, done
        assert done["choices"][0]["message"]["content"] == answer_text(prompt)
        assert self.opened == 1, "the bad request cost the client its connection"


@pytest.fixture
async def conn(gateway: GatewayProcess) -> AsyncIterator[Conn]:
    c = Conn(gateway.base_url)
    yield c
    await c.session.close()


def assert_openai_error(status: int, body: dict[str, Any], expected: int, *words: str) -> None:
    assert status == expected, body
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    for w in words:
        assert w.lower() in err["message"].lower(), (w, err["message"])


# --- bodies that are not a chat request --------------------------------------------------------

RAW_BODIES = [
    pytest.param(b'{"model": "solo", "messages": [', ["not valid JSON"], id="truncated-json"),
    pytest.param(b"model=solo&messages=hi", ["not valid JSON"], id="form-encoded"),
    pytest.param(b"{'model': 'solo'}", ["not valid JSON"], id="single-quotes"),
    pytest.param(
        b'{"model": "solo", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        ["UTF-8"],
        id="invalid-utf8-in-string",
    ),
    pytest.param(b"\xc3\x28\xa0\xa1", ["UTF-8"], id="invalid-utf8-bytes"),
    pytest.param(b"", ["empty"], id="empty"),
    pytest.param(b"[]", ["JSON object"], id="array"),
    pytest.param(b'"hello"', ["JSON object"], id="string"),
    pytest.param(b"42", ["JSON object"], id="number"),
    pytest.param(b"null", ["JSON object"], id="null"),
]


@pytest.mark.parametrize(("raw", "words"), RAW_BODIES)
async def test_unparseable_body_is_a_400(conn: Conn, raw: bytes, words: list[str]) -> None:
    status, body, headers = await conn.request(
        "POST", "/chat/completions", data=raw, headers={"content-type": "application/json"}
    )
    assert_openai_error(status, body, 400, *words)
    assert headers["x-should-retry"] == "false"
    await conn.still_usable()


def nested(depth: int) -> bytes:
    """A chat body whose deepest array is ``depth`` levels down (the body itself is level 1);
    the nesting sits in a pass-through field, as a tool schema or metadata would."""
    inner = b"[" * (depth - 1) + b"0" + b"]" * (depth - 1)
    return b'{"model": "solo", "messages": [{"role": "user", "content": "deep"}], "metadata": ' + (
        inner + b"}"
    )


@pytest.mark.parametrize("depth", [255, 256, 500, 1023, 1024])
async def test_json_nested_deeper_than_keel_can_forward_is_a_400(conn: Conn, depth: int) -> None:
    # orjson parses 1024 levels but serialises only 254: keel accepts only what it can send on.
    status, body, headers = await conn.request(
        "POST",
        "/chat/completions",
        data=nested(depth),
        headers={"content-type": "application/json"},
    )
    assert_openai_error(status, body, 400, "more than 254 levels deep")
    assert body["error"]["code"] == "invalid_json" and headers["x-should-retry"] == "false"
    await conn.still_usable()


async def test_json_nested_254_levels_is_forwarded(conn: Conn) -> None:
    status, body, _ = await conn.request(
        "POST", "/chat/completions", data=nested(254), headers={"content-type": "application/json"}
    )
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == answer_text("deep")


async def test_json_nested_past_the_parser_limit_is_a_400(conn: Conn) -> None:
    status, body, _ = await conn.request(
        "POST", "/chat/completions", data=nested(1026), headers={"content-type": "application/json"}
    )
    assert_openai_error(status, body, 400, "not valid JSON")
    await conn.still_usable()


async def test_a_leading_utf8_bom_is_ignored(conn: Conn) -> None:
    prompt = unique("bom")
    raw = b"\xef\xbb\xbf" + json.dumps(ok_body(prompt)).encode()
    status, body, _ = await conn.request(
        "POST", "/chat/completions", data=raw, headers={"content-type": "application/json"}
    )
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == answer_text(prompt)
    status, body, _ = await conn.request(
        "POST",
        "/chat/completions",
        data=b"\xef\xbb\xbf" + raw,
        headers={"content-type": "application/json"},
    )
    assert_openai_error(status, body, 400, "byte order mark")


# --- fields keel relies on ---------------------------------------------------------------------

FIELD_CASES = [
    pytest.param({"messages": msgs()}, "model", id="model-missing"),
    pytest.param({"model": 3, "messages": msgs()}, "model", id="model-int"),
    pytest.param({"model": "", "messages": msgs()}, "model", id="model-empty"),
    pytest.param({"model": ["solo"], "messages": msgs()}, "model", id="model-list"),
    pytest.param({"model": "solo"}, "messages", id="messages-missing"),
    pytest.param({"model": "solo", "messages": []}, "messages", id="messages-empty"),
    pytest.param({"model": "solo", "messages": "hi"}, "messages", id="messages-string"),
    pytest.param({"model": "solo", "messages": ["hi"]}, "messages", id="message-not-object"),
    pytest.param({"model": "solo", "messages": [{"content": "hi"}]}, "messages", id="role-missing"),
    pytest.param(
        {"model": "solo", "messages": [{"role": 1, "content": "x"}]}, "messages", id="role-int"
    ),
    pytest.param({"model": "solo", "messages": msgs(), "stream": "yes"}, "stream", id="stream-str"),
    pytest.param({"model": "solo", "messages": msgs(), "stream": 1}, "stream", id="stream-int"),
    pytest.param(
        {"model": "solo", "messages": msgs(), "stream_options": "x"},
        "stream_options",
        id="stream-options-str",
    ),
    pytest.param(
        {"model": "solo", "messages": msgs(), "max_tokens": -1},
        "max_tokens",
        id="max-tokens-negative",
    ),
    pytest.param(
        {"model": "solo", "messages": msgs(), "max_tokens": True},
        "max_tokens",
        id="max-tokens-bool",
    ),
    pytest.param(
        {"model": "solo", "messages": msgs(), "max_tokens": "10"}, "max_tokens", id="max-tokens-str"
    ),
    pytest.param(
        {"model": "solo", "messages": msgs(), "max_tokens": 1.5},
        "max_tokens",
        id="max-tokens-float",
    ),
    pytest.param({"model": "solo", "messages": msgs(), "n": 0}, "n", id="n-zero"),
]


@pytest.mark.parametrize(("payload", "param"), FIELD_CASES)
async def test_ill_typed_field_is_a_400_naming_it(
    conn: Conn, payload: dict[str, Any], param: str
) -> None:
    status, body, headers = await conn.request("POST", "/chat/completions", json=payload)
    assert_openai_error(status, body, 400, param)
    assert body["error"]["param"] == param
    assert body["error"]["type"] == "invalid_request_error"
    assert headers["x-should-retry"] == "false"
    assert headers["x-request-id"].startswith("keel-")
    await conn.still_usable()


async def test_unknown_model_is_a_404_listing_the_models(conn: Conn) -> None:
    status, body, _ = await conn.request(
        "POST", "/chat/completions", json={"model": "gpt-nope", "messages": msgs()}
    )
    assert_openai_error(status, body, 404, "gpt-nope", "solo")
    assert body["error"]["code"] == "model_not_found"
    assert body["error"]["param"] == "model"
    await conn.still_usable()


async def test_unknown_model_through_the_sdk(gateway: GatewayProcess) -> None:
    async with AsyncOpenAI(base_url=gateway.base_url, api_key="sk-x", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError) as info:
            await client.chat.completions.create(model="gpt-nope", messages=msgs())
        assert info.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as info2:
            await client.chat.completions.create(model="solo", messages=[])
        assert info2.value.param == "messages"
        prompt = unique()
        done = await client.chat.completions.create(model="solo", messages=msgs(prompt))
        assert done.choices[0].message.content == answer_text(prompt)


# --- size limit --------------------------------------------------------------------------------


async def test_body_over_the_limit_is_a_413(conn: Conn) -> None:
    big = {"model": "solo", "messages": msgs("x" * (MAX_BODY + 1))}
    status, body, _ = await conn.request("POST", "/chat/completions", json=big)
    assert_openai_error(status, body, 413, str(MAX_BODY))
    await conn.still_usable()


async def test_chunked_body_over_the_limit_is_a_413(conn: Conn) -> None:
    """No content-length to check up front: the limit applies while reading."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "solo", "messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY // 4096 + 1):
            yield b"x" * 4096
        yield b'"}]}'

    status, body, _ = await conn.request("POST", "/chat/completions", data=chunks())
    assert_openai_error(status, body, 413, str(MAX_BODY))
    await conn.still_usable()


async def test_body_just_under_the_limit_is_served(conn: Conn) -> None:
    prompt = unique("big")
    payload = {"model": "solo", "messages": msgs(prompt + " " + "y" * (MAX_BODY - 200))}
    assert len(json.dumps(payload)) < MAX_BODY
    status, done, _ = await conn.request("POST", "/chat/completions", json=payload)
    assert status == 200, done


# --- routing -----------------------------------------------------------------------------------


async def test_wrong_method_is_a_405(conn: Conn) -> None:
    status, body, headers = await conn.request("GET", "/chat/completions")
    assert_openai_error(status, body, 405, "GET", "POST")
    assert "POST" in headers["allow"]
    await conn.still_usable()


@pytest.mark.parametrize("path", ["/files", "/images/generations", "/nope", "/../etc/passwd"])
async def test_unknown_path_is_a_404(conn: Conn, path: str) -> None:
    status, body, _ = await conn.request("POST", path, json=ok_body("x"))
    assert_openai_error(status, body, 404)
    await conn.still_usable()


# --- client auth -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locked_gateway(
    sims: tuple[SimProcess, SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    cfg = {
        "server": {"api_keys": [CLIENT_KEY, "sk-keel-other"], "metrics_key": METRICS_KEY},
        "models": {"solo": {"deployments": [{"base_url": sims[0].base_url, "api_key": UPSTREAM_KEY_A}]}},
    }  # fmt: skip
    with spawn_gateway(cfg, workdir=str(tmp_path_factory.mktemp("locked"))) as gw:
        yield gw


METRICS_KEY = "sk-metrics-scraper-42"


@pytest.mark.parametrize(
    "authorization", [None, "Bearer sk-wrong", f"Bearer {CLIENT_KEY}", f"Basic {METRICS_KEY}"]
)
async def test_metrics_need_the_metrics_key_when_one_is_set(
    locked_gateway: GatewayProcess, authorization: str | None
) -> None:
    # A client key is not an operator's: it does not open /metrics either.
    url = locked_gateway.base_url.removesuffix("/v1") + "/metrics"
    headers = {} if authorization is None else {"authorization": authorization}
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers=headers) as r:
            assert_openai_error(r.status, await r.json(), 401, "metrics key")
        async with s.get(url, headers={"authorization": f"Bearer {METRICS_KEY}"}) as r:
            assert r.status == 200
            assert "keel_upstream_attempts" in await r.text()


async def test_metrics_follow_the_client_auth_rules_without_a_metrics_key(
    sims: tuple[SimProcess, SimProcess], tmp_path: Path
) -> None:
    """No server.metrics_key: /metrics asks for what /v1/models asks for (a client's key, or
    the admin key); without one, the same 401 as the API — key names and budgets are not
    shown to anyone who could not call the gateway."""
    cfg = {
        "server": {"api_keys": [CLIENT_KEY], "admin_key": "sk-admin-metrics-7"},
        "models": {"solo": {"deployments": [{"base_url": sims[0].base_url, "api_key": UPSTREAM_KEY_A}]}},
    }  # fmt: skip
    with spawn_gateway(cfg, workdir=str(tmp_path)) as gw:
        url = gw.base_url.removesuffix("/v1") + "/metrics"
        async with aiohttp.ClientSession() as s:
            for authorization in (None, "Bearer sk-wrong"):
                headers = {} if authorization is None else {"authorization": authorization}
                async with s.get(url, headers=headers) as r:
                    body = await r.json()
                    assert_openai_error(r.status, body, 401)
                    assert "sk-wrong" not in str(body)
                async with s.get(gw.base_url + "/models", headers=headers) as r:
                    assert r.status == 401  # the same rule
            for key in (CLIENT_KEY, "sk-admin-metrics-7"):
                async with s.get(url, headers={"authorization": f"Bearer {key}"}) as r:
                    assert r.status == 200 and "keel_upstream_attempts" in await r.text()


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer ", "Bearer sk-wrong", f"Basic {CLIENT_KEY}", f"Bearer {CLIENT_KEY}x"],
)
async def test_wrong_or_missing_client_key_is_a_401(
    locked_gateway: GatewayProcess, authorization: str | None
) -> None:
    c = Conn(locked_gateway.base_url)
    try:
        headers = {} if authorization is None else {"authorization": authorization}
        status, body, h = await c.request(
            "POST", "/chat/completions", json=ok_body("x"), headers=headers
        )
        assert_openai_error(status, body, 401, "API key")
        assert body["error"]["code"] == "invalid_api_key"
        assert h["x-should-retry"] == "false"
        assert CLIENT_KEY not in json.dumps(body)
        c.session.headers["authorization"] = f"Bearer {CLIENT_KEY}"
        await c.still_usable()
    finally:
        await c.session.close()


@pytest.mark.parametrize(
    "token", [b"sk-\xff\xfe", "sk-ключ".encode(), b"sk-\x80" + CLIENT_KEY.encode()[3:]]
)
async def test_a_key_that_is_not_ascii_or_not_utf8_is_a_401(
    locked_gateway: GatewayProcess, token: bytes
) -> None:
    # Header bytes are the client's: aiohttp decodes invalid UTF-8 to surrogates, and the
    # key check must refuse them like any wrong key, not fail on them (a 500).
    host, port = locked_gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = json.dumps(ok_body("x")).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: keel\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + token + b"\r\nContent-Length: " + str(len(data)).encode()
        + b"\r\n\r\n" + data
    )  # fmt: skip
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status = int(head.split()[1])
    length = int(
        next(ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")).split(
            b":"
        )[1]
    )
    body = json.loads(await reader.readexactly(length))
    writer.close()
    assert_openai_error(status, body, 401, "API key")


@pytest.mark.parametrize("authorization", [None, "Bearer sk-wrong", f"Basic {CLIENT_KEY}"])
async def test_the_model_list_is_behind_the_client_key(
    locked_gateway: GatewayProcess, authorization: str | None
) -> None:
    c = Conn(locked_gateway.base_url)
    try:
        headers = {} if authorization is None else {"authorization": authorization}
        status, body, h = await c.request("GET", "/models", headers=headers)
        assert_openai_error(status, body, 401, "API key")
        assert body["error"]["code"] == "invalid_api_key" and h["x-should-retry"] == "false"
        status, body, _ = await c.request(
            "GET", "/models", headers={"authorization": f"Bearer {CLIENT_KEY}"}
        )
        assert status == 200 and [m["id"] for m in body["data"]] == ["solo"]
        # The health check stays open: load balancers probe it without a key.
        async with c.session.get(locked_gateway.url + "/healthz") as r:
            assert r.status == 200
    finally:
        await c.session.close()


async def test_client_key_through_the_sdk(locked_gateway: GatewayProcess) -> None:
    async with AsyncOpenAI(
        base_url=locked_gateway.base_url, api_key="sk-wrong", max_retries=0
    ) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            await bad.chat.completions.create(model="solo", messages=msgs())
        assert info.value.code == "invalid_api_key"
    async with AsyncOpenAI(
        base_url=locked_gateway.base_url, api_key="sk-keel-other", max_retries=0
    ) as good:
        prompt = unique()
        stream = await good.chat.completions.create(
            model="solo", messages=msgs(prompt), stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == answer_text(prompt)


# --- keel's own bugs: still OpenAI-shaped, never a corrupted stream ----------------------------


@pytest.fixture
async def buggy_app() -> AsyncIterator[str]:
    """The gateway's last-resort guard around handlers that fail on purpose."""
    from aiohttp import web

    from keel.gateway._app import guarded

    async def before(request: web.Request) -> web.StreamResponse:
        raise RuntimeError("bug before anything was sent")

    async def mid_stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n')
        raise RuntimeError("bug after the commit")

    app = web.Application()
    app.router.add_post("/before", guarded(before))
    app.router.add_post("/mid", guarded(mid_stream))
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_internal_error_before_the_commit_is_an_openai_shaped_500(buggy_app: str) -> None:
    async with aiohttp.ClientSession() as s, s.post(buggy_app + "/before") as r:
        body = await r.json()
    assert_openai_error(r.status, body, 500, "internal error")
    assert "bug" not in body["error"]["message"]  # no internals


async def test_internal_error_after_the_commit_ends_the_stream_well_formed(buggy_app: str) -> None:
    async with aiohttp.ClientSession() as s, s.post(buggy_app + "/mid") as r:
        assert r.status == 200
        raw = await r.read()  # a complete chunked body: no "HTTP/1.1 500" inside it
    frames = [f for f in raw.split(b"\n\n") if f]
    assert frames[0].startswith(b"data: {")
    assert json.loads(frames[1][6:])["error"]["type"] == "server_error"
    assert frames[2:] == [b"data: [DONE]"]
