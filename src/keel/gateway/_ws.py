"""The WebSocket door: ``GET /v1/ws``, many chat completions multiplexed on one socket.

Client → keel (JSON text frames): ``{"type": "chat.completions.create", "id", "body",
"resumable"?}``, ``{"type": "cancel", "id"}``, ``{"type": "resume", "id", "stream", "after"}``,
``{"type": "auth", "token"}``, ``{"type": "ping"}``.
keel → client: ``{"type": "chunk", "id", "stream", "seq", "chunk"}``, then exactly one of
``{"type": "done", "id"}`` or ``{"type": "error", "id", "error"}`` followed by ``done``;
``{"type": "pong"}``. An ``error`` with ``"id": null`` is about a message that started no
request (not JSON, a binary frame, an unknown type, a duplicate id, …); no ``done`` follows it
and the socket stays open.

Each request is a task of its own with its own sink, so one failing or cancelled touches no
other. A chunk frame is built around the engine's chunk payload by byte concatenation: the
chunk is never parsed again. Every write to the socket that can fail is a ``ClientGone`` (the
peer left) and nothing else: no failure is ever reported through the socket it broke.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from keel.engine._driver import stream
from keel.engine._errors import KeelError
from keel.engine._keel import Call, Keel
from keel.engine._resume import (
    Source,
    StreamBuffer,
    client_stream_id,
    new_stream_id,
    unknown_stream,
)
from keel.engine._sinks import ClientGone
from keel.gateway._sink import error_response
from keel.gateway._streams import check_free

log = logging.getLogger("keel.gateway.ws")

_TYPES = "chat.completions.create, cancel, resume, auth, ping"
_MAX_ID = 256  # characters of a request id


def _bad(message: str, code: str, param: str | None = None) -> KeelError:
    return KeelError(400, message, code=code, param=param)


class _Request:
    """A request running on a socket: the task that writes its frames, and (resumable) the
    stream it follows."""

    __slots__ = ("over", "source", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.source: Source | None = None
        self.over = False  # its done frame is out (or about to be): never a second one


class Socket:
    """One WebSocket connection and the requests multiplexed on it."""

    def __init__(
        self, app: web.Application, keel: Keel, ws: web.WebSocketResponse, request: web.Request
    ) -> None:
        from keel.gateway._streams import STREAMS_KEY

        self.app = app
        self.keel = keel
        self.ws = ws
        self.streams = app[STREAMS_KEY]
        self.cfg = keel.config.websocket
        self.headers: dict[str, str] = {k.lower(): v for k, v in request.headers.items()}
        self.principal: Any = None
        self.running: dict[str, _Request] = {}
        self.cut: list[str] = []  # requests the socket's end cut short
        self.draining = False
        self._auth_timer: asyncio.TimerHandle | None = None

    # -- writing ----------------------------------------------------------------------------------

    async def write(self, frame: bytes) -> None:
        """One text frame; ``ClientGone`` when the peer is gone (closing or closed)."""
        ws = self.ws
        if ws.closed:
            raise ClientGone
        try:
            await ws.send_frame(frame, WSMsgType.TEXT)
        except (ConnectionError, RuntimeError):  # aiohttp: "closing transport" / "closed"
            raise ClientGone from None

    async def say(self, message: Mapping[str, Any]) -> None:
        """A message of keel's own; a peer that is gone is not an error here."""
        with contextlib.suppress(ClientGone):
            await self.write(orjson.dumps(message))

    def error(self, rid: str | None, err: KeelError) -> None:
        """An ``error`` message, sent in the background (message handling never waits)."""
        self._later(self.say({"type": "error", "id": rid, "error": err.body["error"]}))

    def _later(self, coro: Any) -> None:
        self.streams.spawn(coro)

    async def finish(self, rid: str, req: _Request, err: KeelError | None = None) -> None:
        """The request's last frames: an error (if any), then its one ``done``."""
        if req.over:
            return
        req.over = True
        if err is not None:
            await self.say({"type": "error", "id": rid, "error": err.body["error"]})
        await self.say({"type": "done", "id": rid})

    # -- the socket's life ------------------------------------------------------------------------

    async def run(self) -> None:
        if self.principal is None:
            loop = asyncio.get_running_loop()
            self._auth_timer = loop.call_later(self.cfg.auth_timeout, self._auth_expired)
        try:
            while True:
                msg = await self.ws.receive()
                kind = msg.type
                if kind is WSMsgType.TEXT:
                    self.on_message(msg.data)
                elif kind is WSMsgType.BINARY:
                    self.error(
                        None, _bad("Binary frames are not supported: send JSON text.", "binary")
                    )
                else:  # CLOSE, CLOSING, CLOSED, ERROR (a frame beyond the protocol limit)
                    break
        finally:
            self.closed()

    def closed(self) -> list[str]:
        """The socket is gone: every request's task is cancelled — a plain stream's driver
        closes its upstream attempt; a resumable stream's follower only detaches, and the
        stream goes on for the resume grace. Returns the ids that had not ended."""
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        cut = [rid for rid, req in self.running.items() if not req.over]
        for req in self.running.values():
            req.over = True
            if req.task is not None:
                req.task.cancel()
        self.running.clear()
        self.cut = cut
        return cut

    # -- a graceful shutdown (keel.gateway._http.Shutdown) --------------------------------------

    def drain(self) -> None:
        """The server is draining: the socket closes (1001, going away) once its running
        requests have ended — at once if there are none. (aiohttp reads nothing more from a
        connection once its server drains, so no new message arrives meanwhile.)"""
        self.draining = True
        if not self.running:
            self._later(self.ws.close(code=1001, message=b"keel is shutting down"))

    async def cut_off(self) -> None:
        """``server.drain_timeout`` passed with requests still running (their tasks are
        cancelled, upstreams closed): the client is still there, so each of them ends the one
        well-formed way — an error naming the cut-off, then its ``done`` — and the socket
        closes as going away."""
        from keel.gateway._app import _shutting_down

        err = _shutting_down().body["error"]
        for rid in self.cut:
            await self.say({"type": "error", "id": rid, "error": err})
            await self.say({"type": "done", "id": rid})
        with contextlib.suppress(Exception):
            await self.ws.close(code=1001, message=b"keel is shutting down")

    def _auth_expired(self) -> None:
        self._auth_timer = None
        if self.principal is None and not self.ws.closed:
            self.error(
                None,
                KeelError(
                    401,
                    f"Not authenticated within {self.cfg.auth_timeout:g}s: send "
                    '{"type": "auth", "token": "…"} first.',
                    code="invalid_api_key",
                ),
            )
            self._later(self.ws.close(code=1008, message=b"not authenticated"))

    # -- messages ---------------------------------------------------------------------------------

    def on_message(self, data: bytes) -> None:
        if len(data) > self.cfg.max_message_bytes:
            self.error(
                None,
                _bad(
                    f"The message is {len(data)} bytes, larger than the limit of "
                    f"{self.cfg.max_message_bytes} (websocket.max_message_bytes).",
                    "message_too_large",
                ),
            )
            return
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            self.error(None, _bad(f"The message is not JSON ({exc}).", "invalid_json"))
            return
        if not isinstance(msg, dict):
            self.error(
                None, _bad("A message must be a JSON object with a 'type'.", "invalid_message")
            )
            return
        kind = msg.get("type")
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            self.error(
                None,
                _bad(
                    f"Unknown message type {kind!r}; keel accepts {_TYPES}.", "unknown_type", "type"
                ),
            )
            return
        try:
            handler(self, msg)
        except Exception:  # a bug of ours: say so once, keep the socket and the others
            log.exception("websocket: unexpected error handling a %s message", kind)
            self.error(
                None,
                KeelError(
                    500, "keel hit an internal error; it has been logged.", type="server_error"
                ),
            )

    def _new_id(self, msg: Mapping[str, Any]) -> str | None:
        """The id of a message that starts a request, or None (an error was sent)."""
        rid = msg.get("id")
        if not isinstance(rid, str) or not rid or len(rid) > _MAX_ID:
            self.error(
                None,
                _bad(f"'id' must be a string of 1 to {_MAX_ID} characters.", "invalid_id", "id"),
            )
            return None
        if rid in self.running:
            self.error(
                None,
                _bad(
                    f"A request with id {rid!r} is already running on this socket; that one "
                    "goes on, this message was ignored.",
                    "duplicate_id",
                    "id",
                ),
            )
            return None
        return rid

    def _start(self, rid: str, req: _Request, coro: Any) -> None:
        self.running[rid] = req
        req.task = asyncio.get_running_loop().create_task(self._guard(rid, req, coro))

    async def _guard(self, rid: str, req: _Request, coro: Any) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except ClientGone:
            pass
        except KeelError as exc:
            await self.finish(rid, req, exc)
        except Exception:
            log.exception("websocket: unexpected error in request %r", rid)
            err = KeelError(
                500, "keel hit an internal error; it has been logged.", type="server_error"
            )
            await self.finish(rid, req, err)
        finally:
            if self.running.get(rid) is req:
                del self.running[rid]
            if self.draining and not self.running and not self.ws.closed:
                self._later(self.ws.close(code=1001, message=b"keel is shutting down"))

    def create(self, msg: Mapping[str, Any]) -> None:
        rid = self._new_id(msg)
        if rid is None:
            return
        req = _Request()
        err = self._refusal(msg)
        if err is not None:
            self._start(rid, req, self.finish(rid, req, err))
            return
        body = msg["body"]
        try:
            call = self.keel.call(
                {**body, "stream": True}, self.principal, self.headers, self.keel.request_id()
            )
        except KeelError as exc:
            self._start(rid, req, self.finish(rid, req, exc))
            return
        resumable = msg.get("resumable") is True
        self._start(rid, req, self._serve(rid, req, call, resumable, msg.get("stream")))

    def _refusal(self, msg: Mapping[str, Any]) -> KeelError | None:
        if self.principal is None:
            return KeelError(
                401,
                'Not authenticated: send {"type": "auth", "token": "…"} first (or connect '
                "with an Authorization header).",
                code="invalid_api_key",
            )
        if len(self.running) >= self.cfg.max_requests:
            return KeelError(
                429,
                f"{self.cfg.max_requests} requests are already running on this socket "
                "(websocket.max_requests).",
                code="too_many_requests",
            )
        if not isinstance(msg.get("body"), dict):
            return _bad("'body' must be a chat completion request object.", "invalid_body", "body")
        if "resumable" in msg and not isinstance(msg["resumable"], bool):
            return _bad("'resumable' must be true or false.", "invalid_resumable", "resumable")
        return None

    async def _serve(
        self, rid: str, req: _Request, call: Call, resumable: bool, named: Any = None
    ) -> None:
        keel = self.keel
        try:
            await keel.admit(call)
        except KeelError as exc:
            await self.finish(rid, req, exc)
            return
        if resumable:
            try:
                sid = None if named is None else client_stream_id(named, "stream")
                await check_free(self.app, sid)
                buf = self.streams.start(keel, call, sid)  # its task ends the call
            except KeelError as exc:
                keel.done(call)
                await self.finish(rid, req, exc)
                return
            req.source = buf
            await self.follow(rid, req, buf, -1)
            return
        try:
            await stream(keel, call, WSSink(self, rid, req, new_stream_id()))
        finally:
            keel.done(call)

    async def follow(self, rid: str, req: _Request, src: Source, after: int) -> None:
        """Send a resumable stream's chunks after ``after``, then its ending."""
        src.attach()
        try:
            await src.started()
            if not src.committed:
                await self.finish(rid, req, src.error)
                return
            prefix = _prefix(rid, src.sid)
            write = self.write
            try:
                async for first, batch in src.follow(after):
                    for seq, chunk in enumerate(batch, first):
                        await write(b'%s%d,"chunk":%s}' % (prefix, seq, chunk))
                err = src.error
            except KeelError as exc:  # fell behind the buffer's byte cap
                err = exc
            await self.finish(rid, req, err)
        finally:
            src.detach()

    def cancel(self, msg: Mapping[str, Any]) -> None:
        rid = msg.get("id")
        req = self.running.get(rid) if isinstance(rid, str) else None
        if req is None or req.over:
            self.error(
                None,
                _bad(f"No running request with id {rid!r} on this socket.", "unknown_id", "id"),
            )
            return
        del self.running[rid]  # type: ignore[arg-type]
        if isinstance(req.source, StreamBuffer):
            req.source.cancel()  # a resumable stream: cancel means stop its upstream too
        elif req.source is not None:
            from keel.gateway._streams import cancel_stream

            self._later(cancel_stream(self.app, req.source.sid, req.source.owner))
        if req.task is not None:
            req.task.cancel()  # a plain stream's driver closes its upstream in its finally
        self._later(self.finish(rid, req))  # type: ignore[arg-type]

    def resume(self, msg: Mapping[str, Any]) -> None:
        rid = self._new_id(msg)
        if rid is None:
            return
        req = _Request()
        sid, after = msg.get("stream"), msg.get("after", -1)
        err = None
        if self.principal is None:
            err = self._refusal(msg)
        elif not isinstance(sid, str) or not sid:
            err = _bad(
                "'stream' must be the stream id of a resumable stream.", "invalid_stream", "stream"
            )
        elif type(after) is not int or after < -1:
            err = _bad(
                "'after' must be the seq of the last chunk seen (an integer ≥ -1).",
                "invalid_after",
                "after",
            )
        if err is not None:
            self._start(rid, req, self.finish(rid, req, err))
            return
        self._start(rid, req, self._resume(rid, req, sid, after))  # type: ignore[arg-type]

    async def _resume(self, rid: str, req: _Request, sid: str, after: int) -> None:
        from keel.gateway._streams import lookup

        src = await lookup(self.app, sid, self.principal.name)
        if src is None:
            await self.finish(rid, req, unknown_stream(sid))
            return
        req.source = src
        await self.follow(rid, req, src, after)

    def auth(self, msg: Mapping[str, Any]) -> None:
        """A token in-band: the first one of a browser that cannot set headers, or a renewed
        one. It takes over for new requests; running ones keep theirs. A bad one leaves the
        socket unauthenticated for new requests (fail closed)."""
        token = msg.get("token")
        if not isinstance(token, str) or not token:
            self.error(None, _bad("'token' must be a non-empty string.", "invalid_token", "token"))
            return
        headers = {**self.headers, "authorization": f"Bearer {token}"}
        try:
            self.principal = self.keel.authenticate(headers)
        except KeelError as exc:
            self.principal = None
            self.error(None, exc)
            return
        self.headers = headers
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None

    def ping(self, msg: Mapping[str, Any]) -> None:
        self._later(self.say({"type": "pong"}))

    _handlers: dict[str, Any] = {
        "chat.completions.create": create,
        "cancel": cancel,
        "resume": resume,
        "auth": auth,
        "ping": ping,
    }


