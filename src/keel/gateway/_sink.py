"""The gateway's sink: a stream's chunks as Server-Sent Events on an aiohttp response, and the
one way keel's HTTP errors are written (``error_response``).

Nothing is written before the engine commits the stream: until then a failure becomes an
ordinary HTTP error response. After the commit the client sees exactly one ending: the
terminal chunk and one ``[DONE]``, or an OpenAI-shaped error frame and ``[DONE]`` — never a
silent close.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Awaitable, Mapping

import orjson
from aiohttp import web

from keel.engine._errors import KeelError
from keel.engine._sinks import ClientGone

_SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",  # nginx & co. must not batch the stream
}
_DONE = b"data: [DONE]\n\n"


def sse(chunks: list[bytes]) -> bytes:
    """Chunk payloads as SSE events: the one place keel frames them."""
    return b"data: " + b"\n\ndata: ".join(chunks) + b"\n\n"


def sse_end(chunks: list[bytes]) -> bytes:
    """The last chunks of a stream, then ``[DONE]``."""
    return (sse(chunks) if chunks else b"") + _DONE


def sse_ids(sid: bytes, first: int, chunks: list[bytes]) -> bytes:
    """Chunk payloads as SSE events of a resumable stream: each with ``id: <stream id>:<seq>``,
    what an EventSource sends back as ``Last-Event-ID`` when it reconnects."""
    return b"".join(
        [b"id: %s:%d\ndata: %s\n\n" % (sid, seq, c) for seq, c in enumerate(chunks, first)]
    )


def sse_end_ids(sid: bytes, seq: int, error: bytes | None) -> bytes:
    """A resumable stream's ending: an error frame if it failed, then ``[DONE]``, both with
    the id after the last chunk's (a reconnect that saw them gets 204: nothing more)."""
    head = b"id: %s:%d\n" % (sid, seq)
    return (head + b"data: " + error + b"\n\n" if error else b"") + head + _DONE


_OWN_PREFIX = f"keel-{os.getpid():x}-{random.getrandbits(32):08x}-e"
_own_ids = itertools.count(1)


def own_request_id() -> str:
    """An id for an answer no engine request stands behind — an unknown path, a wrong method,
    malformed HTTP, a refused connection — so that every response keel sends carries one."""
    return f"{_OWN_PREFIX}{next(_own_ids):x}"


def error_response(err: KeelError, request_id: str = "") -> web.Response:
    headers = dict(err.headers)
    if request_id:
        headers["x-request-id"] = request_id
    elif "x-request-id" not in headers:
        headers["x-request-id"] = own_request_id()
    return web.Response(
        status=err.status,
        body=orjson.dumps(err.body),
        content_type="application/json",
        headers=headers,
    )


class SSESink:
    """A stream on one aiohttp request. ``response`` is what the handler returns: the event
    stream once committed, or the error response of a stream that never started."""

    __slots__ = ("committed", "ended", "request", "request_id", "response")

    def __init__(self, request: web.Request, request_id: str) -> None:
        self.request = request
        self.request_id = request_id
        self.response: web.StreamResponse | None = None
        self.committed = False
        self.ended = False

    @property
    def left(self) -> bool:
        """The client has gone away (its connection closing or lost)."""
        transport = self.request.transport
        return transport is None or transport.is_closing()

    async def commit(self, headers: Mapping[str, str]) -> None:
        response = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        response.headers.update(headers)
        self.response = response  # even if the client is gone by now: the handler returns it
        try:
            await response.prepare(self.request)
        except ConnectionError:
            if self.left:
                raise ClientGone from None
            raise
        self.committed = True

    def send(self, chunks: list[bytes]) -> Awaitable[None]:
        """Per network read of the stream: aiohttp's write itself, no coroutine of ours in
        between (a frame fewer on every read). Writing to a client that has left raises
        aiohttp's ConnectionError out of it: ``chat_completions`` asks ``left`` and ends
        quietly, as for ``ClientGone``."""
        assert self.response is not None
        return self.response.write(sse(chunks))

    async def end(self, chunks: list[bytes]) -> None:
        """The last chunks, the single ``[DONE]``, the end of the response: one write (the
        chunked encoding's terminator goes with them), not a write and then the terminator's
        own — a syscall fewer per stream."""
        if self.ended or self.response is None:
            return
        self.ended = True
        try:
            await self.response.write_eof(self._last(chunks))
        except ConnectionError:
            if self.left:
                raise ClientGone from None
            raise

    def _last(self, chunks: list[bytes]) -> bytes:
        """The stream's last bytes (``end``): its last chunks and the single ``[DONE]``."""
        return sse_end(chunks)

    async def _write(self, data: bytes) -> None:
        """A write that says ClientGone when the client has left (for a framing whose
        ``send`` is a coroutine of its own: ResponsesSSESink)."""
        assert self.response is not None
        try:
            await self.response.write(data)
        except ConnectionError:
            if self.left:
                raise ClientGone from None
            raise

    async def fail(self, error: KeelError) -> None:
        if not self.committed:
            self.response = error_response(error, self.request_id)
            return
        # A committed stream that cannot be completed: an error frame, then [DONE].
        await self.end([orjson.dumps(error.body)])
