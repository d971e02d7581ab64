"""The gateway's HTTP face: routes, request parsing, and the two request paths
(non-stream and stream) that hand each attempt to the attempt loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from keel._backoff import RetryBudget
from keel._hedge import HedgePolicy
from keel.config import GatewayConfig
from keel.gateway._admission import Admission, Principal
from keel.gateway._attempts import Attempts, Exhausted, run_attempts
from keel.gateway._deadlines import Deadlines
from keel.gateway._deployment import Deployment
from keel.gateway._errors import ClientError, exhausted_response
from keel.gateway._limits import PRIORITIES, RequestCost, apply_remote_health
from keel.gateway._metrics import metrics, registry_for
from keel.gateway._moderation import content_filter_answer, fail_over_filtered_output
from keel.gateway._router import Router
from keel.gateway._shared import SharedState
from keel.gateway._streaming import stream
from keel.gateway._upstream import complete
from keel.gateway._validate import parse_chat_request

log = logging.getLogger("keel.gateway")

GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Gateway:
    """Long-lived state shared by all requests of one process."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        # Shared state across replicas (limits, leases, breakers) when redis_url is set.
        self.shared = SharedState(config.redis_url, config.shared) if config.redis_url else None
        self.router = Router(config, self.shared)
        self.admission = Admission(config, self.shared)
        self.metrics = registry_for(self)
        # Hedging state per model group that hedges (first-token history, hedge budget).
        self.hedges = {
            name: HedgePolicy(
                after=g.hedge.after,
                percentile=g.hedge.percentile,
                min_after=g.hedge.min_after,
                max_ratio=g.hedge.max_ratio,
            )
            for name, g in config.models.items()
            if g.hedge.enabled
        }
        self.budget = RetryBudget(
            ratio=config.retry.budget_ratio,
            floor_per_s=config.retry.budget_floor_per_s,
            clock=time.monotonic,
        )
        self.session: aiohttp.ClientSession | None = None
        self.deadlines: Deadlines | None = None  # upstream deadlines on one loop timer
        self.client_keys = set(self.admission.by_key)  # server.api_keys and clients.*.key
        # Unique across replicas and restarts without a random draw per request: pid plus a
        # random tag per process (containers often all run as pid 1), then a sequence number.
        self._id_prefix = f"keel-{os.getpid():x}-{random.getrandbits(32):08x}-"
        self._seq = 0

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        # No skip_auto_headers: it sends aiohttp down a slow per-request header path (~11 µs
        # per request under load); the upstream adapter names keel as the User-Agent instead.
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=True)
        self.deadlines = Deadlines(asyncio.get_running_loop())
        if self.shared is not None:
            deps = list(self.router.deployments())
            await self.shared.start(
                [d.limiter.health_key for d in deps], lambda h: apply_remote_health(deps, h)
            )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.shared is not None:
            await self.shared.close()

    def request_id(self) -> str:
        self._seq += 1
        return f"{self._id_prefix}{self._seq:x}"

    def authenticate(self, request: web.Request) -> Principal:
        return self.admission.authenticate(request)

    def upstream_body(self, body: dict[str, Any], dep: Deployment) -> bytes:
        return orjson.dumps({**body, "model": dep.model})


# ---------------------------------------------------------------------------------------------