def _prefix(rid: str, sid: str) -> bytes:
    return b'{"type":"chunk","id":%s,"stream":%s,"seq":' % (orjson.dumps(rid), orjson.dumps(sid))


class WSSink:
    """A plain (not resumable) stream on a socket: the driver writes its frames directly, so
    a peer that leaves is ``ClientGone`` and the upstream closes at once."""

    __slots__ = ("committed", "prefix", "req", "rid", "seq", "sock")

    def __init__(self, sock: Socket, rid: str, req: _Request, sid: str) -> None:
        self.sock = sock
        self.rid = rid
        self.req = req
        self.prefix = _prefix(rid, sid)
        self.seq = 0
        self.committed = False

    async def commit(self, headers: Mapping[str, str]) -> None:
        self.committed = True

    async def send(self, chunks: list[bytes]) -> None:
        write, prefix = self.sock.write, self.prefix
        for chunk in chunks:
            await write(b'%s%d,"chunk":%s}' % (prefix, self.seq, chunk))
            self.seq += 1

    async def end(self, chunks: list[bytes]) -> None:
        await self.send(chunks)
        await self.sock.finish(self.rid, self.req)

    async def fail(self, error: KeelError) -> None:
        await self.sock.finish(self.rid, self.req, error)


async def websocket(request: web.Request) -> web.StreamResponse:
    """GET /v1/ws. Credentials in the ``Authorization`` header are checked as for HTTP (a 401
    before the upgrade); without them the socket opens and waits for an ``auth`` message."""
    from keel.gateway._app import KEEL_KEY

    keel = request.app[KEEL_KEY]
    principal = None
    if "authorization" in request.headers:
        try:
            principal = keel.authenticate(request.headers)
        except KeelError as exc:
            return error_response(exc)
    else:
        with contextlib.suppress(KeelError):  # an open gateway needs no credentials
            principal = keel.authenticate({})
    cfg = keel.config.websocket
    ws = web.WebSocketResponse(
        heartbeat=cfg.heartbeat,
        # Up to 4x our own limit is read and answered with an error message (the socket
        # stays open); beyond that the protocol's 1009 close is the only sane answer.
        max_msg_size=cfg.max_message_bytes * 4,
        decode_text=False,  # orjson parses bytes: no str copy of each message
        # No permessage-deflate (browsers and the websockets package ask for it): it cost
        # ~60 % more gateway CPU per chunk frame (9.6 vs 6.0 µs), for frames of a few
        # hundred bytes on streams that are slow anyway.
        compress=False,
    )
    if not ws.can_prepare(request).ok:
        return error_response(
            KeelError(
                426,
                "GET /v1/ws is a WebSocket endpoint: send an Upgrade request.",
                code="upgrade_required",
            )
        )
    await ws.prepare(request)
    sock = Socket(request.app, keel, ws, request)
    sock.principal = principal
    sockets = request.app[SOCKETS_KEY]
    sockets.add(sock)
    try:
        await sock.run()
    except asyncio.CancelledError:
        from keel.gateway._app import _cut_off

        if not _cut_off(request):  # the peer left
            raise
        await sock.cut_off()  # the drain timeout: the peer is still there
    finally:
        sockets.discard(sock)
    return ws


