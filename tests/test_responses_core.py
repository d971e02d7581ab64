"""keel._responses, table by table: Responses requests → chat bodies, chat chunks → Responses
events (each validated against the openai SDK's own event types), chat answers → Responses."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from keel._responses import (
    ResponseEvents,
    Unsupported,
    chat_request,
    event_type,
    response_from_chat,
    sse_events,
)

EVENT = TypeAdapter(ResponseStreamEvent)

# -- request translation -------------------------------------------------------------------------

CALL = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a":1}'}
TOOL = {"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}}

TRANSLATIONS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("a string input", {"input": "hi"}, {"messages": [{"role": "user", "content": "hi"}]}),
    (
        "instructions become the system message",
        {"instructions": "be brief", "input": "hi"},
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
            ]
        },
    ),
    (
        "message items with parts",
        {
            "input": [
                {"role": "developer", "content": [{"type": "input_text", "text": "rules"}]},
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "look"},
                        {"type": "input_image", "image_url": "http://x/i.png", "detail": "low"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
            ]
        },
        {
            "messages": [
                {"role": "developer", "content": "rules"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "http://x/i.png", "detail": "low"},
                        },
                    ],
                },
                {"role": "assistant", "content": "ok"},
            ]
        },
    ),
    (
        "function calls and their outputs; parallel calls make one assistant turn",
        {
            "input": [
                {"role": "user", "content": "go"},
                CALL,
                {**CALL, "call_id": "c2"},
                {"type": "function_call_output", "call_id": "c1", "output": "one"},
                {"type": "function_call_output", "call_id": "c2", "output": {"n": 2}},
                {"type": "reasoning", "id": "rs_1", "summary": []},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "go"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a":1}'},
                        },
                        {
                            "id": "c2",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a":1}'},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "one"},
                {"role": "tool", "tool_call_id": "c2", "content": '{"n":2}'},
            ]
        },
    ),
    (
        "function tools and a named tool choice",
        {"input": "x", "tools": [TOOL], "tool_choice": {"type": "function", "name": "f"}},
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "description": "d", "parameters": {"type": "object"}},
                }
            ],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
        },
    ),
    (
        "text.format json_schema becomes response_format",
        {
            "input": "x",
            "text": {"format": {"type": "json_schema", "name": "n", "schema": {}, "strict": True}},
        },
        {
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": {}, "strict": True},
            },
        },
    ),
    (
        "json_object; text stays plain",
        {"input": "x", "text": {"format": {"type": "json_object"}}},
        {
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_object"},
        },
    ),
    (
        "sampling, limits, reasoning; the ignorable fields are dropped",
        {
            "input": "x",
            "max_output_tokens": 50,
            "temperature": 0.2,
            "top_p": 0.9,
            "user": "u",
            "reasoning": {"effort": "low"},
            "metadata": {"k": "v"},
            "truncation": "auto",
            "include": [],
            "store": False,
            "text": {"format": {"type": "text"}},
        },
        {
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 50,
            "temperature": 0.2,
            "top_p": 0.9,
            "user": "u",
            "reasoning_effort": "low",
        },
    ),
]


@pytest.mark.parametrize(
    ("name", "request_", "chat"), TRANSLATIONS, ids=[t[0] for t in TRANSLATIONS]
)
def test_translation(name: str, request_: dict[str, Any], chat: dict[str, Any]) -> None:
    assert chat_request({"model": "m", **request_}, stream=False) == {"model": "m", **chat}


def test_a_stream_asks_for_usage() -> None:
    body = chat_request({"model": "m", "input": "x"}, stream=True)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


REFUSALS: list[tuple[dict[str, Any], str, str]] = [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id", "natively"),
    ({"input": "x", "store": True}, "store", "keeps no responses"),
    ({"input": "x", "background": True}, "background", "natively"),
    ({"input": "x", "conversation": "conv_1"}, "conversation", "natively"),
    ({}, "input", "'input' is required"),
    ({"input": []}, "input", "'input' is required"),
    ({"input": [{"type": "file_search_call"}]}, "input", "type 'file_search_call'"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input", "role must be"),
    ({"input": [{"role": "user", "content": [{"type": "input_file"}]}]}, "input", "input_file"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools", "function tools only"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "positive integer"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text", "'yaml'"),
    ({"input": "x", "frobnicate": 1}, "frobnicate", "Unknown or unsupported parameter"),
    ({"input": "x", "instructions": 3}, "instructions", "must be a string"),
]


@pytest.mark.parametrize(("request_", "param", "says"), REFUSALS)
def test_what_cannot_be_translated_is_named(
    request_: dict[str, Any], param: str, says: str
) -> None:
    with pytest.raises(Unsupported) as info:
        chat_request({"model": "m", **request_}, stream=False)
    assert info.value.param == param and says in str(info.value)


# -- the event stream ---------------------------------------------------------------------------


def chunk(content: str | None = None, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    d = dict(delta)
    if content is not None:
        d["content"] = content
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": d, "finish_reason": finish}],
    }


USAGE = {
    "id": "chatcmpl-1",
    "choices": [],
    "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
}


def run(chunks: list[dict[str, Any]], fail: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    ev = ResponseEvents({"model": "m", "input": "x"}, "r1", 1700000000)
    out = ev.start()
    for c in chunks:
        out.extend(ev.chunk(c))
    out.extend(ev.failed(fail) if fail is not None else ev.finish())
    assert ev.finish() == [] and ev.failed({"error": {}}) == []  # one terminal event only
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    for e in out:
        EVENT.validate_python(e)  # the SDK's own types, strictly
    return out


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def test_text_stream() -> None:
    out = run([chunk("", role="assistant"), chunk("Hel"), chunk("lo"), chunk(finish="stop"), USAGE])
    assert types(out) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["delta"] for e in out if e["type"] == "response.output_text.delta"] == ["Hel", "lo"]
    assert out[6]["text"] == "Hello" and out[7]["part"]["text"] == "Hello"
    final = Response.model_validate(out[-1]["response"])
    assert final.status == "completed" and final.output_text == "Hello"
    assert final.usage is not None and (final.usage.input_tokens, final.usage.output_tokens) == (
        7,
        3,
    )
    assert final.id == "resp_r1" and out[0]["response"]["status"] == "in_progress"


def test_function_calls_after_text() -> None:
    call0 = {"index": 0, "id": "call_a", "function": {"name": "get", "arguments": '{"q"'}}
    call0b = {"index": 0, "function": {"arguments": ':"x"}'}}
    call1 = {"index": 1, "id": "call_b", "function": {"name": "put", "arguments": "{}"}}
    out = run(
        [
            chunk("Let me check."),
            chunk(tool_calls=[call0]),
            chunk(tool_calls=[call0b]),
            chunk(tool_calls=[call1]),
            chunk(finish="tool_calls"),
        ]
    )
    assert types(out)[2:] == [
        "response.output_item.added",  # the message
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",  # closed when the first call begins
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",  # call_a
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.output_item.added",  # call_b
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = Response.model_validate(out[-1]["response"])
    assert [o.type for o in final.output] == ["message", "function_call", "function_call"]
    a, b = final.output[1], final.output[2]
    assert a.type == "function_call" and (a.call_id, a.name, a.arguments) == (
        "call_a",
        "get",
        '{"q":"x"}',
    )
    assert b.type == "function_call" and b.call_id == "call_b"
    indexes = [e["output_index"] for e in out if e["type"] == "response.output_item.added"]
    assert indexes == [0, 1, 2]


@pytest.mark.parametrize(
    ("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")]
)
def test_an_answer_cut_short_is_incomplete(finish: str, reason: str) -> None:
    out = run([chunk("a"), chunk(finish=finish)])
    assert out[-1]["type"] == "response.incomplete"
    assert out[-1]["response"]["incomplete_details"] == {"reason": reason}


def test_a_failure_after_output_ends_in_response_failed() -> None:
    body = {
        "error": {"message": "upstream cut", "type": "server_error", "param": None, "code": None}
    }
    out = run([chunk("par"), chunk("tial")], fail=body)
    assert types(out)[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.failed",
    ]
    failed = out[-1]
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {"code": "server_error", "message": "upstream cut"}
    assert failed["error"] == body["error"]  # what the SDK raises as APIError
    assert (
        out[-2]["item"]["status"] == "incomplete"
        and out[-2]["item"]["content"][0]["text"] == "partial"
    )


@pytest.mark.parametrize(
    ("error", "code"),
    [
        ({"type": "rate_limit_error", "code": None}, "rate_limit_exceeded"),
        ({"type": "invalid_request_error", "code": "context_length_exceeded"}, "invalid_prompt"),
        ({"type": "server_error", "code": "server_shutting_down"}, "server_error"),
    ],
)
def test_the_failure_code_is_one_of_the_responses_codes(error: dict[str, Any], code: str) -> None:
    out = run([], fail={"error": {"message": "m", **error}})
    assert out[-1]["response"]["error"]["code"] == code


def test_framing() -> None:
    payloads = [b'{"type":"response.created","sequence_number":0}', b'{"type":"error"}']
    assert event_type(payloads[0]) == b"response.created"
    assert sse_events(payloads) == (
        b'event: response.created\ndata: {"type":"response.created","sequence_number":0}\n\n'
        b'event: error\ndata: {"type":"error"}\n\n'
    )


# -- non-stream ------------------------------------------------------------------------------------


def test_a_chat_completion_as_a_response() -> None:
    completion = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Sure.",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
    }
    r = Response.model_validate(response_from_chat(completion, {"model": "m"}, "r9", 1))
    assert r.status == "completed" and r.output_text == "Sure." and r.model == "m"
    assert [o.type for o in r.output] == ["message", "function_call"]
    assert r.usage is not None and r.usage.total_tokens == 6
    cut = {"choices": [{"message": {"content": "a"}, "finish_reason": "length"}]}
    r = Response.model_validate(response_from_chat(cut, {"model": "m"}, "r9", 1))
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    [
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "text",
        "max_output_tokens",
        "reasoning",
        "store",
    ]
)


@given(st.dictionaries(FIELDS, JSON, max_size=5), st.booleans())
def test_any_json_is_translated_or_refused_by_name(body: dict[str, Any], stream: bool) -> None:
    """Bad input is an Unsupported naming the field (the door's 400), never another error."""
    try:
        out = chat_request({"model": "m", **body}, stream=stream)
    except Unsupported as exc:
        assert exc.param is not None and str(exc)
    else:
        assert out["model"] == "m" and out["messages"]


def test_usage_and_the_repair_of_a_continued_stream() -> None:
    """A single attempt's terminal chunk carries the upstream's usage (a native stream): it
    wins; a continued one (its terminal chunk says so in "keel") takes the summed usage
    chunk keel writes, and the Response says how it was repaired."""
    own = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    single = run([chunk("a"), {**chunk(finish="stop"), "usage": own}, USAGE])
    assert (
        single[-1]["response"]["usage"]["input_tokens"] == 5
        and "keel" not in single[-1]["response"]
    )
    how = {"attempts": 2, "continued": [{"at_char": 1, "deployment": "d", "mode": "prefill"}]}
    continued = run([chunk("a"), {**chunk(finish="stop"), "usage": own, "keel": how}, USAGE])
    assert continued[-1]["response"]["usage"]["input_tokens"] == 7
    assert continued[-1]["response"]["keel"] == how


def test_streamed_reasoning_becomes_a_reasoning_item() -> None:
    """DeepSeek/vLLM/Qwen's reasoning_content: a reasoning item before the message."""
    out = run(
        [
            chunk(reasoning_content="Think"),
            chunk(reasoning_content="ing."),
            chunk("Answer"),
            chunk(finish="stop"),
        ]
    )
    assert types(out)[2:7] == [
        "response.output_item.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.output_item.done",
    ]
    final = Response.model_validate(out[-1]["response"])
    assert [o.type for o in final.output] == ["reasoning", "message"]
    rs = final.output[0]
    assert rs.type == "reasoning" and rs.content is not None and rs.content[0].text == "Thinking."
    assert final.output_text == "Answer"
    done = {
        "choices": [
            {"message": {"content": "A", "reasoning_content": "R"}, "finish_reason": "stop"}
        ]
    }
    r = Response.model_validate(response_from_chat(done, {"model": "m"}, "r1", 1))
    assert [o.type for o in r.output] == ["reasoning", "message"] and r.output_text == "A"
