"""keel's HTTP/1.1 connections: the time and number limits a public server needs, on top of
aiohttp's protocol.

aiohttp bounds neither how long a client may take to send its request headers or body, nor
how many connections are open (and its keep-alive timeout is an hour): a client sending one
header byte every 2 s, or a ``Content-Length`` larger than the body it sends, or a thousand
idle sockets, held their descriptors for as long as they liked. Here, like nginx:

* ``header_timeout``: from the first byte of a request to the end of its headers;
* ``body_timeout``: between two reads of a request body (not the whole body, so a large
  upload on a slow link is fine while it moves);
* ``keepalive_timeout``: a connection with no request (new, or between requests) is closed;
* ``max_connections``: at the cap, the connection idle the longest is closed to make room
  (as nginx does); when none is idle, the new one is answered with an OpenAI-shaped 503.

A timed-out request gets an OpenAI-shaped 408 when nothing of its response was sent yet.
Malformed HTTP gets an OpenAI-shaped 400 (aiohttp's is plain text) and at most one log line
per minute, without a traceback: anyone can send garbage, and a log flood is a cost too.

The timers live on the protocol and cost nothing per request in the common case (headers and
body in one read): one is armed only while a request is incomplete. They read a few private
attributes of aiohttp's ``RequestHandler`` (``_request_count``, ``_messages``,
``_request_in_progress``, ``_current_request``, ``_upgraded``, ``_task_handler``); the tests in
tests/test_http_limits.py pin the behaviour, so an aiohttp upgrade that moves them fails there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast

import orjson
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from keel.gateway._sink import own_request_id

log = logging.getLogger("keel.http")

# A refused connection's response is sent at once; its request (if one comes) is read and
# dropped for this long before the socket closes, so that closing does not reset the
# connection before the client has read the 503.
REFUSAL_LINGER = 1.0
MALFORMED_LOG_INTERVAL = 60.0  # seconds between two log lines about malformed requests


@dataclass(slots=True)
class ConnectionPolicy:
    """The limits of one listening site, and what its connections share (the open count,
    the log throttle)."""

    header_timeout: float = 60.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    max_connections: int = 1024
    open: int = 0  # connections accepted and not yet closed
    connections: set[KeelProtocol] = field(default_factory=set)  # those, for reclaiming
    reclaimed: int = 0  # idle connections closed to admit a new one, in total
    refused: int = 0  # connections refused at the cap, in total
    timed_out: int = 0  # requests closed at header_timeout / body_timeout, in total
    malformed: int = 0  # malformed requests, in total
    _malformed_logged: float = field(default=-MALFORMED_LOG_INTERVAL)
    _malformed_quiet: int = 0  # not logged since the last line

    def note_malformed(self, remote: str | None, problem: str) -> None:
        self.malformed += 1
        now = time.monotonic()
        if now - self._malformed_logged < MALFORMED_LOG_INTERVAL:
            self._malformed_quiet += 1
            return
        more = (
            f" ({self._malformed_quiet} more in the last {MALFORMED_LOG_INTERVAL:.0f}s)"
            if self._malformed_quiet
            else ""
        )
        log.warning("malformed HTTP request from %s: %s%s", remote, problem, more)
        self._malformed_logged = now
        self._malformed_quiet = 0


def error_body(message: str, type_: str, code: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


def raw_response(status: int, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, for the cases where no aiohttp
    response object exists (a refused or timed-out connection)."""
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        f"x-request-id: {own_request_id()}",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


_data_received = RequestHandler.data_received


