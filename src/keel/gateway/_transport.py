"""``Keel.transport()``: an httpx transport that calls the engine in-process.

The way ``httpx.ASGITransport`` serves an app without a socket, this serves the gateway's
routes without HTTP: the official SDKs get the same statuses, headers and bodies as through
``keel serve`` (so the same exceptions: ``NotFoundError``, ``RateLimitError``, ``APIError``
from a stream), and a stream closed by the client closes the upstream attempt at once.

The openai SDK takes an ``httpx`` client or, from its 3.x releases, an ``httpx2`` one; the two
have the same transport API but their own classes (and check them). One transport serves
both: it answers each request with the response classes of the request's own library.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import sys
from collections.abc import AsyncIterator, Callable
from functools import cache
from types import ModuleType
from typing import Any
from urllib.parse import unquote

import orjson

from keel._responses import sse_events
from keel.engine._completions import COMPLETIONS
from keel.engine._driver import complete, stream
from keel.engine._embeddings import EMBEDDINGS
from keel.engine._errors import KeelError
from keel.engine._keel import Call, Keel
from keel.engine._operation import CHAT, Operation
from keel.engine._responses import ResponsesSink, parse_request, response_of, responses_call
from keel.engine._sinks import COMMITTED, END, QueueSink, Sink
from keel.gateway._app import too_large, unrouted
from keel.gateway._sink import sse, sse_end

# The engine's endpoints by path (the gateway's routes).
_OPERATIONS = {
    **dict.fromkeys(("/v1/chat/completions", "/chat/completions"), CHAT),
    **dict.fromkeys(("/v1/embeddings", "/embeddings"), EMBEDDINGS),
    **dict.fromkeys(("/v1/completions", "/completions"), COMPLETIONS),
}
_RESPONSES = ("/v1/responses", "/responses")  # keel.engine._responses: chat calls underneath
_JSON = {"content-type": "application/json"}


def _libraries() -> tuple[ModuleType, ...]:
    found = []
    for name in ("httpx", "httpx2"):
        with contextlib.suppress(ImportError):
            found.append(importlib.import_module(name))
    if not found:
        raise ImportError("Keel.transport() needs httpx (or httpx2): pip install httpx")
    return tuple(found)


_BASES = tuple(lib.AsyncBaseTransport for lib in _libraries())


class KeelTransport(*_BASES):  # type: ignore[misc]
    def __init__(self, keel: Keel) -> None:
        self._keel = keel

    async def handle_async_request(self, request: Any) -> Any:
        lib = sys.modules[type(request).__module__.partition(".")[0]]
        return await _Door(self._keel, lib).handle(request)


class _Door:
    """One request through the transport, answered with ``lib``'s classes."""

    def __init__(self, keel: Keel, lib: ModuleType) -> None:
        self._keel = keel
        self._lib = lib

    async def handle(self, request: Any) -> Any:
        path, method = request.url.path, request.method
        op = _OPERATIONS.get(path)
        if op is not None and method == "POST":
            return await self._call(request, op)
        if path in _RESPONSES and method == "POST":
            return await self._call(request, CHAT, responses=True)
        if path.startswith("/v1/models") and method in ("GET", "HEAD"):
            return self._models(request, path.removeprefix("/v1/models"))
        if path == "/healthz" and method in ("GET", "HEAD"):
            return self._lib.Response(200, headers=_JSON, content=b'{"status":"ok"}')
        return self._error(unrouted(method, path))

    def _models(self, request: Any, rest: str) -> Any:
        """GET /v1/models and /v1/models/{id}, by the client's key, as ``keel serve``."""
        keel = self._keel
        try:
            principal = keel.authenticate(request.headers)
            if not rest:
                obj: Any = {"object": "list", "data": keel.models(principal)}
            elif rest.startswith("/") and len(rest) > 1:
                obj = keel.model(unquote(rest[1:]), principal)
            else:
                return self._error(unrouted(request.method, request.url.path))
        except KeelError as exc:
            return self._error(exc)
        return self._lib.Response(200, headers=_JSON, content=orjson.dumps(obj))

    async def _call(self, request: Any, op: Operation, responses: bool = False) -> Any:
        """A request to ``op``'s endpoint; or to /v1/responses (``responses``): a chat call
        whose answer becomes a Response or its events (``keel.engine._responses``)."""
        keel = self._keel
        rid = keel.request_id()
        body: dict[str, Any] = {}  # the Responses request
        try:
            principal = keel.authenticate(request.headers)
            raw = await request.aread()
            limit = keel.config.server.max_body_bytes
            if len(raw) > limit:
                raise too_large(limit)
            if responses:
                body = parse_request(raw)
                call = responses_call(keel, body, principal, request.headers, rid)
            else:
                call = keel.call(raw, principal, request.headers, rid, op)
            await keel.admit(call)
        except KeelError as exc:
            return self._error(exc, rid)
        if call.stream:
            if not responses:
                return await self._streamed(call)
            return await self._streamed(call, lambda sink: ResponsesSink(sink, body, rid))
        try:
            answer, headers = await complete(keel, call)
        except KeelError as exc:
            return self._error(exc)
        finally:
            keel.done(call)
        if responses:
            answer = orjson.dumps(response_of(answer, body, rid))
        return self._lib.Response(200, headers={**_JSON, **headers}, content=answer)

    async def _streamed(self, call: Call, wrap: Callable[[Sink], Sink] | None = None) -> Any:
        """Run the stream in a task of its own; answer once it commits (200 and the event
        stream) or fails before that (the error response). ``wrap``: the sink the driver
        writes to, around the queue (Responses events instead of chat chunks)."""
        keel = self._keel
        sink = QueueSink()
        target = sink if wrap is None else wrap(sink)

        async def run() -> None:
            try:
                await stream(keel, call, target)
            finally:
                keel.done(call)

        task = asyncio.create_task(run())
        try:
            first = await sink.get()
        except BaseException:
            task.cancel()
            raise
        if isinstance(first, KeelError):
            await task
            return self._error(first)
        assert first is COMMITTED
        headers = {
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-cache",
            **sink.headers,
        }
        body = _event_stream_class(self._lib)(sink, task, wrap is not None)
        return self._lib.Response(200, headers=headers, stream=body)

    def _error(self, err: KeelError, request_id: str = "") -> Any:
        headers = {**_JSON, **err.headers}
        if request_id:
            headers["x-request-id"] = request_id
        return self._lib.Response(err.status, headers=headers, content=orjson.dumps(err.body))


@cache
def _event_stream_class(lib: ModuleType) -> type[_EventStream]:
    return type("EventStream", (_EventStream, lib.AsyncByteStream), {})


class _EventStream:
    """The committed stream's SSE bytes; closing it (the SDK's ``close()``, a ``break``)
    cancels the engine's task, which closes the upstream."""

    def __init__(self, sink: QueueSink, task: asyncio.Task[None], events: bool = False) -> None:
        self._sink = sink
        self._task = task
        self._events = events  # Responses events: their own framing, no [DONE]

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            item = await self._sink.get()
            if self._events:
                if item is END:
                    return
                assert isinstance(item, list)  # (its sink ends a failed stream with an event)
                yield sse_events(item)
                continue
            if item is END:
                yield sse_end([])
                return
            if isinstance(item, KeelError):  # a committed stream's last word: a frame
                yield sse_end([orjson.dumps(item.body)])
                return
            assert isinstance(item, list)
            yield sse(item)

    async def aclose(self) -> None:
        task = self._task
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
