"""Response plans: what bytes to write, when to pause, where to break. Pure, no I/O.

A plan is a list of ops that the server executes in order. Consecutive writes are coalesced
while building, so a healthy stream without token delays is a single ``write`` (throughput), and
faults only have to say *where* the wire misbehaves (readability).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from keel.sim._errors import anth_err_payload, err_mid_payload, inspect_mid_payload
from keel.sim._faults import TERMINAL


@dataclass(frozen=True, slots=True)
class Write:
    data: bytes
    tokens: int = 0  # content chunks completed by this write (for the request log)


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class Abort:
    """Drop the connection. ``tail`` goes out first inside an HTTP chunk whose header claims
    ``claimed`` bytes, so the peer sees half a frame and then an incomplete chunked read."""

    tail: bytes = b""
    claimed: int = 0


@dataclass(frozen=True, slots=True)
class Stall:
    """Go silent with the socket open until the client leaves (optionally sending comments)."""

    keepalive: bytes | None = None


Op = Write | Sleep | Abort | Stall

KEEPALIVE_INTERVAL = 0.2


def cut_point(data: bytes) -> int:
    """A byte offset near the middle of ``data``, inside a multi-byte UTF-8 character when
    there is one (a continuation byte 0b10xxxxxx starts the second half)."""
    mid = len(data) // 2
    best = -1
    for i, b in enumerate(data):
        if 0x80 <= b < 0xC0 and (best < 0 or abs(i - mid) < abs(best - mid)):
            best = i
    return best if best > 0 else max(1, mid)


def frag_pieces(data: bytes) -> list[bytes]:
    """``data`` in 2-4 pieces, cut inside multi-byte characters where possible."""
    conts = [i for i, b in enumerate(data) if 0x80 <= b < 0xC0]
    cuts = {len(data) // 2}
    if conts:
        cuts.update((conts[0], conts[-1]))
    edges = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


class _Builder:
    __slots__ = ("buf", "eol", "frag", "ops", "tokens")

    def __init__(self, eol: bytes, frag: bool) -> None:
        self.ops: list[Op] = []
        self.buf = bytearray()
        self.tokens = 0
        self.eol = eol
        self.frag = frag

    def cut(self) -> None:
        if self.buf:
            self.ops.append(Write(bytes(self.buf), self.tokens))
            self.buf = bytearray()
            self.tokens = 0

    def raw(self, data: bytes, tokens: int = 0) -> None:
        if self.frag:
            self.cut()
            for piece in frag_pieces(data):
                self.buf += piece
                self.cut()
            if tokens:  # attribute to the write that completed the frame
                last = self.ops[-1]
                assert isinstance(last, Write)
                self.ops[-1] = Write(last.data, tokens)
        else:
            self.buf += data
            self.tokens += tokens

    def frame(self, payload: bytes, tokens: int = 0, event: bytes | None = None) -> None:
        self.raw(self.encode(payload, event), tokens)

    def encode(self, payload: bytes, event: bytes | None = None) -> bytes:
        eol = self.eol
        head = b"event: " + event + eol if event else b""
        return head + b"data: " + payload + eol + eol

    def comment(self, text: bytes = b"keep-alive") -> bytes:
        return b": " + text + self.eol + self.eol

    def add(self, op: Op) -> None:
        self.cut()
        self.ops.append(op)

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.add(Sleep(seconds))

    def done(self) -> list[Op]:
        self.cut()
        return self.ops


@dataclass(slots=True)
class StreamSpec:
    chunk_id: str
    request_id: str
    created: int
    model: str
    role_delta: dict[str, Any]
    deltas: list[dict[str, Any]]  # one per content chunk (text or tool-call arguments)
    finish_reason: str
    usage: dict[str, int] | None  # set when stream_options.include_usage
    token_delay: float = 0.0
    first_delay: float = 0.0  # extra pause before the first content chunk
    # A legacy text completion's stream: "text_completion" chunks whose choices carry "text"
    # (no role chunk, no tool calls).
    text: bool = False


def stream_plan(spec: StreamSpec, faults: Mapping[str, float]) -> list[Op]:
    """The SSE body for ``spec`` with ``faults`` ({name: parameter}) applied."""
    eol = b"\r\n" if "crlf" in faults else b"\r" if "cr" in faults else b"\n"
    b = _Builder(eol, "frag" in faults)
    obj = b"text_completion" if spec.text else b"chat.completion.chunk"
    prefix = (
        b'{"id":"' + spec.chunk_id.encode() + b'","object":"' + obj + b'","created":'
        + str(spec.created).encode() + b',"model":' + orjson.dumps(spec.model) + b',"choices":['
    )  # fmt: skip
    if "no_finish" in faults:
        tail, final = b"}]}", None
    else:
        tail = b',"finish_reason":null}]}'
        final = b"null" if "null_finish" in faults else b'""' if "empty_finish" in faults else None

    def chunk(delta: dict[str, Any]) -> bytes:
        if spec.text:
            text = orjson.dumps(delta.get("content") or "")
            return prefix + b'{"index":0,"text":' + text + b',"logprobs":null' + tail
        return prefix + b'{"index":0,"delta":' + orjson.dumps(delta) + tail

    n = len(spec.deltas)
    terminal = min(
        ((min(int(v), n), name) for name, v in faults.items() if name in TERMINAL), default=None
    )
    fatal_at = int(faults["garbage_fatal"]) if "garbage_fatal" in faults else -1
    garbage, keepalive = "garbage" in faults, "keepalive" in faults

    if not spec.text:
        b.frame(chunk(spec.role_delta))
    if garbage:
        b.raw(b"data: ping" + eol + eol)
    if keepalive:
        b.raw(b.comment())
    for i, delta in enumerate(spec.deltas):
        if terminal is not None and terminal[0] == i:
            return _terminal(b, terminal[1], b.encode(chunk(delta)), spec)
        b.sleep(spec.token_delay + (spec.first_delay if i == 0 else 0.0))
        if keepalive and i % 2:
            b.raw(b.comment())
        data = chunk(delta)
        if i == fatal_at:  # the same chunk, cut in half, as an invalid JSON data line
            b.raw(b"data: " + data[: len(data) // 2] + eol + eol)
        b.frame(data, tokens=1)
        if garbage and i == 0:
            b.raw(b'{"choices": [' + eol + eol)  # not a field line: SSE parsers must ignore it
    if final is None and "no_finish" not in faults:
        final = orjson.dumps(spec.finish_reason)
    empty = b'{"index":0,"text":"","logprobs":null' if spec.text else b'{"index":0,"delta":{}'
    finish = prefix + empty + (b',"finish_reason":' + final if final else b"")
    finish += b"}]}"
    if terminal is not None:  # N >= number of chunks: break just before the finish chunk
        return _terminal(b, terminal[1], b.encode(finish), spec)
    if fatal_at >= n:  # likewise: the cut copy goes just before the finish chunk
        b.raw(b"data: " + finish[: len(finish) // 2] + eol + eol)
    if garbage:
        b.raw(b"event: ping" + eol + b"data: {}" + eol + eol)
    b.frame(finish)
    if spec.usage is not None:
        b.frame(prefix + b'],"usage":' + orjson.dumps(spec.usage) + b"}")
    if "no_done" not in faults:
        b.frame(b"[DONE]")
    return b.done()


def _terminal(b: _Builder, name: str, next_frame: bytes, spec: StreamSpec) -> list[Op]:
    if name == "trunc":
        b.add(Abort())
    elif name == "trunc_mid":
        b.add(Abort(next_frame[: cut_point(next_frame)], len(next_frame)))
    elif name in ("stall", "stall_ka"):
        b.add(Stall(b.comment() if name == "stall_ka" else None))
    elif name == "err_mid":
        b.frame(err_mid_payload())
        b.frame(b"[DONE]")
    elif name == "inspect_mid":
        b.frame(inspect_mid_payload(spec.chunk_id, spec.request_id))
    elif name == "anth_err_mid":
        b.frame(anth_err_payload(spec.request_id), event=b"error")
    return b.done()


def body_plan(body: bytes, faults: Mapping[str, float]) -> list[Op]:
    """A non-stream JSON body (sent with Content-Length) with ``faults`` applied."""
    b = _Builder(b"\n", "frag" in faults)
    if "slow_token" in faults:  # headers go out first, then the pause
        b.add(Sleep(faults["slow_token"]))
    if "trunc" in faults or "trunc_mid" in faults:
        cut = cut_point(body) if "trunc_mid" in faults else len(body) // 2
        b.raw(body[:cut])
        b.add(Abort())
    else:
        b.raw(body)
    return b.done()
