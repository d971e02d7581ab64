"""The per-frame fast paths (SSE decoder: whole ``data:`` events; assembler: the canonical
content chunk) give exactly what the general paths give, and step aside for anything else."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from keel._assembly import Frame, StreamAssembler
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
