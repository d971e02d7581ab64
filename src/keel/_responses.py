"""The Responses API over chat completions: request translation and the event stream. Sans-IO.

A deployment that speaks only chat completions (Qwen, DeepSeek, vLLM, ...) answers a Responses
client through this module:

* ``chat_request`` turns a ``POST /v1/responses`` body into a chat completion body
  (instructions/input → messages, function tools → tools, ``text.format`` →
  ``response_format``, ``max_output_tokens`` → ``max_tokens``), or raises ``Unsupported``
  naming the field keel cannot translate (the door answers 400);
* ``ResponseEvents`` turns the chat stream's chunks, as the client would see them (already
  retried, spliced and continued by the engine), into the Responses event grammar:
  ``response.created``, ``response.in_progress``, ``response.output_item.added``,
  ``response.content_part.added``, ``response.output_text.delta`` …
  ``response.output_item.done``, then exactly one terminal event (``response.completed``,
  ``response.incomplete`` or ``response.failed``), with ``sequence_number`` counting up from 0;
* ``response_from_chat`` turns a non-stream chat completion into a Response object.

Everything here is what the client sees; no I/O, no clock but the ``created_at`` passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson


class Unsupported(ValueError):
    """A Responses request keel cannot serve over chat completions: ``param`` names the field;
    ``code`` says whether it is a feature chat lacks (``unsupported_parameter``,
    ``unsupported_value``), a field unknown to keel (``unknown_parameter``), or plain bad
    input (None)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


# Request fields of the Responses API that have no chat-completions meaning and change nothing
# about the answer's content: accepted and not forwarded.
_IGNORED = frozenset(
    (
        "include", "truncation", "service_tier", "metadata", "prompt_cache_key",
        "safety_identifier", "stream_options", "top_logprobs", "max_tool_calls",
    )
)  # fmt: skip
# Fields forwarded under the same name.
_SAME = ("temperature", "top_p", "parallel_tool_calls", "user", "seed")
_STATEFUL = ("previous_response_id", "conversation", "background", "prompt")


def chat_request(body: Mapping[str, Any], *, stream: bool) -> dict[str, Any]:
    """The chat completion body for a Responses request (``Unsupported`` otherwise)."""
    for key in _STATEFUL:
        if body.get(key):
            raise Unsupported(
                f"'{key}' needs a deployment that serves the Responses API natively "
                "(api: responses); this model group translates to chat completions, "
                "which keep no state.",
                key,
                "unsupported_parameter",
            )
    if body.get("store") is True:
        raise Unsupported(
            "'store': true needs a deployment that serves the Responses API natively "
            "(api: responses); keel keeps no responses for a translated one. "
            "Send 'store': false.",
            "store",
            "unsupported_parameter",
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Unsupported("'model' is required and must be a non-empty string.", "model")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise Unsupported("'instructions' must be a string.", "instructions")
        messages.append({"role": "system", "content": instructions})
    messages.extend(_messages(body.get("input")))
    out: dict[str, Any] = {"model": model, "messages": messages}
    for key in _SAME:
        if body.get(key) is not None:
            out[key] = body[key]
    limit = body.get("max_output_tokens")
    if limit is not None:
        if type(limit) is not int or limit < 1:
            raise Unsupported(
                "'max_output_tokens' must be a positive integer.", "max_output_tokens"
            )
        out["max_tokens"] = limit
    tools = body.get("tools")
    if tools:
        out["tools"] = _tools(tools)
    choice = body.get("tool_choice")
    if choice is not None:
        out["tool_choice"] = _tool_choice(choice)
    fmt = _response_format(body.get("text"))
    if fmt is not None:
        out["response_format"] = fmt
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        out["reasoning_effort"] = reasoning["effort"]
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}  # response.completed carries usage
    for key in body:
        if not (key in _IGNORED or key in out or key in _KNOWN):
            raise Unsupported(
                f"Unknown or unsupported parameter '{key}'.", key, "unknown_parameter"
            )
    return out


_KNOWN = frozenset(
    (
        "model", "input", "instructions", "max_output_tokens", "tools", "tool_choice", "text",
        "reasoning", "stream", "store", *_SAME, *_STATEFUL,
    )
)  # fmt: skip


