"""keel._responses_wire.ResponsesAssembler, table by table: native Responses event streams in,
the engine's frames and the stream's verdict out."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from keel._assembly import FrameKind
from keel._classify import ErrorKind
from keel._responses_wire import ResponsesAssembler, chat_usage
from keel._sse import ServerSentEvent

RESP = {"id": "resp_1", "object": "response", "created_at": 5, "model": "gpt", "output": []}
USAGE = {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}


def ev(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, **fields}


CREATED = ev("response.created", response=RESP)
PROGRESS = ev("response.in_progress", response=RESP)
MSG = ev("response.output_item.added", output_index=0, item={"type": "message", "id": "m"})
PART = ev("response.content_part.added", output_index=0, content_index=0, item_id="m")


def delta(text: str) -> dict[str, Any]:
    return ev(
        "response.output_text.delta", item_id="m", output_index=0, content_index=0, delta=text
    )


COMPLETED = ev("response.completed", response={**RESP, "status": "completed", "usage": USAGE})


def run(events: list[dict[str, Any] | str], numbered: bool = True) -> tuple[list[Any], Any, Any]:
    asm = ResponsesAssembler()
    frames = []
    for i, e in enumerate(events):
        if isinstance(e, dict):
            data = orjson.dumps({**e, "sequence_number": i} if numbered else e).decode()
            kind = e["type"]
        else:
            data, kind = e, "message"
        frames.append(asm.feed(ServerSentEvent(event=kind, data=data)))
    return frames, asm.finish(), asm


def test_bare_data_lines_are_judged_as_responses_events() -> None:
    # A read without ``event:`` lines reaches the assembler undecoded (``feed_data``): the same
    # frames as the typed events, not chat chunks judged by the chat fast path.
    events = [CREATED, MSG, PART, delta("Hel"), delta("lo"), COMPLETED]
    typed, typed_end, _ = run(events)
    asm = ResponsesAssembler()
    bare = [asm.feed_data(orjson.dumps({**e, "sequence_number": i})) for i, e in enumerate(events)]
    assert [(f.kind, f.data, f.content, f.finish_reason) for f in bare] == [
        (f.kind, f.data, f.content, f.finish_reason) for f in typed
    ]
    assert asm.finish() == typed_end and asm.text == "Hello"


def kinds(frames: list[Any]) -> list[str]:
    return [f.kind.value for f in frames]


def test_a_complete_text_stream() -> None:
    frames, outcome, asm = run(
        [
            CREATED,
            PROGRESS,
            MSG,
            PART,
            delta("Hel"),
            delta("lo"),
            ev("response.output_text.done"),
            COMPLETED,
        ]
    )
    assert outcome.complete and outcome.failure is None
    assert kinds(frames) == [
        "chunk",
        "ignored",
        "ignored",
        "ignored",
        "chunk",
        "chunk",
        "ignored",
        "chunk",
    ]
    assert [f.content for f in frames] == ["", "", "", "", "Hel", "lo", "", ""]
    assert frames[-1].finish_reason == "stop"
    assert asm.text == "Hello" and (asm.id, asm.created, asm.model) == ("resp_1", 5, "gpt")
    assert asm.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    # the frames are chat chunks, as the transcript relays them
    first = orjson.loads(frames[0].data)
    assert first["object"] == "chat.completion.chunk" and first["id"] == "resp_1"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = orjson.loads(frames[-1].data)
    assert last["choices"][0]["finish_reason"] == "stop" and last["usage"]["total_tokens"] == 5


def test_function_calls() -> None:
    call = {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "call_9",
        "name": "get",
        "arguments": "",
    }
    frames, outcome, asm = run(
        [
            CREATED,
            ev("response.output_item.added", output_index=0, item=call),
            ev(
                "response.function_call_arguments.delta",
                output_index=0,
                item_id="fc_1",
                delta='{"a"',
            ),
            ev(
                "response.function_call_arguments.delta",
                output_index=0,
                item_id="fc_1",
                delta=":1}",
            ),
            COMPLETED,
        ]
    )
    assert outcome.complete and frames[-1].finish_reason == "tool_calls"
    assert asm.has_tool_calls
    (tc,) = asm.tool_calls
    assert (tc.id, tc.name, tc.arguments) == ("call_9", "get", '{"a":1}')
    head = orjson.loads(frames[1].data)["choices"][0]["delta"]["tool_calls"][0]
    assert head == {
        "index": 0,
        "id": "call_9",
        "type": "function",
        "function": {"name": "get", "arguments": ""},
    }


@pytest.mark.parametrize(
    ("reason", "finish"), [("max_output_tokens", "length"), ("content_filter", "content_filter")]
)
def test_incomplete_is_a_finish(reason: str, finish: str) -> None:
    end = ev("response.incomplete", response={**RESP, "incomplete_details": {"reason": reason}})
    frames, outcome, _ = run([CREATED, delta("a"), end])
    assert outcome.complete and frames[-1].finish_reason == finish


# What breaks a stream, and how the verdict names it.
BROKEN: list[tuple[str, list[dict[str, Any] | str], str, ErrorKind]] = [
    ("no terminal event", [CREATED, delta("a")], "without a terminal event", ErrorKind.PROTOCOL),
    ("nothing at all", [], "before response.created", ErrorKind.PROTOCOL),
    (
        "an error event after response.created",
        [CREATED, ev("error", code="server_error", message="boom")],
        "boom",
        ErrorKind.SERVER,
    ),
    (
        "a rate-limit error event",
        [CREATED, ev("error", code="rate_limit_exceeded", message="Rate limit reached")],
        "Rate limit",
        ErrorKind.RATE_LIMIT,
    ),
    (
        "response.failed",
        [
            CREATED,
            delta("a"),
            ev(
                "response.failed",
                response={**RESP, "error": {"code": "server_error", "message": "it broke"}},
            ),
        ],
        "it broke",
        ErrorKind.SERVER,
    ),
    (
        "a delta before response.created",
        [delta("a")],
        "before response.created",
        ErrorKind.PROTOCOL,
    ),
    ("invalid JSON", [CREATED, "{not json"], "invalid JSON", ErrorKind.PROTOCOL),
    (
        "an event without a type",
        [CREATED, '{"delta":"x","sequence_number":1}'],
        "without a string type",
        ErrorKind.PROTOCOL,
    ),
    (
        "a non-string delta",
        [CREATED, {**delta("a"), "delta": 3}],
        "without a string delta",
        ErrorKind.PROTOCOL,
    ),
    (
        "arguments for no call",
        [CREATED, ev("response.function_call_arguments.delta", output_index=4, delta="x")],
        "no function_call item",
        ErrorKind.PROTOCOL,
    ),
]


@pytest.mark.parametrize(("name", "events", "says", "kind"), BROKEN, ids=[b[0] for b in BROKEN])
def test_what_breaks_a_stream(name: str, events: list[Any], says: str, kind: ErrorKind) -> None:
    frames, outcome, _ = run(events)
    assert not outcome.complete and outcome.failure is not None
    failing = [f for f in frames if f.kind in (FrameKind.ERROR, FrameKind.INVALID)]
    error = failing[0].error if failing else outcome.failure
    assert says in error.message and error.kind is kind


@pytest.mark.parametrize(("first", "second"), [(3, 3), (3, 1), (None, None), ("1", "2")])
def test_sequence_numbers_must_increase(first: Any, second: Any) -> None:
    asm = ResponsesAssembler()
    a = asm.feed(
        ServerSentEvent(
            event="message", data=orjson.dumps({**CREATED, "sequence_number": first}).decode()
        )
    )
    b = asm.feed(
        ServerSentEvent(
            event="message", data=orjson.dumps({**delta("x"), "sequence_number": second}).decode()
        )
    )
    bad = b if a.kind is FrameKind.CHUNK else a
    assert bad.kind is FrameKind.INVALID and "sequence_number" in (
        bad.error.message if bad.error else ""
    )


def test_gaps_are_fine_and_anything_after_the_terminal_event_is_ignored() -> None:
    asm = ResponsesAssembler()
    for seq, e in [(0, CREATED), (5, delta("a")), (9, COMPLETED)]:
        asm.feed(
            ServerSentEvent(
                event=e["type"], data=orjson.dumps({**e, "sequence_number": seq}).decode()
            )
        )
    after = asm.feed(ServerSentEvent(event="message", data="[DONE]"))
    again = asm.feed(
        ServerSentEvent(
            event="message", data=orjson.dumps({**COMPLETED, "sequence_number": 10}).decode()
        )
    )
    assert after.kind is FrameKind.IGNORED and again.kind is FrameKind.IGNORED
    assert asm.finish().complete


def test_chat_usage() -> None:
    assert chat_usage(USAGE) == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert chat_usage(None) is None and chat_usage({"input_tokens": "3"}) is None
