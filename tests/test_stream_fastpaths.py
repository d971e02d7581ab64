"""The per-frame fast paths (SSE decoder: whole ``data:`` events; assembler: the canonical
content chunk) give exactly what the general paths give, and step aside for anything else."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from keel._assembly import Frame, FrameKind, StreamAssembler
from keel._sse import Comment, ServerSentEvent, SSEDecoder

BASE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def _chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> bytes:
    choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
    return orjson.dumps({**BASE, "choices": [choice], **extra})


def _bytewise(raw: bytes) -> list[ServerSentEvent | Comment]:
    """The general line parser only: one byte per feed never ends in a blank line... except
    the last byte of an event, which is fed alone (no fast-path block either)."""
    dec = SSEDecoder()
    out: list[ServerSentEvent | Comment] = []
    for i in range(len(raw)):
        out += dec.feed(raw[i : i + 1])
    return out


@pytest.mark.parametrize(
    "feeds",
    [
        [b"data: " + _chunk({"content": "hi"}) + b"\n\n"],
        [b"data: a\n\ndata: b\n\ndata: [DONE]\n\n"],
        [b"id: 7\n\n", b"data: after an id\n\n"],  # the id persists into fast-path events
        [b"data: x\n\n", b": ping\n\n", b"data: y\n\n"],  # a comment: general path
        [b"data: one\ndata: two\n\n"],  # multi-line data: general path
        [b"event: error\ndata: {}\n\n"],  # another event type
        [b"data:no space\n\n"],
        [b"data: caf\xc3", b"\xa9\n\n"],  # a character split across reads
        [b"data: a\r\n\r\n", b"data: b\n\n"],  # CRLF: general path
        [b"data: \xff bad utf-8\n\n"],
        [b"\xef\xbb\xbfdata: bom\n\n", b"data: next\n\n"],
        [b"data: a\n\n\n\ndata: b\n\n"],  # extra blank lines
    ],
)
def test_sse_fast_path_matches_the_line_parser(feeds: list[bytes]) -> None:
    dec = SSEDecoder()
    fast: list[ServerSentEvent | Comment] = []
    for f in feeds:
        fast += dec.feed(f)
    assert fast == _bytewise(b"".join(feeds))
    assert not dec.has_partial


def _general(asm: StreamAssembler, data: str) -> Frame:
    obj = orjson.loads(data)
    return asm._chunk(data, obj, obj["choices"])


@pytest.mark.parametrize(
    "payload",
    [
        _chunk({"content": "hello"}),
        _chunk({"content": ""}),
        _chunk({}),
        _chunk({"content": None}),
        _chunk({"content": "x", "role": "assistant"}),  # role already known
        _chunk({"content": "x"}, "stop"),  # a finish: general path
        _chunk({"content": "x"}, usage={"prompt_tokens": 1}),
        _chunk({"content": "x"}, usage=None),
        _chunk({"content": "x"}, error=None),  # a null error: a chunk all the same
        _chunk({"content": "x"}, type="chunk"),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}),
        _chunk({"content": 5}),  # wrong type: INVALID, as the general path says
        orjson.dumps({**BASE, "choices": [{"index": 1, "delta": {"content": "n=2"}}]}),
        orjson.dumps({**BASE, "choices": [{"index": True, "delta": {"content": "bool"}}]}),
        orjson.dumps({**BASE, "choices": [{"delta": {"content": "no index"}}]}),
        orjson.dumps({**BASE, "choices": [{"index": 0, "delta": "oops"}]}),
        orjson.dumps({**BASE, "choices": ["oops"]}),
    ],
)
def test_assembler_fast_path_matches_the_general_path(payload: bytes) -> None:
    opening = ServerSentEvent(_chunk({"role": "assistant", "content": ""}).decode())
    fast, slow = StreamAssembler(), StreamAssembler()
    fast.feed(opening)
    slow.feed(opening)
    data = payload.decode()
    got = fast.feed(ServerSentEvent(data))
    want = _general(slow, data)
    assert (got.kind, got.data, got.obj, got.content, got.finish_reason) == (
        want.kind,
        want.data,
        want.obj,
        want.content,
        want.finish_reason,
    )
    assert (got.error is None) == (want.error is None)
    for attr in ("chunks", "finish_reason", "finish_reasons", "role", "text", "invalid_frames"):
        assert getattr(fast, attr) == getattr(slow, attr), attr
    assert fast._choices == slow._choices
    assert fast.tool_calls == slow.tool_calls
    assert fast.has_tool_calls == bool(slow.tool_calls)


# -- bytes all the way: SSEDecoder.data_payloads → StreamAssembler.feed_data → Frame.raw --------


_READS = [
    [b"data: " + _chunk({"content": "hi"}) + b"\n\n"],
    [b"data: a\n\ndata: b\n\ndata: [DONE]\n\n"],
    [b"id: 7\n\n", b"data: after an id\n\n"],
    [b"data: x\n\n", b": ping\n\n", b"data: y\n\n"],
    [b"data: one\ndata: two\n\n"],
    [b"event: error\ndata: {}\n\n"],
    [b"data:no space\n\n"],
    [b"data: caf\xc3", b"\xa9\n\n"],
    [b"data: a\r\n\r\n", b"data: b\n\n"],
    [b"data: \xff bad utf-8\n\n"],
    [b"\xef\xbb\xbfdata: bom\n\n", b"data: next\n\n"],
    [b"data: a\n\n\n\ndata: b\n\n"],
    [b"data: \n\n", b"\n\n", b"data: z\n\n"],
    [b"x\n\n", b"data: after a stray line\n\n"],
    # after the first read (the BOM question settled): one event, or one and a blank line,
    # or two lines in one event
    [b"data: first\n\n", b"data: a\n\n\n\n", b"data: b\nc\n\n", b"data: one\n\n"],
    # reads that end in one LF, or are one or two LFs
    [b"data: first\n\n", b"\n", b"data: x\n", b"\n", b"\n\n", b"data: y\n\n"],
    [b"data: first\n\n", b"data: a\n\ndata: b\n", b"\n", b"data: half"],
]


@pytest.mark.parametrize("reads", _READS)
def test_data_payloads_are_the_events_feed_returns(reads: list[bytes]) -> None:
    fast, slow = SSEDecoder(), SSEDecoder()
    for read in reads:
        payloads = fast.data_payloads(read)
        if payloads is None:
            got = fast.feed(read)
        else:
            got = [ServerSentEvent(p.decode("utf-8", "replace"), id=fast.last_event_id)
                   for p in payloads]  # fmt: skip
        assert got == slow.feed(read)
        assert fast.has_partial == slow.has_partial


def test_an_llm_read_takes_the_bytes_path() -> None:
    dec = SSEDecoder()
    dec.feed(b"data: first\n\n")  # the first read settles the BOM question
    assert dec.data_payloads(b"data: {\"a\":1}\n\ndata: [DONE]\n\n") == [b'{"a":1}', b"[DONE]"]
    assert dec.data_payloads(b"data: x\n\n: keep-alive\n\n") is None


@pytest.mark.parametrize(
    "payload",
    [
        _chunk({"content": "hello, 你好"}),
        _chunk({"content": "x"}, "stop"),
        _chunk({"content": "x"}, usage={"prompt_tokens": 1}),
        _chunk({"content": 5}),
        orjson.dumps({"error": {"message": "boom", "type": "server_error"}}),
        b"[DONE]",
        b"ping",
        b"",
        b"{}",
        b"[1, 2]",
        b'{"choices": [], "usage": {"prompt_tokens": 3}}',
        b"not json",
        b'{"choices": [{"index": 0, "delta": {"content": "\xff"}}]}',  # not UTF-8
        b'{"choices": [{"index": 0, "delta": {"content": "\xed\xa0\x80"}}]}',  # a surrogate
    ],
)
def test_feed_data_is_feed_of_the_decoded_payload(payload: bytes) -> None:
    opening = ServerSentEvent(_chunk({"role": "assistant", "content": ""}).decode())
    fast, slow = StreamAssembler(), StreamAssembler()
    fast.feed(opening)
    slow.feed(opening)
    got = fast.feed_data(payload)
    want = slow.feed(ServerSentEvent(payload.decode("utf-8", "replace")))
    assert (got.kind, got.data, got.obj, got.content, got.finish_reason) == (
        want.kind, want.data, want.obj, want.content, want.finish_reason,
    )  # fmt: skip
    assert (got.error and got.error.message) == (want.error and want.error.message)
    for attr in ("chunks", "finish_reason", "done", "usage", "text", "invalid_frames"):
        assert getattr(fast, attr) == getattr(slow, attr), attr
    # A chunk keeps the upstream's bytes exactly when they are what re-encoding its decoded
    # text would give (valid UTF-8): the relay forwards them instead.
    if got.raw is not None:
        assert got.raw == payload == want.data.encode()
    assert (got.raw is not None) == (want.kind is FrameKind.CHUNK and payload == want.data.encode())


def test_feed_data_after_done_is_ignored_like_feed() -> None:
    asm = StreamAssembler()
    asm.feed_data(b"[DONE]")
    assert asm.done
    frame = asm.feed_data(_chunk({"content": "late"}))
    assert frame.kind is FrameKind.IGNORED and frame.raw is None


@pytest.mark.parametrize("piece", ["hi", ""])
def test_the_canonical_frame_is_the_constructors(piece: str) -> None:
    """The fast path stores a frame's fields itself: every one of them, as the dataclass
    would (``==`` compares them all; one left unset would raise)."""
    payload = _chunk({"content": piece})
    obj = orjson.loads(payload)
    opening = _chunk({"role": "assistant", "content": ""})
    by_bytes, by_text = StreamAssembler(), StreamAssembler()
    by_bytes.feed_data(opening)
    by_text.feed_data(opening)
    assert by_bytes.feed_data(payload) == Frame(FrameKind.CHUNK, None, obj, piece, raw=payload)
    text = payload.decode()
    assert by_text.feed(ServerSentEvent(text)) == Frame(FrameKind.CHUNK, text, obj, piece)
