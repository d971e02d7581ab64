"""The upstream simulator, observed over real loopback sockets.

Happy paths go through the official ``openai`` SDK; faults are checked on the wire with raw
aiohttp (status, headers, body shape, the exact bytes of the stream and how it ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import pytest

from keel.sim import (
    CONTINUE_MARKER,
    DirectiveError,
    Simulator,
    answer_for,
    answer_text,
    go_duration,
    key_fingerprint,
    mask_key,
    prompt_tokens,
    strip_directives,
)
from keel.sim._answer import default_overlap, pieces_from
from keel.sim._faults import parse_directives, parse_key_faults, parse_rates
from keel.sim._stream import cut_point, frag_pieces
from keel.testing import spawn_listening, spawn_sim

# -- helpers ---------------------------------------------------------------------------------


_clients: list[openai.AsyncOpenAI] = []


def client(sim: Simulator, key: str = "sk-test") -> openai.AsyncOpenAI:
    c = openai.AsyncOpenAI(base_url=sim.base_url, api_key=key, max_retries=0)
    _clients.append(c)
    return c


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _clients:
        await _clients.pop().close()


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def sdk_stream(c: openai.AsyncOpenAI, messages: list[dict[str, Any]], **kw: Any) -> Any:
    """(text, finish_reason, usage) of one streamed completion through the SDK."""
    stream = await c.chat.completions.create(
        model="m",
        messages=messages,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
        **kw,
    )
    text, finish, usage = "", None, None
    async for ch in stream:
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            finish = ch.choices[0].finish_reason or finish
        usage = ch.usage or usage
    return text, finish, usage


@dataclass
class Raw:
    status: int
    headers: Mapping[str, str]  # case-insensitive
    body: bytes
    error: Exception | None = None  # what ended reading the body, if not a clean end
    http_chunks: list[bytes] = field(default_factory=list)

    def frames(self) -> list[str]:
        """The SSE ``data`` payloads (the test's own minimal parser)."""
        text = self.body.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
        out = []
        for block in text.split("\n\n"):
            data = [ln[6:] for ln in block.split("\n") if ln.startswith("data: ")]
            if data:
                out.append("\n".join(data))
        return out

    def chunks(self) -> list[dict[str, Any]]:
        """Frames that decode as JSON objects (a tolerant client would skip the others)."""
        out = []
        for f in self.frames():
            try:
                obj = json.loads(f)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out

    def text(self) -> str:
        return "".join(
            c["choices"][0]["delta"].get("content") or "" for c in self.chunks() if c.get("choices")
        )


async def fetch(
    sim: Simulator,
    content: str,
    *,
    stream: bool = True,
    headers: dict[str, str] | None = None,
    key: str = "sk-test",
    **body: Any,
) -> Raw:
    payload = {"model": "m", "messages": user(content), "stream": stream, **body}
    hdrs = {"authorization": f"Bearer {key}", **(headers or {})}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{sim.base_url}/chat/completions", json=payload, headers=hdrs) as resp,
    ):
        raw = Raw(resp.status, resp.headers, b"")
        data = bytearray()
        try:
            async for chunk, _ in resp.content.iter_chunks():
                data += chunk
                raw.http_chunks.append(chunk)
        except aiohttp.ClientPayloadError as e:
            raw.error = e
        raw.body = bytes(data)
        return raw


async def last_closed(sim: Simulator) -> Any:
    log = await sim.wait_for(lambda log: bool(log) and log[-1].t_close is not None)
    return log[-1]


# -- pure parts ------------------------------------------------------------------------------


def test_answers_are_deterministic_prefix_consistent_and_multibyte() -> None:
    assert answer_for("hello", 40)[:24] == answer_for("hello", 24)
    assert answer_text("hello") == answer_text("  hello [[sim:r429*1,len=3]] ")
    assert answer_text("hello") != answer_text("hello!")
    text = "".join(answer_text(f"p{i}", 64) for i in range(20))
    assert any(len(ch.encode()) == 3 for ch in text)  # CJK
    assert any(len(ch.encode()) == 4 for ch in text)  # emoji
    assert strip_directives("a [[sim@b:e500]] b") == "a  b"


