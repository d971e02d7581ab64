"""The gateway's HTTP door: routes, and the handler that hands each request to the engine
(``keel.engine``). No policy lives here: the handler turns an HTTP request into a principal
and a ``Call``, and the engine's answer (or its stream, through ``SSESink``) into a response."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from keel.auth import _http as auth_http
from keel.config import GatewayConfig
from keel.engine._completions import COMPLETIONS
from keel.engine._driver import complete, stream
from keel.engine._embeddings import EMBEDDINGS
from keel.engine._errors import KeelError
from keel.engine._keel import Keel
from keel.engine._operation import CHAT, Operation
from keel.gateway import _admin
from keel.gateway._http import SHUTDOWN_KEY, SHUTTING_DOWN
from keel.gateway._metrics import metrics, registry_for
from keel.gateway._sink import SSESink, error_response, sse_end
from keel.gateway._streams import install as install_streams
from keel.gateway._streams import resumable_chat, wants_resume
from keel.gateway._ws import playground, websocket

log = logging.getLogger("keel.gateway")

KEEL_KEY: web.AppKey[Keel] = web.AppKey("keel")
METRICS_KEY: web.AppKey[CollectorRegistry] = web.AppKey("metrics")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def too_large(limit: int) -> KeelError:
    return KeelError(413, f"The request body is larger than {limit} bytes.", code="too_large")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, or the 413 for one larger than ``limit`` (``endpoint``'s handler
    has this inline: one coroutine frame fewer on the hot path)."""
    length = request.content_length
    if length is not None and length > limit:
        raise too_large(limit)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None


def endpoint(op: Operation) -> Handler:
    """The handler of ``op``'s endpoint (POST /v1/chat/completions, /v1/embeddings, ...): who
    is asking and for what (a 4xx at once when that is wrong), the client's limits, then the
    engine — one handler body for every operation, made per operation so that the engine is
    called from the handler itself (no coroutine frame more on every wake-up of a request)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            keel = request.app[KEEL_KEY]
            rid = keel.request_id()
            try:
                headers = request.headers
                principal = keel.authenticate(headers)
                limit = keel.settings.max_body_bytes
                length = request.content_length
                if length is not None and length > limit:
                    raise too_large(limit)
                try:
                    raw = await request.read()
                except web.HTTPRequestEntityTooLarge:
                    raise too_large(limit) from None
                call = keel.call(raw, principal, headers, rid, op)
                if keel.shared is None:
                    keel.admit_local(call)  # client limits without Redis: nothing to await
                else:
                    await keel.admit(call)
            except KeelError as exc:
                if keel.observers:  # the access log and traces see refusals too
                    keel.refused(rid, exc, request.headers)
                return error_response(exc, rid)
            if call.stream and wants_resume(headers):  # keel.gateway._streams; it ends the call
                return await resumable_chat(request, keel, call)
            try:
                if call.stream:
                    sink = SSESink(request, rid)
                    try:
                        await stream(keel, call, sink)
                    except asyncio.CancelledError:
                        if not _cut_off(request):
                            raise  # the client went away: nobody to answer
                        await sink.fail(_shutting_down())
                    except ConnectionError:  # a write of SSESink.send
                        if not sink.left:
                            raise  # the client is still there: a real error
                        log.debug("request %s: the client went away mid-stream", rid)
                    assert sink.response is not None
                    return sink.response
                try:
                    body, out = await complete(keel, call)
                except KeelError as exc:
                    return error_response(exc)
                except asyncio.CancelledError:
                    if not _cut_off(request):
                        raise
                    return error_response(_shutting_down(), rid)
                return web.Response(body=body, content_type="application/json", headers=out)
            finally:
                keel.done(call)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:
            return await internal_error(request, exc)

    return handler


chat_completions = endpoint(CHAT)


def _cut_off(request: web.Request) -> bool:
    """Cancelled by the server's drain timeout (not by a client that left): the client is
    still there, and gets a well-formed end instead of a dropped connection. The upstream
    attempt was closed by the cancellation already."""
    shutdown = request.app.get(SHUTDOWN_KEY)
    if shutdown is None or not shutdown.expired:
        return False
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    return True


def _shutting_down() -> KeelError:
    return KeelError(503, SHUTTING_DOWN, type="server_error", code="server_shutting_down")


async def _speech(request: web.Request) -> web.StreamResponse:
    from keel.gateway._speech import audio_speech  # (it imports this module)

    return await audio_speech(request)


async def _responses(request: web.Request) -> web.StreamResponse:
    from keel.gateway._responses import responses  # (it imports this module)

    return await responses(request)


async def models(request: web.Request) -> web.Response:
    keel = request.app[KEEL_KEY]
    try:
        principal = keel.authenticate(request.headers)  # the same rules as chat completions
    except KeelError as exc:
        return error_response(exc)
    return _json({"object": "list", "data": keel.models(principal)})


async def model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: the group as a model object, or a 404 ``model_not_found`` (also
    for a group the client's key may not use, as /v1/models does not list it)."""
    keel = request.app[KEEL_KEY]
    try:
        principal = keel.authenticate(request.headers)
        return _json(keel.model(request.match_info["id"], principal))
    except KeelError as exc:
        return error_response(exc)


def _json(obj: Any) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


