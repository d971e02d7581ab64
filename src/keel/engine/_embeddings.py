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
from keel.engine._limits import RequestCost
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


class InputCost(RequestCost):
    """An embeddings request's tokens: its input, and no output."""

    __slots__ = ()

    @property
    def prompt(self) -> int:
        if self._prompt is None:
            self._prompt = input_tokens(self.body.get("input"))
        return self._prompt

    @property
    def max_completion(self) -> int:
        return 0


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

    def cost(self, body: Mapping[str, Any]) -> RequestCost:
        return InputCost(body)

    def answer(self, raw: bytes, body: Mapping[str, Any]) -> Usage:
        """One embedding per input, checked by the answer's frame rather than parsed whole:
        parsing every number of a float answer would cost several times what relaying it
        does (~450 instructions a number, 1536 numbers an input), and even a base64 answer's
        parse cost 26k instructions a request, 4 % of the bare proxy's whole cost. The usage
        comes with its (absent) completion tokens as 0, so that token accounting reconciles."""
        return _framed(raw, input_count(body.get("input")))


def _framed(raw: bytes, expected: int) -> Usage:
    """An embeddings answer checked without parsing its vectors: a JSON object whose brackets
    balance (a body cut short — that still matched its length — does not), holding one
    ``"embedding":`` key per input (a value "embedding" has no colon after it; base64 and
    numbers hold no quotes); its usage parsed from the ``"usage"`` object alone."""
    head = raw[:1] if raw[:1] == b"{" else raw.lstrip()[:1]  # (no copy in the common case)
    if head != b"{" or raw[-16:].rstrip()[-1:] != b"}":
        raise _malformed("a body that is not a JSON object (truncated?)")
    if raw.count(b"{") != raw.count(b"}") or raw.count(b"[") != raw.count(b"]"):
        raise _malformed("a JSON body whose brackets do not balance (truncated?)")
    found = raw.count(b'"embedding":')
    if found != expected:
        raise _malformed(f"{found} embeddings for {expected} inputs")
    at = raw.rfind(b'"usage"')
    start = raw.find(b"{", at) if at >= 0 else -1
    end = start
    for _ in range(4):  # the first "}" closes it unless it nests (…_details objects)
        end = raw.find(b"}", end + 1) if start >= 0 else -1
        if end < 0:
            break
        try:
            return _usage(orjson.loads(raw[start : end + 1]))
        except orjson.JSONDecodeError:
            continue
    return None


def _usage(usage: Any) -> Usage:
    if type(usage) is not dict:
        return None
    return usage if "completion_tokens" in usage else {**usage, "completion_tokens": 0}


EMBEDDINGS = Embeddings("embeddings", "/embeddings")
