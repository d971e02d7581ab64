"""The stream transcript, byte by byte: upstream frames in; the payloads the client gets, the
commit and the ending out. No sockets."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from keel._assembly import Frame, FrameKind, StreamAssembler
from keel._sse import SSEDecoder
from keel._transcript import Lost, Take, Transcript


def chunk(
    content: str | None = None,
    *,
    cid: str = "c1",
    finish: str | None = None,
    role: bool = False,
    tool: dict[str, Any] | None = None,
    created: int = 1,
) -> bytes:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    if tool is not None:
        delta["tool_calls"] = [tool]
    obj = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return orjson.dumps(obj)


def usage(prompt: int, completion: int, cid: str = "c1") -> bytes:
    return orjson.dumps(
        {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
    )


class Upstream:
    """One attempt's upstream: payloads → validated frames, as the driver gets them."""

    def __init__(self) -> None:
        self.asm = StreamAssembler()
        self.decoder = SSEDecoder()

    def frames(self, *payloads: bytes) -> list[Frame]:
        wire = b"".join(b"data: " + p + b"\n\n" for p in payloads)
        out = [self.asm.feed(ev) for ev in self.decoder.feed(wire)]  # type: ignore[arg-type]
        return [f for f in out if f.kind is FrameKind.CHUNK]


def feed(take: Take, up: Upstream, *payloads: bytes) -> tuple[list[bytes], bool]:
    out: list[bytes] = []
    committed = False
    for f in up.frames(*payloads):
        committed = take.chunk(f, out) or committed
    return out, committed


def test_the_happy_path_relays_the_upstreams_own_bytes_and_one_ending() -> None:
    t = Transcript(wants_usage=True)
    up = Upstream()
    take = t.take(up.asm, "a")
    role, hello, world = chunk("", role=True), chunk("Hello"), chunk(" world")
    out, committed = feed(take, up, role)
    assert (out, committed) == ([], False)  # the role chunk alone is not worth committing for
    out, committed = feed(take, up, hello, world)
    assert committed and out == [role, hello, world]  # verbatim, in order
    stop, use = chunk(finish="stop"), usage(5, 2)
    out, committed = feed(take, up, stop, use)
    assert (out, committed) == ([], False)  # the terminal chunk waits for [DONE]
    assert t.ending(take.complete()) == [stop, use]  # the upstream's own usage chunk
    assert t.text == "Hello world" and t.tokens == 2
    assert t.repair() is None


def test_the_commit_buffer_holds_the_first_tokens() -> None:
    t = Transcript(commit_tokens=3)
    up = Upstream()
    take = t.take(up.asm, "a")
    a, b, c, d = chunk("a"), chunk("b"), chunk("c"), chunk("d")
    assert feed(take, up, a, b) == ([], False)
    out, committed = feed(take, up, c, d)
    assert committed and out == [a, b, c, d]


def test_a_short_answer_commits_at_its_terminal_chunk() -> None:
    t = Transcript(commit_tokens=10)
    up = Upstream()
    take = t.take(up.asm, "a")
    hi, stop = chunk("Hi"), chunk(finish="stop")
    out, committed = feed(take, up, hi, stop)
    assert committed and out == [hi]
    assert take.complete() == stop


def _committed(t: Transcript, *contents: str) -> Take:
    up = Upstream()
    take = t.take(up.asm, "a")
    feed(take, up, chunk("", role=True), *[chunk(c) for c in contents])
    assert t.committed
    return take


def test_a_prefill_continuation_is_spliced_into_the_committed_stream() -> None:
    t = Transcript()
    first = _committed(t, "Hello", " wor")
    first.failed()
    t.attempts = 2
    up = Upstream()
    take = t.take(up.asm, "b", "prefill")
    out, committed = feed(
        take,
        up,
        chunk("", role=True, cid="other", created=9),
        chunk("ld", cid="other"),
        chunk(finish="stop", cid="other"),
    )
    assert not committed
    # The role chunk is dropped; the rest carries the committed stream's id/created/model.
    assert [orjson.loads(p) for p in out] == [
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": "ld"}, "finish_reason": None}],
        }
    ]
    terminal = orjson.loads(take.complete() or b"")
    assert terminal["choices"][0]["finish_reason"] == "stop"
    assert terminal["keel"] == {
        "attempts": 2,
        "continued": [{"at_char": 9, "deployment": "b", "mode": "prefill"}],
    }
    assert t.text == "Hello world"


