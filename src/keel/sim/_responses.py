"""The simulator's native ``/v1/responses``: the same answers and faults as its chat endpoint,
in the Responses API's shapes. Pure, no I/O: the server (``_server.py``) reads the request and
executes the plan.

* ``chat_view`` reads a Responses request as the chat body the rest of the simulator works on
  (instructions and input → messages, function tools, ``max_output_tokens``), so directives,
  continuations (a trailing assistant input item, or the instruct marker) and tool calls work
  exactly as on chat;
* ``responses_plan`` is the event stream — ``response.created``, ``response.in_progress``,
  the output item and content part, one ``response.output_text.delta`` (or
  ``response.function_call_arguments.delta``) per piece, the ``.done`` events, then
  ``response.completed`` with usage — with the stream faults applied: ``err_mid=N`` an
  ``error`` event after N pieces (``err_mid=0``: right after ``response.created``),
  ``trunc=N`` a cut between events, ``trunc_mid=N`` a cut inside the N-th delta event,
  ``stall=N``/``stall_ka=N`` silence, ``no_done`` no terminal event, ``inspect_mid=N`` a
  ``response.failed`` event;
* ``response_json`` is the non-stream Response object;
* ``Stored`` holds the ids of the responses it stored: a ``previous_response_id`` it does not
  hold is OpenAI's 400 ``previous_response_not_found`` (``not_found``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from keel.sim._compose import Answer
from keel.sim._faults import TERMINAL
from keel.sim._stream import Abort, Op, Sleep, Stall, Write, cut_point

_KEEPALIVE = b": keep-alive\n\n"


class Stored:
    """The ids of the responses this simulator stored (``store`` not false), the most recent
    ``limit``: what a ``previous_response_id`` may name."""

    __slots__ = ("_ids", "limit")

    def __init__(self, limit: int = 10_000) -> None:
        self._ids: dict[str, None] = {}
        self.limit = limit

    def add(self, response_id: str) -> None:
        self._ids[response_id] = None
        if len(self._ids) > self.limit:
            del self._ids[next(iter(self._ids))]

    def __contains__(self, response_id: object) -> bool:
        return response_id in self._ids


def not_found(previous: object) -> bytes:
    """OpenAI's 400 for a ``previous_response_id`` it does not hold."""
    return orjson.dumps(
        {
            "error": {
                "message": f"Previous response with id '{previous}' not found.",
                "type": "invalid_request_error",
                "param": "previous_response_id",
                "code": "previous_response_not_found",
            }
        }
    )


def chat_view(body: Mapping[str, Any]) -> dict[str, Any] | str:
    """The chat body a Responses request amounts to, or the message of a 400."""
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list) and items:
        for item in items:
            if not isinstance(item, dict):
                return "'input' items must be objects"
            kind = item.get("type", "message")
            if kind == "message":
                messages.append({"role": item.get("role"), "content": item.get("content")})
            elif kind == "function_call_output":
                messages.append({"role": "tool", "content": str(item.get("output"))})
            elif kind == "function_call":
                messages.append({"role": "assistant", "content": None})
    else:
        return "'input' must be a string or a non-empty array"
    if not messages:
        return "'input' must be a string or a non-empty array"
    tools = [
        {"type": "function", "function": {"name": t.get("name")}}
        for t in body.get("tools") or []
        if isinstance(t, dict) and t.get("type") == "function"
    ]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    view: dict[str, Any] = {
        "model": body.get("model"),
        "messages": messages,
        "stream": bool(body.get("stream")),
    }
    if tools:
        view["tools"] = tools
    if choice is not None:
        view["tool_choice"] = choice
    if isinstance(body.get("max_output_tokens"), int):
        view["max_tokens"] = body["max_output_tokens"]
    return view


@dataclass(slots=True)
class ResponseSpec:
    response_id: str
    created: int
    model: str
    answer: Answer
    usage: dict[str, int]  # chat-shaped: prompt_tokens, completion_tokens, total_tokens
    token_delay: float = 0.0
    first_delay: float = 0.0


