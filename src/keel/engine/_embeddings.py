"""``POST /v1/embeddings`` as an operation of the engine: routed, balanced, limited (a TPM
limit counts the input's tokens: an embedding has no output tokens), retried and failed over
exactly like a chat completion.

keel checks what it relies on — the model, the shape of ``input`` (a string, an array of
strings, an array of token ids, or an array of such arrays), ``dimensions`` and
``encoding_format`` when given — and passes the body on otherwise unchanged (with the
deployment's own model name). An answer is relayed only once it is known to be whole: a JSON
object whose ``data`` holds one embedding per input; anything else (a truncated body, a list
short of an embedding) is a failed attempt that the plan retries or fails over.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from keel._classify import ErrorKind, transport_error
from keel._tokens import input_tokens
from keel.engine._operation import Operation, Usage
from keel.engine._upstream import AttemptFailed
from keel.engine._validate import bad, check_depth, check_model, parse_object

MAX_INPUTS = 2048  # OpenAI's limit on the inputs of one request
ENCODINGS = ("float", "base64")


def input_count(value: Any, param: str = "input", empty: bool = False) -> int:
    """How many items ``value`` — an embeddings ``input``, a legacy completion's ``prompt``
    (``param``) — holds: a string (``empty``: may be ""), an array of strings, an array of
    token ids (one item), or an array of token id arrays. A 400 naming the problem when it
    has no shape OpenAI accepts."""
    if isinstance(value, str):
        if not value and not empty:
            raise bad(f"'{param}' must not be an empty string.", param=param)
        return 1
    if not isinstance(value, list) or not value:
        raise bad(
            f"'{param}' must be a string, an array of strings, an array of token ids "
            "(integers), or an array of token id arrays.",
            param=param,
        )
    if len(value) > MAX_INPUTS:
        raise bad(
            f"'{param}' has {len(value)} items; at most {MAX_INPUTS} are allowed.", param=param
        )
    first = value[0]
    if isinstance(first, str):
        for i, item in enumerate(value):
            if not isinstance(item, str) or not (item or empty):
                what = "a string" if empty else "a non-empty string"
                raise bad(f"{param}[{i}] must be {what}, like {param}[0].", param=param)
        return len(value)
    if _token(first):
        if not all(_token(t) for t in value):
            raise bad(f"A token array in '{param}' must hold integers >= 0 only.", param=param)
        return 1
    for i, item in enumerate(value):
        if not isinstance(item, list) or not item or not all(_token(t) for t in item):
            raise bad(
                f"{param}[{i}] must be a non-empty array of token ids (integers >= 0).",
                param=param,
            )
    return len(value)


def _token(value: object) -> bool:
    return type(value) is int and value >= 0  # not bool (an int subclass)


def check_embeddings_request(
    body: dict[str, Any], *, depth_checked: bool = False
) -> dict[str, Any]:
    check_depth(body, depth_checked)
    check_model(body)
    input_count(body.get("input"))
    dims = body.get("dimensions")
    if dims is not None and (type(dims) is not int or dims < 1):
        raise bad("'dimensions' must be a positive integer.", param="dimensions")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ENCODINGS:
        raise bad("'encoding_format' must be 'float' or 'base64'.", param="encoding_format")
    return body


def _malformed(why: str) -> AttemptFailed:
    return AttemptFailed(transport_error(ErrorKind.PROTOCOL, f"upstream returned {why}"))


class Embeddings(Operation):
    """``POST /v1/embeddings``."""

    __slots__ = ()

    def parse(self, raw: bytes) -> dict[str, Any]:
        body, shallow = parse_object(raw)
        return check_embeddings_request(body, depth_checked=shallow)

    def check(self, body: dict[str, Any]) -> dict[str, Any]:
        return check_embeddings_request(body)

    def estimate(self, body: Mapping[str, Any]) -> tuple[int, int | None]:
        return input_tokens(body.get("input")), 0  # its input, and no output

    def answer(self, raw: bytes, body: Mapping[str, Any]) -> Usage:
        """One embedding per input; the usage with its (absent) completion tokens as 0, so
        that token accounting reconciles. Everything but the vectors is parsed and checked
        (``_skeleton``): parsing every number of a float answer would cost several times
        what relaying it does (~450 instructions a number, 1536 numbers an input), and even
        a base64 answer's full parse cost 26k instructions a request."""
        try:
            obj = orjson.loads(_skeleton(raw))
        except orjson.JSONDecodeError:
            raise _malformed("a body that is not JSON (truncated?)") from None
        data = obj.get("data") if type(obj) is dict else None
        if type(data) is not list:
            raise _malformed("an embeddings answer without a 'data' list")
        expected = input_count(body.get("input"))
        if len(data) != expected:
            raise _malformed(f"{len(data)} embeddings for {expected} inputs")
        for item in data:
            if type(item) is not dict or "embedding" not in item:
                raise _malformed("an embeddings answer with an item that is no embedding")
        return _usage(obj.get("usage"))


_KEY = b'"embedding":'
_BLANK = frozenset(b" \t\r\n")


def _skeleton(raw: bytes) -> bytes:
    """The answer with each vector emptied (``[]`` or ``""``): what is left is small enough to
    parse whole. A vector is found by its key and skipped to its closing bracket or quote
    (C-speed searches); its numbers are not looked at, a vector cut short is (its closing
    bracket or the rest of the answer is missing)."""
    parts: list[bytes] = []
    pos = 0
    while (k := raw.find(_KEY, pos)) >= 0:
        v = k + len(_KEY)
        while v < len(raw) and raw[v] in _BLANK:
            v += 1
        opener = raw[v : v + 1]
        if opener == b"[":
            close = raw.find(b"]", v)
        elif opener == b'"':
            close = raw.find(b'"', v + 1)
        else:
            break  # not a vector: orjson judges the rest as it is
        if close < 0:
            raise _malformed("an embedding cut short (truncated?)")
        parts += (raw[pos:v], b"[]" if opener == b"[" else b'""')
        pos = close + 1
    if not parts:
        return raw
    parts.append(raw[pos:])
    return b"".join(parts)


def _usage(usage: Any) -> Usage:
    if type(usage) is not dict:
        return None
    return usage if "completion_tokens" in usage else {**usage, "completion_tokens": 0}


EMBEDDINGS = Embeddings("embeddings", "/embeddings")