def test_an_instruct_continuation_has_its_repeat_trimmed() -> None:
    t = Transcript()
    _committed(t, "The quick brown")
    up = Upstream()
    take = t.take(up.asm, "b", "instruct")
    out, _ = feed(take, up, chunk(" bro"), chunk("wn fox"), chunk(finish="stop"))
    shown = [orjson.loads(p)["choices"][0]["delta"].get("content") for p in out]
    assert "".join(c or "" for c in shown) == " fox"
    take.complete()
    assert t.text == "The quick brown fox"
    assert t.continued == [{"at_char": 15, "deployment": "b", "mode": "instruct"}]


def test_usage_is_summed_across_attempts_and_sent_once() -> None:
    t = Transcript(wants_usage=True)
    up = Upstream()
    first = t.take(up.asm, "a")
    feed(first, up, chunk("one"), chunk(" two"), usage(10, 2))
    first.failed()
    up2 = Upstream()
    second = t.take(up2.asm, "b", "prefill")
    feed(second, up2, chunk(" three"), chunk(finish="stop"), usage(14, 1))
    ending = t.ending(second.complete())
    assert len(ending) == 2
    assert orjson.loads(ending[1])["usage"] == {
        "prompt_tokens": 24,
        "completion_tokens": 3,
        "total_tokens": 27,
    }


def test_unreported_usage_counts_what_was_relayed() -> None:
    t = Transcript(wants_usage=True)
    take = _committed(t, "a", "b", "c")
    take.failed()
    assert t.completion_tokens == 3


def test_a_terminal_chunk_before_a_failure_is_never_shown_twice() -> None:
    t = Transcript()
    up = Upstream()
    first = t.take(up.asm, "a")
    out, _ = feed(first, up, chunk("Hi"), chunk("!", finish="stop"))
    assert out == [chunk("Hi")]  # the terminal chunk (with its text) is held
    first.failed()  # e.g. the connection closed before [DONE]
    assert t.text == "Hi"
    up2 = Upstream()
    second = t.take(up2.asm, "b", "prefill")
    out, _ = feed(second, up2, chunk("!"), chunk(finish="stop"))
    assert [orjson.loads(p)["choices"][0]["delta"]["content"] for p in out] == ["!"]


def test_a_tool_call_commits_and_is_remembered() -> None:
    t = Transcript()
    up = Upstream()
    take = t.take(up.asm, "a")
    call = chunk(
        tool={
            "index": 0,
            "id": "call_1",
            "type": "function",
            "function": {"name": "f", "arguments": ""},
        },
        role=True,
    )
    out, committed = feed(take, up, call)
    assert committed and out == [call] and t.tool_calls


def test_a_hedged_rival_that_commits_second_has_lost() -> None:
    t = Transcript()
    up_a, up_b = Upstream(), Upstream()
    a = t.take(up_a.asm, "a")
    b = t.take(up_b.asm, "b")
    assert feed(b, up_b, chunk("", role=True)) == ([], False)
    _out, committed = feed(a, up_a, chunk("", role=True), chunk("A"))
    assert committed and t.owner is a
    with pytest.raises(Lost):
        feed(b, up_b, chunk("B"))
    with pytest.raises(Lost):
        feed(Take(t, Upstream().asm, None), Upstream(), chunk("x"))


def test_keel_written_endings_carry_the_repair() -> None:
    t = Transcript(wants_usage=True)
    _committed(t, "x")
    assert orjson.loads(t.finish_chunk("content_filter")).get("keel") is None
    t.attempts = 3
    t.take(Upstream().asm, "b", "prefill")
    end = orjson.loads(t.finish_chunk("length"))
    assert end["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length"}]
    assert end["id"] == "c1" and end["keel"]["attempts"] == 3


def test_flush_commits_what_the_latest_attempt_holds() -> None:
    t = Transcript(commit_tokens=5)
    up = Upstream()
    take = t.take(up.asm, "a")
    feed(take, up, chunk("partial"))
    out: list[bytes] = []
    assert t.flush(out) and out == [chunk("partial")]
    assert Transcript().flush([])  # nothing held at all: the stream still commits
