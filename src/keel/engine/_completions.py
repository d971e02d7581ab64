"""``POST /v1/completions`` (legacy text completions) as an operation of the engine, stream and
non-stream: a passthrough with chat's guarantees before the first byte — failures retried and
failed over invisibly, limits, deadlines — and its validation after it: a stream is relayed
only as ``text_completion`` chunks that end with a terminal ``finish_reason`` and ``[DONE]``
(``keel._text_assembly``), a non-stream answer only with a ``finish_reason`` on every choice.

A text completion is not continued elsewhere once its client has seen part of it (a prompt
completed by two models is not one answer): a stream that breaks after its commit ends with
an OpenAI-shaped error event and ``[DONE]``, never a silent end.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from keel._assembly import StreamAssembler
from keel._classify import Dialect, ErrorKind, transport_error
from keel._text_assembly import TextCompletionAssembler
from keel._tokens import completion_budget, input_tokens
from keel.engine._embeddings import input_count
from keel.engine._operation import Operation, Usage
from keel.engine._upstream import AttemptFailed
from keel.engine._validate import bad, check_depth, check_model, parse_object


def check_completions_request(
    body: dict[str, Any], *, depth_checked: bool = False
) -> dict[str, Any]:
    check_depth(body, depth_checked)
    check_model(body)
    input_count(body.get("prompt"), "prompt", empty=True)
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad("'stream' must be a boolean.", param="stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("'stream_options' must be an object.", param="stream_options")
    v = body.get("max_tokens")
    if v is not None and (type(v) is not int or v < 0):
        raise bad("'max_tokens' must be an integer >= 0.", param="max_tokens")
    for key in ("n", "best_of"):
        v = body.get(key)
        if v is not None and (type(v) is not int or v < 1):
            raise bad(f"'{key}' must be a positive integer.", param=key)
    return body


def _finished(choice: object) -> bool:
    return (
        type(choice) is dict
        and type(choice.get("text")) is str
        and type(r := choice.get("finish_reason")) is str
        and r != ""
    )


class Completions(Operation):
    """``POST /v1/completions``."""

    __slots__ = ()

    def parse(self, raw: bytes) -> dict[str, Any]:
        body, shallow = parse_object(raw)
        return check_completions_request(body, depth_checked=shallow)

    def check(self, body: dict[str, Any]) -> dict[str, Any]:
        return check_completions_request(body)

    def estimate(self, body: Mapping[str, Any]) -> tuple[int, int | None]:
        # Its prompt, and up to max_tokens of output.
        return input_tokens(body.get("prompt")), completion_budget(body)

    def answer(self, raw: bytes, body: Mapping[str, Any]) -> Usage:
        """Every choice with its text and a finish_reason (else it is not known to be whole)."""
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        choices = obj.get("choices") if type(obj) is dict else None
        if type(choices) is not list or not choices:
            raise AttemptFailed(
                transport_error(ErrorKind.PROTOCOL, "upstream returned a malformed text completion")
            )
        if not all(_finished(c) for c in choices):
            raise AttemptFailed(
                transport_error(
                    ErrorKind.PROTOCOL,
                    "upstream returned a text completion without its text or finish_reason",
                )
            )
        usage = obj.get("usage")
        return usage if type(usage) is dict else None

    def assembler(self, dialect: Dialect) -> StreamAssembler:
        return TextCompletionAssembler(dialect=dialect, require_done=True)

    def finish_choice(self, reason: str) -> dict[str, Any]:
        return {"text": "", "index": 0, "logprobs": None, "finish_reason": reason}

    def filtered(self, rid: str, model: str) -> bytes:
        return orjson.dumps(
            {
                "id": f"cmpl-{rid}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [self.finish_choice("content_filter")],
            }
        )


COMPLETIONS = Completions(
    "completions", "/completions", streams=True, chunk_object="text_completion"
)
