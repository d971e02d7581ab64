"""Mid-stream continuation: one uninterrupted stream with exactly the healthy upstream's text,
whatever failed behind it. Real simulator and gateway processes, the official openai SDK."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI

from gw_fixtures import UPSTREAM_KEY_A, UPSTREAM_KEY_B, entries_for, unique
from keel.sim import answer_text
from keel.testing import GatewayProcess, SimProcess, spawn_gateway
from limits_helpers import metrics

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def cgw(
    sims: tuple[SimProcess, SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    a, b = sims

    def dep(url: str, key: str, **kw: Any) -> dict[str, Any]:
        return {"base_url": url, "api_key": key, "timeouts": {"first_token": 2, "idle": 0.5}, **kw}

    models: dict[str, Any] = {
        "prefill": {"deployments": [dep(a.base_url, UPSTREAM_KEY_A, continuation="prefill")]},
        "instruct": {"deployments": [dep(a.base_url, UPSTREAM_KEY_A, continuation="instruct")]},
        "none": {"deployments": [dep(a.base_url, UPSTREAM_KEY_A, continuation="none")]},
        "buffered": {
            "deployments": [dep(a.base_url, UPSTREAM_KEY_A, continuation="none")],
            "commit_buffer": {"tokens": 8},
        },
        # OpenAI-dialect primary, DashScope fallback: a failover across dialects
        "openai-first": {
            "deployments": [dep(a.base_url, UPSTREAM_KEY_A, model="gpt-4o-mini")],
            "fallbacks": ["qwen"],
        },
        "qwen": {
            "deployments": [
                dep(b.base_url, UPSTREAM_KEY_B, dialect="dashscope", model="qwen-turbo")
            ]
        },
        "moderated": {
            "deployments": [dep(a.base_url, UPSTREAM_KEY_A, dialect="dashscope")],
            "on_content_filter": "failover",
            "fallbacks": ["qwen"],
        },
        "slow-guard": {
            "deployments": [
                dep(
                    a.base_url,
                    UPSTREAM_KEY_A,
                    timeouts={
                        "first_token": 2,
                        "idle": 2,
                        "min_tokens": 3,
                        "min_tokens_window": 0.5,
                    },
                )
            ],
            "fallbacks": ["qwen"],
        },
    }
    # Two deployments on the same simulator: with `[[sim:slow_token=2*1]]` whichever is tried
    # first is slow and the hedge (the prompt's second attempt there) is fast.
    models["hedged"] = {
        "deployments": [
            dep(a.base_url, UPSTREAM_KEY_A, name="h1"),
            dep(a.base_url, UPSTREAM_KEY_A, name="h2"),
        ],
        "hedge": {"enabled": True, "after": 0.3, "max_ratio": 1.0},
    }
    # The hedge target allows one request a minute; its weight keeps it out of first place.
    models["hedged-limited"] = {
        "deployments": [
            dep(a.base_url, UPSTREAM_KEY_A, name="h3"),
            dep(a.base_url, UPSTREAM_KEY_A, name="h4", rpm=1, weight=1e-6),
        ],
        "hedge": {"enabled": True, "after": 0.3, "max_ratio": 1.0},
    }
    cfg = {
        "retry": {"backoff_base": 0.01, "backoff_cap": 0.05, "max_retries_per_deployment": 2},
        "breaker": {"enabled": False},  # faults on purpose, one after another (see gw_fixtures)
        "models": models,
    }
    with spawn_gateway(cfg, workdir=str(tmp_path_factory.mktemp("cgw"))) as gw:
        yield gw


@pytest.fixture
async def client(cgw: GatewayProcess) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(
        base_url=cgw.base_url, api_key="sk-client", max_retries=0, timeout=20
    ) as c:
        yield c


async def sse(cgw: GatewayProcess, body: dict[str, Any]) -> list[bytes]:
    """The raw data payloads of a stream, to check the single role/terminal/usage/[DONE]."""
    url = cgw.base_url + "/chat/completions"
    async with aiohttp.ClientSession() as s, s.post(url, json={**body, "stream": True}) as r:
        assert r.status == 200, await r.text()
        raw = await r.read()
    return [f.removeprefix(b"data: ") for f in raw.split(b"\n\n") if f]


def check_one_stream(frames: list[bytes]) -> tuple[str, list[dict[str, Any]]]:
    import json

    assert frames[-1] == b"[DONE]" and frames.count(b"[DONE]") == 1
    chunks = [json.loads(f) for f in frames[:-1]]
    assert all("error" not in c for c in chunks), chunks[-1]
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1
    assert len({c["model"] for c in chunks}) == 1
    with_choices = [c for c in chunks if c["choices"]]
    roles = [c for c in with_choices if c["choices"][0]["delta"].get("role")]
    finishes = [c for c in with_choices if c["choices"][0].get("finish_reason")]
    assert len(roles) == 1 and with_choices[0] is roles[0]
    assert len(finishes) == 1
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in with_choices)
    return text, chunks


async def exact_stream(cgw: GatewayProcess, model: str, directive: str = "") -> str:
    """Stream a fresh prompt (plus a simulator directive) through ``model``; check it arrived
    as one exact, well-formed stream. Returns the prompt, to find its attempts in the log."""
    prompt = unique()
    content = f"{prompt} {directive}" if directive else prompt
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    text, _ = check_one_stream(await sse(cgw, body))
    assert text == answer_text(prompt)
    return prompt


MID = ["trunc=1", "trunc=5", "trunc=23", "trunc_mid=1", "trunc_mid=7", "stall=4", "stall_ka=4",
       "err_mid=3", "anth_err_mid=6", "garbage_fatal=5", "no_finish", "null_finish",
       "empty_finish", "no_done"]  # fmt: skip


@pytest.mark.parametrize("mode", ["prefill", "instruct"])
@pytest.mark.parametrize("fault", MID)
async def test_continuation_gives_the_exact_text(cgw, sims, mode, fault) -> None:
    prompt = unique("继续 continue")
    body = {
        "model": mode,
        "messages": [{"role": "user", "content": f"{prompt} [[sim:{fault}*1]]"}],
        "stream_options": {"include_usage": True},
    }
    text, chunks = check_one_stream(await sse(cgw, body))
    assert text == answer_text(prompt)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    first, second = entries_for(sims[0], prompt)
    assert second.continuation and second.continuation_kind == mode
    # usage is summed across attempts: every token generated (an instruct continuation's
    # repeated overlap included — it was billed), exactly once
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    if fault != "garbage_fatal=5":  # the simulator wrote on past the garbage keel stopped at
        assert usage["completion_tokens"] == first.tokens + second.tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_sdk_sees_one_clean_stream(client) -> None:
    prompt = unique()
    stream = await client.chat.completions.create(
        model="prefill",
        messages=[{"role": "user", "content": f"{prompt} [[sim:trunc_mid=3*2]]"}],
        stream=True,
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer_text(prompt)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


async def test_failover_across_dialects_openai_to_dashscope(cgw, sims) -> None:
    prompt = unique("跨方言")
    body = {
        "model": "openai-first",
        "messages": [{"role": "user", "content": f"{prompt} [[sim@a:trunc=5]]"}],
        "stream_options": {"include_usage": True},
    }
    text, chunks = check_one_stream(await sse(cgw, body))
    assert text == answer_text(prompt)
    assert chunks[0]["model"] == "gpt-4o-mini"  # the committed stream's model throughout
    assert chunks[-1]["usage"]["completion_tokens"] == 24
    on_b = entries_for(sims[1], prompt)
    assert len(on_b) == 1 and on_b[0].continuation and on_b[0].continuation_kind == "prefill"


async def test_max_tokens_is_honoured_across_the_splice(cgw) -> None:
    prompt = unique()
    body = {
        "model": "prefill",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": f"{prompt} [[sim:trunc=4*1]]"}],
    }
    text, chunks = check_one_stream(await sse(cgw, body))
    assert text == answer_text(prompt, 10)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_none_mode_ends_cleanly_after_commit(cgw) -> None:
    prompt = unique()
    frames = await sse(
        cgw,
        {"model": "none", "messages": [{"role": "user", "content": f"{prompt} [[sim:trunc=5*1]]"}]},
    )
    assert frames[-1] == b"[DONE]" and frames[-2].startswith(b'{"error":')


async def test_commit_buffer_restarts_invisibly_on_a_none_deployment(cgw, sims) -> None:
    prompt = unique()
    frames = await sse(
        cgw,
        {
            "model": "buffered",
            "messages": [{"role": "user", "content": f"{prompt} [[sim:trunc=5*1]]"}],
        },
    )
    text, _ = check_one_stream(frames)
    assert text == answer_text(prompt)
    _first, second = entries_for(sims[0], prompt)
    assert not second.continuation  # a restart, not a continuation


@pytest.mark.parametrize("cut", ["trunc=1", "trunc_mid=2"])
async def test_tool_call_is_never_spliced(cgw, cut) -> None:
    prompt = unique()
    body = {
        "model": "prefill",
        "tools": [WEATHER_TOOL],
        "messages": [{"role": "user", "content": f"{prompt} [[sim:tool,{cut}*1]]"}],
    }
    frames = await sse(cgw, body)
    assert frames[-1] == b"[DONE]" and frames[-2].startswith(b'{"error":')


async def test_tool_call_restarts_when_nothing_was_committed(client) -> None:
    prompt = unique()
    stream = await client.chat.completions.create(
        model="prefill",
        tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": f"{prompt} [[sim:tool,reset*1]]"}],
        stream=True,
    )
    chunks = [c async for c in stream]
    args = "".join(
        (c.choices[0].delta.tool_calls or [None])[0].function.arguments or ""
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
    )
    import json

    assert json.loads(args)["city"] == "北京"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_output_moderation_failover_continues_elsewhere(cgw, sims) -> None:
    prompt = unique()
    body = {
        "model": "moderated",
        "messages": [{"role": "user", "content": f"{prompt} [[sim@a:inspect_mid=4]]"}],
    }
    text, chunks = check_one_stream(await sse(cgw, body))
    assert text == answer_text(prompt)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert len(entries_for(sims[1], prompt)) == 1


async def test_minimum_throughput_guard_moves_a_crawling_stream(cgw, sims) -> None:
    prompt = unique()
    body = {
        "model": "slow-guard",
        "messages": [{"role": "user", "content": f"{prompt} [[sim@a:delay=0.4]]"}],
    }
    text, _ = check_one_stream(await sse(cgw, body))
    assert text == answer_text(prompt)
    slow = entries_for(sims[0], prompt)
    assert slow and all(e.client_disconnected and e.tokens < 24 for e in slow)
    (fast,) = entries_for(sims[1], prompt)
    assert fast.continuation


@pytest.mark.parametrize("slow", ["slow_token=3", "slow_first=3"])
async def test_hedge_wins_and_the_loser_is_cancelled(cgw, sims, slow) -> None:
    prompt = unique()
    body = {
        "model": "hedged",
        "messages": [{"role": "user", "content": f"{prompt} [[sim:{slow}*1]]"}],
    }
    text, _ = check_one_stream(await sse(cgw, body))
    assert text == answer_text(prompt)
    log = sims[0].wait_for(lambda log: all(e.t_close for e in log if prompt in e.prompt))
    loser, winner = [e for e in log if prompt in e.prompt]
    assert winner.finished and winner.fault is None
    assert loser.client_disconnected and not loser.finished and loser.tokens == 0
    # the loser was closed as soon as the winner produced its token, not when it finished
    assert loser.t_close - winner.t_open < 0.2


async def _hedged_outcomes(cgw: GatewayProcess) -> dict[str, float]:
    """keel_upstream_attempts of the 'hedged' group's two deployments, summed by outcome."""
    out: dict[str, float] = {}
    for (name, labels), value in (await metrics(cgw.base_url.removesuffix("/v1"))).items():
        lab = dict(labels)
        if name == "keel_upstream_attempts_total" and lab["deployment"] in ("h1", "h2"):
            out[lab["outcome"]] = out.get(lab["outcome"], 0.0) + value
    return out


