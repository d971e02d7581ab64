"""Resumable streams: a buffer of a stream's chunks that outlives the client's connection.

A resumable stream's driver does not write to the client's connection: it writes into a
``StreamBuffer`` (a sink that never says ``ClientGone``), in a task of its own. Every consumer
— the connection that asked for the stream, and each one that resumes it — *follows* the
buffer from a sequence number: the chunks after it, then the live rest, then the stream's
ending. So a dropped connection loses nothing, and a resume gets exactly the chunks after the
last one the client saw: no duplicate, no gap.

While no consumer follows a stream, a timer runs: after ``resume.grace`` seconds the driver is
cancelled (its upstream attempt closes in its ``finally``) and the buffer is dropped. A finished
stream stays for ``grace`` seconds after its last consumer left, then goes the same way.

Memory is bounded: a stream keeps at most ``max_stream_bytes`` of chunks (the oldest are
dropped first; a resume from before them gets a "gone" error), all buffers together about
``max_total_bytes`` (finished streams nobody follows are dropped first, then the appending
stream's oldest chunks), and at most ``max_streams`` buffers exist.

With Redis (``redis_url``) a ``Mirror`` copies every buffer there, so that another replica can
serve a resume (``keel.gateway._resume_redis``); the owner's grace timer asks the mirror whether
a consumer follows on another replica before it gives up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from keel.config._streams import ResumeConfig
from keel.engine._errors import KeelError

if TYPE_CHECKING:
    from keel.engine._keel import Call, Keel

log = logging.getLogger("keel.resume")


def new_stream_id() -> str:
    """Unguessable (a stream id lets its holder read the answer) and safe in a URL path, an
    SSE ``id:`` field and a Redis key."""
    return "ks_" + secrets.token_urlsafe(15)


_CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{8,128}")


def client_stream_id(value: object, where: str) -> str:
    """A stream id the client chose (so that it can resume a stream that dropped before its
    first chunk, which is what brings keel's id): 8 to 128 of ``A-Z a-z 0-9 _ -``."""
    if not isinstance(value, str) or not _CLIENT_ID.fullmatch(value):
        raise KeelError(
            400,
            f"{where} must be 8 to 128 characters of A-Z, a-z, 0-9, '_' and '-'.",
            code="invalid_stream_id",
            param=where,
        )
    return value


def cancelled_error(sid: str) -> KeelError:
    return KeelError(
        409, f"Stream {sid} was cancelled.", type="invalid_request_error", code="stream_cancelled"
    )


def gone_error(sid: str, first: int) -> KeelError:
    return KeelError(
        410,
        f"The chunks of stream {sid} before seq {first} are no longer buffered "
        "(resume.max_stream_bytes).",
        code="stream_gone",
    )


def unknown_stream(sid: str) -> KeelError:
    return KeelError(
        404,
        f"No resumable stream {sid!r} on this gateway (never started, expired after the "
        "resume grace, or cancelled).",
        code="stream_not_found",
        param="stream",
    )


class Mirror(Protocol):
    """Where buffers are copied for other replicas (Redis). Every call returns at once: the
    copy is written in the background, and trouble there never touches the stream."""

    def opened(self, buf: StreamBuffer) -> None: ...

    def committed(self, buf: StreamBuffer) -> None: ...

    def appended(self, buf: StreamBuffer, first: int, chunks: list[bytes]) -> None: ...

    def ended(self, buf: StreamBuffer) -> None: ...

    def dropped(self, buf: StreamBuffer) -> None: ...

    async def followed_elsewhere(self, sid: str) -> bool: ...


class Source(Protocol):
    """A resumable stream as its consumers see it, wherever it is buffered."""

    sid: str
    owner: str
    committed: bool
    headers: dict[str, str]
    error: KeelError | None
    ended: bool
    base: int  # the first seq still buffered

    async def started(self) -> None:
        """Until the stream is committed or has ended (a failure before the first chunk)."""
        ...

    def follow(self, after: int) -> AsyncIterator[tuple[int, list[bytes]]]:
        """``(seq of the first, chunks)`` batches after seq ``after``, live, until the
        stream ends (then ``error`` says how)."""
        ...

    @property
    def next_seq(self) -> int: ...

    def attach(self) -> None: ...

    def detach(self) -> None: ...


class StreamBuffer:
    """One resumable stream: the driver's sink and its consumers' source."""

    __slots__ = (
        "_changed",
        "_registry",
        "_timer",
        "base",
        "chunks",
        "committed",
        "ended",
        "error",
        "headers",
        "owner",
        "readers",
        "sid",
        "size",
        "task",
    )

    def __init__(self, registry: Streams, sid: str, owner: str) -> None:
        self._registry = registry
        self.sid = sid
        self.owner = owner  # the principal's name: only it may resume
        self.chunks: list[bytes] = []
        self.base = 0  # the seq of chunks[0] (older ones were dropped for the byte caps)
        self.size = 0
        self.headers: dict[str, str] = {}
        self.committed = False
        self.ended = False
        self.error: KeelError | None = None
        self.readers = 0
        self.task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def next_seq(self) -> int:
        return self.base + len(self.chunks)

    def _notify(self) -> None:
        # One event per change: waiters of the old one wake, later ones wait on the new one.
        self._changed.set()
        self._changed = asyncio.Event()

    # -- the Sink protocol (the driver's side) ------------------------------------------------

    async def commit(self, headers: Mapping[str, str]) -> None:
        if self.committed:
            return
        self.headers = {**headers, "x-keel-stream-id": self.sid}
        self.committed = True
        mirror = self._registry.mirror
        if mirror is not None:
            mirror.committed(self)
        self._notify()

    async def send(self, chunks: list[bytes]) -> None:
        if chunks and not self.ended:
            self._append(chunks)
            self._notify()

    async def end(self, chunks: list[bytes]) -> None:
        if self.ended:
            return
        if chunks:
            self._append(chunks)
        self._finish(None)

    async def fail(self, error: KeelError) -> None:
        if not self.ended:
            self._finish(error)

    def _append(self, chunks: list[bytes]) -> None:
        first = self.next_seq
        self.chunks.extend(chunks)
        added = sum(map(len, chunks))
        self.size += added
        reg = self._registry
        reg.total += added
        if reg.mirror is not None:
            reg.mirror.appended(self, first, chunks)
        cfg = reg.cfg
        if self.size > cfg.max_stream_bytes or reg.total > cfg.max_total_bytes:
            if reg.total > cfg.max_total_bytes:
                reg.evict_finished()
            while len(self.chunks) > 1 and (
                self.size > cfg.max_stream_bytes or reg.total > cfg.max_total_bytes
            ):
                self._drop_oldest()

    def _drop_oldest(self) -> None:
        dropped = len(self.chunks[0])
        del self.chunks[0]
        self.base += 1
        self.size -= dropped
        self._registry.total -= dropped

    def _finish(self, error: KeelError | None) -> None:
        self.ended = True
        self.error = error
        mirror = self._registry.mirror
        if mirror is not None:
            mirror.ended(self)
        self._notify()

    # -- the consumers' side --------------------------------------------------------------------

    async def started(self) -> None:
        while not (self.committed or self.ended):
            await self._changed.wait()

    async def follow(self, after: int) -> AsyncIterator[tuple[int, list[bytes]]]:
        nxt = after + 1
        while True:
            if nxt < self.base:
                raise gone_error(self.sid, self.base)
            changed = self._changed
            if nxt < self.next_seq:
                batch = self.chunks[nxt - self.base :]
                yield nxt, batch
                nxt += len(batch)
                continue
            if self.ended:
                return
            await changed.wait()

    def attach(self) -> None:
        self.readers += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def detach(self) -> None:
        self.readers -= 1
        if self.readers == 0 and self._registry.get(self.sid) is self:
            self._arm(self._registry.cfg.grace)

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self.readers:
            return
        mirror = self._registry.mirror
        if mirror is None:
            self._registry.drop(self, "nobody came back within the resume grace")
            return
        # Someone may follow this stream through another replica: ask before giving up.
        self._registry.spawn(self._expire_unless_followed(mirror))

    async def _expire_unless_followed(self, mirror: Mirror) -> None:
        try:
            elsewhere = await mirror.followed_elsewhere(self.sid)
        except Exception:  # Redis trouble: nobody is known to follow
            elsewhere = False
        if self.readers or self._registry.get(self.sid) is not self:
            return
        if elsewhere:
            self._arm(self._registry.cfg.grace)
            return
        self._registry.drop(self, "nobody came back within the resume grace")

    def cancel(self) -> None:
        """``DELETE /v1/streams/{id}`` or a WebSocket ``cancel``: stop now."""
        self._registry.drop(self, "cancelled by the client", error=cancelled_error(self.sid))


class Streams:
    """The resumable streams of this process, by id."""

    def __init__(self, cfg: ResumeConfig, mirror: Mirror | None = None) -> None:
        self.cfg = cfg
        self.mirror = mirror
        self.total = 0  # bytes of chunks held by all buffers
        self._by_id: dict[str, StreamBuffer] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, sid: str) -> StreamBuffer | None:
        return self._by_id.get(sid)

    def open(self, owner: str, sid: str | None = None) -> StreamBuffer:
        if sid is not None and sid in self._by_id:
            raise KeelError(409, f"Stream id {sid!r} is in use.", code="stream_id_in_use")
        if len(self._by_id) >= self.cfg.max_streams:
            self.evict_finished()
            if len(self._by_id) >= self.cfg.max_streams:
                raise KeelError(
                    503,
                    f"Too many resumable streams are buffered ({self.cfg.max_streams}); "
                    "retry, or ask without resumable.",
                    type="server_error",
                    code="resume_full",
                    headers={"retry-after": "1"},
                )
        buf = StreamBuffer(self, sid or new_stream_id(), owner)
        self._by_id[buf.sid] = buf
        if self.mirror is not None:
            self.mirror.opened(buf)
        return buf

    def start(self, keel: Keel, call: Call, sid: str | None = None) -> StreamBuffer:
        """A resumable stream for an admitted ``call``: its driver runs in a task of its own
        (which ends the call with ``keel.done``), writing into the returned buffer."""
        from keel.engine._driver import stream

        buf = self.open(call.principal.name, sid)

        async def run() -> None:
            try:
                await stream(keel, call, buf)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("resumable stream %s: unexpected error", buf.sid)
                await buf.fail(
                    KeelError(
                        500, "keel hit an internal error; it has been logged.", type="server_error"
                    )
                )
            finally:
                keel.done(call)
                if not buf.ended:  # cancelled: its consumers hear why
                    buf._finish(cancelled_error(buf.sid))

        buf.task = self.spawn(run())
        buf._arm(self.cfg.grace)  # until its first consumer attaches
        return buf

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # a reference, or the loop may collect it mid-flight
        task.add_done_callback(self._tasks.discard)
        return task

    def drop(self, buf: StreamBuffer, why: str, error: KeelError | None = None) -> None:
        """The end of a buffer: its driver cancelled (the upstream closes), its memory freed."""
        if self._by_id.get(buf.sid) is not buf:
            return
        del self._by_id[buf.sid]
        if buf._timer is not None:
            buf._timer.cancel()
            buf._timer = None
        if buf.task is not None and not buf.task.done():
            log.info("resumable stream %s: %s; closing its upstream", buf.sid, why)
            buf.task.cancel()
        if not buf.ended:
            buf._finish(error or cancelled_error(buf.sid))
        self.total -= buf.size
        buf.size = 0
        if self.mirror is not None:
            self.mirror.dropped(buf)

    def evict_finished(self) -> None:
        """Make room: drop the oldest finished streams nobody follows (dicts keep insertion
        order, so the first ones are the oldest)."""
        for buf in [b for b in self._by_id.values() if b.ended and not b.readers]:
            if self.total <= self.cfg.max_total_bytes and len(self._by_id) < self.cfg.max_streams:
                return
            self.drop(buf, "evicted to make room")

    async def close(self) -> None:
        for buf in list(self._by_id.values()):
            self.drop(buf, "the gateway is stopping")
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t


def parse_last_event_id(value: str, sid: str | None = None) -> tuple[str, int]:
    """``Last-Event-ID: <stream id>:<seq>`` → (stream id, seq); ValueError naming the problem.
    ``sid``: the stream the id must belong to."""
    stream, sep, seq = value.strip().rpartition(":")
    if not sep or not stream or not seq.isdigit():
        raise ValueError(f"Last-Event-ID {value!r} is not '<stream id>:<seq>'")
    if sid is not None and stream != sid:
        raise ValueError(f"Last-Event-ID {value!r} belongs to another stream than {sid}")
    return stream, int(seq)
