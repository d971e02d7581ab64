"""``Keel``: the request engine, and its public face for library use.

One object per process holds what outlives a request — the router and its deployments, client
admission, the retry budget, hedge histories, the upstream connection pool, shared state in
Redis. Every door drives it the same way: authenticate the headers (a ``Principal``), turn the
body into a ``Call``, admit it against the client's limits, then ``complete`` it or ``stream``
it into a sink (``keel.engine._driver``). The HTTP gateway is one such door; ``chat``,
``stream`` and ``transport()`` are the library's.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import aiohttp
import orjson

from keel._backoff import RetryBudget
from keel._hedge import HedgePolicy
from keel._plan import Plan, Policy
from keel.config import GatewayConfig, ModelGroup, load_config, parse_config
from keel.engine._admission import Admission, Ticket
from keel.engine._auth import Authenticator, Principal
from keel.engine._deadlines import Deadlines
from keel.engine._deployment import Deployment
from keel.engine._errors import KeelError
from keel.engine._limits import PRIORITIES, apply_remote_health, holds_back
from keel.engine._observe import new_record, refused_record
from keel.engine._operation import CHAT, Operation
from keel.engine._router import Router
from keel.engine._shared import SharedState
from keel.engine._snapshot import Monitor

if TYPE_CHECKING:
    import httpx

    from keel._transcript import Transcript
    from keel.auth._service import KeyService
    from keel.engine._observe import Observer, Record
    from keel.engine._sinks import ChunkStream
    from keel.engine._speech import Speech

# How long before the client's own timeout keel answers, so that its error (not a client-side
# timeout) is what the client sees: a response's trip back, with room to spare.
_PATIENCE_MARGIN = 0.25  # seconds, or 10 % of a shorter timeout


@dataclass(slots=True, eq=False)
class Call:
    """One request on its way through the engine."""

    rid: str
    body: dict[str, Any]
    model: str
    stream: bool
    principal: Principal
    priority: int  # 0 interactive, 1 batch
    max_wait: float  # seconds an attempt may queue at a deployment
    deadline: float  # loop time: the whole request
    wants_usage: bool = False  # the client asked for a stream's usage chunk
    op: Operation = CHAT  # the endpoint (``keel.engine._operation``)
    ticket: Ticket | None = None  # the client's booked limits
    usage: Mapping[str, Any] | None = None  # the upstream's usage, once an attempt succeeded
    racers: dict[asyncio.Task[Any], Any] | None = None  # a hedge's attempts, while it races
    transcript: Transcript | None = None  # a stream's, for its spend (``Meter.charge``)
    record: Record | None = None  # what it did, when observers watch (``keel.engine._observe``)
    # A Responses request (keel.engine._responses): what deployments with ``api: responses``
    # are sent as it is; ``body`` is its chat translation, for the others.
    responses: dict[str, Any] | None = None
    _tokens: tuple[int, int | None] | None = None  # ``tokens()``, once asked

    def tokens(self) -> tuple[int, int | None]:
        """``Costed``: its operation's token estimate of its body, made at the first ask (only
        TPM limits ask; the client's and the deployment's share it)."""
        t = self._tokens
        if t is None:
            t = self._tokens = self.op.estimate(self.body)
        return t


@dataclass(slots=True, frozen=True)
class RequestSettings:
    """What every request reads of the config, copied out of it: ``GatewayConfig`` is
    pydantic, and an attribute read there costs ~0.3k instructions more than a slot's. Made
    with the engine and again by ``reload``."""

    max_body_bytes: int
    deadline: float  # seconds: the whole request (``retry.deadline``)
    interactive_max_wait: float  # seconds an attempt may queue at a deployment, by priority
    batch_max_wait: float

    @classmethod
    def of(cls, config: GatewayConfig) -> RequestSettings:
        q = config.queue
        return cls(
            config.server.max_body_bytes,
            config.retry.deadline,
            q.interactive_max_wait,
            q.batch_max_wait,
        )


class Keel:
    """The engine. Use as ``async with Keel.from_config("keel.yaml") as gw: ...``."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.settings = RequestSettings.of(config)  # ``reload`` makes it again with the config
        # Shared state across replicas (limits, leases, breakers) when redis_url is set.
        self.shared = SharedState(config.redis_url, config.shared) if config.redis_url else None
        self.router = Router(config, self.shared)
        self.admission = Admission(config, self.shared)
        self.authenticator: Authenticator = self.admission.authenticator
        # Virtual keys, budgets and token sessions (keel.auth) when there is a key database:
        # the config's keys first, then the database's, then access JWTs.
        self.keys: KeyService | None = None
        if config.database_url:
            from keel.auth._service import KeyChain, KeyService

            self.keys = KeyService(config)
            self.authenticator = KeyChain(
                self.admission.authenticator, self.keys, self.admission.anonymous
            )
        # Hedging state per model group that hedges (first-token history, hedge budget).
        self.hedges = {
            name: hedge_policy(g) for name, g in config.models.items() if g.hedge.enabled
        }
        r = config.retry
        self.policies = policies(config)
        self.budget = RetryBudget(
            ratio=r.budget_ratio, floor_per_s=r.budget_floor_per_s, clock=time.monotonic
        )
        self.session: aiohttp.ClientSession | None = None
        self.deadlines: Deadlines | None = None  # upstream deadlines on one loop timer
        # Unique across replicas and restarts without a random draw per request: pid plus a
        # random tag per process (containers often all run as pid 1), then a sequence number.
        self._id_prefix = f"keel-{os.getpid():x}-{random.getrandbits(32):08x}-"
        self._seq = 0
        # The status page's history (keel.engine._snapshot); the file ``reload`` re-reads.
        self.monitor = Monitor(self)
        self.config_path: Path | None = None
        # Who watches requests (the access log, OpenTelemetry): empty, the engine records
        # nothing (``keel.engine._observe``). ``start`` adds OpenTelemetry when configured.
        self.observers: list[Observer] = []
        self.log_bodies = False  # observers may see request bodies (``logging.log_bodies``)

    @classmethod
    def from_config(cls, source: str | Path | Mapping[str, Any] | GatewayConfig) -> Keel:
        """From a YAML file's path, a dict with the same keys, or a parsed config."""
        if isinstance(source, GatewayConfig):
            return cls(source)
        if isinstance(source, Mapping):
            return cls(parse_config(dict(source)))
        keel = cls(load_config(source))
        keel.config_path = Path(source)
        return keel

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        # No skip_auto_headers: it sends aiohttp down a slow per-request header path (~11 µs
        # per request under load); the upstream adapter names keel as the User-Agent instead.
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=True)
        self.deadlines = Deadlines(asyncio.get_running_loop())
        self.monitor.start()
        if self.shared is not None:
            deps = list(self.router.deployments())
            await self.shared.start(
                [d.limiter.health_key for d in deps], lambda h: apply_remote_health(deps, h)
            )
        if self.keys is not None:
            await self.keys.start()
        self._watch()

    def _watch(self) -> None:
        """Install the observers the config and the environment ask for: the access log
        when ``keel.access`` logs at info, OpenTelemetry when it is on."""
        import logging

        from keel.telemetry import wanted  # no OpenTelemetry import unless it is wanted

        self.log_bodies = self.config.logging.log_bodies
        if self.config.logging.access and logging.getLogger("keel.access").isEnabledFor(
            logging.INFO
        ):
            from keel.telemetry._logs import AccessLog

            self.observers.append(AccessLog(self.log_bodies))
        if wanted(self.config.telemetry):
            from keel.telemetry._otel import Telemetry

            assert self.session is not None
            self.observers.append(Telemetry(self.config.telemetry, self.session))

    async def close(self) -> None:
        self.monitor.stop()
        for obs in self.observers:
            await obs.close()  # what telemetry still holds goes out (before the session closes)
        self.observers.clear()
        if self.keys is not None:
            await self.keys.close()  # writes the spend not yet written
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self.shared is not None:
            await self.shared.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- the library's door -----------------------------------------------------------------------

    async def chat(self, body: Mapping[str, Any], *, api_key: str | None = None) -> dict[str, Any]:
        """A chat completion (non-stream) as a dict, or ``KeelError``. ``api_key``: answer as
        that client of the config (its limits apply); None: the trusted in-process caller."""
        return await self._complete(body, api_key, CHAT)

    async def embeddings(
        self, body: Mapping[str, Any], *, api_key: str | None = None
    ) -> dict[str, Any]:
        """Embeddings (``POST /v1/embeddings``) as a dict, or ``KeelError``: routed, limited,
        retried and failed over like ``chat``."""
        from keel.engine._embeddings import EMBEDDINGS

        return await self._complete(body, api_key, EMBEDDINGS)

    async def completions(
        self, body: Mapping[str, Any], *, api_key: str | None = None
    ) -> dict[str, Any]:
        """A legacy text completion (``POST /v1/completions``, non-stream) as a dict, or
        ``KeelError``."""
        from keel.engine._completions import COMPLETIONS

        return await self._complete(body, api_key, COMPLETIONS)

    def completions_stream(
        self, body: Mapping[str, Any], *, api_key: str | None = None
    ) -> ChunkStream:
        """The chunks of a streamed legacy text completion as dicts (``async for``), with
        ``stream``'s guarantees before the first chunk; a stream that breaks after it ends
        with ``KeelError`` from the iteration (a text completion cannot be continued)."""
        from keel.engine._completions import COMPLETIONS
        from keel.engine._sinks import ChunkStream

        return ChunkStream(self, lambda: self.library_call(body, True, api_key, COMPLETIONS))

    async def _complete(
        self, body: Mapping[str, Any], api_key: str | None, op: Operation
    ) -> dict[str, Any]:
        from keel.engine._driver import complete

        call = self.library_call(body, False, api_key, op)
        await self.admit(call)
        try:
            raw, _ = await complete(self, call)
        finally:
            self.done(call)
        result: dict[str, Any] = orjson.loads(raw)
        return result

    def stream(self, body: Mapping[str, Any], *, api_key: str | None = None) -> ChunkStream:
        """The chunks of a streamed chat completion as dicts (``async for``). ``KeelError``
        comes from the iteration: before the first chunk, or after the chunks it yielded when
        the stream could not be completed. Leaving the iteration (``break``, ``aclose()``,
        cancellation) closes the upstream attempt at once."""
        from keel.engine._sinks import ChunkStream

        return ChunkStream(self, lambda: self.library_call(body, True, api_key))

    async def responses(
        self, body: Mapping[str, Any], *, api_key: str | None = None
    ) -> dict[str, Any]:
        """A Responses API request (non-stream) as a Response dict, or ``KeelError``: served
        over the group's chat-completions deployments by translation (``keel._responses``)."""
        from keel.engine._driver import complete
        from keel.engine._responses import response_of, responses_call

        rid = self.request_id()
        headers, principal = self._library_principal(api_key)
        request = {**body, "stream": False}
        call = responses_call(self, request, principal, headers, rid)
        await self.admit(call)
        try:
            raw, _ = await complete(self, call)
        finally:
            self.done(call)
        return response_of(raw, request, rid)

    def responses_stream(
        self, body: Mapping[str, Any], *, api_key: str | None = None
    ) -> ChunkStream:
        """A streamed Responses API request: its events as dicts (``async for``), from
        ``response.created`` to exactly one terminal event — ``response.completed``,
        ``response.incomplete``, or ``response.failed`` (carrying the error) when a started
        stream cannot be completed. ``KeelError`` before the first event."""
        from keel.engine._responses import ResponsesSink, responses_call
        from keel.engine._sinks import ChunkStream

        rid = self.request_id()
        request = {**body, "stream": True}

        def make_call() -> Call:
            headers, principal = self._library_principal(api_key)
            return responses_call(self, request, principal, headers, rid)

        return ChunkStream(self, make_call, lambda sink: ResponsesSink(sink, request, rid))

    def _library_principal(self, api_key: str | None) -> tuple[dict[str, str], Principal]:
        headers = {} if api_key is None else {"authorization": f"Bearer {api_key}"}
        principal = self.admission.anonymous if api_key is None else self.authenticate(headers)
        return headers, principal

    async def speech(self, body: Mapping[str, Any], *, api_key: str | None = None) -> Speech:
        """Text-to-speech on a model group whose deployments serve ``/v1/audio/speech``:
        retried and failed over until the first audio byte, then an async iterator of audio
        chunks (``KeelError`` if it breaks after that). Leaving it closes the upstream."""
        from keel.engine._speech import speech

        headers = {} if api_key is None else {"authorization": f"Bearer {api_key}"}
        principal = None if api_key is None else self.authenticate(headers)
        return await speech(self, body, principal, headers)

    def transport(self) -> httpx.AsyncBaseTransport:
        """An ``httpx`` transport that calls the engine in-process (no socket, no HTTP
        parsing) and answers exactly as ``keel serve`` would: hand it to an SDK's
        ``http_client=httpx.AsyncClient(transport=gw.transport())``."""
        from keel.gateway._transport import KeelTransport

        return KeelTransport(self)

    def models(self, principal: Principal | None = None) -> list[dict[str, Any]]:
        """The model groups (those ``principal`` may use, when its key is restricted)."""
        created = int(time.time())
        allowed = principal.models if principal is not None else None
        return [
            {"id": name, "object": "model", "created": created, "owned_by": "keel"}
            for name in self.router.groups
            if allowed is None or name in allowed
        ]

    # -- for operators (keel.engine._snapshot, keel.engine._reload) ------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Every model group and deployment: state, load, latency, errors, recent failures
        (what ``GET /admin/state`` and the status page show)."""
        from keel.engine._snapshot import snapshot

        return snapshot(self)

    def readiness(self) -> dict[str, str]:
        """Model group → why no deployment could take a request for it now (empty: ready)."""
        from keel.engine._snapshot import readiness

        return readiness(self)

    def reload(self, config: GatewayConfig | None = None) -> dict[str, Any]:
        """Apply a new config (default: re-read ``config_path``) without dropping requests in
        flight; returns what changed (``keel.engine._reload``)."""
        from keel.engine._reload import reload

        return reload(self, config)

    def model(self, name: str, principal: Principal | None = None) -> dict[str, Any]:
        """One model group as a model object (``GET /v1/models/{id}``); a 404
        ``model_not_found`` for a name that is no group, or one ``principal`` may not use."""
        self.check_model(name, principal)
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "keel"}

    def check_model(self, model: str, principal: Principal | None) -> None:
        """A 404 ``model_not_found`` unless ``model`` is a group ``principal`` may use."""
        if model not in self.router:
            raise KeelError(
                404,
                f"The model '{model}' does not exist on this gateway. "
                f"Available: {', '.join(sorted(self.router.groups))}.",
                code="model_not_found",
                param="model",
            )
        if principal is not None and principal.models is not None and model not in principal.models:
            # As OpenAI answers for a model the key may not use: 404, naming what it may.
            raise KeelError(
                404,
                f"The model '{model}' does not exist or key '{principal.name}' may not use "
                f"it. Available: {', '.join(sorted(principal.models & set(self.router.groups)))}.",
                code="model_not_found",
                param="model",
            )

    # -- what every door does ---------------------------------------------------------------------

    def request_id(self) -> str:
        self._seq += 1
        return f"{self._id_prefix}{self._seq:x}"

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        return self.authenticator.authenticate(headers)

    def call(
        self,
        raw: bytes | Mapping[str, Any],
        principal: Principal,
        headers: Mapping[str, str],
        rid: str,
        op: Operation = CHAT,
    ) -> Call:
        """The request to ``op``'s endpoint, checked (a 4xx ``KeelError`` naming the problem
        otherwise), with its deadline, priority and cost."""
        body = op.parse(raw) if isinstance(raw, bytes) else op.check(dict(raw))
        model = body["model"]
        if model not in self.router.groups or (
            principal.models is not None and model not in principal.models
        ):
            self.check_model(model, principal)  # the 404 that says why
        meter = principal.meter
        if meter is not None:
            meter.check()  # a 429 when its budget is spent
        priority = self.admission.priority(headers, principal)
        settings = self.settings
        # The engine's loop once started (asyncio.get_running_loop() makes a getpid syscall
        # per call in CPython 3.11, to notice a fork).
        deadlines = self.deadlines
        now = (deadlines.loop if deadlines is not None else asyncio.get_running_loop()).time()
        deadline = now + settings.deadline
        streaming = op.streams and bool(body.get("stream"))
        wants_usage = False
        if streaming:
            opts = body.get("stream_options")
            wants_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
            if meter is not None and not wants_usage:
                # Spend needs the upstream's count; the client still gets no usage chunk.
                opts = opts if isinstance(opts, dict) else {}
                body = {**body, "stream_options": {**opts, "include_usage": True}}
        if not streaming:
            patience = _client_patience(headers)
            if patience is not None and now + patience < deadline:
                deadline = now + patience
        max_wait = settings.batch_max_wait if priority == "batch" else settings.interactive_max_wait
        # Arguments by position, in the order of Call's fields: a class called with keywords
        # gathers them into a dict first (per request: ~0.7 µs for a call of ten).
        call = Call(
            rid, body, model, streaming, principal, PRIORITIES[priority], max_wait, deadline,
            wants_usage, op,
        )  # fmt: skip
        if self.observers:
            call.record = new_record(call, headers, self.log_bodies)
        return call

    def library_call(
        self, body: Mapping[str, Any], stream: bool, api_key: str | None, op: Operation = CHAT
    ) -> Call:
        headers, principal = self._library_principal(api_key)
        # An endpoint that never streams gets no "stream" key (OpenAI's would refuse it).
        body = {**body, "stream": stream} if op.streams else dict(body)
        return self.call(body, principal, headers, self.request_id(), op)

    async def admit(self, call: Call) -> None:
        """Book the client's limits (a 429 ``KeelError`` when over them)."""
        call.ticket = await self.admission.admit(call.principal, call)

    def admit_local(self, call: Call) -> None:
        """``admit`` without Redis: a plain call (a coroutine per request costs more than the
        booking itself)."""
        call.ticket = self.admission.admit_local(call.principal, call)

    def done(self, call: Call) -> None:
        """The request is over: free the client's concurrency, reconcile its tokens."""
        self.admission.done(call.principal, call.ticket, call.usage)
        meter = call.principal.meter
        if meter is not None:
            meter.charge(call)
        record = call.record
        if record is not None:
            record.close(call)
            for obs in self.observers:
                obs.finished(record)

    def refused(self, rid: str, err: KeelError, headers: Mapping[str, str]) -> None:
        """A request refused before it became a ``Call`` (its key, its body, its client's
        limits): observers still see it."""
        if self.observers:
            record = refused_record(rid, err, headers)
            for obs in self.observers:
                obs.finished(record)

    def plan(self, call: Call) -> Plan[Deployment]:
        """The attempt plan of one request."""
        router = self.router
        body = call.body
        model = call.model
        hedge = self.hedges.get(model) if call.stream else None
        spliceable = call.op.continues and body.get("n") in (None, 1)
        token_limit = _token_limit(body) if call.stream else None
        # By position, in the order of Plan's fields: groups, order, has_room, policy, budget,
        # deadline, max_wait, hedge, spliceable, token_limit, queued (as ``Call`` in ``call``).
        return Plan(
            router.plan(model), router.order, _has_room, self.policies[model], self.budget,
            call.deadline, call.max_wait, hedge, spliceable, token_limit, holds_back,
        )  # fmt: skip

    def upstream_body(self, body: Mapping[str, Any], dep: Deployment) -> bytes:
        return orjson.dumps({**body, "model": dep.model})

    def attempt_headers(self, call: Call, plan: Plan[Deployment]) -> dict[str, str]:
        """Response headers that tell the client how its request was served."""
        h = {"x-request-id": call.rid, "x-keel-attempts": str(plan.count)}
        if plan.last is not None:
            h["x-keel-deployment"] = plan.last.name
        return h


