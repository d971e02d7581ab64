"""What to answer: conversation analysis and the response's content. Pure, no I/O.

The server decides *how* to deliver (and break) a response; this module decides *what* it
contains: the plain answer, the rest of a continuation (prefill or instruct), or a tool call,
cut to ``max_tokens``, plus the JSON of the non-stream body and the stream's deltas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from keel.sim._answer import (
    CONTINUE_MARKER,
    ToolCall,
    content_text,
    default_overlap,
    pieces_from,
    tokens_for,
    tool_call_for,
)
from keel.sim._faults import Directives


@dataclass(slots=True)
class Turn:
    """What the conversation asks for."""

    user: str  # raw text of the user message the answer is computed from
    prefix: str | None = None  # assistant text already produced (continuation)
    kind: str | None = None  # "prefill" | "instruct"
    marker: str = ""  # raw text of the instruct message (it may carry directives too)


def turn_of(messages: list[Any]) -> Turn:
    """Prefill: ``[..., user U, assistant A]``. Instruct: ``[..., user U, assistant A, user M]``
    with ``CONTINUE_MARKER`` in M. Otherwise the last user message is the prompt."""

    def last_user(before: int) -> str:
        for m in reversed(messages[:before]):
            if isinstance(m, dict) and m.get("role") == "user":
                return content_text(m.get("content"))
        return ""

    last = messages[-1] if isinstance(messages[-1], dict) else {}
    role, text = last.get("role"), content_text(last.get("content"))
    n = len(messages)
    if role == "assistant" and text:  # with or without partial/prefix flags
        return Turn(last_user(n - 1), text, "prefill")
    if role == "user" and CONTINUE_MARKER in text and n >= 3:
        prev = messages[-2] if isinstance(messages[-2], dict) else {}
        prev_text = content_text(prev.get("content"))
        if prev.get("role") == "assistant" and prev_text:
            return Turn(last_user(n - 2), prev_text, "instruct", text)
    return Turn(text if role == "user" else last_user(n))


@dataclass(slots=True)
class Answer:
    pieces: list[str]  # content chunks (text, or tool-call argument fragments)
    finish: str
    call: ToolCall | None = None
    continuation: str | None = None  # the kind, when the request continued an earlier answer


def _tool_name(body: dict[str, Any], d: Directives) -> str | None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    if not (d.tool or choice == "required" or isinstance(choice, dict)):
        return None
    if isinstance(choice, dict) and (name := (choice.get("function") or {}).get("name")):
        return str(name)
    first = tools[0] if isinstance(tools[0], dict) else {}
    return str((first.get("function") or {}).get("name") or "tool")


def compose(body: dict[str, Any], turn: Turn, d: Directives, prompt: str, length: int) -> Answer:
    """The content of the response to ``body`` (``prompt`` is ``turn.user`` without
    directives; ``length`` the default answer length)."""
    if (name := _tool_name(body, d)) is not None:
        call = tool_call_for(prompt, name)
        return Answer(list(call.pieces), "tool_calls", call)
    tokens = tokens_for(prompt, d.length if d.length is not None else length)
    answer = Answer(list(tokens), "stop")
    if turn.prefix is not None and "".join(tokens).startswith(turn.prefix):
        start = len(turn.prefix)
        if turn.kind == "instruct":  # repeat a little of A so overlap removal can be tested
            ov = d.overlap if d.overlap is not None else default_overlap(tokens, start)
            start -= max(0, min(ov, start))
        answer = Answer(pieces_from(tokens, start), "stop", continuation=turn.kind)
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and 0 <= limit < len(answer.pieces):
        answer.pieces, answer.finish = answer.pieces[:limit], "length"
    return answer


def stream_deltas(answer: Answer) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the first chunk's delta, one delta per content chunk)."""
    call = answer.call
    if call is None:
        return {"role": "assistant", "content": ""}, [{"content": p} for p in answer.pieces]
    head = {"index": 0, "id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": ""}}  # fmt: skip
    role = {"role": "assistant", "content": None, "tool_calls": [head]}
    deltas = [{"tool_calls": [{"index": 0, "function": {"arguments": a}}]} for a in answer.pieces]
    return role, deltas


def completion_json(
    answer: Answer,
    *,
    chunk_id: str,
    created: int,
    model: str,
    usage: dict[str, int],
    finish: str | bool | None,
) -> bytes:
    """The non-stream body. ``finish``: True = the real reason, False = key absent, or the
    (faulty) value to send instead."""
    message: dict[str, Any] = {"role": "assistant", "content": "".join(answer.pieces)}
    if answer.call is not None:
        message["content"] = None
        message["tool_calls"] = [{"id": answer.call.id, "type": "function",
                                  "function": {"name": answer.call.name,
                                               "arguments": answer.call.arguments}}]  # fmt: skip
    choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None}
    if finish is not False:
        choice["finish_reason"] = answer.finish if finish is True else finish
    return orjson.dumps({
        "id": chunk_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [choice], "usage": usage,
    })  # fmt: skip
