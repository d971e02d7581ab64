"""Resumable streams over HTTP: ``x-keel-resumable: true`` on ``POST /v1/chat/completions``,
``GET /v1/streams/{id}`` (with ``Last-Event-ID``, as an EventSource reconnects) and
``DELETE /v1/streams/{id}``. The buffers are ``keel.engine._resume``'s; with ``redis_url`` a
stream buffered on another replica is served from Redis (``keel.gateway._resume_redis``).

A POST that carries ``Last-Event-ID: <stream id>:<seq>`` with ``x-keel-resumable`` resumes that
stream instead of starting a new one: what a POST-capable EventSource client (fetch-event-source
and the like) sends when it reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from aiohttp import web

from keel.engine._errors import KeelError
from keel.engine._keel import Call, Keel
from keel.engine._resume import (
    Source,
    Streams,
    cancelled_error,
    client_stream_id,
    gone_error,
    parse_last_event_id,
    unknown_stream,
)
from keel.gateway._sink import _SSE_HEADERS, error_response, sse_end_ids, sse_ids

log = logging.getLogger("keel.gateway")

STREAMS_KEY: web.AppKey[Streams] = web.AppKey("streams")
REMOTE_KEY: web.AppKey[Any] = web.AppKey("remote_streams")  # a RedisStreams, or None


def wants_resume(headers: Mapping[str, str]) -> bool:
    value = headers.get("x-keel-resumable")
    return value is not None and value.strip().lower() == "true"


async def lookup(app: web.Application, sid: str, owner: str) -> Source | None:
    """The stream ``sid`` of principal ``owner``: buffered here, or (with Redis) on another
    replica. Someone else's stream is as unknown as a stream that never was."""
    src: Source | None = app[STREAMS_KEY].get(sid)
    if src is None and (remote := app[REMOTE_KEY]) is not None:
        src = await remote.source(sid)
    if src is None or src.owner != owner:
        return None
    return src


async def check_free(app: web.Application, sid: str | None) -> None:
    """A stream id the client chose must not be one another replica runs (this replica's
    registry checks its own)."""
    remote = app[REMOTE_KEY]
    if sid is not None and remote is not None and await remote.exists(sid):
        raise KeelError(409, f"Stream id {sid!r} is in use.", code="stream_id_in_use")


async def resumable_chat(request: web.Request, keel: Keel, call: Call) -> web.StreamResponse:
    """A resumable stream for an admitted ``call`` (this function ends the call: the driver's
    task does, or it does itself when no stream is started)."""
    last = request.headers.get("last-event-id")
    if last:  # a reconnecting POST: resume, start nothing
        keel.done(call)
        try:
            sid, after = parse_last_event_id(last)
        except ValueError as exc:
            return error_response(_bad_resume(str(exc)), call.rid)
        src = await lookup(request.app, sid, call.principal.name)
        if src is None:
            return error_response(unknown_stream(sid), call.rid)
        return await serve_sse(request, src, after, call.rid)
    try:
        named = request.headers.get("x-keel-stream-id")
        chosen = None if named is None else client_stream_id(named, "x-keel-stream-id")
        await check_free(request.app, chosen)
        buf = request.app[STREAMS_KEY].start(keel, call, chosen)
    except KeelError as exc:
        keel.done(call)
        return error_response(exc, call.rid)
    return await serve_sse(request, buf, -1, call.rid)


async def serve_sse(request: web.Request, src: Source, after: int, rid: str) -> web.StreamResponse:
    """Follow ``src`` from after seq ``after`` to its end, as SSE events with ids. The client
    leaving (the handler is cancelled) only detaches it: the stream goes on for the grace."""
    response: web.StreamResponse | None = None
    src.attach()
    try:
        await src.started()
        if not src.committed:  # failed (or was cancelled) before its first chunk
            return error_response(src.error or cancelled_error(src.sid), rid)
        if src.ended and after >= src.next_seq:
            # Seen it all, its ending too: 204 tells an EventSource not to reconnect again.
            return web.Response(status=204, headers={"x-keel-stream-id": src.sid})
        if after + 1 < src.base:
            return error_response(gone_error(src.sid, src.base), rid)
        response = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        response.headers.update(src.headers)
        await response.prepare(request)
        sid = src.sid.encode()
        error: KeelError | None
        try:
            async for first, batch in src.follow(after):
                await response.write(sse_ids(sid, first, batch))
            error = src.error
        except KeelError as exc:  # fell behind the buffer's byte cap
            error = exc
        body = orjson.dumps(error.body) if error is not None else None
        await response.write_eof(sse_end_ids(sid, src.next_seq, body))  # one write, as SSESink.end
        return response
    except ConnectionError:
        # The client left while we wrote (the handler is usually cancelled instead); the
        # stream stays buffered for the grace.
        if response is None:
            raise
        return response
    except asyncio.CancelledError:
        from keel.gateway._app import _cut_off, _shutting_down

        if not _cut_off(request):
            raise  # the client left: the stream goes on for the grace
        # server.drain_timeout passed: the client is still there and hears why it ends.
        if response is None:
            return error_response(_shutting_down(), rid)
        body = orjson.dumps(_shutting_down().body)
        with contextlib.suppress(ConnectionError):
            await response.write_eof(sse_end_ids(src.sid.encode(), src.next_seq, body))
        return response
    finally:
        src.detach()


