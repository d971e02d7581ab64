"""A minimal keep-alive HTTP/1.1 client on ``asyncio.Protocol`` for non-stream load.

Why not aiohttp's client here: the load generator shares a core with the simulator, and at a
few thousand requests per second aiohttp's client (~150 µs per request) would become the
bottleneck and measure itself instead of the gateway. This one does only what the benchmark
needs: one request at a time per connection, ``Content-Length`` or chunked bodies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import cast
from urllib.parse import urlsplit


class HTTPError(ConnectionError):
    pass


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done():
            self._parse(self.waiter)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HTTPError("connection closed before the response ended"))

    def _parse(self, waiter: asyncio.Future[tuple[int, bytes]]) -> None:
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end]).lower()
        status = int(head[9:12])
        start = end + 4
        i = head.find(b"\r\ncontent-length:")
        if i >= 0:
            j = head.find(b"\r\n", i + 2)
            length = int(head[i + 17 : j if j >= 0 else None])
            if len(buf) < start + length:
                return
            body = bytes(buf[start : start + length])
            del buf[: start + length]
            waiter.set_result((status, body))
            return
        if b"transfer-encoding: chunked" not in head:
            return  # read-until-close bodies: connection_lost ends them (not used by targets)
        parts: list[bytes] = []
        pos = start
        while True:
            k = buf.find(b"\r\n", pos)
            if k < 0:
                return
            size = int(bytes(buf[pos:k]).split(b";")[0], 16)
            if size == 0:
                if buf.find(b"\r\n", k + 2) < 0:
                    return
                del buf[: k + 4]
                waiter.set_result((status, b"".join(parts)))
                return
            if len(buf) < k + 2 + size + 2:
                return
            parts.append(bytes(buf[k + 2 : k + 2 + size]))
            pos = k + 2 + size + 2


class RawClient:
    """``await client.post(body)`` → (status, body); reconnects when the server closed."""

    def __init__(self, url: str, headers: Mapping[str, str]) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path
        lines = [f"POST {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self._head = "\r\n".join(lines).encode()
        self._conn: _Conn | None = None

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Conn, self.host, self.port)
        return conn

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self._conn is None or self._conn.closed:
            self._conn = await self._connect()
        conn = self._conn
        assert conn.transport is not None
        waiter: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        conn.waiter = waiter
        conn.transport.write(
            self._head + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        try:
            return await waiter
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()
        self._conn = None