class KeelProtocol(RequestHandler):
    """aiohttp's request handler with header/body timeouts, a connection cap and OpenAI-shaped
    answers to malformed requests."""

    __slots__ = ("_body", "_body_read", "_counted", "_deadline", "_policy", "_refused")

    def __init__(self, manager: web.Server, *, policy: ConnectionPolicy, **kwargs: Any) -> None:
        super().__init__(manager, keepalive_timeout=policy.keepalive_timeout, **kwargs)
        self._policy = policy
        self._deadline: asyncio.TimerHandle | None = None  # header or body timer
        self._body: StreamReader | None = None  # a request body still being received
        self._body_read = 0.0  # loop time of the last read of that body
        self._counted = False
        self._refused = False

    @property
    def busy(self) -> bool:
        """A request is being handled on this connection (for the drain at shutdown)."""
        return self._request_in_progress

    def drain(self) -> None:
        """Shutdown begins: no new request on this connection (aiohttp's ``close()``, which
        also stops reading). An upgraded connection — a WebSocket — keeps reading: its
        requests in flight still need their ``cancel`` and ``resume`` messages, and its own
        handler closes it (1001) when they are done."""
        if not self._upgraded:
            self.close()

    def cancel_handler(self) -> None:
        """Cancel the request being handled, as when its client goes away (drain timeout)."""
        task = self._task_handler
        if task is not None and not task.done():
            task.cancel()

    # -- the connection cap -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        policy = self._policy
        if policy.open >= policy.max_connections and not self._reclaim_one():
            self._refuse(transport)
            return
        policy.open += 1
        policy.connections.add(self)
        self._counted = True
        super().connection_made(transport)

    @property
    def idle(self) -> bool:
        """Waiting for a request, none of it received yet: closing it loses nothing (HTTP
        lets a server close an idle persistent connection at any time)."""
        return (
            self.transport is not None
            and not self._request_in_progress
            and not self._messages
            and self._deadline is None  # no partial headers, no body being received
            and self._waiter is not None
            and not self._waiter.done()
        )

    def _reclaim_one(self) -> bool:
        """At the cap: close the connection idle the longest (nginx reuses connections the
        same way), so that idle or silent sockets cannot lock new clients out. False when
        every connection is busy. O(connections), only at the cap."""
        idlest: KeelProtocol | None = None
        for c in self._policy.connections:
            # aiohttp sets _next_keepalive_close_time when a connection turns idle (its
            # keep-alive deadline): the smallest one has been idle the longest.
            if c.idle and (
                idlest is None or c._next_keepalive_close_time < idlest._next_keepalive_close_time
            ):
                idlest = c
        if idlest is None:
            return False
        policy = self._policy
        policy.reclaimed += 1
        # Its slot is free now (the transport reports the loss a loop iteration later).
        idlest._counted = False
        policy.open -= 1
        policy.connections.discard(idlest)
        idlest.force_close()
        return True

    def _refuse(self, transport: asyncio.BaseTransport) -> None:
        policy = self._policy
        self._refused = True
        policy.refused += 1
        if policy.refused == 1 or policy.refused % 1000 == 0:
            log.warning(
                "refusing connections: %d open, server.max_connections is %d (%d refused so far)",
                policy.open,
                policy.max_connections,
                policy.refused,
            )
        tcp = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        self.transport = tcp
        body = error_body(
            f"keel has {policy.max_connections} connections open, its limit; "
            "please retry in a moment.",
            "server_error",
            "too_many_connections",
        )
        tcp.write(raw_response(503, body, {"Retry-After": "1"}))
        if tcp.can_write_eof():
            tcp.write_eof()  # the client reads the 503; its request bytes are dropped
        self._loop.call_later(REFUSAL_LINGER, tcp.close)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._body = None
        if self._refused:
            self.transport = None
            return
        if self._counted:
            self._counted = False
            self._policy.open -= 1
            self._policy.connections.discard(self)
        super().connection_lost(exc)

    # -- header and body timeouts ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # The common case, a whole request in one read, costs a few attribute tests around
        # aiohttp's own parsing (no super() object, no timer).
        body = self._body
        if body is not None:
            self._body_read = self._loop.time()
        elif self._refused:
            return  # the request of a refused connection: read and dropped
        count = self._request_count
        _data_received(self, data)
        if self._request_count != count:  # a request's headers are complete
            messages = self._messages
            if messages and not (payload := messages[-1][1]).is_eof():
                self._body = payload
                self._body_read = self._loop.time()
                self._arm(self._policy.body_timeout, self._body_late)
            elif self._deadline is not None:
                self._body = None
                self._disarm()
        elif body is not None:
            if body.is_eof():  # complete: any bytes left belong to a pipelined request,
                self._body = None  # whose wait is bounded by the keep-alive timeout
                self._disarm()
        elif self._deadline is None and data and not self._upgraded:
            self._arm(self._policy.header_timeout, self._headers_late)  # a request begins

    def _arm(self, delay: float, callback: Any) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self._loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        if self.transport is None:
            return
        if self._request_in_progress:
            # A pipelined request waits behind a response still being sent: its headers are
            # not late yet. Check again one timeout later.
            self._arm(self._policy.header_timeout, self._headers_late)
            return
        self._time_out(
            f"The request headers did not arrive within {self._policy.header_timeout:g}s.",
            answer=True,  # no response is under way on this connection
        )

    def _body_late(self) -> None:
        self._deadline = None
        body = self._body
        if body is None or body.is_eof() or self.transport is None:
            self._body = None
            return
        quiet = self._loop.time() - self._body_read
        timeout = self._policy.body_timeout
        if quiet < timeout:  # it moved since: re-arm rather than reset a timer on every read
            self._arm(timeout - quiet, self._body_late)
            return
        self._body = None
        # Answer only a handler still waiting for the body: once it has answered (aiohttp then
        # reads and drops the rest of the body), a 408 would be a second response.
        request = self._current_request
        self._time_out(
            f"The request body stalled: nothing arrived for {timeout:g}s.",
            answer=request is not None and request.writer.output_size == 0,
        )

    def _time_out(self, message: str, *, answer: bool) -> None:
        """Close the connection; with an OpenAI-shaped 408 first when ``answer``."""
        self._policy.timed_out += 1
        transport = self.transport
        if transport is not None and answer:
            body = error_body(message, "invalid_request_error", "request_timeout")
            transport.write(raw_response(408, body))
        log.info("closing a connection from %s: %s", self.peername, message)
        self.force_close()  # the handler, if one runs, is cancelled like for a client gone

    # -- malformed requests -----------------------------------------------------------------------

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        problem = _one_line(message or (str(exc) if exc is not None else ""), status)
        self._policy.note_malformed(request.remote, problem)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was sent already")
        resp = web.Response(
            status=status,
            body=error_body(
                f"Malformed HTTP request: {problem}", "invalid_request_error", "malformed_request"
            ),
            content_type="application/json",
            headers={"x-request-id": own_request_id()},
        )
        resp.force_close()
        return resp