def _usage(u: Mapping[str, int]) -> dict[str, Any]:
    return {
        "input_tokens": u["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": u["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u["total_tokens"],
    }


def _item(spec: ResponseSpec, status: str, done: bool) -> dict[str, Any]:
    a = spec.answer
    if a.call is not None:
        return {
            "id": f"fc_{spec.response_id[5:]}",
            "type": "function_call",
            "status": status,
            "call_id": a.call.id,
            "name": a.call.name,
            "arguments": a.call.arguments if done else "",
        }
    text = "".join(a.pieces)
    content = [{"type": "output_text", "text": text, "annotations": []}] if done else []
    return {
        "id": f"msg_{spec.response_id[5:]}",
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _response(spec: ResponseSpec, status: str, output: list[Any], usage: bool) -> dict[str, Any]:
    incomplete = spec.answer.finish == "length" and status != "in_progress"
    return {
        "id": spec.response_id,
        "object": "response",
        "created_at": spec.created,
        "status": "incomplete" if incomplete else status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "model": spec.model,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": _usage(spec.usage) if usage else None,
    }


def response_json(spec: ResponseSpec) -> bytes:
    """The non-stream Response object."""
    return orjson.dumps(_response(spec, "completed", [_item(spec, "completed", True)], True))


class _Events:
    __slots__ = ("ops", "seq")

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.seq = 0

    def encode(self, kind: str, **fields: Any) -> bytes:
        payload = orjson.dumps({"type": kind, **fields, "sequence_number": self.seq})
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"

    def emit(self, kind: str, tokens: int = 0, **fields: Any) -> None:
        self.ops.append(Write(self.encode(kind, **fields), tokens))


def responses_plan(spec: ResponseSpec, faults: Mapping[str, float]) -> list[Op]:
    """The event stream for ``spec`` with ``faults`` ({name: parameter}) applied."""
    e = _Events()
    a = spec.answer
    n = len(a.pieces)
    terminal = min(
        ((min(int(v), n), name) for name, v in faults.items() if name in TERMINAL), default=None
    )
    e.emit("response.created", response=_response(spec, "in_progress", [], False))
    if terminal == (0, "err_mid"):  # an error event before any output
        return _terminal(e, spec, "err_mid", b"")
    e.emit("response.in_progress", response=_response(spec, "in_progress", [], False))
    item = _item(spec, "in_progress", False)
    item_id = item["id"]
    e.emit("response.output_item.added", output_index=0, item=item)
    if a.call is None:
        part = {"type": "output_text", "text": "", "annotations": []}
        e.emit("response.content_part.added", item_id=item_id, output_index=0, content_index=0, part=part)  # fmt: skip
    for i, piece in enumerate(a.pieces):
        if a.call is None:
            kind, where = "response.output_text.delta", {"content_index": 0, "logprobs": []}
        else:
            kind, where = "response.function_call_arguments.delta", {}
        fields = {"item_id": item_id, "output_index": 0, **where, "delta": piece}
        if terminal is not None and terminal[0] == i:
            return _terminal(e, spec, terminal[1], e.encode(kind, **fields))
        delay = spec.token_delay + (spec.first_delay if i == 0 else 0.0)
        if delay > 0:
            e.ops.append(Sleep(delay))
        e.emit(kind, tokens=1, **fields)
    if terminal is not None:  # N >= the pieces: break before the .done events
        return _terminal(e, spec, terminal[1], b"")
    done = _item(spec, "completed", True)
    if a.call is None:
        text = "".join(a.pieces)
        e.emit("response.output_text.done", item_id=item_id, output_index=0, content_index=0, text=text, logprobs=[])  # fmt: skip
        e.emit("response.content_part.done", item_id=item_id, output_index=0, content_index=0, part=done["content"][0])  # fmt: skip
    else:
        e.emit("response.function_call_arguments.done", item_id=item_id, output_index=0, arguments=a.call.arguments)  # fmt: skip
    e.emit("response.output_item.done", output_index=0, item=done)
    if "no_done" not in faults:
        final = _response(spec, "completed", [done], True)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        e.emit(kind, response=final)
    return _coalesced(e.ops)


def _terminal(e: _Events, spec: ResponseSpec, name: str, next_event: bytes) -> list[Op]:
    if name == "trunc":
        e.ops.append(Abort())
    elif name == "trunc_mid":
        if not next_event:
            e.ops.append(Abort())
        else:
            e.ops.append(Abort(next_event[: cut_point(next_event)], len(next_event)))
    elif name in ("stall", "stall_ka"):
        e.ops.append(Stall(_KEEPALIVE if name == "stall_ka" else None))
    elif name == "inspect_mid":
        failed = _response(spec, "failed", [], False)
        failed["error"] = {"code": "server_error", "message": "The model failed to generate."}
        e.emit("response.failed", response=failed)
    else:  # err_mid and the others: an error event, then the stream ends
        e.emit(
            "error",
            code="server_error",
            message="The server had an error while processing your request. Sorry about that!",
            param=None,
        )
    return _coalesced(e.ops)


def _coalesced(ops: list[Op]) -> list[Op]:
    """Consecutive writes as one (a healthy stream without delays is a single write)."""
    out: list[Op] = []
    for op in ops:
        last = out[-1] if out else None
        if isinstance(op, Write) and isinstance(last, Write):
            out[-1] = Write(last.data + op.data, last.tokens + op.tokens)
        else:
            out.append(op)
    return out
