"""Stream assembly: SSE events of an OpenAI-style chat stream -> validated frames and a final
outcome. Pure and I/O-free; the gateway's stream guard drives it one event at a time.

Each JSON payload is parsed exactly once (orjson) and handed back in the ``Frame`` so the transcript
never parses it again. The assembler accumulates what a client has been shown so far (content,
tool calls, finish_reason, usage), which is what mid-stream continuation needs.

What each event becomes (shared/faults.md §2):

* ``data: [DONE]`` -> DONE; anything after it -> IGNORED.
* an error frame (``{"error": …}``, ``{"type": "error", …}`` or ``event: error``) -> ERROR, with
  the error classified by ``keel._classify.classify_stream_error``; ``finish()`` reports it.
* noise (``event: ping`` or any other event type, ``data: {}``, ``data: ping``) -> IGNORED.
* a chunk with a ``choices`` list, or a usage-only chunk -> CHUNK.
* anything else (invalid JSON, not an object, no ``choices``, wrongly typed fields) ->
  INVALID with a PROTOCOL error. A multi-choice chunk found INVALID at choice k may already
  have applied choices before k: the stream is broken at that point anyway.

A stream is complete only when every choice seen has a terminal ``finish_reason`` and (when
``require_done``) ``[DONE]`` arrived. Unknown non-empty finish reasons count as terminal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import orjson

from keel._classify import (
    Dialect,
    ErrorKind,
    UpstreamError,
    classify_stream_error,
    transport_error,
)
from keel._sse import ServerSentEvent

TERMINAL_FINISH_REASONS = frozenset(
    {"stop", "length", "tool_calls", "content_filter", "function_call"}
)

# ``data:`` payloads some providers send to keep a connection warm (compared stripped and
# lower-cased). An empty ``data:`` line carries nothing either.
KEEPALIVE_DATA = frozenset({"", "ping", "pong", "keep-alive", "keepalive", "heartbeat"})

_SNIPPET_CHARS = 60  # how much of a bad payload an error message may quote


class FrameKind(Enum):
    CHUNK = "chunk"  # a valid chat.completion.chunk (may carry content, tool calls, finish, usage)
    DONE = "done"  # data: [DONE]
    ERROR = "error"  # an error frame inside the stream (``error`` is set)
    INVALID = "invalid"  # unparseable or wrong-shaped data: a protocol failure
    IGNORED = "ignored"  # harmless noise: ``event: ping``, ``data: {}``, frames after [DONE]


# Module-level aliases: the hot path builds one Frame per event.
_CHUNK = FrameKind.CHUNK
_IGNORED = FrameKind.IGNORED
_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError


@dataclass(slots=True)
class Frame:
    kind: FrameKind
    _data: str | None = ""  # ``data``; None: not decoded from ``raw`` yet
    obj: dict[str, Any] | None = None  # the parsed chunk for CHUNK (and the payload for ERROR)
    content: str = ""  # content delta of choice 0 in this chunk ("" when none)
    finish_reason: str | None = None  # terminal finish_reason of choice 0 in this chunk, if any
    error: UpstreamError | None = None  # for ERROR (and a PROTOCOL error for INVALID)
    # The payload exactly as the upstream sent it, when it came undecoded (``feed_data``):
    # what a relay forwards instead of re-encoding ``data``.
    raw: bytes | None = None

    @property
    def data(self) -> str:
        """The raw ``data`` text of the event. (A relayed chunk's is decoded only if asked:
        the relay sends ``raw``.)"""
        text = self._data
        if text is None:
            assert self.raw is not None
            text = self._data = self.raw.decode()
        return text


# ``Frame.__new__`` is ``object.__new__`` in pure Python; compiled (setup.py), mypyc's own,
# which allocates the native object (``object.__new__`` refuses a compiled class).
_new_frame = Frame.__new__


@dataclass(slots=True)
class ToolCall:
    index: int
    id: str | None = None
    type: str = "function"
    name: str = ""
    arguments: str = ""


@dataclass(slots=True)
class StreamOutcome:
    complete: bool  # terminal finish_reason seen (and [DONE] when required)
    failure: UpstreamError | None = None  # why not complete (kind PROTOCOL/SERVER/MODERATION…)


class _InvalidChunk(Exception):
    """Raised inside chunk processing for a wrongly shaped chunk; becomes an INVALID frame."""


@dataclass(slots=True)
class StreamAssembler:
    dialect: Dialect | str = Dialect.OPENAI
    require_done: bool = True
    # state, read by the gateway
    id: str | None = None
    created: int | None = None
    model: str | None = None
    role: str | None = None  # delta.role of choice 0
    finish_reason: str | None = None  # first terminal finish_reason of choice 0
    usage: dict[str, Any] | None = None  # the last non-null usage object
    done: bool = False
    chunks: int = 0
    error: UpstreamError | None = None  # the first ERROR frame's error
    invalid_frames: int = 0
    # Choice 0 has streamed tool call deltas: a plain attribute (the transcript reads it per frame;
    # ``tool_calls`` builds a list).
    has_tool_calls: bool = False
    finish_reasons: dict[int, str] = field(default_factory=dict)  # first terminal one per choice
    _parts: list[str] = field(default_factory=list)  # choice-0 content deltas
    _other_parts: dict[int, list[str]] = field(default_factory=dict)  # content of choices > 0
    _choices: set[int] = field(default_factory=set)  # every choice index seen
    _calls: dict[int, ToolCall] = field(default_factory=dict)  # choice-0 tool calls by index
    # Argument deltas are kept as pieces and joined on read: ``str +=`` on an attribute copies
    # the whole string each time, which is quadratic for a large streamed argument.
    _arg_parts: dict[int, list[str]] = field(default_factory=dict)
    _args_pending: bool = False  # _arg_parts holds pieces not yet joined into a ToolCall
    _meta_open: bool = True  # still looking for id/created/model

    @property
    def text(self) -> str:
        """Content of choice 0 so far. The join is cached: the parts collapse into one."""
        return _joined(self._parts)

    def choice_text(self, index: int) -> str:
        """Content of choice ``index`` so far (for ``n > 1``)."""
        if index == 0:
            return self.text
        return _joined(self._other_parts.get(index, []))

    @property
    def tool_calls(self) -> list[ToolCall]:
        """Choice 0's tool calls so far, in the order they first appeared."""
        if self._args_pending:
            self._args_pending = False
            for index, parts in self._arg_parts.items():
                if parts:
                    self._calls[index].arguments += "".join(parts)
                    parts.clear()
        return list(self._calls.values())

    @property
    def in_tool_call(self) -> bool:
        """A tool call is being streamed: tool call deltas seen and no finish_reason yet."""
        return bool(self._calls) and self.finish_reason is None

    def feed(self, event: ServerSentEvent) -> Frame:
        data = event.data
        if self.done:
            return Frame(_IGNORED, data)
        kind = event.event
        if kind != "message":
            if kind == "error":
                return self._error_event(data)
            if kind:
                return Frame(_IGNORED, data)  # ping and other event types: not chunks
        if data == "[DONE]":
            self.done = True
            return Frame(FrameKind.DONE, data)
        try:
            obj = _loads(data)
        except _JSONDecodeError:
            return self._not_json(data)
        return self._parsed(data, obj, None)

    def feed_data(self, raw: bytes) -> Frame:
        """``feed`` for a ``data:`` event of the default type whose payload came undecoded
        (``SSEDecoder.data_payloads``): the same frame as ``feed(ServerSentEvent(raw.decode(
        "utf-8", "replace")))``, and a JSON payload's frame keeps ``raw``."""
        if not self.done:
            try:
                obj = _loads(raw)  # valid UTF-8 JSON, or it raises
            except _JSONDecodeError:
                pass  # [DONE], a keep-alive, invalid JSON or UTF-8: as ``feed`` says
            else:  # the data text is decoded only if someone asks
                return self._canonical(None, obj, raw) or self._judged(raw.decode(), obj, raw)
        return self.feed(ServerSentEvent(raw.decode("utf-8", "replace")))

    def _canonical(self, data: str | None, obj: Any, raw: bytes | None) -> Frame | None:
        """Fast path, nearly every chunk of a stream after the first: one choice, index 0, a
        delta with (at most) content, no finish_reason — taken in (as ``_chunk`` would) and
        its frame returned. None for anything else (usage, role, tool calls, a finish, odd
        types, not a chunk at all), which ``_judged`` judges; nothing is taken in then."""
        if type(obj) is not dict or self._meta_open:
            return None
        choices = obj.get("choices")
        # A usage, error or type key at all (even null) is for ``_judged``: a key test is
        # cheaper than reading the value.
        if (
            type(choices) is not list
            or len(choices) != 1
            or "usage" in obj
            or "error" in obj
            or "type" in obj
        ):
            return None
        choice = choices[0]
        if type(choice) is not dict or choice.get("finish_reason"):
            return None
        delta = choice.get("delta")
        index = choice.get("index", 0)
        if (
            type(delta) is not dict
            or type(index) is not int
            or index != 0
            or "tool_calls" in delta
            or (self.role is None and "role" in delta)
        ):
            return None
        piece = delta.get("content")
        if piece is None:
            piece = ""
        elif type(piece) is not str:
            return None
        elif piece:
            self._parts.append(piece)
        self._choices.add(0)
        self.chunks += 1
        # ``Frame(CHUNK, data, obj, piece, raw=raw)``, its fields stored here: one is made per
        # relayed chunk, and the dataclass ``__init__`` called through the class costs ~400
        # instructions more (cachegrind). tests/test_stream_fastpaths.py pins it to the
        # constructor.
        f = _new_frame(Frame)
        f.kind = _CHUNK
        f._data = data
        f.obj = obj
        f.content = piece
        f.finish_reason = None
        f.error = None
        f.raw = raw
        return f

    def _parsed(self, data: str, obj: Any, raw: bytes | None) -> Frame:
        """A ``data:`` event of the default type, parsed as JSON."""
        return self._canonical(data, obj, raw) or self._judged(data, obj, raw)

    def _judged(self, data: str, obj: Any, raw: bytes | None) -> Frame:
        """A parsed ``data:`` event that is not the canonical chunk (``_canonical``)."""
        if type(obj) is not dict:
            return self._invalid(data, "not a JSON object")
        if obj.get("error") or obj.get("type") == "error":
            return self._error(data, obj)
        choices = obj.get("choices")
        if type(choices) is list:
            return self._chunk(data, obj, choices, raw)
        if not obj:
            return Frame(_IGNORED, data)  # data: {}
        if choices is None and type(obj.get("usage")) is dict:
            return self._chunk(data, obj, [], raw)  # usage-only chunk without a choices key
        return self._invalid(data, "chunk without a choices list")

    def finish(self) -> StreamOutcome:
        """The upstream closed the stream (cleanly). Is what we have complete?"""
        if self.error is not None:
            return StreamOutcome(False, self.error)
        if not self._choices:
            return self._incomplete("upstream stream ended without finish_reason (no choices)")
        unfinished = sorted(self._choices - self.finish_reasons.keys())
        if unfinished:
            which = "" if unfinished == [0] else f" (choices {unfinished})"
            after = " after [DONE]" if self.done else ""
            return self._incomplete(f"upstream stream ended without finish_reason{which}{after}")
        if self.require_done and not self.done:
            return self._incomplete("upstream stream ended without [DONE]")
        return StreamOutcome(True)

    # --- the hot path -----------------------------------------------------------------------

    def _chunk(
        self, data: str, obj: dict[str, Any], choices: list[Any], raw: bytes | None = None
    ) -> Frame:
        if self._meta_open:
            self._take_meta(obj, bool(choices))
        usage = obj.get("usage")
        if usage is not None:
            if type(usage) is not dict:
                return self._invalid(data, "usage is not an object")
            self.usage = usage
        content = ""
        finish: str | None = None
        try:
            for choice in choices:
                if type(choice) is not dict:
                    raise _InvalidChunk("choice is not an object")
                index = choice.get("index", 0)
                if type(index) is not int:
                    raise _InvalidChunk("choice index is not an integer")
                self._choices.add(index)
                delta = choice.get("delta")
                if delta:
                    if type(delta) is not dict:
                        raise _InvalidChunk("delta is not an object")
                    # Inlined content handling: this is the path of nearly every chunk.
                    piece = delta.get("content")
                    if piece:
                        if type(piece) is not str:
                            raise _InvalidChunk("delta.content is not a string")
                        if index == 0:
                            self._parts.append(piece)
                            content = piece
                        else:
                            self._other_parts.setdefault(index, []).append(piece)
                    if index == 0:
                        if self.role is None:
                            self._take_role(delta)
                        calls = delta.get("tool_calls")
                        if calls:
                            self._tool_deltas(calls)
                reason = choice.get("finish_reason")
                if reason:
                    if type(reason) is not str:
                        raise _InvalidChunk("finish_reason is not a string")
                    if index not in self.finish_reasons:
                        self.finish_reasons[index] = reason
                    if index == 0:
                        finish = reason
                        if self.finish_reason is None:
                            self.finish_reason = reason
        except _InvalidChunk as exc:
            return self._invalid(data, str(exc))
        self.chunks += 1
        return Frame(_CHUNK, data, obj, content, finish, None, raw)

    def _take_role(self, delta: dict[str, Any]) -> None:
        role = delta.get("role")
        if role and type(role) is str:
            self.role = role

    def _tool_deltas(self, calls: Any) -> None:
        if type(calls) is not list:
            raise _InvalidChunk("delta.tool_calls is not a list")
        for position, item in enumerate(calls):
            if type(item) is not dict:
                raise _InvalidChunk("tool call delta is not an object")
            # ``index`` is required by OpenAI; some compatible servers omit it when they send
            # each call whole, so the position in the list is the best guess.
            index = item.get("index", position)
            if type(index) is not int:
                raise _InvalidChunk("tool call index is not an integer")
            call = self._calls.get(index)
            if call is None:
                call = self._calls[index] = ToolCall(index)
                self.has_tool_calls = True
                self._arg_parts[index] = []
            call_id = item.get("id")
            if call_id and call.id is None:
                call.id = str(call_id)
            call_type = item.get("type")
            if call_type:
                call.type = str(call_type)
            function = item.get("function")
            if function:
                if type(function) is not dict:
                    raise _InvalidChunk("tool call function is not an object")
                name = function.get("name")
                if name:
                    call.name += str(name)
                arguments = function.get("arguments")
                if arguments:
                    if type(arguments) is not str:
                        raise _InvalidChunk("tool call arguments are not a string")
                    self._arg_parts[index].append(arguments)
                    self._args_pending = True

    def _take_meta(self, obj: dict[str, Any], has_choices: bool) -> None:
        # Azure's first chunk carries only prompt_filter_results with empty id/model and no
        # choices, so keep filling blanks until the first chunk that has choices.
        if self.id is None:
            value = obj.get("id")
            if value and type(value) is str:
                self.id = value
        if self.created is None:
            value = obj.get("created")
            if value and type(value) is int:
                self.created = value
        if self.model is None:
            value = obj.get("model")
            if value and type(value) is str:
                self.model = value
        if has_choices:
            self._meta_open = False

    # --- the rare paths ---------------------------------------------------------------------

    def _not_json(self, data: str) -> Frame:
        word = data.strip()
        if word == "[DONE]":
            self.done = True
            return Frame(FrameKind.DONE, data)
        if word.lower() in KEEPALIVE_DATA:
            return Frame(_IGNORED, data)
        return self._invalid(data, "invalid JSON")

    def _error_event(self, data: str) -> Frame:
        """``event: error``: classify its payload, whatever shape it has."""
        try:
            obj = _loads(data)
        except _JSONDecodeError:
            obj = None
        if type(obj) is not dict or not obj:
            text = _snippet(data) if data.strip() else "upstream sent event: error"
            obj = {"error": {"message": text}}
        return self._error(data, obj)

    def _error(self, data: str, obj: dict[str, Any]) -> Frame:
        error = classify_stream_error(self.dialect, obj)
        if self.error is None:
            self.error = error
        return Frame(FrameKind.ERROR, data, obj, error=error)

    def _invalid(self, data: str, reason: str) -> Frame:
        self.invalid_frames += 1
        error = transport_error(
            ErrorKind.PROTOCOL,
            f"upstream sent an invalid stream frame ({reason}): {_snippet(data)}",
            status=200,
        )
        return Frame(FrameKind.INVALID, data, error=error)

    def _incomplete(self, message: str) -> StreamOutcome:
        return StreamOutcome(False, transport_error(ErrorKind.PROTOCOL, message, status=200))


def _joined(parts: list[str]) -> str:
    """Join ``parts`` and collapse the list to the result, so the next read is free."""
    if len(parts) > 1:
        joined = "".join(parts)
        parts[:] = (joined,)
        return joined
    return parts[0] if parts else ""


def _snippet(data: str) -> str:
    if len(data) <= _SNIPPET_CHARS:
        return repr(data)
    return repr(data[:_SNIPPET_CHARS]) + "…"
