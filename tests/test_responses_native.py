"""Native Responses deployments (``api: responses``) end to end: the openai SDK through
``keel serve`` and library mode, against the simulators' native ``/v1/responses`` with faults
before any output (an invisible retry) and after it (continued exactly, natively or by a chat
deployment), and stored state passed through. Attempts are counted from the simulators' logs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from gw_fixtures import UPSTREAM_KEY_A, UPSTREAM_KEY_B, unique
from keel import Keel
from keel.sim import answer_text, tool_call_for
from keel.testing import GatewayProcess, SimProcess, spawn_gateway
from responses_helpers import EVENT, attempts, check_grammar, sdk_client, streamed_text


def native_config(a: str, b: str) -> dict[str, Any]:
    fast = {"first_token": 2.0, "idle": 1.0}
    native = {"base_url": a, "api_key": UPSTREAM_KEY_A, "api": "responses", "timeouts": fast}
    return {
        "retry": {"backoff_base": 0.01, "backoff_cap": 0.05, "max_retries_per_deployment": 2},
        "breaker": {"enabled": False},  # faults are injected on purpose, one after another
        "models": {
            # one native deployment: retries and native continuations
            "nsolo": {"deployments": [{**native, "name": "nat-a"}]},
            # a native deployment, then a chat one (DashScope: prefill) to fall back on
            "nprimary": {"deployments": [{**native, "name": "nat-p"}], "fallbacks": ["nbackup"]},
            "nbackup": {
                "deployments": [
                    {
                        "base_url": b,
                        "api_key": UPSTREAM_KEY_B,
                        "dialect": "dashscope",
                        "name": "chat-b",
                    }
                ]
            },
        },
    }


@pytest.fixture(scope="module")
def native_gateway(
    sims: tuple[SimProcess, SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    a, b = sims
    with spawn_gateway(
        native_config(a.base_url, b.base_url), workdir=str(tmp_path_factory.mktemp("ngw"))
    ) as gw:
        yield gw


@pytest.fixture
async def library(sims: tuple[SimProcess, SimProcess]) -> AsyncIterator[Keel]:
    a, b = sims
    async with Keel.from_config(native_config(a.base_url, b.base_url)) as gw:
        yield gw


@pytest.fixture(params=["serve", "library"])
async def client(
    request: pytest.FixtureRequest, native_gateway: GatewayProcess, library: Keel
) -> AsyncIterator[AsyncOpenAI]:
    """The same SDK client through the gateway process, or in-process through the engine."""
    async with sdk_client(request.param, native_gateway.base_url, library) as c:
        yield c


async def stream(client: AsyncOpenAI, model: str, text: str, **kw: Any) -> tuple[list[Any], Any]:
    async with client.responses.stream(model=model, input=text, **kw) as s:
        events = [e async for e in s]
        final = await s.get_final_response()
    return events, final


# -- the simulator's own endpoint ---------------------------------------------------------------


async def test_the_simulator_speaks_the_responses_grammar(
    sims: tuple[SimProcess, SimProcess],
) -> None:
    a, _ = sims
    async with AsyncOpenAI(base_url=a.base_url, api_key=UPSTREAM_KEY_A, max_retries=0) as sim:
        prompt = unique("sim native")
        events, final = await stream(sim, "m", prompt)
        check_grammar(events)
        assert final.status == "completed" and final.output_text == answer_text(prompt)
        deltas = [e for e in events if e.type == "response.output_text.delta"]
        assert final.usage is not None and final.usage.output_tokens == len(deltas) > 0
        r = await sim.responses.create(model="m", input=prompt)
        assert r.output_text == answer_text(prompt) and r.id.startswith("resp_")
        tools: Any = [{"type": "function", "name": "lookup", "parameters": {}}]
        r = await sim.responses.create(model="m", input=prompt, tools=tools, tool_choice="required")
        assert r.output[0].type == "function_call"
        assert r.output[0].arguments == tool_call_for(prompt, "lookup").arguments
        (entry, *_) = [e for e in a.log() if e.kind == "responses"]
        assert entry.kind == "responses"


# -- through keel ---------------------------------------------------------------------------------


async def test_non_stream_is_the_upstreams_own_response(
    client: AsyncOpenAI, sims: tuple[SimProcess, SimProcess]
) -> None:
    prompt = unique("native plain")
    r = await client.responses.create(model="nsolo", input=f"{prompt} [[sim:e500*1]]")
    assert r.status == "completed" and r.output_text == answer_text(prompt)
    tried = attempts(sims, prompt)
    assert [(e.kind, e.status) for e in tried] == [("responses", 500), ("responses", 200)]
    assert r.id == f"resp_{tried[-1].request_id[4:]}"  # the simulator's id, not keel's


@pytest.mark.parametrize(
    ("fault", "statuses"),
    [
        ("", [200]),
        ("e500*1", [500, 200]),
        ("reset*1", [None, 200]),
        ("err_mid=0*1", [200, 200]),  # an error event right after response.created
        ("trunc=0*1", [200, 200]),  # cut before any output
        ("stall=0*1", [200, 200]),  # silent before any output
    ],
)
async def test_a_fault_before_any_output_is_an_invisible_retry(
    client: AsyncOpenAI, sims: tuple[SimProcess, SimProcess], fault: str, statuses: list[Any]
) -> None:
    prompt = unique("native pre")
    events, final = await stream(client, "nsolo", f"{prompt} [[sim:{fault}]]")
    check_grammar(events)
    assert final.status == "completed" and final.output_text == answer_text(prompt)
    assert streamed_text(events) == answer_text(prompt)
    tried = attempts(sims, prompt)
    assert [e.status for e in tried] == statuses
    assert not any(e.continuation for e in tried)  # started over: nothing had been shown
    assert final.id == f"resp_{tried[-1].request_id[4:]}"
    # one attempt's stream: the upstream's own usage (one output token per delta)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert final.usage is not None and final.usage.output_tokens == len(deltas)
    assert final.usage.input_tokens > 0


@pytest.mark.parametrize(
    "fault",
    ["err_mid=3*1", "trunc=3*1", "trunc_mid=3*1", "stall=3*1", "no_done*1", "inspect_mid=3*1"],
)
async def test_a_mid_stream_fault_is_continued_natively_and_exactly(
    client: AsyncOpenAI, sims: tuple[SimProcess, SimProcess], fault: str
) -> None:
    prompt = unique("native mid")
    events, final = await stream(client, "nsolo", f"{prompt} [[sim:{fault}]]")
    check_grammar(events)
    assert final.status == "completed" and final.output_text == answer_text(prompt)
    assert streamed_text(events) == answer_text(prompt)  # each character exactly once
    first, second = attempts(sims, prompt)
    assert (first.kind, second.kind) == ("responses", "responses")
    assert second.continuation_kind == "instruct"


async def test_a_chat_deployment_continues_a_native_stream(
    client: AsyncOpenAI, sims: tuple[SimProcess, SimProcess]
) -> None:
    prompt = unique("native to chat")
    events, final = await stream(client, "nprimary", f"{prompt} [[sim@a:trunc=3]]")
    check_grammar(events)
    assert final.status == "completed" and final.output_text == answer_text(prompt)
    tried = attempts(sims, prompt)
    # the native deployment and its two retries break; the chat fallback continues by prefill
    assert [(e.sim, e.kind) for e in tried] == [("a", "responses")] * 3 + [("b", "chat")]
    assert tried[-1].continuation_kind == "prefill"


async def test_native_function_calls(client: AsyncOpenAI) -> None:
    prompt = unique("native call")
    tools: Any = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]
    events, final = await stream(client, "nsolo", prompt, tools=tools, tool_choice="required")
    check_grammar(events)
    (item,) = final.output
    expected = tool_call_for(prompt, "lookup")
    assert item.type == "function_call" and (item.call_id, item.arguments) == (
        expected.id,
        expected.arguments,
    )


async def test_a_native_stream_that_cannot_be_completed_raises_the_sdk_error(
    client: AsyncOpenAI, sims: tuple[SimProcess, SimProcess]
) -> None:
    prompt = unique("native broken")
    seen: list[Any] = []
    with pytest.raises(openai.APIError) as info:
        s = await client.responses.create(
            model="nsolo", input=f"{prompt} [[sim:err_mid=3]]", stream=True
        )
        async for e in s:
            seen.append(e)
    assert "The server had an error" in info.value.message
    assert streamed_text(seen) and answer_text(prompt).startswith(streamed_text(seen))
    assert len(attempts(sims, prompt)) == 3  # the first and its two retries


async def test_the_wire_ends_in_response_failed(native_gateway: GatewayProcess) -> None:
    prompt = unique("native wire")
    body = {"model": "nsolo", "input": f"{prompt} [[sim:trunc_mid=2]]", "stream": True}
    async with (
        aiohttp.ClientSession() as s,
        s.post(native_gateway.base_url + "/responses", json=body) as r,
    ):
        assert r.status == 200
        raw = await r.read()
    frames = [f for f in raw.split(b"\n\n") if f]
    assert frames[-1].startswith(b"event: response.failed\n") and b"[DONE]" not in raw
    last = EVENT.validate_json(frames[-1].split(b"\ndata: ", 1)[1])
    assert last.type == "response.failed" and last.response.status == "failed"


async def test_stored_state_is_passed_to_native_deployments(
    client: AsyncOpenAI, sims: tuple[SimProcess, SimProcess]
) -> None:
    prompt = unique("native state")
    first = await client.responses.create(model="nsolo", input=prompt, store=True)
    follow = await client.responses.create(
        model="nsolo", input=prompt, previous_response_id=first.id, store=False
    )
    assert follow.status == "completed" and follow.output_text == answer_text(prompt)
    # an id the upstream does not hold: its own 400, relayed at once (a client mistake)
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model="nsolo", input=prompt, previous_response_id="resp_nope")
    assert info.value.code == "previous_response_not_found"
    assert [e.status for e in attempts(sims, prompt)] == [200, 200, 400]


async def test_stored_state_is_refused_where_a_chat_deployment_may_answer(
    client: AsyncOpenAI, sims: tuple[SimProcess, SimProcess]
) -> None:
    prompt = unique("native state mixed")
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model="nprimary", input=prompt, previous_response_id="resp_1")
    assert info.value.param == "previous_response_id"
    assert attempts(sims, prompt) == []