def hedge_policy(group: ModelGroup) -> HedgePolicy:
    h = group.hedge
    return HedgePolicy(
        after=h.after, percentile=h.percentile, min_after=h.min_after, max_ratio=h.max_ratio
    )


def policies(config: GatewayConfig) -> dict[str, Policy]:
    """Each model group's retry policy."""
    r = config.retry
    return {
        name: Policy(
            max_attempts=r.max_attempts,
            max_retries_per_deployment=r.max_retries_per_deployment,
            backoff_base=r.backoff_base,
            backoff_cap=r.backoff_cap,
            max_retry_wait=r.max_retry_wait,
            quota_cooldown=r.quota_cooldown,
            auth_cooldown=r.auth_cooldown,
            on_content_filter=g.on_content_filter,
        )
        for name, g in config.models.items()
    }


def _token_limit(body: Mapping[str, Any]) -> int | None:
    """The client's limit on answer tokens (what a continuation may still spend)."""
    limits = [v for k in ("max_tokens", "max_completion_tokens") if type(v := body.get(k)) is int]
    return min(limits) if limits else None


def _has_room(dep: Deployment) -> bool:
    return dep.limiter.has_capacity(time.monotonic())


def _client_patience(headers: Mapping[str, str]) -> float | None:
    """How long the client will wait for a non-stream answer, when it says so: the official
    OpenAI SDKs send their read timeout as ``x-stainless-read-timeout`` (nothing arrives
    before a non-stream answer, so it bounds the whole request). keel gives up a little
    before that with an OpenAI-shaped error and closes the upstream attempt, instead of
    working on for an answer nobody will read."""
    raw = headers.get("x-stainless-read-timeout")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        return None
    if not seconds > 0 or seconds == float("inf"):  # also rejects NaN
        return None
    return seconds - min(_PATIENCE_MARGIN, 0.1 * seconds)
