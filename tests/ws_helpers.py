"""Helpers for the WebSocket and resume tests: reading keel's WS messages per request id, the
text of chunks, a TCP proxy whose connections a test can cut (a network drop), and the
simulator log's view of when an upstream closed."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from keel.sim import LogEntry
from keel.testing import SimProcess

CANCEL_WITHIN = 0.020  # seconds from the client's cancel (or close) to the upstream's close
# On a machine shared with other work a few milliseconds of scheduling sometimes land on one
# close: the typical one (the median of several) must be within CANCEL_WITHIN, none may take
# longer than WORST_WITHIN.
WORST_WITHIN = 0.050


def assert_prompt(lags: list[float]) -> None:
    assert statistics.median(lags) < CANCEL_WITHIN and max(lags) < WORST_WITHIN, lags


def create(rid: str, prompt: str, model: str = "m", **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    return {"type": "chat.completions.create", "id": rid, "body": body, **extra}


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
    )


@dataclass
class Outcome:
    """What keel said about one request id."""

    seqs: list[int] = field(default_factory=list)
    chunks: list[dict[str, Any]] = field(default_factory=list)
    streams: set[str] = field(default_factory=set)
    errors: list[dict[str, Any]] = field(default_factory=list)
    done: int = 0

    @property
    def text(self) -> str:
        return text_of(self.chunks)


class Reader:
    """keel's messages on one aiohttp WebSocket, sorted by request id."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.by_id: dict[str, Outcome] = {}
        self.loose: list[dict[str, Any]] = []  # errors with "id": null, pongs

    async def send(self, msg: dict[str, Any]) -> None:
        await self.ws.send_str(orjson.dumps(msg).decode())

    def take(self, m: dict[str, Any]) -> None:
        rid = m.get("id")
        if rid is None:
            self.loose.append(m)
            return
        o = self.by_id.setdefault(rid, Outcome())
        kind = m["type"]
        if kind == "chunk":
            assert o.done == 0, f"a chunk after done for {rid}"
            o.seqs.append(m["seq"])
            o.chunks.append(m["chunk"])
            o.streams.add(m["stream"])
        elif kind == "error":
            assert o.done == 0
            o.errors.append(m["error"])
        elif kind == "done":
            o.done += 1
        else:
            raise AssertionError(f"unexpected message {m}")

    async def next(self, within: float = 10.0) -> dict[str, Any]:
        msg = await self.ws.receive(within)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        m: dict[str, Any] = orjson.loads(msg.data)
        return m

    async def until(self, cond: Callable[[], bool], within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while not cond():
            self.take(await self.next(max(0.01, deadline - time.monotonic())))

    async def until_done(self, *ids: str, within: float = 30.0) -> dict[str, Outcome]:
        await self.until(lambda: all(self.by_id.get(i, Outcome()).done for i in ids), within)
        return {i: self.by_id[i] for i in ids}

    async def settle(self) -> None:
        """Everything keel sent before a pong: a second ``done`` would be among it."""
        await self.send({"type": "ping"})
        n = len([m for m in self.loose if m.get("type") == "pong"])
        await self.until(lambda: len([m for m in self.loose if m.get("type") == "pong"]) > n)

    async def loose_error(self, within: float = 5.0) -> dict[str, Any]:
        n = len(self.loose)
        await self.until(lambda: len(self.loose) > n, within)
        m = self.loose[n]
        assert m["type"] == "error", m
        return m


class CutProxy:
    """A TCP proxy to ``target``; ``cut()`` resets every connection open through it (what a
    network drop looks like to both ends) while new connections keep working."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server: asyncio.Server | None = None
        self.port = 0
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.cuts = 0

    async def start(self) -> CutProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.close()
            return
        pair = (cw, uw)
        self._conns.add(pair)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            with contextlib.suppress(Exception):
                w.close()

        try:
            await asyncio.gather(pipe(cr, uw), pipe(ur, cw))
        finally:
            self._conns.discard(pair)

    def cut(self) -> None:
        self.cuts += 1
        for pair in list(self._conns):
            for w in pair:
                sock: socket.socket | None = w.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                w.transport.abort()
        self._conns.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def sim_entries(
    sim: SimProcess, fragment: str, cond: Callable[[list[LogEntry]], bool], within: float = 10.0
) -> list[LogEntry]:
    """Await a condition on the simulator's entries for ``fragment`` (polled in a thread, so
    this loop keeps serving the clients under test)."""

    def pred(log: list[LogEntry]) -> bool:
        return cond([e for e in log if fragment in e.prompt])

    log = await asyncio.to_thread(sim.wait_for, pred, within)
    return [e for e in log if fragment in e.prompt]


def one_closed(es: list[LogEntry]) -> bool:
    return len(es) == 1 and es[0].t_close is not None


def one_open(es: list[LogEntry]) -> bool:
    return len(es) == 1 and es[0].t_close is None and es[0].tokens > 0


@dataclass
class Event:
    id: str
    data: str


class EventSource:
    """An EventSource as browsers implement it (WHATWG HTML, "Server-sent events"): it
    reconnects by itself whenever the connection ends or fails — sending the last event id it
    saw as ``Last-Event-ID`` — after ``retry`` seconds, and stops at a 204 (or any non-200).
    A POST variant (``method="POST"``) is what fetch-event-source-style clients do.
    (aiohttp-sse-client, the package, gives up on a connection reset mid-body instead.)"""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        method: str = "GET",
        retry: float = 0.005,
        **kw: Any,
    ) -> None:
        self.session, self.url, self.method, self.retry, self.kw = session, url, method, retry, kw
        self.last_event_id = ""
        self.connects = 0

    async def events(self) -> AsyncIterator[Event]:
        while True:
            headers = dict(self.kw.get("headers") or {})
            headers["accept"] = "text/event-stream"
            if self.last_event_id:
                headers["last-event-id"] = self.last_event_id
            self.connects += 1
            try:
                async with self.session.request(
                    self.method, self.url, **{**self.kw, "headers": headers}
                ) as resp:
                    if resp.status != 200:
                        return
                    ev_id, data = self.last_event_id, []
                    async for raw in resp.content:
                        line = raw.decode().rstrip("\r\n")
                        if not line:
                            if data:
                                self.last_event_id = ev_id
                                yield Event(ev_id, "\n".join(data))
                            data = []
                            continue
                        name, _, value = line.partition(":")
                        value = value.removeprefix(" ")
                        if name == "id":
                            ev_id = value
                        elif name == "data":
                            data.append(value)
            except (aiohttp.ClientError, ConnectionError):
                pass  # the network failed: reconnect, like a browser
            await asyncio.sleep(self.retry)
