"""The Responses API on the engine: a request becomes a chat ``Call`` (``keel._responses``
translates it), runs through chat's whole engine — retries, failover, mid-stream continuation —
and its answer is turned back into a Response object or the Responses event stream.

On a deployment with ``api: responses`` an attempt is ``RESPONSES`` instead (an
``Operation``, chosen by the driver per attempt): the client's own request goes to
``/responses``, and ``keel._responses_wire`` reads its event stream into the same frames.

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

from keel._assembly import StreamAssembler
from keel._classify import Dialect, ErrorKind, classify_stream_error, transport_error
from keel._responses import (
    ResponseEvents,
    Unsupported,
    chat_request,
    native_continuation,
    response_from_chat,
)
from keel._responses_wire import ResponsesAssembler, chat_usage
from keel.engine._errors import KeelError
from keel.engine._operation import Operation, Usage
from keel.engine._sinks import Sink
from keel.engine._upstream import AttemptFailed
from keel.engine._validate import bad

if TYPE_CHECKING:
    from keel._transcript import Transcript
    from keel.engine._auth import Principal
    from keel.engine._deployment import Deployment
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
        if not _all_native(keel, request.get("model")):
            raise KeelError(400, str(exc), param=exc.param, code=exc.code) from None
        # Only deployments that speak Responses serve this model: what chat cannot express
        # (stored state, built-in tools) goes to them as it is. The chat body is a stand-in,
        # for the limits' token estimate.
        body = _stand_in(request, bool(stream))
    call = keel.call(body, principal, headers, rid)
    call.responses = dict(request)
    return call


def _all_native(keel: Keel, model: object) -> bool:
    """Every deployment a request for ``model`` may reach (fallbacks too) has api: responses."""
    router = keel.router
    if not isinstance(model, str) or model not in router:
        return False
    return all(d.native for g in router.plan(model) for d in router.groups[g])


def _stand_in(request: Mapping[str, Any], stream: bool) -> dict[str, Any]:
    text = orjson.dumps(request.get("input")).decode()
    body: dict[str, Any] = {
        "model": request.get("model"),
        "messages": [{"role": "user", "content": text}],
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def native_body(call: Call, dep: Deployment) -> bytes:
    """The request a native deployment gets: the client's own, with the deployment's model."""
    assert call.responses is not None
    return orjson.dumps({**call.responses, "model": dep.model, "stream": call.stream})


def native_payload(call: Call, t: Transcript, dep: Deployment, mode: str | None) -> bytes:
    """A streamed attempt's request to a native deployment, continuing the answer so far
    when ``mode``."""
    request = call.responses
    assert request is not None
    if mode is not None:
        request = native_continuation(request, t.text, mode, dep.dialect, t.tokens)
        assert request is not None  # past the token limit the plan ends with "length" instead
    return orjson.dumps({**request, "model": dep.model, "stream": True})


class NativeResponses(Operation):
    """``POST /responses`` on a deployment with ``api: responses``: the wire of a Responses
    call's attempts there (the call itself is a chat one, ``CHAT``, for every other
    deployment). The driver takes it per attempt; the door never builds a call of it."""

    __slots__ = ()

    def answer(self, raw: bytes, body: Mapping[str, Any]) -> Usage:
        """A non-stream Response: its usage in chat terms; AttemptFailed for one that failed
        (retried and failed over like any upstream error) or is not a Response."""
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict) or obj.get("object") != "response":
            raise AttemptFailed(
                transport_error(ErrorKind.PROTOCOL, "upstream returned a malformed Response")
            )
        status = obj.get("status")
        if status == "failed":
            error = obj.get("error")
            error = error if isinstance(error, dict) else {}
            shaped = {"error": {"message": str(error.get("message") or "the response failed"),
                                "code": error.get("code"), "type": error.get("type")}}  # fmt: skip
            raise AttemptFailed(classify_stream_error("openai", shaped))
        if status not in ("completed", "incomplete", "in_progress", "queued"):
            raise AttemptFailed(
                transport_error(
                    ErrorKind.PROTOCOL, f"upstream returned a Response with status {status!r}"
                )
            )
        return chat_usage(obj.get("usage"))

    def assembler(self, dialect: Dialect) -> StreamAssembler:
        return ResponsesAssembler(dialect=dialect)


RESPONSES = NativeResponses("responses", "/responses", streams=True, continues=True)


def response_of(raw: bytes, request: Mapping[str, Any], rid: str) -> dict[str, Any]:
    """A non-stream chat answer (the engine's, checked complete) as a Response object."""
    answer: dict[str, Any] = orjson.loads(raw)
    if answer.get("object") == "response":
        return answer  # a native deployment's own (its id is what previous_response_id takes)
    return response_from_chat(answer, request, rid, int(time.time()))


class ResponsesSink:
    """A sink of chat chunks that writes Responses event payloads to ``inner``."""

    __slots__ = ("committed", "events", "inner", "started")

    def __init__(self, inner: Sink, request: Mapping[str, Any], rid: str) -> None:
        self.inner = inner
        self.events = ResponseEvents(request, rid, int(time.time()))
        self.committed = False
        self.started = False  # response.created is out

    async def commit(self, headers: Mapping[str, str]) -> None:
        await self.inner.commit(headers)
        self.committed = True

    def _translate(self, chunks: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        events = self.events
        for c in chunks:
            obj = orjson.loads(c)
            if not self.started:
                self.started = True
                rid = obj.get("id")
                if isinstance(rid, str) and rid.startswith("resp_"):
                    events.adopt(rid)  # a native deployment's stream: its response id
                out.extend(orjson.dumps(e) for e in events.start())
            for event in events.chunk(obj):
                out.append(orjson.dumps(event))
        return out

    def _opening(self) -> list[bytes]:
        if self.started:
            return []
        self.started = True
        return [orjson.dumps(e) for e in self.events.start()]

    async def send(self, chunks: list[bytes]) -> None:
        out = self._translate(chunks)
        if out:
            await self.inner.send(out)

    async def end(self, chunks: list[bytes]) -> None:
        out = self._translate(chunks)
        out[:0] = self._opening()
        out.extend(orjson.dumps(e) for e in self.events.finish())
        await self.inner.end(out)

    async def fail(self, error: KeelError) -> None:
        if not self.committed:
            await self.inner.fail(error)  # nothing was sent: an ordinary error response
            return
        out = self._opening()
        out.extend(orjson.dumps(e) for e in self.events.failed(error.body))
        await self.inner.end(out)
