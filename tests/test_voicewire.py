"""The voice-bot worker's bus messages (keel._voicewire): what is accepted, what is
Malformed, and the exact messages of a turn in both protocols."""

from __future__ import annotations

import base64

import orjson
import pytest

from keel._voicewire import (
    Cancel,
    ChatWire,
    Malformed,
    TTSWire,
    Utterance,
    cancel_message,
    error_of,
    parse_control,
    parse_utterance,
)

GOOD = [
    (b'{"session": "s1", "turn": "t1", "text": "hi"}', Utterance("s1", "t1", "hi")),
    ('{"session":"s","turn":"t","text":"你好","extra":1}'.encode(), Utterance("s", "t", "你好")),
]
BAD = [
    (b"not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "not an object"),
    (b'"text"', "not an object"),
    (b'{"turn": "t", "text": "x"}', "'session'"),
    (b'{"session": "", "turn": "t", "text": "x"}', "'session'"),
    (b'{"session": 1, "turn": "t", "text": "x"}', "'session'"),
    (b'{"session": "s", "text": "x"}', "'turn'"),
    (b'{"session": "s", "turn": ["t"], "text": "x"}', "'turn'"),
    (b'{"session": "s", "turn": "t"}', "'text'"),
    (b'{"session": "s", "turn": "t", "text": "   "}', "'text'"),
    (b'{"session": "s", "turn": "t", "text": 5}', "'text'"),
    (orjson.dumps({"session": "s" * 257, "turn": "t", "text": "x"}), "longer than"),
]


@pytest.mark.parametrize(("raw", "expected"), GOOD)
def test_utterance(raw: bytes, expected: Utterance) -> None:
    assert parse_utterance(raw) == expected


@pytest.mark.parametrize(("raw", "why"), BAD)
def test_malformed(raw: bytes, why: str) -> None:
    with pytest.raises(Malformed, match=why):
        parse_utterance(raw)


def test_control() -> None:
    assert parse_control(b'{"type": "cancel", "session": "s1"}') == Cancel("s1")
    assert parse_control(orjson.dumps(cancel_message("s1", "t2"))) == Cancel("s1", "t2")
    for raw in (b'{"type": "pause", "session": "s1"}', b'{"type": "cancel"}', b"nope"):
        with pytest.raises(Malformed):
            parse_control(raw)


def test_events_protocol() -> None:
    w = ChatWire("events", "s1", "t1")
    assert w.segment("当然可以。") == [
        {"type": "segment", "session": "s1", "turn": "t1", "seq": 0, "text": "当然可以。"}
    ]
    assert w.segment("一一得一。")[0]["seq"] == 1
    assert w.end("stop") == [
        {"type": "end", "session": "s1", "turn": "t1", "seq": 2, "finish_reason": "stop",
         "error": None}
    ]  # fmt: skip
    assert w.ended
    assert w.restart() == {"type": "restart", "session": "s1", "turn": "t1"}


def seq_view(msgs: list[dict]) -> list[tuple]:
    return [(m["seq"], m["text"], m.get("finish_reason")) for m in msgs]


ERR = {"message": "quota", "type": "insufficient_quota", "code": "insufficient_quota"}
SEQ_CASES = [
    # (segments, reason, error, what goes out over the whole turn)
    (["a.", "b.", "c."], "stop", None, [(1, "a.", None), (2, "b.", None), (-3, "c.", "stop")]),
    (["a."], "stop", None, [(-1, "a.", "stop")]),
    ([], "stop", None, [(-1, "", "stop")]),
    (["a.", "b"], "length", None, [(1, "a.", None), (2, "b", None), (-3, "", "length")]),
    (["a."], "cancelled", None, [(1, "a.", None), (-2, "", "cancelled")]),
    ([], "error", ERR, [(-1, "", "error")]),
    (["a."], "content_filter", None, [(1, "a.", None), (-2, "", "content_filter")]),
]


@pytest.mark.parametrize(("segs", "reason", "error", "expected"), SEQ_CASES)
def test_seq_protocol(segs: list[str], reason: str, error: dict | None, expected: list) -> None:
    w = ChatWire("seq", "s1", "t1")
    out: list[dict] = []
    for s in segs:
        out += w.segment(s)
    assert len(out) == max(0, len(segs) - 1)  # each sentence waits to know if it is the last
    out += w.end(reason, error)
    assert seq_view(out) == expected
    assert out[-1]["error"] == error
    assert all(m["session"] == "s1" and m["turn"] == "t1" for m in out)


def test_tts_wire() -> None:
    w = TTSWire("s1", "t1")
    a = w.audio(0, b"\x00\x01")
    assert a == {"type": "audio", "session": "s1", "turn": "t1", "segment": 0, "seq": 0,
                 "data": base64.b64encode(b"\x00\x01").decode()}  # fmt: skip
    assert w.audio(2, b"x")["seq"] == 1
    assert w.end("cancelled")["seq"] == 2


def test_error_of() -> None:
    body = {"error": {"message": "m", "type": "t", "param": None, "code": "c"}}
    assert error_of(body) == {"message": "m", "type": "t", "code": "c"}
    assert error_of("weird")["type"] == "server_error"
