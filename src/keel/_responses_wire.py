"""A native Responses stream, decoded and validated like a chat stream. Sans-IO.

``ResponsesAssembler`` is a ``StreamAssembler`` for deployments with ``api: responses``: the
upstream's SSE events go in one at a time, and out come the same ``Frame``s a chat stream
gives — so retries before the commit, the commit itself, continuation after it and the one
ending are the engine's own, unchanged. The validator is a state machine over the Responses
event grammar:

* every event is a JSON object with a string ``type`` and an integer ``sequence_number``
  greater than the one before (INVALID otherwise: a protocol failure);
* the first event is ``response.created`` (an ``error`` event may come instead);
* ``response.output_text.delta`` → a content chunk; a ``function_call`` output item and its
  ``response.function_call_arguments.delta`` → tool-call chunks;
* exactly one terminal event: ``response.completed`` (finish ``stop``/``tool_calls``, with the
  usage), ``response.incomplete`` (``length``/``content_filter``), ``response.failed``
  (ERROR); anything after it is IGNORED, and a stream that ends without one is incomplete;
* an ``error`` event → ERROR, classified like a chat stream's error frame;
* any other event type (``response.in_progress``, the ``.done`` events, reasoning, …) is
  checked for its type and sequence number, then IGNORED.

The chunks it makes carry the upstream's response id, so a continued answer keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from keel._assembly import Frame, FrameKind, StreamAssembler, StreamOutcome, ToolCall
from keel._classify import classify_stream_error
from keel._sse import ServerSentEvent

_CHUNK = FrameKind.CHUNK
_IGNORED = FrameKind.IGNORED
_TERMINAL = ("response.completed", "response.incomplete", "response.failed")
_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}


def chat_usage(usage: object) -> dict[str, Any] | None:
    """A Response's usage in chat terms (what the limiter and the transcript count)."""
    if type(usage) is not dict:
        return None
    i, o = usage.get("input_tokens"), usage.get("output_tokens")
    if type(i) is not int or type(o) is not int:
        return None
    return {"prompt_tokens": i, "completion_tokens": o, "total_tokens": i + o}


