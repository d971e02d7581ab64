"""``POST /v1/responses`` over chat-completions deployments, end to end: the official openai
SDK (``client.responses.create``, stream and non-stream, and ``client.responses.stream``)
through ``keel serve`` and through library mode (``gw.transport()``), against the real
simulators with faults before the first byte and mid-stream. Upstream attempts are counted
from the simulators' logs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from gw_fixtures import gateway_config, unique
from keel import Keel, KeelError
from keel.sim import answer_text, tool_call_for
from keel.testing import GatewayProcess, SimProcess
from responses_helpers import EVENT, attempts, check_grammar, sdk_client, streamed_text


@pytest.fixture
async def library(sims: tuple[SimProcess, SimProcess]) -> AsyncIterator[Keel]:
    a, b = sims
    async with Keel.from_config(gateway_config(a.base_url, b.base_url)) as gw:
        yield gw


@pytest.fixture(params=["serve", "library"])
async def client(
    request: pytest.FixtureRequest, gateway: GatewayProcess, library: Keel
) -> AsyncIterator[AsyncOpenAI]:
    """The same SDK client through the gateway process, or in-process through the engine."""
    async with sdk_client(request.param, gateway.base_url, library) as c:
        yield c


async def events_of(client: AsyncOpenAI, model: str, prompt: str, **kw: Any) -> list[Any]:
    stream = await client.responses.create(model=model, input=prompt, stream=True, **kw)
    return [e async for e in stream]


# -- non-stream -----------------------------------------------------------------------------------


async def test_non_stream_is_the_exact_answer_through_a_failover(
    client: AsyncOpenAI, sims: tuple[SimProcess, SimProcess]
) -> None:
    prompt = unique("resp plain")
    r = await client.responses.create(
        model="pair", input=f"{prompt} [[sim:e500*1]]", instructions="Answer briefly."
    )
    assert r.status == "completed" and r.output_text == answer_text(prompt)
    assert r.object == "response" and r.model == "pair" and r.id.startswith("resp_")
    assert r.usage is not None and r.usage.output_tokens > 0
    # a fails, b fails, then a answers (each simulator fails the prompt once)
    assert [e.status for e in attempts(sims, prompt)] == [500, 500, 200]
    (first, *_) = attempts(sims, prompt)
    assert first.messages == 2  # the instructions became a system message


async def test_function_calls_come_back_as_function_call_items(client: AsyncOpenAI) -> None:
    prompt = unique("resp weather")
    tools: Any = [
        {"type": "function", "name": "get_weather", "parameters": {"type": "object"}},
    ]
    r = await client.responses.create(
        model="solo", input=prompt, tools=tools, tool_choice="required"
    )
    (item,) = r.output
    expected = tool_call_for(prompt, "get_weather")
    assert item.type == "function_call"
    assert (item.name, item.call_id, item.arguments) == (
        "get_weather",
        expected.id,
        expected.arguments,
    )
    # ...and stream as function_call_arguments events
    events = await events_of(client, "solo", prompt, tools=tools, tool_choice="required")
    check_grammar(events)
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert args == expected.arguments
    final = events[-1].response
    assert final.status == "completed" and final.output[0].type == "function_call"


# -- streams --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "statuses"),
    [("", [200]), ("e500*1", [500, 200]), ("r429*1", [429, 200]), ("reset*1", [None, 200])],
)
async def test_a_stream_is_exact_through_pre_first_byte_faults(
    client: AsyncOpenAI, sims: tuple[SimProcess, SimProcess], fault: str, statuses: list[Any]
) -> None:
    prompt = unique("resp pre")
    events = await events_of(client, "solo", f"{prompt} [[sim:{fault}]]")
    check_grammar(events)
    assert streamed_text(events) == answer_text(prompt)
    final = events[-1]
    assert final.type == "response.completed" and final.response.output_text == answer_text(prompt)
    assert final.response.usage is not None and final.response.usage.input_tokens > 0
    assert [e.status for e in attempts(sims, prompt)] == statuses


@pytest.mark.parametrize(
    ("model", "fault"),
    [
        *[("solo", f) for f in ("trunc=5*1", "err_mid=3*1", "stall=4*1", "no_done*1")],
        # (pair's deployments keep the default stall timeout: no stall here)
        *[("pair", f) for f in ("trunc=5*1", "err_mid=3*1", "no_done*1")],
    ],
)
async def test_a_mid_stream_fault_is_continued_exactly(
    client: AsyncOpenAI, sims: tuple[SimProcess, SimProcess], fault: str, model: str
) -> None:
    prompt = unique("resp mid")
    async with client.responses.stream(model=model, input=f"{prompt} [[sim:{fault}]]") as s:
        events = [e async for e in s]
        final = await s.get_final_response()
    check_grammar(events)
    assert final.status == "completed" and final.output_text == answer_text(prompt)
    assert streamed_text(events) == answer_text(prompt)  # each character once
    # The fault hits each simulator's first attempt: solo's retry continues the answer; in
    # pair the other deployment's continuation fails once too, and a third one finishes it.
    tried = attempts(sims, prompt)
    assert len(tried) == (2 if model == "solo" else 3)
    assert all(e.continuation for e in tried[1:])
    # the repair is on record, as on a chat stream's terminal chunk
    repair = events[-1].response.to_dict(warnings=False)["keel"]
    assert repair["attempts"] == len(tried) and len(repair["continued"]) == len(tried) - 1


async def test_a_stream_that_cannot_be_completed_raises_the_sdk_error(
    client: AsyncOpenAI, sims: tuple[SimProcess, SimProcess]
) -> None:
    prompt = unique("resp broken")
    seen: list[Any] = []
    with pytest.raises(openai.APIError) as info:
        stream = await client.responses.create(
            model="solo", input=f"{prompt} [[sim:trunc=3]]", stream=True
        )
        async for e in stream:
            seen.append(e)
    assert "truncated" in info.value.message or "closed" in info.value.message
    text = streamed_text(seen)
    assert text and answer_text(prompt).startswith(text)
    assert seen[-1].type == "response.output_item.done" and seen[-1].item.status == "incomplete"
    # solo retries its one deployment (max_retries_per_deployment: 2): three attempts
    assert len(attempts(sims, prompt)) == 3


async def test_the_wire_ends_in_response_failed_never_a_silent_200(gateway: GatewayProcess) -> None:
    prompt = unique("resp wire")
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gateway.base_url + "/responses",
            json={"model": "solo", "input": f"{prompt} [[sim:err_mid=2]]", "stream": True},
        ) as r,
    ):
        assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
        body = await r.read()
    frames = [f for f in body.split(b"\n\n") if f]
    assert b"[DONE]" not in body
    assert all(f.startswith(b"event: ") and b"\ndata: {" in f for f in frames)
    assert frames[0].startswith(b"event: response.created\n")
    assert frames[-1].startswith(b"event: response.failed\n")
    last = EVENT.validate_json(frames[-1].split(b"\ndata: ", 1)[1])
    assert last.type == "response.failed" and last.response.status == "failed"
    assert last.response.error is not None and last.response.error.code == "server_error"


async def test_library_stream_ends_in_response_failed(library: Keel) -> None:
    prompt = unique("resp lib broken")
    events = [
        e
        async for e in library.responses_stream(
            {"model": "solo", "input": f"{prompt} [[sim:trunc=3]]"}
        )
    ]
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["code"] == "server_error"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


async def test_library_responses(library: Keel, sims: tuple[SimProcess, SimProcess]) -> None:
    prompt = unique("resp lib")
    r = await library.responses({"model": "pair", "input": f"{prompt} [[sim:e503*1]]"})
    assert r["status"] == "completed"
    assert r["output"][0]["content"][0]["text"] == answer_text(prompt)
    events = [
        e
        async for e in library.responses_stream(
            {"model": "solo", "input": f"{prompt} [[sim:trunc=4*1]]"}
        )
    ]
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == answer_text(prompt)
    with pytest.raises(KeelError) as info:
        await library.responses({"model": "solo", "input": "x", "previous_response_id": "resp_1"})
    assert info.value.status == 400


# -- what a translated deployment cannot do ------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id", "unsupported_parameter"),
        ({"store": True}, "store", "unsupported_parameter"),
        ({"tools": [{"type": "web_search"}]}, "tools", "unsupported_value"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input", "unsupported_value"),
        ({"input": []}, "input", None),
    ],
)
async def test_what_a_translated_deployment_cannot_do_is_a_clear_400(
    client: AsyncOpenAI,
    sims: tuple[SimProcess, SimProcess],
    extra: dict[str, Any],
    param: str,
    code: str | None,
) -> None:
    prompt = unique("resp stateful")
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model="solo", **{"input": prompt, **extra})
    assert info.value.param == param and info.value.code == code
    assert attempts(sims, prompt) == []  # nothing went upstream


async def test_unknown_model_and_bad_json(client: AsyncOpenAI, gateway: GatewayProcess) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await client.responses.create(model="nope", input="x")
    assert info.value.code == "model_not_found"
    async with (
        aiohttp.ClientSession() as s,
        s.post(gateway.base_url + "/responses", data=b"{not json") as r,
    ):
        assert r.status == 400
        assert (await r.json())["error"]["code"] == "invalid_json"


async def test_a_bug_after_the_commit_still_ends_in_response_failed(
    sim: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected error inside a committed Responses stream (here: the translator breaks
    at the 4th chunk) ends it with response.failed, not a chat error frame or a cut."""
    from keel._responses import ResponseEvents
    from keel.config import parse_config
    from keel.gateway import create_app, start_site

    calls = 0
    chunk = ResponseEvents.chunk

    def breaking(self: ResponseEvents, c: Any) -> list[dict[str, Any]]:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise RuntimeError("a bug")
        return chunk(self, c)

    monkeypatch.setattr(ResponseEvents, "chunk", breaking)
    cfg = parse_config(
        {"models": {"m": {"deployments": [{"base_url": sim.base_url, "api_key": "k"}]}}}
    )
    runner, port = await start_site(create_app(cfg), "127.0.0.1", 0)
    try:
        body = {"model": "m", "input": "hello [[sim:delay=0.01]]", "stream": True}
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"http://127.0.0.1:{port}/v1/responses", json=body) as r,
        ):
            assert r.status == 200
            raw = await r.read()
    finally:
        await runner.cleanup()
    frames = [f for f in raw.split(b"\n\n") if f]
    last = EVENT.validate_json(frames[-1].split(b"\ndata: ", 1)[1])
    assert last.type == "response.failed" and last.response.error is not None
    assert "internal error" in last.response.error.message and b"[DONE]" not in raw
    assert "a bug" in caplog.text  # logged for us, with its traceback
