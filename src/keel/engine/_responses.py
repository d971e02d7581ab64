"""The Responses API on the engine: a request becomes a chat ``Call`` (``keel._responses``
translates it), runs through chat's whole engine — retries, failover, mid-stream continuation —
and its answer is turned back into a Response object or the Responses event stream.

``ResponsesSink`` wraps any sink of event payloads (the gateway's, the transport's, the
library's queue): the driver writes chat chunks to it as it writes them to a chat client, and
it writes Responses events on. A stream that cannot be completed after its commit ends in a
well-formed ``response.failed`` carrying the OpenAI-shaped error, never in a silent end.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from keel._responses import ResponseEvents, Unsupported, chat_request, response_from_chat
from keel.engine._errors import KeelError
from keel.engine._sinks import Sink
from keel.engine._validate import bad

if TYPE_CHECKING:
    from keel.engine._auth import Principal
    from keel.engine._keel import Call, Keel


def parse_request(raw: bytes | Mapping[str, Any]) -> dict[str, Any]:
    """A Responses request body as a dict (a 400 ``KeelError`` for one that is not JSON)."""
    if not isinstance(raw, bytes):
        return dict(raw)
    if not raw:
        raise bad("The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        body = orjson.loads(raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw)
    except orjson.JSONDecodeError as exc:
        raise bad(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("The request body must be a JSON object.", code="invalid_json")
    return body


def responses_call(
    keel: Keel,
    request: Mapping[str, Any],
    principal: Principal,
    headers: Mapping[str, str],
    rid: str,
) -> Call:
    """The chat ``Call`` that answers a Responses request (4xx ``KeelError`` otherwise)."""
    stream = request.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad("'stream' must be a boolean.", param="stream")
    try:
        body = chat_request(request, stream=bool(stream))
    except Unsupported as exc:
        raise KeelError(400, str(exc), param=exc.param, code="unsupported_parameter") from None
    return keel.call(body, principal, headers, rid)


def response_of(raw: bytes, request: Mapping[str, Any], rid: str) -> dict[str, Any]:
    """A non-stream chat answer (the engine's, checked complete) as a Response object."""
    completion = orjson.loads(raw)
    return response_from_chat(completion, request, rid, int(time.time()))


class ResponsesSink:
    """A sink of chat chunks that writes Responses event payloads to ``inner``."""

    __slots__ = ("_head", "committed", "events", "inner")

    def __init__(self, inner: Sink, request: Mapping[str, Any], rid: str) -> None:
        self.inner = inner
        self.events = ResponseEvents(request, rid, int(time.time()))
        self.committed = False
        self._head: list[bytes] = []  # response.created/in_progress, sent with the first chunk

    async def commit(self, headers: Mapping[str, str]) -> None:
        await self.inner.commit(headers)
        self.committed = True
        self._head = [orjson.dumps(e) for e in self.events.start()]

    def _translate(self, chunks: list[bytes]) -> list[bytes]:
        out, self._head = self._head, []
        chunk = self.events.chunk
        for c in chunks:
            for event in chunk(orjson.loads(c)):
                out.append(orjson.dumps(event))
        return out

    async def send(self, chunks: list[bytes]) -> None:
        out = self._translate(chunks)
        if out:
            await self.inner.send(out)

    async def end(self, chunks: list[bytes]) -> None:
        out = self._translate(chunks)
        out.extend(orjson.dumps(e) for e in self.events.finish())
        await self.inner.end(out)

    async def fail(self, error: KeelError) -> None:
        if not self.committed:
            await self.inner.fail(error)  # nothing was sent: an ordinary error response
            return
        out, self._head = self._head, []
        out.extend(orjson.dumps(e) for e in self.events.failed(error.body))
        await self.inner.end(out)