def _messages(items: object) -> list[dict[str, Any]]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise Unsupported("'input' is required: a string or a non-empty array of items.", "input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise Unsupported(f"input[{i}] must be an object.", "input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise Unsupported(
                    f"input[{i}].role must be user, assistant, system or developer.", "input"
                )
            out.append({"role": role, "content": _content(item.get("content"), i, role)})
        elif kind == "function_call":
            call = {
                "id": str(item.get("call_id") or item.get("id") or f"call_{i}"),
                "type": "function",
                "function": {
                    "name": str(item.get("name") or ""),
                    "arguments": str(item.get("arguments") or ""),
                },
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # one assistant turn with parallel calls
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                output = orjson.dumps(output).decode()
            out.append(
                {"role": "tool", "tool_call_id": str(item.get("call_id") or ""), "content": output}
            )
        elif kind == "reasoning":
            continue  # an earlier turn's reasoning: a chat deployment cannot take it back
        else:
            raise Unsupported(
                f"input[{i}] is of type '{kind}', which keel cannot translate to chat "
                "completions (message, function_call, function_call_output and reasoning "
                "items are supported).",
                "input",
                "unsupported_value",
            )
    return out


def _content(content: object, i: int, role: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Unsupported(f"input[{i}].content must be a string or an array of parts.", "input")
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": str(part.get("text") or "")})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image: dict[str, Any] = {"url": part["image_url"]}
            if part.get("detail"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        elif kind == "refusal":
            parts.append({"type": "text", "text": str(part.get("refusal") or "")})
        else:
            raise Unsupported(
                f"input[{i}].content has a part of type '{kind}', which keel cannot "
                "translate to chat completions (input_text, output_text, input_image with "
                "an image_url are supported).",
                "input",
                "unsupported_value",
            )
    if role != "user" and all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)  # system/assistant turns: plain text
    return parts


def _tools(tools: object) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise Unsupported("'tools' must be an array.", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise Unsupported(
                f"tools[{i}] is of type '{kind}'; over chat completions keel supports "
                "function tools only.",
                "tools",
                "unsupported_value",
            )
        fn: dict[str, Any] = {"name": tool.get("name")}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                fn[key] = tool[key]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: object) -> object:
    if isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise Unsupported("'tool_choice' must be auto, none, required or a function.", "tool_choice")


def _response_format(text: object) -> dict[str, Any] | None:
    if not isinstance(text, dict) or not isinstance(fmt := text.get("format"), dict):
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise Unsupported(
        f"text.format of type '{kind}' is not supported.", "text", "unsupported_value"
    )


# -- the Response object -----------------------------------------------------------------------


def response_shell(
    request: Mapping[str, Any], rid: str, created_at: int, status: str = "in_progress"
) -> dict[str, Any]:
    """A Response object with no output yet, echoing the request's settings."""
    text = request.get("text")
    return {
        "id": f"resp_{rid}",
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": request.get("model"),
        "output": [],
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": request.get("reasoning") or {"effort": None, "summary": None},
        "store": False,
        "temperature": request.get("temperature"),
        "text": text if isinstance(text, dict) else {"format": {"type": "text"}},
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": request.get("tools") or [],
        "top_p": request.get("top_p"),
        "truncation": "disabled",
        "usage": None,
        "user": request.get("user"),
        "metadata": request.get("metadata") or {},
    }


def usage_of(chat_usage: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not chat_usage:
        return None
    i = int(chat_usage.get("prompt_tokens") or 0)
    o = int(chat_usage.get("completion_tokens") or 0)
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (chat_usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": i,
        "input_tokens_details": {"cached_tokens": int(cached), "cache_write_tokens": 0},
        "output_tokens": o,
        "output_tokens_details": {"reasoning_tokens": int(reasoning)},
        "total_tokens": i + o,
    }


# finish_reason → why a response is incomplete (None: it completed)
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def _end_status(response: dict[str, Any], finish: str | None) -> str:
    reason = _INCOMPLETE.get(finish or "")
    if reason is None:
        response["status"] = "completed"
        return "response.completed"
    response["status"] = "incomplete"
    response["incomplete_details"] = {"reason": reason}
    return "response.incomplete"


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "reasoning",
        "status": status,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def _call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def response_from_chat(
    completion: Mapping[str, Any], request: Mapping[str, Any], rid: str, created_at: int
) -> dict[str, Any]:
    """A non-stream chat completion as a Response object."""
    response = response_shell(request, rid, created_at)
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    thought = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(thought, str) and thought:
        output.append(_reasoning_item(f"rs_{rid}", thought, "completed"))
    text = message.get("content")
    if isinstance(text, str) and text:
        output.append(_message_item(f"msg_{rid}", text, "completed"))
    for i, call in enumerate(message.get("tool_calls") or []):
        fn = call.get("function") or {}
        output.append(
            _call_item(
                f"fc_{rid}_{i}",
                str(call.get("id") or f"call_{rid}_{i}"),
                str(fn.get("name") or ""),
                str(fn.get("arguments") or ""),
                "completed",
            )
        )
    response["output"] = output
    response["usage"] = usage_of(completion.get("usage"))
    _end_status(response, choice.get("finish_reason"))
    return response


# -- the event stream ------------------------------------------------------------------------


class _Call:
    __slots__ = ("arguments", "call_id", "item_id", "name", "output_index")

    def __init__(self, item_id: str, call_id: str, name: str, output_index: int) -> None:
        self.item_id = item_id
        self.call_id = call_id
        self.name = name
        self.output_index = output_index
        self.arguments: list[str] = []


class ResponseEvents:
    """The Responses events for one chat stream, as its client sees it. ``start`` once, then
    ``chunk`` per chat chunk (a parsed ``chat.completion.chunk``), then ``finish`` (the stream
    ended complete) or ``failed`` (it cannot be completed): each returns the events to send,
    in order. After ``finish`` or ``failed`` it returns nothing more — one terminal event."""

    __slots__ = (
        "_calls", "_finish", "_items", "_msg", "_open", "_own_usage", "_repair", "_rs",
        "_rs_text", "_seq", "_text", "_usage", "ended", "response", "rid",
    )  # fmt: skip

    def __init__(self, request: Mapping[str, Any], rid: str, created_at: int) -> None:
        self.rid = rid
        self.response = response_shell(request, rid, created_at)
        self._seq = 0
        self._items: list[dict[str, Any]] = []  # output items done so far
        self._msg: int | None = None  # output_index of the open message item
        self._rs: int | None = None  # output_index of the open reasoning item
        self._rs_text: list[str] = []
        self._text: list[str] = []
        self._calls: dict[int, _Call] = {}  # open function calls by the chat tool-call index
        self._open: list[int] = []  # output indexes still open, in order
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None  # the stream's usage chunk
        self._own_usage: dict[str, Any] | None = None  # usage on the terminal chunk itself
        self._repair: Any = None  # the terminal chunk's "keel": how the answer was continued
        self.ended = False

    def adopt(self, response_id: str) -> None:
        """Answer under the upstream's response id (a native deployment's stream): the id a
        later ``previous_response_id`` names."""
        self.response["id"] = response_id

    @property
    def text(self) -> str:
        return "".join(self._text)

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, **fields, "sequence_number": self._seq}
        self._seq += 1
        return event

    def _snapshot(self) -> dict[str, Any]:
        return {**self.response, "output": list(self._items)}

    def start(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=self._snapshot()),
            self._event("response.in_progress", response=self._snapshot()),
        ]

    def chunk(self, chunk: Mapping[str, Any]) -> list[dict[str, Any]]:
        if self.ended:
            return []
        out: list[dict[str, Any]] = []
        usage = chunk.get("usage")
        choices = chunk.get("choices")
        if isinstance(usage, dict):
            if choices:
                self._own_usage = usage  # a native stream's terminal chunk: its own count
            else:
                self._usage = usage
        if "keel" in chunk:
            self._repair = chunk["keel"]
        if not choices:
            return out
        choice = choices[0]
        delta = choice.get("delta") or {}
        # DeepSeek, vLLM, Qwen stream their reasoning beside the content
        thought = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(thought, str) and thought:
            self._reasoning_delta(thought, out)
        content = delta.get("content")
        if isinstance(content, str) and content:
            self._text_delta(content, out)
        for call in delta.get("tool_calls") or ():
            self._call_delta(call, out)
        finish = choice.get("finish_reason")
        if isinstance(finish, str) and finish:
            self._finish = finish
        return out

    def _reasoning_delta(self, thought: str, out: list[dict[str, Any]]) -> None:
        if self._rs is None:
            self._close_message(out)
            self._close_calls(out)
            index = self._rs = self._next_index()
            self._open.append(index)
            item = {"id": f"rs_{self.rid}", "type": "reasoning", "summary": [], "content": []}
            out.append(self._event("response.output_item.added", output_index=index, item=item))
        self._rs_text.append(thought)
        out.append(
            self._event(
                "response.reasoning_text.delta",
                item_id=f"rs_{self.rid}",
                output_index=self._rs,
                content_index=0,
                delta=thought,
            )
        )

    def _close_reasoning(self, out: list[dict[str, Any]], status: str = "completed") -> None:
        index = self._rs
        if index is None:
            return
        self._rs = None
        self._open.remove(index)
        text = "".join(self._rs_text)
        item_id = f"rs_{self.rid}"
        out.append(
            self._event(
                "response.reasoning_text.done",
                item_id=item_id,
                output_index=index,
                content_index=0,
                text=text,
            )
        )
        item = _reasoning_item(item_id, text, status)
        self._items.append(item)
        out.append(self._event("response.output_item.done", output_index=index, item=item))

    def _text_delta(self, content: str, out: list[dict[str, Any]]) -> None:
        if self._msg is None:
            self._close_reasoning(out)
            self._close_calls(out)
            index = self._msg = self._next_index()
            self._open.append(index)
            item_id = f"msg_{self.rid}"
            out.append(
                self._event(
                    "response.output_item.added",
                    output_index=index,
                    item={
                        "id": item_id,
                        "type": "message",
                        "status": "in_progress",
                        "role": "assistant",
                        "content": [],
                    },
                )
            )
            out.append(
                self._event(
                    "response.content_part.added",
                    item_id=item_id,
                    output_index=index,
                    content_index=0,
                    part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
                )
            )
        self._text.append(content)
        out.append(
            self._event(
                "response.output_text.delta",
                item_id=f"msg_{self.rid}",
                output_index=self._msg,
                content_index=0,
                delta=content,
                logprobs=[],
            )
        )

    def _call_delta(self, call: Mapping[str, Any], out: list[dict[str, Any]]) -> None:
        key = call.get("index", 0)
        key = key if type(key) is int else 0
        fn = call.get("function") or {}
        current = self._calls.get(key)
        if current is None:
            self._close_reasoning(out)
            self._close_message(out)
            index = self._next_index()
            n = len(self._calls)
            current = self._calls[key] = _Call(
                f"fc_{self.rid}_{n}",
                str(call.get("id") or f"call_{self.rid}_{n}"),
                str(fn.get("name") or ""),
                index,
            )
            self._open.append(index)
            out.append(
                self._event(
                    "response.output_item.added",
                    output_index=index,
                    item=_call_item(
                        current.item_id, current.call_id, current.name, "", "in_progress"
                    ),
                )
            )
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            current.arguments.append(args)
            out.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=current.item_id,
                    output_index=current.output_index,
                    delta=args,
                )
            )

    def _next_index(self) -> int:
        return len(self._items) + len(self._open)

    def _close_message(self, out: list[dict[str, Any]], status: str = "completed") -> None:
        index = self._msg
        if index is None:
            return
        self._msg = None
        self._open.remove(index)
        item_id, text = f"msg_{self.rid}", self.text
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        out.append(
            self._event(
                "response.output_text.done",
                item_id=item_id,
                output_index=index,
                content_index=0,
                text=text,
                logprobs=[],
            )
        )
        out.append(
            self._event(
                "response.content_part.done",
                item_id=item_id,
                output_index=index,
                content_index=0,
                part=part,
            )
        )
        item = _message_item(item_id, text, status)
        self._items.append(item)
        out.append(self._event("response.output_item.done", output_index=index, item=item))

    def _close_calls(self, out: list[dict[str, Any]], status: str = "completed") -> None:
        for key in list(self._calls):
            call = self._calls[key]
            if call.output_index not in self._open:
                continue
            self._open.remove(call.output_index)
            arguments = "".join(call.arguments)
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=call.item_id,
                    output_index=call.output_index,
                    name=call.name,
                    arguments=arguments,
                )
            )
            item = _call_item(call.item_id, call.call_id, call.name, arguments, status)
            self._items.append(item)
            out.append(
                self._event("response.output_item.done", output_index=call.output_index, item=item)
            )

    def _close_all(self, out: list[dict[str, Any]], status: str) -> None:
        # Close in output order: whichever is open (only the last item can be).
        self._close_reasoning(out, status)
        if self._msg is not None:
            self._close_message(out, status)
        self._close_calls(out, status)

    def finish(self) -> list[dict[str, Any]]:
        """The stream ended complete: close the open items, then the terminal event."""
        if self.ended:
            return []
        self.ended = True
        out: list[dict[str, Any]] = []
        self._close_all(out, "completed")
        response = self._snapshot()
        own = self._own_usage if self._repair is None else None
        response["usage"] = usage_of(own or self._usage)
        if self._repair is not None:
            # As on a chat stream's terminal chunk (SDKs ignore unknown fields): a continued
            # answer says so, and how — an instruct continuation is never passed off as exact.
            response["keel"] = self._repair
        kind = _end_status(response, self._finish)
        self.response = response
        out.append(self._event(kind, response=response))
        return out

    def failed(self, error: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The stream cannot be completed: ``error`` is the OpenAI-shaped error body
        (``{"error": {...}}``). The open items end ``incomplete``; the terminal event is
        ``response.failed``, carrying the error twice: as the Response's ``error`` (the
        Responses grammar) and as the event's own ``error`` — what the official SDKs raise
        (``APIError``) when an event has one, as they do for a chat stream's error frame."""
        if self.ended:
            return []
        self.ended = True
        out: list[dict[str, Any]] = []
        self._close_all(out, "incomplete")
        inner = dict(error.get("error") or {})
        response = self._snapshot()
        response["status"] = "failed"
        response["usage"] = usage_of(self._usage)
        response["error"] = {
            "code": _failure_code(inner),
            "message": str(inner.get("message") or "The response failed."),
        }
        self.response = response
        out.append(self._event("response.failed", response=response, error=inner))
        return out


