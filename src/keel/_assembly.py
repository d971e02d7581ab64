"""Stream assembly: SSE events of an OpenAI-style chat stream -> validated frames and a final
outcome. Pure and I/O-free; the gateway's stream guard drives it one event at a time.

Each JSON payload is parsed exactly once (orjson) and handed back in the ``Frame`` so the relay
never parses it again. The assembler accumulates what a client has been shown so far (content,
tool calls, finish_reason, usage), which is what mid-stream continuation needs.

TODO(issue 2): implementation pending.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from keel._classify import Dialect, UpstreamError
from keel._sse import ServerSentEvent

TERMINAL_FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})


class FrameKind(Enum):
    CHUNK = "chunk"  # a valid chat.completion.chunk (may carry content, tool calls, finish, usage)
    DONE = "done"  # data: [DONE]
    ERROR = "error"  # an error frame inside the stream (``error`` is set)
    INVALID = "invalid"  # unparseable or wrong-shaped data: a protocol failure
    IGNORED = "ignored"  # harmless noise: ``event: ping``, ``data: {}``, frames after [DONE]


@dataclass(slots=True)
class Frame:
    kind: FrameKind
    data: str = ""  # the raw ``data`` text of the event
    obj: dict[str, Any] | None = None  # the parsed chunk for CHUNK
    content: str = ""  # content delta of choice 0 in this chunk ("" when none)
    finish_reason: str | None = None  # terminal finish_reason in this chunk, if any
    error: UpstreamError | None = None  # for ERROR (and a PROTOCOL error for INVALID)


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


@dataclass(slots=True)
class StreamAssembler:
    dialect: Dialect | str = Dialect.OPENAI
    require_done: bool = True
    # state, read by the gateway
    id: str | None = None
    created: int | None = None
    model: str | None = None
    role: str | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    done: bool = False
    chunks: int = 0
    _parts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """Content of choice 0 so far."""
        raise NotImplementedError

    def feed(self, event: ServerSentEvent) -> Frame:
        raise NotImplementedError

    def finish(self) -> StreamOutcome:
        """The upstream closed the stream (cleanly). Is what we have complete?"""
        raise NotImplementedError