def _one_line(text: str, status: int) -> str:
    """aiohttp's parser errors span lines (the message, the bytes, a caret): one line of them,
    short, for the client and the log."""
    parts = [p.strip() for p in text.splitlines() if p.strip() and p.strip() != "^"]
    line = " ".join(parts) or HTTPStatus(status).phrase
    return line if len(line) <= 200 else line[:197] + "..."


class KeelSite(web.BaseSite):
    """A TCP site whose connections are ``KeelProtocol``s (aiohttp's TCPSite with the
    protocol factory swapped; everything else — runner registration, shutdown — is aiohttp's)."""

    __slots__ = ("_handler_kwargs", "_host", "_policy", "_port", "_reuse_address")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        policy: ConnectionPolicy,
        handler_kwargs: dict[str, Any],
        backlog: int = 128,
        reuse_address: bool = True,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._policy = policy
        self._handler_kwargs = handler_kwargs
        self._reuse_address = reuse_address

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    @property
    def policy(self) -> ConnectionPolicy:
        return self._policy

    def connections(self) -> list[KeelProtocol]:
        server = self._runner.server
        conns = server.connections if server is not None else []
        return [c for c in conns if isinstance(c, KeelProtocol)]

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        policy, kwargs = self._policy, self._handler_kwargs

        def protocol() -> KeelProtocol:
            return KeelProtocol(server, loop=loop, policy=policy, **kwargs)

        self._server = await loop.create_server(
            protocol,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
        )
        sockets = getattr(self._server, "sockets", None) or []
        if sockets:
            self._port = sockets[0].getsockname()[1]

    @property
    def port(self) -> int:
        return self._port


@dataclass(slots=True)
class Shutdown:
    """Where a graceful shutdown is, for handlers to read (``request.app[SHUTDOWN_KEY]``).

    ``draining``: a signal came; no new connections, requests in flight may finish.
    ``expired``: ``server.drain_timeout`` passed; the requests still running are being
    cancelled (CancelledError in their handler, like a client gone away). A handler that sees
    ``expired`` in its ``except CancelledError`` has a client still listening: it should
    ``asyncio.current_task().uncancel()`` and end the answer — a committed stream through its
    sink's ``fail`` (an error frame, then ``[DONE]``), otherwise an OpenAI-shaped 503
    ``server_shutting_down`` — and return it instead of re-raising (``_app._cut_off``)."""

    draining: bool = False
    expired: bool = False


SHUTDOWN_KEY: web.AppKey[Shutdown] = web.AppKey("keel_shutdown", Shutdown)
SHUTTING_DOWN = (
    "keel is shutting down and this request ran past server.drain_timeout; it was cut off."
)
