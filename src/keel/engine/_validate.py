"""Client request validation: bad input gets a clear OpenAI-shaped 4xx naming the problem."""

from __future__ import annotations

from typing import Any

import orjson

from keel.engine._errors import KeelError


def bad(message: str, param: str | None = None, code: str | None = None) -> KeelError:
    return KeelError(400, message, param=param, code=code)


def parse_chat_request(raw: bytes) -> dict[str, Any]:
    """Parse and check a chat completion body; only what keel itself relies on is checked —
    everything else passes through to the upstream unchanged."""
    if not raw:
        raise bad("The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "utf-8" in str(exc).lower():
            raise bad("The request body is not valid UTF-8.", code="invalid_json") from None
        raise bad(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("The request body must be a JSON object.", code="invalid_json")
    return check_chat_request(body)


def check_chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """Check a chat completion body (parsed, or a library caller's dict)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required and must be a non-empty string.", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' is required and must be a non-empty array.", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string 'role'.", param="messages")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad("'stream' must be a boolean.", param="stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("'stream_options' must be an object.", param="stream_options")
    for key in ("max_tokens", "max_completion_tokens", "n"):
        v = body.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise bad(f"'{key}' must be a positive integer.", param=key)
    return body
