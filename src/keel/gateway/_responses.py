"""``POST /v1/responses``: the Responses API over the engine (``keel.engine._responses``).

The request is translated to a chat completion and served by chat's whole engine; the answer
goes back as a Response object, or as the Responses event stream (``event:``/``data:`` pairs,
no ``[DONE]``: the terminal event ends it) through ``ResponsesSSESink``.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from aiohttp import web

from keel._responses import sse_events
from keel.engine._driver import complete, stream
from keel.engine._errors import KeelError
from keel.engine._responses import ResponsesSink, parse_request, response_of, responses_call
from keel.gateway._app import KEEL_KEY, _cut_off, _shutting_down, internal_error, read_body
from keel.gateway._sink import SSESink, error_response

log = logging.getLogger("keel.gateway")


class ResponsesSSESink(SSESink):
    """The gateway's SSE sink, framing Responses events (``event: <type>``) without
    ``[DONE]``."""

    __slots__ = ()

    async def send(self, chunks: list[bytes]) -> None:
        await self._write(sse_events(chunks))

    def _last(self, chunks: list[bytes]) -> bytes:
        return sse_events(chunks) if chunks else b""  # the terminal event is among them


async def responses(request: web.Request) -> web.StreamResponse:
    try:
        keel = request.app[KEEL_KEY]
        rid = keel.request_id()
        try:
            headers = request.headers
            principal = keel.authenticate(headers)
            body = parse_request(await read_body(request, keel.config.server.max_body_bytes))
            call = responses_call(keel, body, principal, headers, rid)
            await keel.admit(call)
        except KeelError as exc:
            if keel.observers:  # the access log and traces see refusals too
                keel.refused(rid, exc, request.headers)
            return error_response(exc, rid)
        try:
            if call.stream:
                outer = ResponsesSSESink(request, rid)
                sink = ResponsesSink(outer, body, rid)
                try:
                    await stream(keel, call, sink)
                except asyncio.CancelledError:
                    if not _cut_off(request):
                        raise
                    await sink.fail(_shutting_down())
                except Exception:
                    if not outer.committed or outer.ended:
                        raise  # internal_error answers: nothing of the stream was sent
                    # A bug after the commit: the stream still ends the Responses way.
                    log.exception("unexpected error in Responses stream %s", rid)
                    msg = "keel hit an internal error; it has been logged."
                    await sink.fail(KeelError(500, msg, type="server_error"))
                assert outer.response is not None
                return outer.response
            try:
                raw, out = await complete(keel, call)
            except KeelError as exc:
                return error_response(exc)
            except asyncio.CancelledError:
                if not _cut_off(request):
                    raise
                return error_response(_shutting_down(), rid)
            answer = orjson.dumps(response_of(raw, body, rid))
            return web.Response(body=answer, content_type="application/json", headers=out)
        finally:
            keel.done(call)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        return await internal_error(request, exc)