def test_pieces_and_overlap() -> None:
    toks = ["ab", "cd", "ef"]
    assert pieces_from(toks, 3) == ["d", "ef"]
    assert pieces_from(toks, 2) == ["cd", "ef"]
    assert pieces_from(toks, 6) == []
    assert default_overlap(toks, 4) == 4  # the last two tokens: "abcd"[0:]
    assert default_overlap(toks, 5) == 3  # "cd" + "e"


def test_directive_parsing_and_errors() -> None:
    d = parse_directives("x [[sim:trunc=3*2,len=40,tool]] [[sim@b:e500]]", "a")
    assert d is not None and [(f.name, f.value, f.limit) for f in d.faults] == [("trunc", 3, 2)]
    assert (d.length, d.tool) == (40, True)
    assert parse_directives("plain prompt", "a") is None
    for bad in ("[[sim:nonsense]]", "[[sim:crlf=3]]", "[[sim:len]]", "[[sim:trunc=x]]"):
        with pytest.raises(DirectiveError):
            parse_directives(bad, "a")
    with pytest.raises(DirectiveError):
        parse_rates("r429=0.7,e500=0.5")
    assert parse_key_faults("sk-a=auth,sk-b=r429=0.5")["sk-b"].value == 0.5


def test_small_helpers() -> None:
    assert [go_duration(s) for s in (0.02, 0.644, 1.5, 360, 86400)] == [
        "20ms", "644ms", "1.5s", "6m0s", "24h0m0s",
    ]  # fmt: skip
    assert mask_key("sk-1234567890abcdef") == "sk-************cdef"
    assert mask_key("sk-dead") == "*******"
    assert key_fingerprint("sk-test") != "sk-test"
    data = "数据".encode() + b"xyz"
    assert 0x80 <= data[cut_point(data)] < 0xC0
    assert b"".join(frag_pieces(data)) == data and len(frag_pieces(data)) > 1


# -- happy paths through the SDK ---------------------------------------------------------------


async def test_exact_text_and_usage(sim: Simulator) -> None:
    c = client(sim)
    msgs = user("hello")
    r = await c.chat.completions.create(model="m", messages=msgs)  # type: ignore[arg-type]
    assert r.choices[0].message.content == answer_text("hello")
    assert r.choices[0].finish_reason == "stop" and r.model == "m"
    assert r.usage is not None and r.usage.completion_tokens == 24
    assert r.usage.prompt_tokens == prompt_tokens(msgs)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24
    text, finish, usage = await sdk_stream(c, msgs)
    assert (text, finish) == (answer_text("hello"), "stop")
    assert (usage.completion_tokens, usage.total_tokens) == (24, prompt_tokens(msgs) + 24)
    entry = (await last_closed(sim)).to_dict()
    assert entry | {"stream": True, "status": 200, "tokens": 24, "finished": True} == entry
    assert entry["key"] == key_fingerprint("sk-test") and entry["prompt"] == "hello"


async def test_stream_wire_shape(sim: Simulator) -> None:
    raw = await fetch(sim, "shape", stream_options={"include_usage": True})
    assert raw.headers["Content-Type"].startswith("text/event-stream") and raw.error is None
    assert raw.headers["x-request-id"]
    chunks = raw.chunks()
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "m" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 24
    assert raw.frames()[-1] == "[DONE]" and raw.body.endswith(b"data: [DONE]\n\n")
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]] == answer_for("shape")


async def test_length_max_tokens_and_len_directive(sim: Simulator) -> None:
    c = client(sim)
    r = await c.chat.completions.create(model="m", messages=user("cap"), max_tokens=5)  # type: ignore[arg-type]
    assert r.choices[0].message.content == "".join(answer_for("cap")[:5])
    assert r.choices[0].finish_reason == "length" and r.usage and r.usage.completion_tokens == 5
    text, finish, usage = await sdk_stream(c, user("cap"), max_completion_tokens=7)
    assert (text, finish, usage.completion_tokens) == ("".join(answer_for("cap")[:7]), "length", 7)
    text, finish, _ = await sdk_stream(c, user("cap [[sim:len=40]]"))
    assert (text, finish) == (answer_text("cap", 40), "stop")


async def test_models(sim: Simulator) -> None:
    models = await client(sim).models.list()
    assert [m.id for m in models.data] == ["sim-model"]