_ENDPOINTS = (
    "POST /v1/chat/completions, POST /v1/responses, POST /v1/embeddings, POST /v1/completions, "
    "POST /v1/audio/speech, GET /v1/models, GET /v1/models/{id}, GET /v1/ws, "
    "GET|DELETE /v1/streams/{id}, GET /playground, GET /healthz, GET /readyz, GET /metrics, "
    "GET /status, GET /admin/state, POST /admin/deployments/{name}/reset|drain|undrain, "
    "POST /admin/reload"
)


def unrouted(method: str, path: str) -> KeelError:
    """A request no route takes: a known path with the wrong method is a 405 naming the
    allowed ones, anything else a 404 naming what keel serves — both OpenAI-shaped."""
    allowed = _ALLOWED.get(path) or ("GET, HEAD" if path.startswith("/v1/models/") else None)
    if allowed is not None:
        return KeelError(
            405,
            f"Method {method} is not allowed on {path}; use {allowed}.",
            code="method_not_allowed",
            headers={"allow": allowed},
        )
    return KeelError(404, f"Unknown path {path!r}; keel serves {_ENDPOINTS}.", code="unknown_url")


async def _unrouted(request: web.Request) -> web.StreamResponse:
    return error_response(unrouted(request.method, request.path))


async def internal_error(request: web.Request, exc: Exception) -> web.StreamResponse:
    """Last line of defence, called from a handler's ``except Exception``: an unexpected bug
    answers with an OpenAI-shaped 500 naming no internals, and is logged with its traceback
    for us. (A guard inside the handlers rather than an aiohttp middleware: the middleware
    chain cost ~2.5 µs on every request.)"""
    log.exception("unexpected error handling %s %s", request.method, request.path)
    err = KeelError(500, "keel hit an internal error; it has been logged.", type="server_error")
    if request.writer.output_size > 0:
        # A stream was already committed: a second HTTP response would corrupt it. End it
        # the one well-formed way left; aiohttp then closes the connection.
        await _end_committed_stream(request, err.body)
        raise exc  # aiohttp closes the connection: nothing more is written
    return error_response(err)


def guarded(handler: Handler) -> Handler:
    """``handler`` with the ``internal_error`` guard (chat completions has it inline)."""

    async def run(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:
            return await internal_error(request, exc)

    return run


async def _end_committed_stream(request: web.Request, body: dict[str, Any]) -> None:
    writer = request.writer
    if getattr(writer, "_eof", False):  # the stream had already ended
        return
    with contextlib.suppress(Exception):
        await writer.write(sse_end([orjson.dumps(body)]))
        await writer.write_eof()


_ROUTES: list[tuple[str, str, Handler]] = [
    ("/v1/chat/completions", "POST", chat_completions),  # guarded inline: the hot path
    ("/chat/completions", "POST", chat_completions),
    ("/v1/embeddings", "POST", endpoint(EMBEDDINGS)),  # keel.engine._embeddings
    ("/embeddings", "POST", endpoint(EMBEDDINGS)),
    ("/v1/completions", "POST", endpoint(COMPLETIONS)),  # keel.engine._completions
    ("/completions", "POST", endpoint(COMPLETIONS)),
    ("/v1/audio/speech", "POST", _speech),  # keel.gateway._speech
    ("/v1/responses", "POST", _responses),  # keel.gateway._responses (guards itself)
    ("/responses", "POST", _responses),
    ("/v1/models", "GET", guarded(models)),
    ("/v1/models/{id:.+}", "GET", guarded(model)),
    ("/healthz", "GET", guarded(healthz)),
    ("/metrics", "GET", guarded(metrics)),
    ("/v1/ws", "GET", websocket),  # keel.gateway._ws (guards itself)
    ("/playground", "GET", guarded(playground)),
    *_admin.ROUTES,  # /status, /readyz, /admin/state and the admin actions
    *auth_http.ROUTES,  # token sessions (keel.auth); the admin API: auth_http.add_routes
]
_ALLOWED = {path: "GET, HEAD" if method == "GET" else method for path, method, _ in _ROUTES}


def create_app(config: GatewayConfig | Keel) -> web.Application:
    """The aiohttp application of a gateway: on a config, or on an engine of the caller's
    (which it then starts and closes with the app)."""
    keel = config if isinstance(config, Keel) else Keel(config)
    app = web.Application(client_max_size=keel.config.server.max_body_bytes)
    app[KEEL_KEY] = keel
    app[METRICS_KEY] = registry_for(keel)
    if keel.keys is not None:
        from keel.auth._metrics import KeyCollector

        app[METRICS_KEY].register(KeyCollector(keel.keys))
    for path, method, handler in _ROUTES:
        if method == "GET":
            app.router.add_get(path, handler)  # and HEAD, for load balancers' health checks
        else:
            app.router.add_route(method, path, handler)
    install_streams(app, keel)  # GET/DELETE /v1/streams/{id} and the resume buffers
    auth_http.add_routes(app)
    app.router.add_route("*", "/{tail:.*}", _unrouted)  # last: only what nothing else took

    async def lifecycle(app: web.Application) -> Any:
        await keel.start()
        # After start: virtual keys (keel.auth) are loaded by then.
        if getattr(keel.authenticator, "open", False):
            log.warning(
                "no client keys configured: any bearer token is accepted (local use only)"
            )
        yield
        await keel.close()

    app.cleanup_ctx.append(lifecycle)
    return app