def _bad_resume(message: str) -> KeelError:
    return KeelError(400, message, code="invalid_last_event_id", param="Last-Event-ID")


async def get_stream(request: web.Request) -> web.StreamResponse:
    """GET /v1/streams/{id}: the chunks after ``Last-Event-ID`` (or ``?after=``; neither: from
    the start), then the live rest."""
    from keel.gateway._app import KEEL_KEY

    keel = request.app[KEEL_KEY]
    rid = keel.request_id()
    sid = request.match_info["id"]
    try:
        principal = keel.authenticate(request.headers)
        after = _after(request, sid)
    except KeelError as exc:
        return error_response(exc, rid)
    src = await lookup(request.app, sid, principal.name)
    if src is None:
        return error_response(unknown_stream(sid), rid)
    return await serve_sse(request, src, after, rid)


def _after(request: web.Request, sid: str) -> int:
    last = request.headers.get("last-event-id")
    if last:
        try:
            return parse_last_event_id(last, sid)[1]
        except ValueError as exc:
            raise _bad_resume(str(exc)) from None
    raw = request.query.get("after")
    if raw is None:
        return -1
    try:
        after = int(raw)
    except ValueError:
        after = -2
    if after < -1:
        raise KeelError(400, f"after={raw!r} is not a seq (an integer ≥ -1)", param="after")
    return after


async def delete_stream(request: web.Request) -> web.StreamResponse:
    """DELETE /v1/streams/{id}: cancel it at once (its upstream attempt closes), wherever it
    runs."""
    from keel.gateway._app import KEEL_KEY

    keel = request.app[KEEL_KEY]
    sid = request.match_info["id"]
    try:
        principal = keel.authenticate(request.headers)
    except KeelError as exc:
        return error_response(exc)
    if not await cancel_stream(request.app, sid, principal.name):
        return error_response(unknown_stream(sid))
    return web.json_response({"id": sid, "object": "stream", "deleted": True})


async def cancel_stream(app: web.Application, sid: str, owner: str) -> bool:
    local = app[STREAMS_KEY].get(sid)
    if local is not None:
        if local.owner != owner:
            return False
        local.cancel()
        return True
    remote = app[REMOTE_KEY]
    if remote is None:
        return False
    src = await remote.source(sid)
    if src is None or src.owner != owner:
        return False
    await remote.cancel(sid)
    return True


async def _stream_other_method(request: web.Request) -> web.StreamResponse:
    allowed = "GET, HEAD, DELETE"
    return error_response(
        KeelError(
            405,
            f"Method {request.method} is not allowed on {request.path}; use {allowed}.",
            code="method_not_allowed",
            headers={"allow": allowed},
        )
    )


def install(app: web.Application, keel: Keel) -> None:
    """The streams' routes (before the catch-all), their buffers, and (with Redis) the mirror
    that lets other replicas serve a resume."""
    from keel.gateway._app import guarded

    mirror = None
    if keel.config.redis_url:
        from keel.gateway._resume_redis import RedisStreams

        mirror = RedisStreams(keel.config.redis_url, keel.config.shared.prefix, keel.config.resume)
    streams = Streams(keel.config.resume, mirror)
    app[STREAMS_KEY] = streams
    app[REMOTE_KEY] = mirror
    app.router.add_get("/v1/streams/{id}", guarded(get_stream))
    app.router.add_delete("/v1/streams/{id}", guarded(delete_stream))
    app.router.add_route("*", "/v1/streams/{id}", _stream_other_method)

    async def stop_streams(app: web.Application) -> None:
        # on_shutdown runs before the engine closes its upstream session: the drivers end
        # (cancelled) while they can still close their connections cleanly.
        await streams.close()

    app.on_shutdown.append(stop_streams)
    from keel.gateway._ws import install as install_sockets

    install_sockets(app)
    if mirror is not None:

        async def lifecycle(app: web.Application) -> AsyncIterator[None]:
            await mirror.start(streams)
            yield
            await mirror.close()

        app.cleanup_ctx.append(lifecycle)