@pytest.mark.parametrize("flag", [None, "partial", "prefix"])
async def test_prefill_continuation(sim: Simulator, flag: str | None) -> None:
    toks = answer_for("prefill")
    i = next(i for i, t in enumerate(toks) if i > 3 and len(t) >= 2)
    prefix = "".join(toks[:i]) + toks[i][:1]  # ends inside token i
    assistant: dict[str, Any] = {"role": "assistant", "content": prefix}
    if flag:
        assistant[flag] = True
    msgs = [{"role": "system", "content": "be brief"}, *user("prefill"), assistant]
    raw = await fetch(sim, "", messages=msgs, stream_options={"include_usage": True})
    contents = [c["choices"][0]["delta"].get("content") for c in raw.chunks()[1:-2]]
    assert contents == [toks[i][1:], *toks[i + 1 :]]
    assert raw.chunks()[-1]["usage"]["completion_tokens"] == len(toks) - i
    assert prefix + raw.text() == answer_text("prefill")
    entry = await last_closed(sim)
    assert (entry.continuation, entry.continuation_kind) == (True, "prefill")
    # Not a prefix of the answer: an ordinary answer.
    other = [*user("prefill"), {"role": "assistant", "content": "something else"}]
    text, _, _ = await sdk_stream(client(sim), other)
    assert text == answer_text("prefill")


async def test_instruct_continuation_repeats_overlap(sim: Simulator) -> None:
    full = answer_text("story [[sim:len=30]]", 30)
    toks = answer_for("story", 30)
    sent = "".join(toks[:10])
    msgs = [
        *user("story [[sim:len=30]]"),
        {"role": "assistant", "content": sent},
        *user(f"{CONTINUE_MARKER} Continue exactly where you stopped."),
    ]
    text, finish, usage = await sdk_stream(client(sim), msgs)
    overlap = len(toks[8]) + len(toks[9])
    assert (text, finish) == (full[len(sent) - overlap :], "stop")
    assert usage.completion_tokens == 22
    msgs[-1] = user(f"{CONTINUE_MARKER} [[sim:overlap=3]]")[0]
    text, _, _ = await sdk_stream(client(sim), msgs)
    assert text == full[len(sent) - 3 :]
    assert (await last_closed(sim)).continuation_kind == "instruct"


async def test_tool_call_stream_and_non_stream(sim: Simulator) -> None:
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    ]
    stream = await client(sim).chat.completions.create(
        model="m",
        messages=user("weather? [[sim:tool]]"),  # type: ignore[arg-type]
        tools=tools,  # type: ignore[arg-type]
        stream=True,
    )
    args, names, ids, finish, n = "", set(), set(), None, 0
    async for ch in stream:
        d = ch.choices[0].delta
        for tc in d.tool_calls or []:
            n += 1
            ids.add(tc.id) if tc.id else None
            names.add(tc.function.name) if tc.function and tc.function.name else None
            args += (tc.function.arguments or "") if tc.function else ""
        finish = ch.choices[0].finish_reason or finish
    assert names == {"get_weather"} and len(ids) == 1 and next(iter(ids)).startswith("call_")
    assert json.loads(args)["city"] == "北京" and finish == "tool_calls" and n > 4
    r = await client(sim).chat.completions.create(
        model="m",
        messages=user("weather?"),  # type: ignore[arg-type]
        tools=tools,  # type: ignore[arg-type]
        tool_choice="required",
    )
    call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.arguments == args and call.id in ids  # type: ignore[union-attr]
    assert r.choices[0].finish_reason == "tool_calls"


# -- errors before any byte ------------------------------------------------------------------

