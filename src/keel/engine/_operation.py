"""Operations: what the engine needs to know about one OpenAI endpoint.

Every endpoint keel serves goes through the same engine — the router and balancer, client
admission, the deployment's limiter and breaker, the plan's retries and fail-over, the
deadlines, the metrics. An ``Operation`` says only what differs between endpoints: where the
upstream serves it, how a request body is checked, what it costs in tokens (for TPM limits),
how a non-stream answer is validated, and — for an endpoint that streams — how its chunks are
assembled and whether a broken stream can be continued. The driver (``keel.engine._driver``)
takes the call's operation (``call.op``) and does the rest the same way for all of them.

Each endpoint is a subclass with one instance (``CHAT`` here; the others beside the endpoint
they describe: ``keel.engine._embeddings``, ``keel.engine._completions``). Why methods on a
slotted class and not a record of functions: on the hot path a method call on a slotted
instance is specialised by CPython (a function stored in an attribute is not), and a plain
attribute read of an instance slot is too — the chat path pays nothing for being general.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from keel._assembly import StreamAssembler
from keel._classify import Dialect, ErrorKind, transport_error
from keel.engine._limits import chat_tokens
from keel.engine._upstream import AttemptFailed
from keel.engine._validate import check_chat_request, parse_object

Usage = Mapping[str, Any] | None


class Operation:
    """One endpoint, as the engine drives it. Compared and hashed by identity: each is a
    module-level constant. Subclasses override the methods; the attributes are set once."""

    __slots__ = ("chunk_object", "continues", "name", "path", "paths", "streams")

    def __init__(
        self,
        name: str,
        path: str,
        *,
        streams: bool = False,
        continues: bool = False,
        chunk_object: str = "chat.completion.chunk",
        paths: Mapping[Dialect, str] | None = None,
    ) -> None:
        self.name = name  # as OpenAI names the endpoint: "chat.completions", "embeddings", ...
        self.path = path  # appended to a deployment's base_url, e.g. "/chat/completions"
        self.paths = dict(paths or {})  # another upstream path for some dialects
        self.streams = streams  # the endpoint may stream (then ``assembler`` makes frames)
        self.continues = continues  # a stream broken after its commit can be continued
        self.chunk_object = chunk_object  # the "object" of the stream chunks keel writes

    def __repr__(self) -> str:
        return f"<Operation {self.name}>"

    def path_for(self, dialect: Dialect) -> str:
        return self.paths.get(dialect, self.path)

    # -- the request ------------------------------------------------------------------------------

    def parse(self, raw: bytes) -> dict[str, Any]:
        """A door's raw body, checked (a 4xx ``KeelError`` naming the problem otherwise)."""
        raise NotImplementedError

    def check(self, body: dict[str, Any]) -> dict[str, Any]:
        """A library caller's dict, checked the same way."""
        raise NotImplementedError

    # Its token estimate of a body (``Costed.tokens()``), asked only where a TPM limit
    # applies: a chat body's unless overridden. The function itself, not a method calling
    # it: one frame fewer per request.
    estimate = staticmethod(chat_tokens)

    # -- the answer -------------------------------------------------------------------------------

    def answer(self, raw: bytes, body: Mapping[str, Any]) -> Usage:
        """A 2xx non-stream answer to ``body`` (as keel sent it, before the deployment's model
        name): its usage — or ``AttemptFailed`` when it is not a complete answer, which the
        plan then retries like any failure."""
        raise NotImplementedError

    def assembler(self, dialect: Dialect) -> StreamAssembler:
        """A stream attempt's validator: its chunks → frames (only where ``streams``)."""
        raise NotImplementedError(f"{self.name} does not stream")

    def finish_choice(self, reason: str) -> dict[str, Any] | None:
        """The choice of a terminal chunk keel writes itself (content_filter, length);
        None: a chat completion chunk's."""
        return None

    def filtered(self, rid: str, model: str) -> bytes | None:
        """The non-stream answer when the plan ends with output moderation passed on; None:
        an error instead."""
        return None


# -- chat completions ----------------------------------------------------------------------------


class ChatCompletions(Operation):
    """``POST /v1/chat/completions``."""

    __slots__ = ()

    def parse(self, raw: bytes) -> dict[str, Any]:
        body, shallow = parse_object(raw)
        return check_chat_request(body, depth_checked=shallow)

    def check(self, body: dict[str, Any]) -> dict[str, Any]:
        return check_chat_request(body)

    def answer(self, raw: bytes, body: Mapping[str, Any]) -> Usage:
        """A complete chat completion's usage; AttemptFailed for anything else. Like a stream
        without its terminal chunk, an answer without a finish_reason is not known to be
        complete: never pass it off as success."""
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
            raise AttemptFailed(
                transport_error(ErrorKind.PROTOCOL, "upstream returned a malformed chat completion")
            )
        choices = obj["choices"]
        if not choices:
            raise _unfinished()
        for c in choices:  # (a loop, not all() over a generator: no frame of its own)
            if not _finished(c):
                raise _unfinished()
        usage = obj.get("usage")
        return usage if type(usage) is dict else None

    def assembler(self, dialect: Dialect) -> StreamAssembler:
        return StreamAssembler(dialect=dialect, require_done=True)

    def filtered(self, rid: str, model: str) -> bytes:
        """Output moderation passed on, the way OpenAI reports it."""
        return orjson.dumps(
            {
                "id": f"chatcmpl-{rid}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": "content_filter",
                    }
                ],
            }
        )


def _unfinished() -> AttemptFailed:
    return AttemptFailed(
        transport_error(
            ErrorKind.PROTOCOL, "upstream returned a chat completion without a finish_reason"
        )
    )


def _finished(choice: object) -> bool:
    return type(choice) is dict and type(r := choice.get("finish_reason")) is str and r != ""


CHAT = ChatCompletions("chat.completions", "/chat/completions", streams=True, continues=True)
