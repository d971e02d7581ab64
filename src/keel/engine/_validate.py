"""Client request validation: bad input gets a clear OpenAI-shaped 4xx naming the problem."""

from __future__ import annotations

from typing import Any

import orjson

from keel.engine._errors import KeelError

# orjson parses up to 1024 nested arrays/objects but serialises only 254 (its recursion limit):
# keel re-serialises every body it forwards, so it accepts only what it can send on.
MAX_DEPTH = 254
_BOM = b"\xef\xbb\xbf"
# The keys that must be positive integers when present, in the order they are checked (the
# first bad one is named).
_POSITIVE_INTS_ORDER = ("max_tokens", "max_completion_tokens", "n")
_POSITIVE_INTS = frozenset(_POSITIVE_INTS_ORDER)


def bad(message: str, param: str | None = None, code: str | None = None) -> KeelError:
    return KeelError(400, message, param=param, code=code)


def parse_chat_request(raw: bytes) -> dict[str, Any]:
    """Parse and check a chat completion body; only what keel itself relies on is checked —
    everything else passes through to the upstream unchanged."""
    body, shallow = parse_object(raw)
    return check_chat_request(body, depth_checked=shallow)


def parse_object(raw: bytes) -> tuple[dict[str, Any], bool]:
    """A request body as a JSON object (a 400 naming the problem otherwise), and whether it
    is known to nest no deeper than ``MAX_DEPTH`` (else the body's check walks it:
    ``check_depth``)."""
    if not raw:
        raise bad("The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as first:
        # RFC 8259 §8.1 lets a parser ignore one leading BOM (some Windows tools write one);
        # checked only after a failure, so the common path pays nothing for it.
        if not raw.startswith(_BOM):
            raise _not_json(first) from None
        raw = raw[len(_BOM) :]
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _not_json(exc) from None
    if not isinstance(body, dict):
        raise bad("The request body must be a JSON object.", code="invalid_json")
    # Only a body with more than MAX_DEPTH brackets can nest that deep (bytes.count runs in
    # C, ~1 µs for a typical body; a body shorter than that has too few bytes to need it); the
    # walk is for the rare body that has that many.
    deep = len(raw) > MAX_DEPTH and raw.count(b"[") + raw.count(b"{") > MAX_DEPTH
    return body, not deep


def check_depth(body: dict[str, Any], depth_checked: bool) -> None:
    """A 400 for a body nested deeper than keel can forward (a library caller's dict is
    walked, as a cycle would be)."""
    if not depth_checked and too_deep(body, MAX_DEPTH):
        raise _too_deep()


def _too_deep() -> KeelError:
    return bad(
        f"The request body nests arrays/objects more than {MAX_DEPTH} levels deep; "
        f"keel forwards at most {MAX_DEPTH}.",
        code="invalid_json",
    )


def check_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required and must be a non-empty string.", param="model")
    return model


def check_chat_request(body: dict[str, Any], *, depth_checked: bool = False) -> dict[str, Any]:
    """Check a chat completion body (parsed, or a library caller's dict: its depth is walked,
    as a cycle would be)."""
    if not depth_checked and too_deep(body, MAX_DEPTH):
        raise _too_deep()
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
    if not _POSITIVE_INTS.isdisjoint(body):  # (most bodies have none: one test in C)
        for key in _POSITIVE_INTS_ORDER:
            v = body.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise bad(f"'{key}' must be a positive integer.", param=key)
    return body


def _not_json(exc: orjson.JSONDecodeError) -> KeelError:
    text = str(exc).lower()
    if "byte order mark" in text:  # a second BOM after the one ignored
        return bad(
            "The request body starts with more than one UTF-8 byte order mark (BOM).",
            code="invalid_json",
        )
    if "utf-8" in text:
        return bad("The request body is not valid UTF-8.", code="invalid_json")
    return bad(f"The request body is not valid JSON: {exc}", code="invalid_json")


def too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests dicts/lists more than ``limit`` levels deep (the value itself
    being level 1). Iterative: a parsed body may be 1024 levels deep, past Python's recursion
    limit."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        obj, depth = stack.pop()
        if depth > limit:
            return True
        for child in obj.values() if isinstance(obj, dict) else obj:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False