E = openai
ERRORS: list[tuple[str, int, type[Exception], dict[str, Any], dict[str, str]]] = [
    ("r429", 429, E.RateLimitError, {"code": "rate_limit_exceeded", "type": "requests"},
     {"retry-after-ms": "20", "x-ratelimit-reset-requests": "20ms"}),
    ("r429=0.5", 429, E.RateLimitError, {"code": "rate_limit_exceeded"},
     {"retry-after": "0.5", "retry-after-ms": "500", "x-ratelimit-remaining-requests": "0"}),
    ("r429_ds", 429, E.RateLimitError, {"code": "rate_limit_error"}, {}),
    ("r429_long", 429, E.RateLimitError, {"code": "429"}, {"retry-after": "86400"}),
    ("quota", 429, E.RateLimitError, {"code": "insufficient_quota"}, {}),
    ("quota_ds", 429, E.RateLimitError, {"code": "insufficient_quota"}, {}),
    ("free_quota_ds", 429, E.RateLimitError, {"message": "Free allocated quota exceeded."}, {}),
    ("too_large", 429, E.RateLimitError, {"code": "rate_limit_exceeded", "type": "tokens"}, {}),
    ("auth", 401, E.AuthenticationError, {"code": "invalid_api_key"}, {}),
    ("arrearage", 400, E.BadRequestError, {"code": "Arrearage", "type": "Arrearage"}, {}),
    ("balance", 402, E.APIStatusError, {"message": "Insufficient Balance"}, {}),
    ("ctx", 400, E.BadRequestError, {"code": "context_length_exceeded", "param": "messages"}, {}),
    ("inspect", 400, E.BadRequestError, {"code": "data_inspection_failed"}, {}),
    ("content_filter_az", 400, E.BadRequestError, {"code": "content_filter"}, {}),
    ("e500", 500, E.InternalServerError, {"type": "server_error"}, {}),
    ("e503", 503, E.InternalServerError, {"code": "server_is_overloaded"}, {}),
    ("e529", 529, E.InternalServerError, {"type": "overloaded_error"}, {"x-should-retry": "true"}),
    ("moonshot", 429, E.RateLimitError, {"type": "engine_overloaded_error"}, {}),
]  # fmt: skip


@pytest.mark.parametrize(("fault", "status", "exc", "error", "headers"), ERRORS)
async def test_error_faults(
    sim: Simulator,
    fault: str,
    status: int,
    exc: type[Exception],
    error: dict[str, Any],
    headers: dict[str, str],
) -> None:
    c = client(sim, key="sk-proj-abcdefghijklmnop")
    with pytest.raises(exc) as info:
        await c.chat.completions.create(
            model="m",
            messages=user("err"),  # type: ignore[arg-type]
            extra_headers={"x-sim-fault": fault},
        )
    resp = info.value.response  # type: ignore[attr-defined]
    assert resp.status_code == status and resp.headers["x-request-id"]
    body = resp.json()
    assert body["error"] | error == body["error"]
    assert {k: resp.headers.get(k) for k in headers} == headers
    assert "abcdefghijklmnop" not in resp.text  # never echo the key
    entry = await last_closed(sim)
    assert (entry.status, entry.fault, entry.finished) == (status, fault.split("=")[0], False)


async def test_error_details(sim: Simulator) -> None:
    r = await fetch(sim, "e", stream=False, headers={"x-sim-fault": "r429"})
    assert json.loads(r.body)["error"]["message"].split(". ")[1] == "Please try again in 20ms"
    r = await fetch(sim, "e", headers={"x-sim-fault": "auth"}, key="sk-proj-abcdefghijklmnop")
    message = json.loads(r.body)["error"]["message"]
    assert "sk-*****************mnop" in message and mask_key("sk-proj-abcdefghijklmnop") in message
    r = await fetch(sim, "e", headers={"x-sim-fault": "quota_ds"})
    assert "#token-limit" in json.loads(r.body)["error"]["message"]
    assert json.loads(r.body)["request_id"]
    r = await fetch(sim, "e", headers={"x-sim-fault": "content_filter_az"})
    assert json.loads(r.body)["error"]["innererror"]["code"] == "ResponsibleAIPolicyViolation"
    for fault, status in (("e502_html", 502), ("e504_html", 504)):
        r = await fetch(sim, "e", headers={"x-sim-fault": fault})
        assert r.status == status and r.headers["Content-Type"].startswith("text/html")
        assert r.body.startswith(b"<html>") and str(status).encode() in r.body


@pytest.mark.parametrize(
    ("dialect", "expect"),
    [
        ("dashscope", {"error": {"code": "rate_limit_error"}, "request_id": ...}),
        ("anthropic", {"type": "error", "error": {"type": "rate_limit_error"}}),
        ("azure", {"error": {"code": "429"}}),
    ],
)
async def test_generic_r429_follows_dialect(dialect: str, expect: dict[str, Any]) -> None:
    async with Simulator(dialect=dialect) as sim:
        body = json.loads((await fetch(sim, "d", headers={"x-sim-fault": "r429"})).body)
    for k, v in expect.items():
        assert k in body and (v is ... or body[k] == v or body[k] | v == body[k])


