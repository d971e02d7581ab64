"""``POST /v1/audio/speech`` through the gateway: the engine's speech (``keel.engine._speech``)
streamed through. Retries and fail-over happen before the first byte, invisibly; a client that
hangs up cancels the handler, and leaving the ``Speech`` closes the upstream at once."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from keel.engine._errors import KeelError
from keel.engine._speech import speech
from keel.gateway._app import KEEL_KEY, _cut_off, _shutting_down, internal_error, too_large
from keel.gateway._sink import error_response

log = logging.getLogger("keel.gateway")


async def audio_speech(request: web.Request) -> web.StreamResponse:
    try:
        keel = request.app[KEEL_KEY]
        rid = keel.request_id()
        try:
            principal = keel.authenticate(request.headers)
            limit = keel.config.server.max_body_bytes
            if request.content_length is not None and request.content_length > limit:
                raise too_large(limit)
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise too_large(limit) from None
            try:
                sp = await speech(keel, raw, principal, request.headers, rid)
            except asyncio.CancelledError:
                if not _cut_off(request):
                    raise  # the client went away: nobody to answer
                raise _shutting_down() from None  # the drain timeout, before any audio
        except KeelError as exc:
            return error_response(exc, rid)
        try:
            resp = web.StreamResponse(headers=sp.headers)
            await resp.prepare(request)
            try:
                async for data in sp:
                    await resp.write(data)
            except KeelError as exc:
                # Audio cannot be continued and a status cannot be changed once sent: end
                # the body without its last chunk, so the client sees a truncated response,
                # never a complete-looking one.
                log.info("request %s: %s", rid, exc.message)
                if request.transport is not None:
                    request.transport.abort()
                return resp
            await resp.write_eof()
            return resp
        finally:
            await sp.aclose()
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        return await internal_error(request, exc)
