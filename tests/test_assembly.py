"""Stream assembly: a healthy stream, and every in-stream failure of shared/faults.md §2 as a
typed outcome. Streams are fed as raw SSE bytes through the real decoder where the wire shape
matters, so these double as decoder+assembler integration tests."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from keel._assembly import (
    TERMINAL_FINISH_REASONS,
    Frame,
    FrameKind,
    StreamAssembler,
    StreamOutcome,
)
from keel._classify import Dialect, ErrorKind
from keel._sse import ServerSentEvent, SSEDecoder

ID = "chatcmpl-abc"
MODEL = "gpt-4o-mini"


def chunk(
    delta: dict[str, Any] | None = None,
    finish: Any = None,
    *,
    index: int = 0,
    usage: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "delta": delta or {}, "finish_reason": finish}
    obj: dict[str, Any] = {
        "id": ID,
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [choice],
    }
    if usage is not None:
        obj["usage"] = usage
    obj.update(extra)
    return obj


def sse(*items: dict[str, Any] | str | bytes) -> bytes:
    """Encode frames: dicts as ``data: <json>``, str as ``data: <str>``, bytes verbatim."""
    out = b""
    for item in items:
        if isinstance(item, bytes):
            out += item
        elif isinstance(item, str):
            out += b"data: " + item.encode() + b"\n\n"
        else:
            out += b"data: " + orjson.dumps(item) + b"\n\n"
    return out


def run(
    raw: bytes, *, dialect: Dialect | str = Dialect.OPENAI, require_done: bool = True
) -> tuple[StreamAssembler, list[Frame], StreamOutcome]:
    dec = SSEDecoder()
    asm = StreamAssembler(dialect=dialect, require_done=require_done)
    frames = [asm.feed(e) for e in dec.feed(raw) + dec.close() if isinstance(e, ServerSentEvent)]
    return asm, frames, asm.finish()


def kinds(frames: list[Frame]) -> list[FrameKind]:
    return [f.kind for f in frames]


USAGE = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}

HEALTHY = (
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Hi"}),
    chunk({"content": " there, 你好"}),
    chunk({}, "stop"),
    {**chunk(), "choices": [], "usage": USAGE},
    "[DONE]",
)


# --- healthy --------------------------------------------------------------------------------


def test_healthy_stream_is_complete() -> None:
    asm, frames, outcome = run(sse(*HEALTHY))
    assert outcome == StreamOutcome(complete=True)
    assert kinds(frames) == [FrameKind.CHUNK] * 5 + [FrameKind.DONE]
    assert asm.text == "Hi there, 你好"
    assert asm.usage == USAGE
    assert asm.finish_reason == "stop"
    assert (asm.id, asm.created, asm.model, asm.role) == (ID, 1700000000, MODEL, "assistant")
    assert asm.chunks == 5
    assert asm.done
    assert asm.tool_calls == []
    assert not asm.in_tool_call
    assert [f.content for f in frames] == ["", "Hi", " there, 你好", "", "", ""]
    assert [f.finish_reason for f in frames] == [None, None, None, "stop", None, None]


def test_chunk_frame_carries_parsed_object_and_raw_data() -> None:
    asm = StreamAssembler()
    obj = chunk({"content": "x"})
    data = orjson.dumps(obj).decode()
    frame = asm.feed(ServerSentEvent(data))
    assert frame.kind is FrameKind.CHUNK
    assert frame.obj == obj
    assert frame.data == data
    assert frame.content == "x"
    assert frame.error is None


def test_text_is_cached_and_keeps_growing() -> None:
    asm = StreamAssembler()
    for piece in ["a", "b", "c"]:
        asm.feed(ServerSentEvent(orjson.dumps(chunk({"content": piece})).decode()))
    assert asm.text == "abc"
    assert asm.text is asm.text  # joined once
    asm.feed(ServerSentEvent(orjson.dumps(chunk({"content": "d"})).decode()))
    assert asm.text == "abcd"


def test_finish_reason_first_terminal_wins_and_usage_last_wins() -> None:
    raw = sse(
        chunk({"content": "x"}, usage={"total_tokens": 1}),
        chunk({}, "length"),
        chunk({}, "stop", usage={"total_tokens": 2}),
        "[DONE]",
    )
    asm, frames, outcome = run(raw)
    assert outcome.complete
    assert asm.finish_reason == "length"
    assert frames[2].finish_reason == "stop"  # the frame reports what this chunk said
    assert asm.usage == {"total_tokens": 2}


def test_usage_null_does_not_clear_usage() -> None:
    raw = sse(chunk({}, "stop", usage=USAGE), chunk(usage=None) | {"usage": None}, "[DONE]")
    asm, _, _ = run(raw)
    assert asm.usage == USAGE


@pytest.mark.parametrize("reason", sorted(TERMINAL_FINISH_REASONS))
def test_standard_finish_reasons_are_terminal(reason: str) -> None:
    asm, _, outcome = run(sse(chunk({"content": "x"}), chunk({}, reason), "[DONE]"))
    assert outcome.complete
    assert asm.finish_reason == reason


def test_unknown_finish_reason_is_terminal_and_kept() -> None:
    asm, _, outcome = run(sse(chunk({"content": "x"}, "eos_token"), "[DONE]"))
    assert outcome.complete
    assert asm.finish_reason == "eos_token"


def test_azure_prompt_filter_chunk_and_late_metadata() -> None:
    # Azure opens with an empty-choices chunk whose id/model are blank
    first = {"id": "", "object": "", "created": 0, "model": "", "choices": []}
    first["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": {}}]
    asm, frames, outcome = run(sse(first, chunk({"content": "x"}, "stop"), "[DONE]"))
    assert kinds(frames) == [FrameKind.CHUNK, FrameKind.CHUNK, FrameKind.DONE]
    assert (asm.id, asm.model, asm.created) == (ID, MODEL, 1700000000)
    assert outcome.complete


def test_usage_only_chunk_without_choices_key() -> None:
    asm, frames, outcome = run(sse(chunk({"content": "x"}, "stop"), {"usage": USAGE}, "[DONE]"))
    assert kinds(frames) == [FrameKind.CHUNK, FrameKind.CHUNK, FrameKind.DONE]
    assert asm.usage == USAGE
    assert outcome.complete


def test_content_none_and_absent_delta() -> None:
    raw = sse(
        chunk({"role": "assistant", "content": None}),
        {"id": ID, "choices": [{"index": 0, "finish_reason": None}]},  # no delta at all
        {"id": ID, "choices": [{"index": 0, "delta": None, "finish_reason": "stop"}]},
        "[DONE]",
    )
    asm, frames, outcome = run(raw)
    assert [f.content for f in frames[:3]] == ["", "", ""]
    assert asm.text == ""
    assert outcome.complete


def test_choice_without_index_is_choice_zero() -> None:
    raw = sse({"choices": [{"delta": {"content": "x"}, "finish_reason": "stop"}]}, "[DONE]")
    asm, _, outcome = run(raw)
    assert asm.text == "x"
    assert outcome.complete


# --- [DONE] ---------------------------------------------------------------------------------


def test_events_after_done_are_ignored() -> None:
    asm, frames, outcome = run(
        sse(chunk({"content": "x"}, "stop"), "[DONE]", chunk({"content": "y"}))
    )
    assert kinds(frames) == [FrameKind.CHUNK, FrameKind.DONE, FrameKind.IGNORED]
    assert asm.text == "x"
    assert asm.chunks == 1
    assert outcome.complete


def test_done_with_stray_whitespace() -> None:
    _, frames, outcome = run(sse(chunk({}, "stop"), "[DONE] "))
    assert kinds(frames)[-1] is FrameKind.DONE
    assert outcome.complete


def test_no_done_with_require_done_fails() -> None:
    asm, _, outcome = run(sse(chunk({"content": "x"}), chunk({}, "stop")))
    assert not outcome.complete
    assert outcome.failure is not None
    assert outcome.failure.kind is ErrorKind.PROTOCOL
    assert outcome.failure.retryable and outcome.failure.failover
    assert "[DONE]" in outcome.failure.message
    assert asm.text == "x"  # what the client saw is still available for continuation


def test_no_done_without_require_done_is_complete() -> None:
    _, _, outcome = run(sse(chunk({"content": "x"}), chunk({}, "stop")), require_done=False)
    assert outcome == StreamOutcome(complete=True)


# --- missing finish_reason / truncation -----------------------------------------------------


def _missing_finish(style: str) -> bytes:
    frames: list[dict[str, Any] | str] = []
    for piece in ["a", "b"]:
        c = chunk({"content": piece}, "" if style == "empty" else None)
        if style == "absent":
            del c["choices"][0]["finish_reason"]
        frames.append(c)
    return sse(*frames, "[DONE]")


@pytest.mark.parametrize("style", ["absent", "null", "empty"])
def test_missing_finish_reason_is_a_protocol_failure(style: str) -> None:
    asm, frames, outcome = run(_missing_finish(style))
    assert [f.finish_reason for f in frames] == [None, None, None]
    assert asm.finish_reason is None
    assert not outcome.complete
    assert outcome.failure is not None
    assert outcome.failure.kind is ErrorKind.PROTOCOL
    assert outcome.failure.retryable and outcome.failure.failover
    assert "finish_reason" in outcome.failure.message
    assert asm.text == "ab"


def test_truncation_no_finish_no_done() -> None:
    raw = sse(chunk({"role": "assistant"}), chunk({"content": "Hel"}))
    raw += b'data: {"id":"chatcmpl-abc","choices":[{"index":0,"delta":{"con'  # cut mid-frame
    dec = SSEDecoder()
    asm = StreamAssembler()
    for e in dec.feed(raw) + dec.close():
        assert isinstance(e, ServerSentEvent)
        asm.feed(e)
    outcome = asm.finish()
    assert dec.has_partial  # the decoder's truncation sign
    assert not outcome.complete
    assert outcome.failure is not None
    assert outcome.failure.kind is ErrorKind.PROTOCOL
    assert outcome.failure.retryable
    assert "finish_reason" in outcome.failure.message
    assert asm.text == "Hel"


def test_empty_stream_fails() -> None:
    _, _, outcome = run(b"")
    assert not outcome.complete
    assert outcome.failure is not None and outcome.failure.kind is ErrorKind.PROTOCOL


def test_done_without_any_chunk_fails() -> None:
    _, _, outcome = run(sse("[DONE]"))
    assert not outcome.complete


# --- error frames ---------------------------------------------------------------------------


def test_openai_mid_stream_server_error() -> None:
    err = {"error": {"message": "The server experienced an error.", "type": "server_error"}}
    asm, frames, outcome = run(sse(chunk({"content": "Hi"}), err, "[DONE]"))
    assert kinds(frames) == [FrameKind.CHUNK, FrameKind.ERROR, FrameKind.DONE]
    error = frames[1].error
    assert error is not None
    assert error.kind is ErrorKind.SERVER
    assert error.retryable
    assert frames[1].obj == err
    assert outcome == StreamOutcome(complete=False, failure=error)
    assert asm.error is error
    assert asm.text == "Hi"


def test_dashscope_output_moderation() -> None:
    err = {
        "error": {
            "message": "Output data may contain inappropriate content.",
            "type": "data_inspection_failed",
            "code": "data_inspection_failed",
        }
    }
    asm, frames, outcome = run(sse(chunk({"content": "部分"}), err), dialect=Dialect.DASHSCOPE)
    assert kinds(frames) == [FrameKind.CHUNK, FrameKind.ERROR]
    assert outcome.failure is not None
    assert outcome.failure.kind is ErrorKind.MODERATION
    assert not outcome.failure.retryable
    assert not outcome.complete
    assert asm.text == "部分"


def test_anthropic_event_error() -> None:
    payload = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    raw = sse(chunk({"content": "x"})) + b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"
    _, frames, outcome = run(raw, dialect=Dialect.ANTHROPIC)
    assert kinds(frames) == [FrameKind.CHUNK, FrameKind.ERROR]
    assert outcome.failure is not None
    assert outcome.failure.kind is ErrorKind.OVERLOADED
    assert outcome.failure.retryable


def test_type_error_object_without_event_line() -> None:
    payload = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    _, frames, outcome = run(sse(payload))
    assert kinds(frames) == [FrameKind.ERROR]
    assert outcome.failure is not None and outcome.failure.kind is ErrorKind.OVERLOADED


@pytest.mark.parametrize("data", [b"", b"something broke", b"[1,2]", b"{}"])
def test_event_error_with_odd_payload_is_still_an_error(data: bytes) -> None:
    _, frames, outcome = run(b"event: error\ndata: " + data + b"\n\n")
    assert kinds(frames) == [FrameKind.ERROR]
    assert outcome.failure is not None
    assert outcome.failure.retryable
    assert not outcome.complete


def test_first_error_wins() -> None:
    e1 = {
        "error": {
            "message": "Output data may contain inappropriate content.",
            "code": "data_inspection_failed",
        }
    }
    e2 = {"error": {"message": "The server had an error", "type": "server_error"}}
    _, _, outcome = run(sse(e1, e2))
    assert outcome.failure is not None and outcome.failure.kind is ErrorKind.MODERATION


def test_error_null_alongside_choices_is_a_chunk() -> None:
    _, frames, outcome = run(sse(chunk({"content": "x"}, "stop", error=None), "[DONE]"))
    assert kinds(frames) == [FrameKind.CHUNK, FrameKind.DONE]
    assert outcome.complete


# --- noise and garbage ----------------------------------------------------------------------


@pytest.mark.parametrize("word", ["ping", "keep-alive", "heartbeat", "PING", ""])
def test_keepalive_data_is_ignored(word: str) -> None:
    asm, frames, outcome = run(sse(chunk({"content": "x"}), word, chunk({}, "stop"), "[DONE]"))
    assert kinds(frames) == [FrameKind.CHUNK, FrameKind.IGNORED, FrameKind.CHUNK, FrameKind.DONE]
    assert outcome.complete
    assert asm.invalid_frames == 0


def test_event_ping_with_empty_object_is_ignored() -> None:
    raw = (
        sse(chunk({"content": "x"}))
        + b"event: ping\ndata: {}\n\n"
        + sse(chunk({}, "stop"), "[DONE]")
    )
    asm, frames, outcome = run(raw)
    assert kinds(frames) == [FrameKind.CHUNK, FrameKind.IGNORED, FrameKind.CHUNK, FrameKind.DONE]
    assert outcome.complete
    assert asm.chunks == 2


def test_bare_empty_object_is_ignored() -> None:
    _, frames, _ = run(sse({}))
    assert kinds(frames) == [FrameKind.IGNORED]


def test_other_event_types_are_ignored_even_with_chunk_data() -> None:
    raw = b"event: message_start\ndata: " + orjson.dumps(chunk({"content": "zz"})) + b"\n\n"
    asm, frames, _ = run(raw)
    assert kinds(frames) == [FrameKind.IGNORED]
    assert asm.text == ""


def test_comments_never_reach_the_assembler_as_frames() -> None:
    raw = b": keep-alive\n\n" + sse(chunk({"content": "x"}, "stop"), "[DONE]")
    _, frames, outcome = run(raw)
    assert kinds(frames) == [FrameKind.CHUNK, FrameKind.DONE]
    assert outcome.complete


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ('{"choices": [', "invalid JSON"),
        ("not json at all", "invalid JSON"),
        ("[1, 2, 3]", "not a JSON object"),
        ('"a string"', "not a JSON object"),
        ("42", "not a JSON object"),
        ('{"id": "x", "object": "chat.completion.chunk"}', "without a choices list"),
        ('{"choices": {"0": {}}}', "without a choices list"),
        ('{"choices": [1]}', "choice is not an object"),
        ('{"choices": [{"index": "0"}]}', "index is not an integer"),
        ('{"choices": [{"index": 0, "delta": "hi"}]}', "delta is not an object"),
        ('{"choices": [{"index": 0, "delta": {"content": 5}}]}', "content is not a string"),
        ('{"choices": [{"index": 0, "delta": {}, "finish_reason": 1}]}', "not a string"),
        ('{"choices": [], "usage": 3}', "usage is not an object"),
        ('{"choices": [{"delta": {"tool_calls": {"a": 1}}}]}', "tool_calls is not a list"),
    ],
)
def test_garbage_is_invalid_protocol_error(data: str, reason: str) -> None:
    asm = StreamAssembler()
    frame = asm.feed(ServerSentEvent(data))
    assert frame.kind is FrameKind.INVALID
    assert frame.data == data
    assert frame.error is not None
    assert frame.error.kind is ErrorKind.PROTOCOL
    assert frame.error.retryable and frame.error.failover
    assert reason in frame.error.message
    assert asm.invalid_frames == 1
    assert asm.chunks == 0


def test_invalid_message_does_not_dump_a_long_payload() -> None:
    data = '{"choices": [' + "x" * 5000
    frame = StreamAssembler().feed(ServerSentEvent(data))
    assert frame.error is not None
    assert len(frame.error.message) < 160
    assert "x" * 100 not in frame.error.message


# --- tool calls -----------------------------------------------------------------------------


def _tc(
    index: int, *, id: str | None = None, name: str | None = None, args: str | None = None
) -> dict[str, Any]:
    item: dict[str, Any] = {"index": index}
    if id is not None:
        item["id"] = id
        item["type"] = "function"
    function: dict[str, Any] = {}
    if name is not None:
        function["name"] = name
    if args is not None:
        function["arguments"] = args
    if function:
        item["function"] = function
    return item


def test_tool_call_arguments_split_across_chunks() -> None:
    args0 = '{"city": "北京", "unit": "celsius"}'
    args1 = '{"q": "a \\"quoted\\" word"}'
    pieces0 = [args0[i : i + 5] for i in range(0, len(args0), 5)]
    frames: list[dict[str, Any] | str] = [chunk({"role": "assistant", "content": None})]
    frames.append(chunk({"tool_calls": [_tc(0, id="call_1", name="get_weather", args="")]}))
    for p in pieces0:
        frames.append(chunk({"tool_calls": [_tc(0, args=p)]}))
    frames.append(chunk({"tool_calls": [_tc(1, id="call_2", name="sea", args=args1[:4])]}))
    frames.append(chunk({"tool_calls": [_tc(1, name="rch", args=args1[4:])]}))
    frames.append(chunk({}, "tool_calls"))
    frames.append("[DONE]")

    dec, asm = SSEDecoder(), StreamAssembler()
    seen_in_call: list[bool] = []
    for e in dec.feed(sse(*frames)):
        assert isinstance(e, ServerSentEvent)
        asm.feed(e)
        seen_in_call.append(asm.in_tool_call)
    assert seen_in_call[0] is False  # role chunk: nothing yet
    assert all(seen_in_call[1:-2])  # while arguments stream
    assert seen_in_call[-2] is False  # finish_reason arrived
    calls = asm.tool_calls
    assert [(c.index, c.id, c.type, c.name, c.arguments) for c in calls] == [
        (0, "call_1", "function", "get_weather", args0),
        (1, "call_2", "function", "search", args1),
    ]
    assert orjson.loads(calls[0].arguments) == {"city": "北京", "unit": "celsius"}
    assert asm.finish_reason == "tool_calls"
    assert asm.text == ""
    assert asm.finish().complete


def test_tool_calls_read_mid_stream_then_continue() -> None:
    asm = StreamAssembler()
    asm.feed(
        ServerSentEvent(
            orjson.dumps(chunk({"tool_calls": [_tc(0, id="c", name="f", args='{"a"')]})).decode()
        )
    )
    assert asm.tool_calls[0].arguments == '{"a"'
    asm.feed(ServerSentEvent(orjson.dumps(chunk({"tool_calls": [_tc(0, args=": 1}")]})).decode()))
    assert asm.tool_calls[0].arguments == '{"a": 1}'
    assert asm.in_tool_call


def test_tool_call_without_index_uses_position() -> None:
    item = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    asm, _, outcome = run(sse(chunk({"tool_calls": [item]}, "tool_calls"), "[DONE]"))
    assert [(c.index, c.name, c.arguments) for c in asm.tool_calls] == [(0, "f", "{}")]
    assert outcome.complete


def test_truncated_tool_call_is_incomplete() -> None:
    raw = sse(chunk({"tool_calls": [_tc(0, id="c", name="f", args='{"a": ')]}))
    asm, _, outcome = run(raw)
    assert asm.in_tool_call
    assert not outcome.complete


# --- n > 1 ----------------------------------------------------------------------------------


def test_two_choices_complete_only_when_both_finish() -> None:
    raw = sse(
        chunk({"role": "assistant", "content": "A"}),
        chunk({"role": "assistant", "content": "B"}, index=1),
        chunk({"content": "a"}),
        chunk({"content": "b"}, index=1),
        chunk({}, "stop"),
        chunk({}, "length", index=1),
        "[DONE]",
    )
    asm, frames, outcome = run(raw)
    assert outcome.complete
    assert asm.text == "Aa"
    assert asm.choice_text(1) == "Bb"
    assert asm.choice_text(0) == "Aa"
    assert asm.finish_reasons == {0: "stop", 1: "length"}
    assert asm.finish_reason == "stop"
    # frames report choice 0 only
    assert [f.content for f in frames[:4]] == ["A", "", "a", ""]
    assert [f.finish_reason for f in frames[4:6]] == ["stop", None]


def test_two_choices_one_unfinished_fails() -> None:
    raw = sse(
        chunk({"content": "A"}),
        chunk({"content": "B"}, index=1),
        chunk({}, "stop"),
        "[DONE]",
    )
    asm, _, outcome = run(raw)
    assert asm.finish_reason == "stop"
    assert not outcome.complete
    assert outcome.failure is not None
    assert "finish_reason" in outcome.failure.message
    assert "1" in outcome.failure.message


def test_both_choices_in_one_chunk() -> None:
    two = chunk({"content": "x"}, "stop")
    two["choices"].append({"index": 1, "delta": {"content": "y"}, "finish_reason": "stop"})
    asm, _, outcome = run(sse(two, "[DONE]"))
    assert (asm.text, asm.choice_text(1)) == ("x", "y")
    assert outcome.complete


# --- whole stream through the decoder, split at every byte ---------------------------------


def test_healthy_stream_split_anywhere_gives_same_result() -> None:
    raw = sse(*HEALTHY).replace(b"\n", b"\r\n")
    for cut in range(0, len(raw), 7):
        dec, asm = SSEDecoder(), StreamAssembler()
        for part in (raw[:cut], raw[cut:]):
            for e in dec.feed(part):
                if isinstance(e, ServerSentEvent):
                    asm.feed(e)
        assert asm.text == "Hi there, 你好"
        assert asm.finish().complete