async def test_reset(sim: Simulator) -> None:
    with pytest.raises(openai.APIConnectionError):
        await client(sim).chat.completions.create(
            model="m",
            messages=user("[[sim:reset]]"),  # type: ignore[arg-type]
        )
    with pytest.raises((aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)):
        await fetch(sim, "x", headers={"x-sim-fault": "reset"})
    assert (await last_closed(sim)).status is None


# -- failures inside the stream --------------------------------------------------------------


async def test_trunc_stream_and_non_stream(sim: Simulator) -> None:
    raw = await fetch(sim, "trunc me [[sim:trunc=3]]")
    assert isinstance(raw.error, aiohttp.ClientPayloadError)
    assert raw.text() == "".join(answer_for("trunc me")[:3]) and b"[DONE]" not in raw.body
    entry = await last_closed(sim)
    assert (entry.status, entry.tokens, entry.finished, entry.fault) == (200, 3, False, "trunc")
    raw = await fetch(sim, "trunc me [[sim:trunc]]", stream=False)
    assert isinstance(raw.error, aiohttp.ClientPayloadError) and raw.body.startswith(b'{"id"')
    with pytest.raises(openai.APIError):
        await sdk_stream(client(sim), user("trunc me [[sim:trunc=3]]"))


async def test_trunc_mid_cuts_inside_a_character(sim: Simulator) -> None:
    toks = answer_for("trunc me")
    n = next(i for i, t in enumerate(toks) if not t.isascii())
    raw = await fetch(sim, f"trunc me [[sim:trunc_mid={n}]]")
    assert isinstance(raw.error, aiohttp.ClientPayloadError)
    tail = raw.body.rsplit(b"\n\n", 1)[1]
    assert tail.startswith(b"data: {") and not raw.body.endswith(b"\n")
    with pytest.raises(UnicodeDecodeError):
        tail.decode()
    assert raw.text() == "".join(toks[:n])


async def test_stall_until_client_leaves(sim: Simulator) -> None:
    async with aiohttp.ClientSession() as s:
        payload = {"model": "m", "stream": True, "messages": user("stall [[sim:stall=2]]")}
        async with s.post(f"{sim.base_url}/chat/completions", json=payload) as resp:
            frames = [await resp.content.readuntil(b"\n\n") for _ in range(3)]
            assert b'"role"' in frames[0] and b'"content"' in frames[2]
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await resp.content.read(1)
            left = time.monotonic()
    entry = await last_closed(sim)
    assert (entry.client_disconnected, entry.tokens, entry.finished) == (True, 2, False)
    assert entry.t_close is not None and entry.t_close - left < 0.5


async def test_stall_ka_sends_keepalives(sim: Simulator) -> None:
    async with aiohttp.ClientSession() as s:
        payload = {"model": "m", "stream": True, "messages": user("ka [[sim:stall_ka=1]]")}
        async with s.post(f"{sim.base_url}/chat/completions", json=payload) as resp:
            frames = [await resp.content.readuntil(b"\n\n") for _ in range(4)]
    assert frames[2:] == [b": keep-alive\n\n"] * 2
    assert (await last_closed(sim)).client_disconnected


async def test_client_leaving_mid_stream_stops_the_handler(sim: Simulator) -> None:
    async with aiohttp.ClientSession() as s:
        payload = {"model": "m", "stream": True, "messages": user("slow [[sim:delay=0.05]]")}
        async with s.post(f"{sim.base_url}/chat/completions", json=payload) as resp:
            for _ in range(3):
                await resp.content.readuntil(b"\n\n")
            left = time.monotonic()
    entry = await last_closed(sim)
    assert entry.client_disconnected and not entry.finished and 1 <= entry.tokens < 24
    assert entry.t_close is not None and entry.t_close - left < 0.5  # ms in practice


