"""Resumable streams through Redis: any replica can serve a resume.

The replica that runs a stream (its *owner*) copies its buffer into Redis as it goes; a resume
that lands on another replica reads the buffered chunks and then the live tail from there.
Per stream (``<prefix>:rs:<stream id>``):

* a Redis stream whose entry ids are the chunks' seqs: ``0-1`` marks the commit, chunk ``n`` is
  ``1-n`` (field ``c``: the payload, as the owner's clients got it), ``2-0`` the end (field
  ``e``, or ``x``: the error body). So "the chunks after seq 41" is ``XREAD … 1-41``, exact;
* ``…:m``, a hash: the owner principal's name and the committed response headers;
* ``…:r``, a key that a reader on another replica keeps alive while it follows: the owner's
  grace timer asks for it before it closes the upstream.

Cancellation (``DELETE /v1/streams/{id}`` on any replica) is published on ``<prefix>:rs:cancel``;
the owner cancels its driver.

Redis is off the request path: the owner's writes are queued and sent by one background task
(pipelined, coalesced), with short timeouts; if a write fails the stream still completes for
its own client and for resumes on the owner, and a reader elsewhere that finds a gap in the
seqs ends with an error rather than show a stream with a hole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from keel.config._streams import ResumeConfig
from keel.engine._errors import KeelError
from keel.engine._resume import StreamBuffer, Streams, gone_error

log = logging.getLogger("keel.resume")

_BLOCK_MS = 1000  # a reader's XREAD blocks this long before it checks the stream still exists
_LINGER = 5  # seconds a dropped stream's keys stay, so readers elsewhere read its ending


def _lost(sid: str, why: str) -> KeelError:
    return KeelError(
        503,
        f"Stream {sid} can no longer be followed through Redis ({why}).",
        type="server_error",
        code="stream_lost",
    )


class RedisStreams:
    """The ``Mirror`` of this replica's buffers, and the way to follow other replicas' ones."""

    def __init__(self, url: str, prefix: str, cfg: ResumeConfig) -> None:
        self.cfg = cfg
        self.prefix = f"{prefix}:rs"
        common: dict[str, Any] = {
            "retry": Retry(NoBackoff(), 0),
            "retry_on_timeout": False,
            "health_check_interval": 0,
            "protocol": 2,
            "socket_connect_timeout": 0.5,
        }
        self._redis = Redis.from_url(url, socket_timeout=0.5, **common)
        # Blocking reads hold a connection for up to _BLOCK_MS: their own client, so they
        # never wait behind (or hold up) the owner's writes.
        self._blocking = Redis.from_url(url, socket_timeout=_BLOCK_MS / 1000 + 2, **common)
        self.ttl = max(60, int(3 * cfg.grace))  # seconds; refreshed while the owner lives
        self._ops: list[tuple[Any, ...]] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._streams: Streams | None = None
        self._down = False

    def key(self, sid: str, part: str = "") -> str:
        return f"{self.prefix}:{sid}{part}"

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self, streams: Streams) -> None:
        self._streams = streams
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._write_loop(), name="keel-resume-writer"),
            loop.create_task(self._cancel_loop(), name="keel-resume-cancels"),
            loop.create_task(self._refresh_loop(), name="keel-resume-refresh"),
        ]

    async def close(self) -> None:
        await self._flush()  # the endings of the streams just dropped
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        for r in (self._redis, self._blocking):
            with contextlib.suppress(RedisError, OSError):
                await r.aclose()

    # -- the owner's side (Mirror): queued, written in the background ------------------------------

    def _queue(self, *op: Any) -> None:
        self._ops.append(op)
        self._wake.set()

    def opened(self, buf: StreamBuffer) -> None:
        meta = self.key(buf.sid, ":m")
        self._queue("hset", meta, {"owner": buf.owner})
        self._queue("expire", meta, self.ttl)

    def committed(self, buf: StreamBuffer) -> None:
        self._queue("hset", self.key(buf.sid, ":m"), {"h": orjson.dumps(buf.headers)})
        self._queue("xadd", self.key(buf.sid), "0-1", {"h": b""})
        self._queue("expire", self.key(buf.sid), self.ttl)

    def appended(self, buf: StreamBuffer, first: int, chunks: list[bytes]) -> None:
        key = self.key(buf.sid)
        for seq, chunk in enumerate(chunks, first):
            self._queue("xadd", key, f"1-{seq}", {"c": chunk})
        if buf.base:  # the owner dropped its oldest chunks (byte caps): so does Redis
            self._queue("xtrim", key, f"1-{buf.base}")

    def ended(self, buf: StreamBuffer) -> None:
        err = buf.error
        fields = {"e": b""} if err is None else {"x": orjson.dumps(err.body), "s": str(err.status)}
        self._queue("xadd", self.key(buf.sid), "2-0", fields)
        self._queue("expire", self.key(buf.sid), self.ttl)

    def dropped(self, buf: StreamBuffer) -> None:
        for part in ("", ":m"):
            self._queue("expire", self.key(buf.sid, part), _LINGER)

    async def followed_elsewhere(self, sid: str) -> bool:
        return bool(await self._redis.exists(self.key(sid, ":r")))

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0.001)  # coalesce what the same loop turn queued
            await self._flush()

    async def _flush(self) -> None:
        ops, self._ops = self._ops, []
        if not ops:
            return
        pipe = self._redis.pipeline(transaction=False)
        for op in ops:
            name = op[0]
            if name == "hset":
                pipe.hset(op[1], mapping=op[2])
            elif name == "xadd":
                pipe.xadd(op[1], op[3], id=op[2])
            elif name == "xtrim":
                pipe.xtrim(op[1], minid=op[2])
            else:
                pipe.expire(op[1], op[2])
        try:
            await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            if not self._down:
                log.warning(
                    "redis: resumable stream writes failing (%s); resumes on other "
                    "replicas may fail until it is back",
                    exc,
                )
            self._down = True
            return
        if self._down:
            log.warning("redis: resumable stream writes work again")
            self._down = False

    async def _refresh_loop(self) -> None:
        # While the owner lives its streams' keys do not expire (a stalled upstream writes
        # nothing for a while); when it dies they go within ``ttl``.
        while True:
            await asyncio.sleep(min(10.0, self.ttl / 3))
            if self._streams is not None:
                for sid in list(self._streams._by_id):
                    self._queue("expire", self.key(sid), self.ttl)
                    self._queue("expire", self.key(sid, ":m"), self.ttl)

    async def _cancel_loop(self) -> None:
        channel = f"{self.prefix}:cancel"
        while True:
            try:
                pubsub = self._blocking.pubsub()
                await pubsub.subscribe(channel)
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is None or self._streams is None:
                        continue
                    buf = self._streams.get(msg["data"].decode())
                    if buf is not None:
                        buf.cancel()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError):
                await asyncio.sleep(0.5)  # reconnect

    async def cancel(self, sid: str) -> None:
        try:
            await self._redis.publish(f"{self.prefix}:cancel", sid)
        except (RedisError, OSError) as exc:
            raise _lost(sid, f"redis: {exc}") from None

    # -- a reader's side ----------------------------------------------------------------------------

    async def source(self, sid: str) -> RemoteSource | None:
        """A stream another replica owns, or None."""
        try:
            meta = await self._redis.hgetall(self.key(sid, ":m"))
            if not meta or b"owner" not in meta:
                return None
            await self._present(sid)
        except (RedisError, OSError) as exc:
            log.warning("redis: cannot look up stream %s: %s", sid, exc)
            return None
        return RemoteSource(self, sid, meta)

    async def exists(self, sid: str) -> bool:
        try:
            return bool(await self._redis.exists(self.key(sid, ":m")))
        except (RedisError, OSError):
            return False  # cannot tell: this replica's own registry still refuses its own

    async def _present(self, sid: str) -> None:
        await self._redis.set(self.key(sid, ":r"), b"1", px=int(self.cfg.grace * 1000))


class RemoteSource:
    """A stream buffered by another replica, followed through Redis (a ``Source``)."""

    def __init__(self, store: RedisStreams, sid: str, meta: dict[bytes, bytes]) -> None:
        self.store = store
        self.sid = sid
        self.owner = meta[b"owner"].decode()
        self.headers: dict[str, str] = orjson.loads(meta[b"h"]) if b"h" in meta else {}
        self.committed = b"h" in meta
        self.error: KeelError | None = None
        self.ended = False
        self.base = 0
        self.next_seq = 0
        self._seen = 0.0  # when the reader key was last renewed

    def attach(self) -> None:
        pass  # the reader key was set by the lookup, and is renewed while following

    def detach(self) -> None:
        pass  # it expires by itself (several replicas may follow one stream)

    async def _read(self, last: str, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        store = self.store
        try:
            now = time.monotonic()
            if now - self._seen > 1.0:
                self._seen = now
                await store._present(self.sid)
            res = await store._blocking.xread(
                {store.key(self.sid): last}, count=count, block=_BLOCK_MS
            )
            if not res:
                if not await store._redis.exists(store.key(self.sid, ":m")):
                    raise _lost(self.sid, "its owner is gone")
                return []
        except (RedisError, OSError) as exc:
            raise _lost(self.sid, f"redis: {exc}") from None
        entries: list[tuple[bytes, dict[bytes, bytes]]] = res[0][1]
        return entries

    def _end(self, fields: dict[bytes, bytes]) -> None:
        self.ended = True
        if b"x" in fields:
            self.error = KeelError.from_body(int(fields[b"s"]), orjson.loads(fields[b"x"]), {})

    async def started(self) -> None:
        while not (self.committed or self.ended):
            for eid, fields in await self._read("0-0", 1):
                if eid.startswith(b"2-"):
                    self._end(fields)
                else:
                    self.committed = True
        if not self.committed:
            return
        store = self.store
        try:
            if not self.headers:
                raw = await store._redis.hget(store.key(self.sid, ":m"), "h")
                self.headers = orjson.loads(raw) if raw else {"x-keel-stream-id": self.sid}
            # Already over? Then a reader that saw it all gets "nothing more" (SSE: 204).
            tail = await store._redis.xrevrange(store.key(self.sid), count=2)
        except (RedisError, OSError) as exc:
            raise _lost(self.sid, f"redis: {exc}") from None
        if tail and tail[0][0] == b"2-0":
            self._end(tail[0][1])
            if len(tail) > 1 and tail[1][0].startswith(b"1-"):
                self.next_seq = int(tail[1][0][2:]) + 1

    async def follow(self, after: int) -> AsyncIterator[tuple[int, list[bytes]]]:
        expected = after + 1
        last = f"1-{after}" if after >= 0 else "0-1"
        while True:
            batch: list[bytes] = []
            first = expected
            for eid, fields in await self._read(last, 512):
                major, _, minor = eid.partition(b"-")
                if major == b"1":
                    seq = int(minor)
                    if seq != expected:  # trimmed (before the first) or a failed write (a gap)
                        if expected == after + 1 and seq > expected:
                            raise gone_error(self.sid, seq)
                        raise _lost(self.sid, f"seq {expected} is missing")
                    batch.append(fields[b"c"])
                    expected += 1
                elif major == b"2":
                    self._end(fields)
                last = eid.decode()
            self.next_seq = expected
            if batch:
                yield first, batch
            if self.ended:
                return
