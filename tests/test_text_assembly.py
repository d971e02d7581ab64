"""``keel._text_assembly``: legacy ``text_completion`` streams → validated frames, table by
table (pure, no network); and the simulator's embeddings as a pure function of their input."""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

import orjson
import pytest

from keel._assembly import FrameKind
from keel._sse import SSEDecoder
from keel._text_assembly import TextCompletionAssembler
from keel.sim import embedding_base64, embedding_for


def chunk(text: Any, finish: Any = None, index: int = 0, **extra: Any) -> bytes:
    choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
    obj = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", **extra}
    return b"data: " + orjson.dumps({**obj, "choices": [choice]}) + b"\n\n"


def run(*events: bytes) -> tuple[TextCompletionAssembler, list[Any]]:
    asm = TextCompletionAssembler()
    frames = [asm.feed(ev) for ev in SSEDecoder().feed(b"".join(events))]  # type: ignore[arg-type]
    return asm, frames


DONE = b"data: [DONE]\n\n"


def test_a_whole_stream() -> None:
    asm, frames = run(chunk("Hel"), chunk("lo 你好"), chunk("", "stop"), DONE)
    assert [(f.kind, f.content, f.finish_reason) for f in frames] == [
        (FrameKind.CHUNK, "Hel", None),
        (FrameKind.CHUNK, "lo 你好", None),
        (FrameKind.CHUNK, "", "stop"),
        (FrameKind.DONE, "", None),
    ]
    assert asm.text == "Hello 你好" and (asm.id, asm.model) == ("cmpl-1", "m")
    assert asm.finish().complete


def test_text_in_the_terminal_chunk_and_other_choices() -> None:
    asm, frames = run(
        chunk("a"), chunk("b", index=1), chunk("c", "length"), chunk("", "stop", 1), DONE
    )
    assert asm.text == "ac" and asm.choice_text(1) == "b"
    assert frames[2].content == "c" and frames[2].finish_reason == "length"
    assert asm.finish().complete


@pytest.mark.parametrize(
    ("events", "why"),
    [
        ((chunk("a"), DONE), "without finish_reason"),
        ((chunk("a"), chunk("", "stop")), "without [DONE]"),
        ((chunk("a"), chunk(7), chunk("", "stop"), DONE), "choice text is not a string"),
        ((chunk("a"), chunk("", 3), DONE), "finish_reason is not a string"),
    ],
)
def test_incomplete_or_invalid_streams(events: tuple[bytes, ...], why: str) -> None:
    asm, frames = run(*events)
    invalid = [f for f in frames if f.kind is FrameKind.INVALID]
    outcome = asm.finish()
    message = invalid[0].error.message if invalid else outcome.failure.message  # type: ignore[union-attr]
    assert why in message
    assert invalid or not outcome.complete


def test_an_error_frame_is_an_error() -> None:
    err = b'data: {"error": {"message": "boom", "type": "server_error"}}\n\n'
    asm, frames = run(chunk("a"), err)
    assert frames[1].kind is FrameKind.ERROR and not asm.finish().complete


@pytest.mark.parametrize("dims", [2, 8, 1536])
def test_sim_embeddings_are_unit_float32_vectors(dims: int) -> None:
    vec = embedding_for("hello [[sim:e503*1]]", dims)
    assert vec == embedding_for("hello", dims)  # directives do not change it
    assert len(vec) == dims and math.isclose(math.fsum(x * x for x in vec), 1.0, rel_tol=1e-5)
    assert vec == [struct.unpack("<f", struct.pack("<f", x))[0] for x in vec]  # float32 exact
    decoded = base64.b64decode(embedding_base64("hello", dims))
    assert list(struct.unpack(f"<{dims}f", decoded)) == vec
    assert embedding_for("hello!", dims) != vec and embedding_for([1, 2], dims) != vec