SOCKETS_KEY: web.AppKey[set[Socket]] = web.AppKey("ws_sockets")


def install(app: web.Application) -> None:
    """The sockets' registry, and the watch that drains them when a graceful shutdown starts
    (``Shutdown.draining``: no hook of the HTTP server's fires then, so a look every
    ``_DRAIN_POLL`` seconds — nothing on any request's path)."""
    from keel.gateway._http import SHUTDOWN_KEY

    app[SOCKETS_KEY] = set()

    async def watch(app: web.Application) -> Any:
        async def loop() -> None:
            shutdown = app.get(SHUTDOWN_KEY)
            if shutdown is None:
                return
            while True:
                await asyncio.sleep(_DRAIN_POLL)
                if shutdown.draining:
                    break
            for sock in list(app[SOCKETS_KEY]):
                sock.drain()

        task = asyncio.get_running_loop().create_task(loop(), name="keel-ws-drain")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(watch)


_DRAIN_POLL = 0.1


_PLAYGROUND = Path(__file__).with_name("playground.html")


async def playground(request: web.Request) -> web.StreamResponse:
    """GET /playground: a small chat page over the WebSocket that survives a network drop."""
    return web.Response(body=_PLAYGROUND.read_bytes(), content_type="text/html", charset="utf-8")