async def test_mid_stream_error_frames(sim: Simulator) -> None:
    raw = await fetch(sim, "mid [[sim:err_mid=2]]")
    assert raw.frames()[-1] == "[DONE]" and raw.error is None
    err = json.loads(raw.frames()[-2])["error"]
    assert err["type"] == "server_error" and err["message"].startswith("The server experienced")
    assert raw.text() == "".join(answer_for("mid")[:2])
    with pytest.raises(openai.APIError):
        await sdk_stream(client(sim), user("mid [[sim:err_mid=2]]"))
    raw = await fetch(sim, "mid [[sim:inspect_mid=2]]")
    last = json.loads(raw.frames()[-1])
    assert last["error"]["code"] == "data_inspection_failed" and last["request_id"]
    assert "Output data" in last["error"]["message"] and b"[DONE]" not in raw.body
    raw = await fetch(sim, "mid [[sim:anth_err_mid=2]]")
    assert raw.body.endswith(b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"'
                             b',"message":"Overloaded"},"request_id":"' + raw.headers["x-request-id"]
                             .encode() + b'"}\n\n')  # fmt: skip
    r = await fetch(sim, "mid [[sim:err_mid]]", stream=False)
    assert r.status == 500


@pytest.mark.parametrize(
    ("fault", "finish"), [("no_finish", "absent"), ("null_finish", None), ("empty_finish", "")]
)
async def test_missing_finish_reason(sim: Simulator, fault: str, finish: str | None) -> None:
    raw = await fetch(sim, f"fin [[sim:{fault}]]")
    choices = [c["choices"][0] for c in raw.chunks()]
    assert all(c.get("finish_reason", "absent") in (finish, None) for c in choices)
    assert choices[-1].get("finish_reason", "absent") == finish and raw.text() == answer_text("fin")
    body = json.loads((await fetch(sim, f"fin [[sim:{fault}]]", stream=False)).body)
    assert body["choices"][0].get("finish_reason", "absent") == finish


async def test_no_done(sim: Simulator) -> None:
    raw = await fetch(sim, "nd [[sim:no_done]]")
    assert raw.error is None and b"[DONE]" not in raw.body and raw.text() == answer_text("nd")
    assert raw.chunks()[-1]["choices"][0]["finish_reason"] == "stop"
    assert (await last_closed(sim)).finished


async def test_garbage_lines_keep_the_text_exact(sim: Simulator) -> None:
    raw = await fetch(sim, "junk [[sim:garbage]]")
    assert b"data: ping\n\n" in raw.body and b'\n{"choices": [\n\n' in raw.body
    assert b"event: ping\ndata: {}\n\n" in raw.body
    assert raw.text() == answer_text("junk") and raw.frames()[-1] == "[DONE]"
    raw = await fetch(sim, "junk [[sim:garbage_fatal=2]]")
    bad = [f for f in raw.frames() if f.startswith("{") and not _is_json(f)]
    assert len(bad) == 1 and answer_for("junk")[2] not in bad[0]
    assert raw.text() == answer_text("junk")  # the intact chunks all follow
    raw = await fetch(sim, "junk [[sim:garbage_fatal=99]]")  # clamped: before the finish chunk
    assert len([f for f in raw.frames() if not _is_json(f)]) == 2  # the cut one and [DONE]


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


async def test_line_endings_and_keepalive(sim: Simulator) -> None:
    raw = await fetch(sim, "eol [[sim:crlf]]")
    assert raw.body.count(b"\r\n\r\n") == len(raw.frames()) and raw.text() == answer_text("eol")
    raw = await fetch(sim, "eol [[sim:cr]]")
    assert b"\n" not in raw.body and raw.body.endswith(b"data: [DONE]\r\r")
    assert raw.text() == answer_text("eol")
    raw = await fetch(sim, "eol [[sim:keepalive]]")
    assert raw.body.count(b": keep-alive\n\n") > 5 and raw.text() == answer_text("eol")


async def test_frag_splits_frames_inside_characters(sim: Simulator) -> None:
    raw = await fetch(sim, "frag [[sim:frag]]")
    assert raw.text() == answer_text("frag")
    assert len(raw.http_chunks) > 2 * len(raw.frames())
    assert any(_not_utf8(c) for c in raw.http_chunks)
    text, _, _ = await sdk_stream(client(sim), user("frag [[sim:frag]]"))
    assert text == answer_text("frag")


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return True
    return False


async def test_slow_first_and_slow_token(sim: Simulator) -> None:
    t0 = time.monotonic()
    r = await client(sim).chat.completions.create(
        model="m",
        messages=user("slow [[sim:slow_first=0.2]]"),  # type: ignore[arg-type]
    )
    assert time.monotonic() - t0 >= 0.2 and r.choices[0].message.content == answer_text("slow")
    async with aiohttp.ClientSession() as s:
        payload = {"model": "m", "stream": True, "messages": user("slow [[sim:slow_token=0.2]]")}
        async with s.post(f"{sim.base_url}/chat/completions", json=payload) as resp:
            await resp.content.readuntil(b"\n\n")  # the role chunk comes at once
            t_role = time.monotonic()
            await resp.content.readuntil(b"\n\n")
            t_first = time.monotonic()
    assert t_first - t_role >= 0.18  # the role chunk went out before the pause