def _too_large(limit: int) -> ClientError:
    return ClientError(413, f"The request body is larger than {limit} bytes.", code="too_large")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions: who is asking and for what (a 4xx at once when that is
    wrong), the client's limits, then the attempt loop — through a StreamSession for streams,
    right here for non-stream answers. One function rather than a chain of helpers on
    purpose: in CPython every wait on the upstream wakes up through each coroutine frame."""
    try:
        gw = request.app[GATEWAY_KEY]
        rid = gw.request_id()
        config = gw.config
        try:  # who is asking, how urgently, for what (the read inline: no coroutine for it)
            principal = gw.admission.authenticate(request)
            priority = gw.admission.priority(request, principal)
            limit = config.server.max_body_bytes
            length = request.content_length
            if length is not None and length > limit:
                raise _too_large(limit)
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise _too_large(limit) from None
            body = _parse(gw, raw)
        except ClientError as exc:
            return exc.response(rid)
        queue = config.queue
        now = asyncio.get_running_loop().time()
        deadline = now + config.retry.deadline
        streaming = body.get("stream")
        if not streaming:
            patience = _client_patience(request)
            if patience is not None and now + patience < deadline:
                deadline = now + patience
        state = Attempts(
            deadline=deadline,
            cost=RequestCost(body),
            priority=PRIORITIES[priority],
            max_wait=queue.batch_max_wait if priority == "batch" else queue.interactive_max_wait,
        )
        adm = gw.admission
        try:  # client limits (without Redis: no coroutine to await)
            ticket = (
                adm.admit_local(principal, state.cost)
                if adm.shared is None
                else await adm.admit(principal, state.cost)
            )
        except ClientError as exc:
            return exc.response(rid)
        try:
            if streaming:
                return await stream(request, gw, rid, body, state)
            # Non-stream, inline rather than a coroutine of its own: every time the request
            # waits on the upstream, the wake-up passes through each coroutine frame above.
            model = body["model"]
            on_filter = config.models[model].on_content_filter
            try:
                raw = await run_attempts(
                    model,
                    gw.router,
                    config.retry,
                    gw.budget,
                    state,
                    fail_over_filtered_output(_attempt_for(gw, body, state), on_filter),
                )
            except Exhausted as exc:
                filtered = content_filter_answer(exc, on_filter, rid, model)
                if filtered is None:
                    return exhausted_response(rid, state, exc)
                raw = filtered
            return web.Response(
                body=raw, content_type="application/json", headers=state.headers(rid)
            )
        finally:
            adm.done(ticket, state.usage)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        return await internal_error(request, exc)


# How long before the client's own timeout keel answers, so that its error (not a client-side
# timeout) is what the client sees: a response's trip back, with room to spare.
_PATIENCE_MARGIN = 0.25  # seconds, or 10 % of a shorter timeout


def _client_patience(request: web.Request) -> float | None:
    """How long the client will wait for a non-stream answer, when it says so: the official
    OpenAI SDKs send their read timeout as ``x-stainless-read-timeout`` (nothing arrives
    before a non-stream answer, so it bounds the whole request). keel gives up a little
    before that with an OpenAI-shaped error and closes the upstream attempt, instead of
    working on for an answer nobody will read."""
    raw = request.headers.get("x-stainless-read-timeout")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        return None
    if not seconds > 0 or seconds == float("inf"):  # also rejects NaN
        return None
    return seconds - min(_PATIENCE_MARGIN, 0.1 * seconds)


def _parse(gw: Gateway, raw: bytes) -> dict[str, Any]:
    """The request body, checked, for a model this gateway serves; or a ClientError."""
    body = parse_chat_request(raw)
    model = body["model"]
    if model not in gw.router:
        raise ClientError(
            404,
            f"The model '{model}' does not exist on this gateway. "
            f"Available: {', '.join(sorted(gw.router.groups))}.",
            code="model_not_found",
            param="model",
        )
    return body


def _attempt_for(
    gw: Gateway, body: dict[str, Any], state: Attempts
) -> Callable[[Deployment], Awaitable[bytes]]:
    """The non-stream attempt on one deployment: the raw answer (its usage goes to state)."""
    assert gw.session is not None and gw.deadlines is not None
    session, deadlines = gw.session, gw.deadlines

    def attempt(dep: Deployment) -> Awaitable[bytes]:
        # A plain function: the loop awaits complete()'s coroutine itself, one frame fewer.
        return complete(session, dep, gw.upstream_body(body, dep), state, deadlines)

    return attempt


async def models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    created = int(time.time())
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "keel"}
        for name in gw.router.groups
    ]
    return web.json_response(
        {"object": "list", "data": data}, dumps=lambda o: orjson.dumps(o).decode()
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


_ENDPOINTS = "POST /v1/chat/completions, GET /v1/models, GET /healthz, GET /metrics"


async def _unrouted(request: web.Request) -> web.StreamResponse:
    """The catch-all route: a known path with the wrong method is a 405 naming the allowed
    ones, anything else a 404 naming what keel serves — both OpenAI-shaped."""
    allowed = _ALLOWED.get(request.path)
    if allowed is not None:
        return ClientError(
            405,
            f"Method {request.method} is not allowed on {request.path}; use {allowed}.",
            code="method_not_allowed",
            headers={"allow": allowed},
        ).response()
    return ClientError(
        404, f"Unknown path {request.path!r}; keel serves {_ENDPOINTS}.", code="unknown_url"
    ).response()


async def internal_error(request: web.Request, exc: Exception) -> web.StreamResponse:
    """Last line of defence, called from a handler's ``except Exception``: an unexpected bug
    answers with an OpenAI-shaped 500 naming no internals, and is logged with its traceback
    for us. (A guard inside the handlers rather than an aiohttp middleware: the middleware
    chain cost ~2.5 µs on every request.)"""
    log.exception("unexpected error handling %s %s", request.method, request.path)
    err = ClientError(500, "keel hit an internal error; it has been logged.", type="server_error")
    if request.writer.output_size > 0:
        # A stream was already committed: a second HTTP response would corrupt it. End it
        # the one well-formed way left; aiohttp then closes the connection.
        await _end_committed_stream(request, err.body())
        raise exc  # aiohttp closes the connection: nothing more is written
    return err.response()


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
        await writer.write(b"data: " + orjson.dumps(body) + b"\n\ndata: [DONE]\n\n")
        await writer.write_eof()


_ROUTES: list[tuple[str, str, Handler]] = [
    ("/v1/chat/completions", "POST", chat_completions),  # guarded inline: the hot path
    ("/chat/completions", "POST", chat_completions),
    ("/v1/models", "GET", guarded(models)),
    ("/healthz", "GET", guarded(healthz)),
    ("/metrics", "GET", guarded(metrics)),
]
_ALLOWED = {path: "GET, HEAD" if method == "GET" else method for path, method, _ in _ROUTES}


def create_app(config: GatewayConfig) -> web.Application:
    app = web.Application(client_max_size=config.server.max_body_bytes)
    gw = Gateway(config)
    app[GATEWAY_KEY] = gw
    for path, method, handler in _ROUTES:
        if method == "GET":
            app.router.add_get(path, handler)  # and HEAD, for load balancers' health checks
        else:
            app.router.add_route(method, path, handler)
    app.router.add_route("*", "/{tail:.*}", _unrouted)  # last: only what nothing else took

    async def lifecycle(app: web.Application) -> Any:
        await gw.start()
        yield
        await gw.close()

    app.cleanup_ctx.append(lifecycle)
    if not gw.client_keys:
        log.warning("no client api_keys configured: any bearer token is accepted (local use only)")
    return app