def _failure_code(inner: Mapping[str, Any]) -> str:
    """A Response's ``error.code`` is an enum: the closest of its values."""
    code, kind = inner.get("code"), inner.get("type")
    if code in ("rate_limit_exceeded", "insufficient_quota") or kind == "rate_limit_error":
        return "rate_limit_exceeded"
    if kind == "invalid_request_error":
        return "invalid_prompt"
    return "server_error"


def event_type(payload: bytes) -> bytes:
    """The ``type`` of an event payload this module serialised (``type`` is its first key):
    the SSE ``event:`` line without parsing the JSON."""
    return payload[9 : payload.index(b'"', 9)]


def sse_events(payloads: list[bytes]) -> bytes:
    """Event payloads as Server-Sent Events the way OpenAI sends them: ``event: <type>`` and
    ``data: <json>``, and no ``[DONE]`` (the terminal event is the end)."""
    return b"".join([b"event: %s\ndata: %s\n\n" % (event_type(p), p) for p in payloads])


# -- native deployments ------------------------------------------------------------------------


def native_continuation(
    request: Mapping[str, Any], sent: str, mode: str, dialect: str, tokens_sent: int
) -> dict[str, Any] | None:
    """The Responses request that asks a native deployment to continue ``sent``: the
    request's input with the answer so far appended as an assistant message (and, for
    ``instruct``, the words that ask to go on), like ``keel._splice.continuation_body`` does
    for chat. None when the answer already used up ``max_output_tokens``."""
    from keel._splice import continuation_body

    shim: dict[str, Any] = {"messages": []}
    limit = request.get("max_output_tokens")
    if type(limit) is int:
        shim["max_tokens"] = limit
    cont = continuation_body(shim, sent, mode, dialect, tokens_sent)  # type: ignore[arg-type]
    if cont is None:
        return None
    items = request.get("input")
    before = [{"role": "user", "content": items}] if isinstance(items, str) else list(items or [])
    added = [{"role": m["role"], "content": m["content"]} for m in cont["messages"]]
    out = {**request, "input": before + added}
    if "max_tokens" in cont:
        out["max_output_tokens"] = cont["max_tokens"]
    return out