# -- selection: seeds, counters, targeting, keys, concurrency --------------------------------


async def _fault_sequence(sim: Simulator, n: int) -> list[str | None]:
    start = sim.log[-1].seq if sim.log else 0
    for i in range(n):
        try:
            await fetch(sim, f"p{i}", stream=False)
        except aiohttp.ClientError:
            pass
    return [e.fault for e in sim.log_since(start)]


async def test_seeded_faults_are_reproducible() -> None:
    async with Simulator(faults="r429=0.3,e500=0.2,trunc=0.1", seed=7) as sim:
        first = await _fault_sequence(sim, 30)
        sim.reset()
        assert await _fault_sequence(sim, 30) == first
        sim.configure(seed=8)
        assert await _fault_sequence(sim, 30) != first
    assert {"r429", "e500", "trunc", None} == set(first)
    async with Simulator(faults="r429=0.3,e500=0.2,trunc=0.1", seed=7) as other:
        assert await _fault_sequence(other, 30) == first


async def test_attempt_counter_then_exact_text(sim: Simulator) -> None:
    c = client(sim)
    with pytest.raises(openai.RateLimitError):
        await sdk_stream(c, user("count me [[sim:r429*1]]"))
    text, _, _ = await sdk_stream(c, user("count me [[sim:r429*1]]"))
    assert text == answer_text("count me")
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            await sdk_stream(c, user("twice"), extra_headers={"x-sim-fault": "e500*2"})
    assert (await sdk_stream(c, user("twice"), extra_headers={"x-sim-fault": "e500*2"}))[1]


async def test_targeting_by_name(sim: Simulator) -> None:
    c = client(sim)
    text, _, _ = await sdk_stream(c, user("t [[sim@b:e500]]"))
    assert text == answer_text("t")
    text, _, _ = await sdk_stream(c, user("t"), extra_headers={"x-sim-fault": "@b:e500"})
    assert text == answer_text("t")
    with pytest.raises(openai.InternalServerError):
        await sdk_stream(c, user("t [[sim@a:e500]]"))


async def test_key_faults_and_allow_list() -> None:
    async with Simulator(key_faults="sk-dead=auth,sk-broke=quota", keys="sk-ok,sk-dead") as sim:
        assert (await fetch(sim, "k", key="sk-ok")).status == 200
        assert (await fetch(sim, "k", key="sk-dead")).status == 401
        assert (await fetch(sim, "k", key="sk-other")).status == 401
        sim.configure(keys="")
        r = await fetch(sim, "k", key="sk-broke")
        assert r.status == 429 and json.loads(r.body)["error"]["code"] == "insufficient_quota"
        assert sim.log[-1].key == key_fingerprint("sk-broke")


async def test_bad_requests(sim: Simulator) -> None:
    r = await fetch(sim, "typo [[sim:trnc=3]]")
    assert r.status == 400 and "trnc" in json.loads(r.body)["error"]["message"]
    r = await fetch(sim, "x", messages=[])
    assert r.status == 400


async def test_concurrency_limit(sim: Simulator) -> None:
    sim.configure(max_concurrency=2)
    async with aiohttp.ClientSession() as s:
        payload = {"model": "m", "stream": True, "messages": user("hold [[sim:stall=0]]")}
        url = f"{sim.base_url}/chat/completions"
        async with s.post(url, json=payload), s.post(url, json=payload):
            r = await fetch(sim, "third")
            assert r.status == 429 and r.headers["retry-after-ms"] == "20"
            assert sim.stats()["in_flight"] == 2 and sim.log[-1].fault == "concurrency"
    await sim.wait_for(lambda log: all(e.t_close is not None for e in log))
    assert sim.stats()["max_in_flight"] == 3 and sim.stats()["in_flight"] == 0


