"""Sinks: where a stream's chunks go.

The driver writes every stream through four calls — ``commit`` (the answer starts: status 200
and headers), ``send`` (chunks), ``end`` (the last chunks, then the stream's end) and ``fail``
(a ``KeelError``: an error response when nothing was committed, else the stream's last word).
Chunks are the JSON payloads of ``chat.completion.chunk`` objects, as bytes: an SSE sink frames
them (``data: …``), a WebSocket sink would wrap them, the library's iterator parses them.

A sink raises ``ClientGone`` when its consumer went away; the driver then ends quietly (the
upstream connection closes in its ``finally``). ``send`` runs once per network read, so it may
hand back the consumer's own write instead of being a coroutine; what that write raises
(``SSESink``: aiohttp's ConnectionError) comes out of the driver for the door to judge.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from keel.engine._errors import KeelError

if TYPE_CHECKING:
    from keel.engine._keel import Call, Keel


class ClientGone(Exception):
    """The consumer of a stream went away: normal (a closed tab, an SDK that stopped reading),
    not an error to log."""


class Sink(Protocol):
    committed: bool

    async def commit(self, headers: Mapping[str, str]) -> None: ...

    def send(self, chunks: list[bytes]) -> Awaitable[None]: ...

    async def end(self, chunks: list[bytes]) -> None: ...

    async def fail(self, error: KeelError) -> None: ...


# What a QueueSink hands over, besides lists of chunk payloads and a KeelError.
COMMITTED = object()
END = object()
_BACKLOG = 16  # batches of chunks a slow consumer may leave unread before the driver waits


class QueueSink:
    """A sink read by another task: the library's ``ChunkStream`` and the in-process httpx
    transport. Bounded, so a consumer that stops reading holds the upstream back instead of
    buffering the whole answer."""

    __slots__ = ("_queue", "committed", "headers")

    def __init__(self) -> None:
        self._queue: asyncio.Queue[object] = asyncio.Queue(_BACKLOG)
        self.committed = False
        self.headers: dict[str, str] = {}

    async def commit(self, headers: Mapping[str, str]) -> None:
        self.committed = True
        self.headers = dict(headers)
        await self._queue.put(COMMITTED)

    async def send(self, chunks: list[bytes]) -> None:
        await self._queue.put(chunks)

    async def end(self, chunks: list[bytes]) -> None:
        if chunks:
            await self._queue.put(chunks)
        await self._queue.put(END)

    async def fail(self, error: KeelError) -> None:
        await self._queue.put(error)

    async def get(self) -> object:
        """The next item: ``COMMITTED``, a list of chunk payloads, ``END`` or a KeelError."""
        return await self._queue.get()


class ChunkStream:
    """``Keel.stream()``: an async iterator of chunk dicts. The request starts at the first
    ``__anext__``; ``aclose()`` (also when the iterator is dropped after a ``break``, or the
    reading task is cancelled) stops it and closes the upstream attempt."""

    def __init__(
        self,
        keel: Keel,
        make_call: Callable[[], Call],
        wrap: Callable[[Sink], Sink] | None = None,
    ) -> None:
        self._keel = keel
        self._make_call = make_call
        self._wrap = wrap  # the sink the driver writes to, around the queue (Responses)
        self._sink = QueueSink()
        self._task: asyncio.Task[None] | None = None
        self._batch: list[bytes] = []
        self._closed = False

    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while not self._batch:
            if self._closed:
                raise StopAsyncIteration
            if self._task is None:
                await self._start()
            try:
                item = await self._sink.get()
            except BaseException:
                await self.aclose()  # cancelled while waiting: stop the upstream too
                raise
            if item is COMMITTED:
                continue
            if item is END:
                self._closed = True
                raise StopAsyncIteration
            if isinstance(item, KeelError):
                self._closed = True
                raise item
            assert isinstance(item, list)
            self._batch = item[::-1]
        chunk: dict[str, Any] = orjson.loads(self._batch.pop())
        return chunk

    async def _start(self) -> None:
        from keel.engine._driver import stream

        keel, sink = self._keel, self._sink
        call = self._make_call()  # KeelError for a bad body or an unknown model
        target = sink if self._wrap is None else self._wrap(sink)
        await keel.admit(call)

        async def run() -> None:  # (no reference to self: dropping the iterator must free it)
            try:
                await stream(keel, call, target)
            finally:
                keel.done(call)

        self._task = asyncio.create_task(run())

    async def aclose(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def __aenter__(self) -> ChunkStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Dropped without aclose() (a ``break`` out of ``async for``): stop the upstream now.
        task = self._task
        if task is not None and not task.done():
            task.cancel()