@dataclass(slots=True)
class ResponsesAssembler(StreamAssembler):
    require_done: bool = False  # (the terminal event is the end; there is no [DONE])
    sequence: int = -1  # the last event's sequence_number
    started: bool = False  # response.created arrived
    _by_output: dict[int, int] = field(default_factory=dict)  # output_index → tool-call index

    def feed_data(self, raw: bytes) -> Frame:
        # The reader hands over a read of bare ``data:`` lines undecoded (a provider or proxy
        # that drops the ``event:`` lines): a Responses event is still judged by its own
        # ``type``, never by the chat chunk's fast path that ``StreamAssembler`` would take.
        return self.feed(ServerSentEvent(raw.decode("utf-8", "replace")))

    def feed(self, event: ServerSentEvent) -> Frame:
        data = event.data
        if self.done:
            return Frame(_IGNORED, data)  # after the terminal event (a [DONE], say)
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            if data.strip() in ("", "[DONE]"):
                return Frame(_IGNORED, data)
            return self._invalid(data, "invalid JSON")
        if type(obj) is not dict or type(kind := obj.get("type")) is not str:
            return self._invalid(data, "an event without a string type")
        seq = obj.get("sequence_number")
        if type(seq) is not int or seq <= self.sequence:
            return self._invalid(data, f"{kind} has sequence_number {seq!r} after {self.sequence}")
        self.sequence = seq
        if kind == "error":
            return self._native_error(data, obj, obj)
        if not self.started:
            if kind != "response.created":
                return self._invalid(data, f"{kind} before response.created")
            return self._created(data, obj)
        if kind == "response.output_text.delta":
            delta = obj.get("delta")
            if type(delta) is not str:
                return self._invalid(data, "response.output_text.delta without a string delta")
            if not delta:
                return Frame(_IGNORED, data)
            self._parts.append(delta)
            return self._frame(data, {"content": delta}, content=delta)
        if kind == "response.output_item.added":
            item = obj.get("item")
            if type(item) is not dict or type(index := obj.get("output_index")) is not int:
                return self._invalid(data, "response.output_item.added without item/output_index")
            if item.get("type") != "function_call":
                return Frame(_IGNORED, data)
            return self._call_added(data, index, item)
        if kind == "response.function_call_arguments.delta":
            call = self._by_output.get(obj.get("output_index"))  # type: ignore[arg-type]
            delta = obj.get("delta")
            if call is None or type(delta) is not str:
                return self._invalid(data, "arguments for no function_call item")
            self._arg_parts[call].append(delta)
            self._args_pending = True
            tool = {"index": call, "function": {"arguments": delta}}
            return self._frame(data, {"tool_calls": [tool]})
        if kind in _TERMINAL:
            return self._terminal(data, kind, obj)
        return Frame(_IGNORED, data)  # in_progress, content parts, the .done events, reasoning…

    def finish(self) -> StreamOutcome:
        if self.error is not None:
            return StreamOutcome(False, self.error)
        if not self.started:
            return self._incomplete("upstream Responses stream ended before response.created")
        if not self.done:
            return self._incomplete(
                "upstream Responses stream ended without a terminal event "
                "(response.completed, response.incomplete or response.failed)"
            )
        return StreamOutcome(True)

    # -- pieces ------------------------------------------------------------------------------

    def _chunk_json(self, delta: dict[str, Any], finish: str | None, usage: Any = None) -> str:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created or 0,
            "model": self.model or "",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage is not None:
            chunk["usage"] = usage
        return orjson.dumps(chunk).decode()

    def _frame(
        self, data: str, delta: dict[str, Any], content: str = "", finish: str | None = None
    ) -> Frame:
        self.chunks += 1
        text = self._chunk_json(delta, finish)
        return Frame(_CHUNK, text, orjson.loads(text), content, finish)

    def _created(self, data: str, obj: dict[str, Any]) -> Frame:
        response = obj.get("response")
        if type(response) is not dict or type(rid := response.get("id")) is not str:
            return self._invalid(data, "response.created without a response id")
        self.started = True
        self.id = rid
        created = response.get("created_at")
        self.created = created if type(created) is int else None
        model = response.get("model")
        self.model = model if type(model) is str else None
        self.role = "assistant"
        self._choices.add(0)
        self._meta_open = False
        return self._frame(data, {"role": "assistant", "content": ""})

    def _call_added(self, data: str, index: int, item: dict[str, Any]) -> Frame:
        call = len(self._calls)
        self._by_output[index] = call
        tc = self._calls[call] = ToolCall(call, str(item.get("call_id") or item.get("id") or ""))
        tc.name = str(item.get("name") or "")
        self._arg_parts[call] = []
        self.has_tool_calls = True
        head = {
            "index": call,
            "id": tc.id,
            "type": "function",
            "function": {"name": tc.name, "arguments": ""},
        }
        return self._frame(data, {"tool_calls": [head]})

    def _terminal(self, data: str, kind: str, obj: dict[str, Any]) -> Frame:
        self.done = True
        response = obj.get("response")
        response = response if type(response) is dict else {}
        if kind == "response.failed":
            return self._native_error(data, obj, response.get("error") or {})
        if kind == "response.incomplete":
            details = response.get("incomplete_details") or {}
            reason = details.get("reason") if type(details) is dict else None
            finish = _INCOMPLETE.get(str(reason), "length")
        else:
            finish = "tool_calls" if self._calls else "stop"
        self.finish_reason = finish
        self.finish_reasons[0] = finish
        usage = self.usage = chat_usage(response.get("usage"))
        self.chunks += 1
        text = self._chunk_json({}, finish, usage)
        return Frame(_CHUNK, text, orjson.loads(text), "", finish)

    def _native_error(self, data: str, obj: dict[str, Any], error: Any) -> Frame:
        """An ``error`` event or a ``response.failed``: classified as a chat error frame."""
        error = error if type(error) is dict else {}
        shaped = {
            "error": {
                "message": str(error.get("message") or "upstream Responses stream failed"),
                "type": error.get("type"),
                "code": error.get("code"),
                "param": error.get("param"),
            }
        }
        err = classify_stream_error(self.dialect, shaped)
        if self.error is None:
            self.error = err
        return Frame(FrameKind.ERROR, data, obj, error=err)