async def test_rate_window_and_latency() -> None:
    """--rate-limit: N requests per fixed window, then 429 with a hint to the next window;
    successes carry OpenAI's x-ratelimit-*-requests headers. --latency delays every answer."""
    # A window of a million seconds: the test cannot straddle a window boundary.
    async with Simulator(rate_limit=2, rate_window=1e6, latency=0.05) as sim:
        t0 = time.monotonic()
        first = await fetch(sim, "w1", stream=False)
        assert time.monotonic() - t0 >= 0.05
        assert first.status == 200
        assert first.headers["x-ratelimit-limit-requests"] == str(round(2 * 60 / 1e6))
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        second = await fetch(sim, "w2")
        assert second.status == 200 and second.headers["x-ratelimit-remaining-requests"] == "0"
        third = await fetch(sim, "w3")
        assert (
            third.status == 429 and json.loads(third.body)["error"]["code"] == "rate_limit_exceeded"
        )
        assert float(third.headers["retry-after-ms"]) > 1000
        assert sim.log[-1].fault == "window"
        sim.configure(rate_limit=0, latency=0.0)
        assert (await fetch(sim, "w4")).status == 200
        assert "x-ratelimit-limit-requests" not in (await fetch(sim, "w5")).headers


async def test_admin_endpoints(sim: Simulator) -> None:
    await fetch(sim, "one")
    await fetch(sim, "two [[sim:e500]]")
    root = sim.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as s:
        log = await (await s.get(f"{root}/_sim/log?since=1")).json()
        assert [e["prompt"] for e in log] == ["two"]
        stats = await (await s.get(f"{root}/_sim/stats")).json()
        assert stats["by_status"] == {"200": 1, "500": 1} and stats["by_fault"] == {"e500": 1}
        cfg = await (await s.post(f"{root}/_sim/config", json={"length": 5})).json()
        assert cfg["length"] == 5
        bad = await s.post(f"{root}/_sim/config", json={"faults": "nope=1"})
        assert bad.status == 400
        await s.delete(f"{root}/_sim/log")
    assert sim.log == []
    assert (await fetch(sim, "short")).text() == answer_text("short", 5)


async def test_azure_path_api_key_header_and_delays() -> None:
    async with Simulator(token_delay=0.01, first_token_delay=0.1) as sim:
        url = sim.base_url.removesuffix("/v1") + "/openai/deployments/gpt4o/chat/completions"
        payload = {"messages": user("az"), "stream": True}
        t0 = time.monotonic()
        async with (
            aiohttp.ClientSession() as s,
            s.post(url, json=payload, headers={"api-key": "az-key"}) as resp,
        ):
            raw = Raw(resp.status, resp.headers, await resp.read())
        assert time.monotonic() - t0 >= 0.1 + 23 * 0.01
        assert raw.text() == answer_text("az") and raw.chunks()[0]["model"] == "gpt4o"
        assert sim.log[-1].key == key_fingerprint("az-key")


# -- the process path ------------------------------------------------------------------------


def test_spawn_sim_subprocess() -> None:
    before = time.monotonic()
    with (
        contextlib.ExitStack() as stack,
        spawn_sim("--name", "p", "--length", "8", "--dialect", "dashscope") as proc,
    ):
        assert proc.base_url.startswith("http://127.0.0.1:") and proc.base_url.endswith("/v1")
        c = openai.OpenAI(base_url=proc.base_url, api_key="sk-test", max_retries=0)
        stack.enter_context(c)
        r = c.chat.completions.create(model="m", messages=user("proc"))  # type: ignore[arg-type]
        assert r.choices[0].message.content == answer_text("proc", 8)
        (entry,) = proc.log()
        assert entry.sim == "p" and before < entry.t_open <= (entry.t_close or 0) < time.monotonic()
        proc.configure(faults="r429=1")
        with pytest.raises(openai.RateLimitError) as info:
            c.chat.completions.create(model="m", messages=user("proc"))  # type: ignore[arg-type]
        assert info.value.response.json()["request_id"]  # the dashscope shape
        assert proc.stats()["by_fault"] == {"r429": 1}
        assert proc.wait_for(lambda log: len(log) == 2)[-1].status == 429
    assert proc.proc.returncode == 0


def test_spawn_failures_are_reported() -> None:
    with pytest.raises(RuntimeError, match="nope"):
        spawn_listening([sys.executable, "-c", "print('nope')"], timeout=5)
    with pytest.raises(RuntimeError, match="unknown sim fault"):
        spawn_sim("--faults", "bogus=1")
