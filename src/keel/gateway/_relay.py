"""The relay: the only writer of a streaming response to the client.

It holds what the client has been shown. Nothing is sent until the first content (the
*commit*): before that, any upstream failure is retried or failed over invisibly. After the
commit the client sees exactly one stream ending: the upstream's terminal chunk and one
``[DONE]``, a ``content_filter`` finish for output moderation, or an OpenAI-shaped error
frame followed by ``[DONE]`` — never a silent close.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

_SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",  # nginx & co. must not batch the stream
}
DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The client went away while we wrote to it. Normal — a closed tab, an SDK that stopped
    reading — and not an error to log: the stream session ends quietly (the upstream closes
    in its ``finally``, the attempt's slot is released as cancelled). Raised only when the
    client's connection is really gone; any other write error propagates unchanged."""


class StreamRelay:
    __slots__ = ("committed", "ended", "extra_headers", "request", "response")

    def __init__(self, request: web.Request, extra_headers: dict[str, str]) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None
        self.extra_headers = extra_headers  # request id & co., completed at commit
        self.committed = False
        self.ended = False

    def _client_left(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    async def commit(self, headers: dict[str, str]) -> None:
        response = web.StreamResponse(status=200, headers={**_SSE_HEADERS, **self.extra_headers})
        response.headers.update(headers)
        self.response = response  # even if the client is gone by now: the handler returns it
        try:
            await response.prepare(self.request)
        except ConnectionError:
            if self._client_left():
                raise ClientGone from None
            raise
        self.committed = True

    async def send(self, frames: list[bytes]) -> None:
        assert self.response is not None
        try:
            await self.response.write(b"".join(frames))
        except ConnectionError:
            if self._client_left():
                raise ClientGone from None
            raise

    async def end(self) -> None:
        """Write the single ``[DONE]`` and finish the response."""
        if self.ended or self.response is None:
            return
        self.ended = True
        try:
            await self.response.write(DONE)
            await self.response.write_eof()
        except ConnectionError:
            if self._client_left():
                raise ClientGone from None
            raise

    async def end_with_error(self, body: dict[str, Any]) -> None:
        """A committed stream that cannot be completed: an error frame, then ``[DONE]``."""
        await self.send([b"data: " + orjson.dumps(body) + b"\n\n"])
        await self.end()


def frame_bytes(data: str) -> bytes:
    return b"data: " + data.encode() + b"\n\n"


Meta = tuple[str | None, int | None, str | None]  # id, created, model of the client's stream


def keel_chunk(meta: Meta, choices: list[Any], usage: dict[str, int] | None = None) -> bytes:
    """A chunk keel writes itself (a terminal ``content_filter``/``length``, a continuation's
    chunk, the summed usage) with the committed stream's id/created/model."""
    chunk_id, created, model = meta
    chunk: dict[str, Any] = {
        "id": chunk_id or "chatcmpl-keel",
        "object": "chat.completion.chunk",
        "created": created or int(time.time()),
        "model": model or "",
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage
    return b"data: " + orjson.dumps(chunk) + b"\n\n"
