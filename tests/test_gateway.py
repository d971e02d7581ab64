"""The gateway end to end: real simulator and gateway processes, the official openai SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from gw_fixtures import KEY_FAULTS, UPSTREAM_KEY_A, entries_for, unique
from keel.sim import answer_text


@pytest.fixture
async def client(gateway) -> AsyncIterator[AsyncOpenAI]:
    # Closed on the test's own loop: an unclosed client's connections are reported by asyncio
    # later, inside whichever test is running when they are collected.
    async with AsyncOpenAI(
        base_url=gateway.base_url, api_key="sk-client", max_retries=0, timeout=20
    ) as c:
        yield c


def msgs(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


async def stream_text(client: AsyncOpenAI, model: str, prompt: str, **kw) -> tuple[str, list]:
    stream = await client.chat.completions.create(
        model=model, messages=msgs(prompt), stream=True, **kw
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


async def raw_stream(gateway, model: str, prompt: str) -> bytes:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gateway.base_url + "/chat/completions",
            json={"model": model, "messages": msgs(prompt), "stream": True},
        ) as r,
    ):
        assert r.status == 200
        return await r.read()


# --- happy paths ------------------------------------------------------------------------------


async def test_non_stream_exact_text_and_headers(client, sims) -> None:
    prompt = unique()
    raw = await client.chat.completions.with_raw_response.create(
        model="solo", messages=msgs(prompt)
    )
    done = raw.parse()
    assert done.choices[0].message.content == answer_text(prompt)
    assert done.choices[0].finish_reason == "stop"
    assert raw.headers["x-keel-attempts"] == "1"
    assert raw.headers["x-keel-deployment"] == "solo/0"
    assert raw.headers["x-request-id"].startswith("keel-")
    (entry,) = entries_for(sims[0], prompt)
    assert entry.model == "gpt-4o-mini"  # the deployment's own model name went upstream


async def test_stream_exact_text_one_role_one_finish_usage(client) -> None:
    prompt = unique("流式")
    text, chunks = await stream_text(client, "solo", prompt, stream_options={"include_usage": True})
    assert text == answer_text(prompt)
    roles = [c for c in chunks if c.choices and c.choices[0].delta.role]
    finishes = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(roles) == 1 and len(finishes) == 1
    assert finishes[0].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24


async def test_passthrough_fields_reach_upstream(client) -> None:
    prompt = unique()
    done = await client.chat.completions.create(
        model="solo", messages=msgs(prompt), temperature=0.2, seed=3, user="u1", max_tokens=5
    )
    assert done.choices[0].finish_reason == "length"
    assert done.choices[0].message.content == answer_text(prompt, 5)


async def test_models_and_healthz(gateway, client) -> None:
    ids = {m.id async for m in client.models.list()}
    assert {"solo", "pair", "primary", "backup"} <= ids
    async with aiohttp.ClientSession() as s, s.get(gateway.url + "/healthz") as r:
        assert r.status == 200


# --- errors before the first byte: retried or failed over, exact text -------------------------

RETRYABLE = ["r429", "r429_ds", "quota_ds", "e500", "e503", "e529", "e502_html", "e504_html",
             "moonshot", "reset", "trunc=0", "slow_first=3"]  # fmt: skip


@pytest.mark.parametrize("fault", RETRYABLE)
@pytest.mark.parametrize("stream", [False, True])
async def test_retryable_fault_is_retried_on_the_same_deployment(
    client, sims, fault, stream
) -> None:
    prompt = unique()
    full = f"{prompt} [[sim:{fault}*1]]"
    if stream:
        text, _ = await stream_text(client, "solo", full)
    else:
        done = await client.chat.completions.create(model="solo", messages=msgs(full))
        text = done.choices[0].message.content
    assert text == answer_text(prompt)
    log = entries_for(sims[0], prompt)
    assert len(log) == 2, [(e.fault, e.status) for e in log]
    assert log[0].fault and log[1].fault is None and log[1].finished


@pytest.mark.parametrize("fault", ["e500", "reset", "r429"])
async def test_failover_to_the_fallback_group(client, sims, fault) -> None:
    prompt = unique()
    text, _ = await stream_text(client, "primary", f"{prompt} [[sim@a:{fault}]]")
    assert text == answer_text(prompt)
    # persistent on a: 3 attempts there (1 + 2 retries), then b answers
    assert len(entries_for(sims[0], prompt)) == 3
    assert len(entries_for(sims[1], prompt)) == 1


async def test_long_retry_hint_fails_over_instead_of_sleeping(client, sims) -> None:
    prompt = unique()
    raw = await client.chat.completions.with_raw_response.create(
        model="primary", messages=msgs(f"{prompt} [[sim@a:r429_long*1]]")
    )
    assert raw.parse().choices[0].message.content == answer_text(prompt)
    assert raw.headers["x-keel-deployment"] == "backup/0"
    assert len(entries_for(sims[0], prompt)) == 1


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ("ctx", 400, "context_length_exceeded"),
        ("inspect", 400, "data_inspection_failed"),
        ("content_filter_az", 400, "content_filter"),
    ],
)
async def test_client_mistakes_return_at_once(client, sims, fault, status, code) -> None:
    prompt = unique()
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model="primary", messages=msgs(f"{prompt} [[sim:{fault}]]")
        )
    assert info.value.status_code == status
    assert info.value.code == code
    assert info.value.response.headers["x-should-retry"] == "false"
    assert len(entries_for(sims[0], prompt)) == 1
    assert len(entries_for(sims[1], prompt)) == 0  # not failed over: it would fail anywhere


@pytest.mark.parametrize("fault", KEY_FAULTS)
async def test_key_faults_bench_the_deployment(client, sims, fault) -> None:
    prompt = unique()
    raw = await client.chat.completions.with_raw_response.create(
        model=f"key-{fault}", messages=msgs(f"{prompt} [[sim@a:{fault}]]")
    )
    assert raw.parse().choices[0].message.content == answer_text(prompt)
    assert raw.headers["x-keel-deployment"] == "backup/0"
    assert len(entries_for(sims[0], prompt)) == 1  # no retry against a dead key
    # benched: the next request does not even try it
    second = unique()
    done = await client.chat.completions.create(model=f"key-{fault}", messages=msgs(second))
    assert done.choices[0].message.content == answer_text(second)
    assert entries_for(sims[0], second) == []


async def test_all_attempts_fail_gives_an_honest_openai_error(client, sims) -> None:
    prompt = unique()
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model="solo", messages=msgs(f"{prompt} [[sim:e500]]"))
    err = info.value
    assert err.status_code == 502
    assert "solo/0" in err.message and "server" in err.message
    assert len(entries_for(sims[0], prompt)) == 3
    assert UPSTREAM_KEY_A not in err.response.text


async def test_upstream_keys_never_leak(client, sims) -> None:
    prompt = unique()
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(
            model="doomed", messages=msgs(f"{prompt} [[sim:auth]]")
        )
    body = info.value.response.text
    assert UPSTREAM_KEY_A not in body and UPSTREAM_KEY_A[-8:] not in body
    assert info.value.response.headers["x-should-retry"] == "false"


# --- after the first byte: well-formed endings ------------------------------------------------

MID_STREAM = ["trunc=3", "trunc_mid=3", "stall=3", "stall_ka=3", "err_mid=3", "anth_err_mid=3",
              "no_finish", "null_finish", "empty_finish", "no_done", "garbage_fatal=3"]  # fmt: skip


@pytest.mark.parametrize("fault", MID_STREAM)
async def test_mid_stream_failure_ends_with_error_frame_then_done(gateway, fault) -> None:
    prompt = unique()
    body = await raw_stream(gateway, "solo", f"{prompt} [[sim:{fault}]]")
    frames = [f for f in body.split(b"\n\n") if f]
    assert frames[-1] == b"data: [DONE]"
    assert frames[-2].startswith(b'data: {"error":')
    assert body.count(b"data: [DONE]") == 1


@pytest.mark.parametrize("fault", ["err_mid=2", "trunc=2"])
async def test_mid_stream_error_is_an_apierror_for_the_sdk(client, fault) -> None:
    prompt = unique()
    with pytest.raises(openai.APIError):
        await stream_text(client, "solo", f"{prompt} [[sim:{fault}]]")


@pytest.mark.parametrize("fault", ["garbage", "crlf", "cr", "frag", "keepalive"])
async def test_harmless_wire_variants_give_exact_text(client, fault) -> None:
    prompt = unique("中文 mixed")
    text, chunks = await stream_text(client, "solo", f"{prompt} [[sim:{fault}]]")
    assert text == answer_text(prompt)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_output_moderation_becomes_content_filter(client) -> None:
    prompt = unique()
    text, chunks = await stream_text(client, "solo", f"{prompt} [[sim:inspect_mid=4]]")
    assert answer_text(prompt).startswith(text) and text
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["content_filter"]


async def test_stall_before_first_token_is_retried(client, sims) -> None:
    prompt = unique()
    text, _ = await stream_text(client, "solo", f"{prompt} [[sim:stall=0*1]]")
    assert text == answer_text(prompt)
    first, second = entries_for(sims[0], prompt)
    assert first.client_disconnected and second.finished