async def test_the_hedge_that_lost_is_not_counted_as_a_success(cgw, sims) -> None:
    # The winner succeeded; the slow first attempt was cancelled, not successful: its breaker
    # and metrics must not count it as a success.
    before = await _hedged_outcomes(cgw)
    await exact_stream(cgw, "hedged", "[[sim:slow_first=3*1]]")
    for _ in range(100):  # both outcomes are recorded as the handler unwinds, just after [DONE]
        after = await _hedged_outcomes(cgw)
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        if sum(delta.values()) >= 2:
            break
        await asyncio.sleep(0.02)
    assert {k: v for k, v in delta.items() if v} == {"success": 1.0, "cancelled": 1.0}


async def test_a_hedge_counts_against_the_target_limits_and_never_exceeds_them(cgw, sims) -> None:
    # First request: the hedge goes to h4 and wins, using h4's one request of the minute.
    first = await exact_stream(cgw, "hedged-limited", "[[sim:slow_first=3*1]]")
    assert len(entries_for(sims[0], first)) == 2  # the slow attempt and the hedge
    # Second request: h4 has no room left this minute, so no hedge: h3 answers, late.
    second = await exact_stream(cgw, "hedged-limited", "[[sim:slow_first=1*1]]")
    (only,) = entries_for(sims[0], second)
    assert only.finished and not only.client_disconnected


async def test_no_hedge_when_the_first_token_is_on_time(cgw, sims) -> None:
    prompt = unique()
    body = {"model": "hedged", "messages": [{"role": "user", "content": prompt}]}
    text, _ = check_one_stream(await sse(cgw, body))
    assert text == answer_text(prompt)
    assert len(entries_for(sims[0], prompt)) == 1
