"""The simulator's HTTP server: an OpenAI-compatible chat endpoint with fault injection.

Request path: read and validate the body -> work out the conversation (plain, prefill or
instruct continuation, tool call) -> choose the faults (allow-list, concurrency, key fault,
forced directives, seeded draw - first match wins) -> reply with an error, a reset, or a planned
body (``_stream.py``) executed op by op. Runs with ``handler_cancellation=True`` so a client that
leaves cancels its handler; all bookkeeping happens in ``finally``.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import orjson
from aiohttp import web

from keel.sim._answer import DEFAULT_LENGTH, prompt_tokens, strip_directives
from keel.sim._compose import completion_json, compose, stream_deltas, turn_of
from keel.sim._errors import (
    WALL_WORDINGS,
    ErrorReply,
    bad_request,
    error_reply,
    key_fingerprint,
    non_stream_mid_error,
    wall_reply,
)
from keel.sim._faults import (
    TERMINAL,
    AttemptCounter,
    DirectiveError,
    Directives,
    Fault,
    draw,
    parse_directives,
    parse_header,
    parse_key_faults,
    parse_rates,
)
from keel.sim._log import LogEntry, RequestLog
from keel.sim._responses import (
    ResponseSpec,
    Stored,
    chat_view,
    not_found,
    response_json,
    responses_plan,
)
from keel.sim._stream import (
    KEEPALIVE_INTERVAL,
    Abort,
    Op,
    Sleep,
    Stall,
    StreamSpec,
    Write,
    body_plan,
    stream_plan,
)
from keel.sim._window import RequestWindow

# keel's dialects; the last three answer like openai except where _errors aliases a name.
DIALECTS = ("openai", "dashscope", "anthropic", "azure", "deepseek", "moonshot", "vllm")
_WALLS = ("concurrency", "window")  # what --max-concurrency / --rate-limit answer with
_MID_ERRORS = ("err_mid", "inspect_mid", "anth_err_mid")
_SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",  # tell nginx-style proxies not to batch the stream
}


def _api_key(request: web.Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth and auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("api-key") or request.headers.get("x-api-key")


class Simulator:
    """An in-process simulator. ``base_url = await sim.start()``; ``await sim.stop()``."""

    def __init__(
        self,
        name: str = "sim",
        dialect: str = "openai",
        faults: str | None = None,
        seed: int = 0,
        length: int = DEFAULT_LENGTH,
        token_delay: float = 0.0,
        first_token_delay: float = 0.0,
        max_concurrency: int = 0,
        rate_limit: int = 0,
        rate_window: float = 60.0,
        rate_sliding: bool = False,
        wall_wording: str = "default",
        latency: float = 0.0,
        key_faults: str | Mapping[str, str] | None = None,
        keys: Iterable[str] | str | None = None,
        models: Iterable[str] = ("sim-model",),
        audio_chunk: int = 1024,
        audio_delay: float = 0.0,
    ) -> None:
        self.name = name
        self.models = list(models)
        self.base_url = ""
        self._log = RequestLog()
        self._counter = AttemptCounter()
        self._stored = Stored()  # /v1/responses: the ids a previous_response_id may name
        self._rid = os.urandom(4).hex()
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.dialect = "openai"
        self.rates: tuple[tuple[str, float], ...] = ()
        self.seed = seed
        self._rng = random.Random(seed)
        self.length = length
        self.token_delay = token_delay
        self.first_token_delay = first_token_delay
        self.max_concurrency = max_concurrency
        self.window = RequestWindow(
            rate_limit, rate_window, rate_sliding
        )  # --rate-limit/--rate-window
        self.wall_wording = "default"  # how the walls' 429s read (_errors.WALL_WORDINGS)
        self.latency = latency  # seconds before every successful answer's headers
        self.key_faults: dict[str, Fault] = {}
        self.keys: frozenset[str] = frozenset()
        self.audio_chunk = audio_chunk  # /v1/audio/speech: bytes per chunk (keel.sim._speech)
        self.audio_delay = audio_delay  # seconds before each chunk after the first
        self.configure(
            dialect=dialect,
            faults=faults or "",
            key_faults=key_faults,
            keys=keys,
            wall_wording=wall_wording,
        )

    # -- configuration ------------------------------------------------------------------------

    def configure(
        self,
        *,
        faults: str | None = None,
        seed: int | None = None,
        max_concurrency: int | None = None,
        rate_limit: int | None = None,
        rate_window: float | None = None,
        rate_sliding: bool | None = None,
        wall_wording: str | None = None,
        latency: float | None = None,
        token_delay: float | None = None,
        first_token_delay: float | None = None,
        length: int | None = None,
        key_faults: str | Mapping[str, str] | None = None,
        keys: Iterable[str] | str | None = None,
        dialect: str | None = None,
        audio_chunk: int | None = None,
        audio_delay: float | None = None,
    ) -> dict[str, Any]:
        """Change settings at run time (None = unchanged; ``faults=""`` = none). Setting
        ``faults`` or ``seed`` restarts the seeded fault sequence."""
        if dialect is not None:
            if dialect not in DIALECTS:
                raise ValueError(f"unknown dialect {dialect!r}; expected one of {DIALECTS}")
            self.dialect = dialect
        if faults is not None:
            self.rates = parse_rates(faults)
        if seed is not None:
            self.seed = seed
        if faults is not None or seed is not None:
            self._rng = random.Random(self.seed)
        if key_faults is not None:
            if not isinstance(key_faults, str):
                key_faults = ",".join(f"{k}={v}" for k, v in key_faults.items())
            self.key_faults = parse_key_faults(key_faults)
        if keys is not None:
            items = keys.split(",") if isinstance(keys, str) else keys
            self.keys = frozenset(k.strip() for k in items if k.strip())
        if max_concurrency is not None:
            self.max_concurrency = max_concurrency
        if wall_wording is not None:
            if wall_wording not in WALL_WORDINGS:
                raise ValueError(
                    f"unknown wall wording {wall_wording!r}; expected one of {WALL_WORDINGS}"
                )
            self.wall_wording = wall_wording
        if rate_limit is not None or rate_window is not None or rate_sliding is not None:
            self.window = RequestWindow(
                self.window.limit if rate_limit is None else rate_limit,
                self.window.seconds if rate_window is None else rate_window,
                self.window.sliding if rate_sliding is None else bool(rate_sliding),
            )
        if latency is not None:
            self.latency = latency
        if token_delay is not None:
            self.token_delay = token_delay
        if first_token_delay is not None:
            self.first_token_delay = first_token_delay
        if length is not None:
            self.length = length
        if audio_chunk is not None:
            self.audio_chunk = audio_chunk
        if audio_delay is not None:
            self.audio_delay = audio_delay
        return self.config()

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dialect": self.dialect,
            "faults": ",".join(f"{n}={p:g}" for n, p in self.rates),
            "seed": self.seed,
            "length": self.length,
            "token_delay": self.token_delay,
            "first_token_delay": self.first_token_delay,
            "max_concurrency": self.max_concurrency,
            "rate_limit": self.window.limit,
            "rate_window": self.window.seconds,
            "rate_sliding": self.window.sliding,
            "wall_wording": self.wall_wording,
            "latency": self.latency,
            "key_faults": len(self.key_faults),  # keys are secrets: count only
            "keys": len(self.keys),
            "models": self.models,
            "audio_chunk": self.audio_chunk,
            "audio_delay": self.audio_delay,
        }

    # -- lifecycle and introspection ----------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        r = app.router
        r.add_post("/v1/chat/completions", self._chat)
        r.add_post("/chat/completions", self._chat)
        r.add_post("/openai/deployments/{deployment}/chat/completions", self._chat)  # Azure
        r.add_post("/v1/embeddings", self._embeddings)
        r.add_post("/embeddings", self._embeddings)
        r.add_post("/openai/deployments/{deployment}/embeddings", self._embeddings)  # Azure
        r.add_post("/v1/completions", self._completions)
        r.add_post("/completions", self._completions)
        r.add_post("/openai/deployments/{deployment}/completions", self._completions)
        r.add_post("/v1/responses", self._responses)  # keel.sim._responses
        r.add_post("/responses", self._responses)
        r.add_post("/v1/audio/speech", self._speech)
        r.add_post("/audio/speech", self._speech)
        r.add_get("/v1/models", self._models)
        r.add_get("/_sim/log", self._get_log)
        r.add_delete("/_sim/log", self._delete_log)
        r.add_get("/_sim/stats", self._get_stats)
        r.add_get("/_sim/config", self._get_config)
        r.add_post("/_sim/config", self._post_config)
        r.add_post("/_sim/reset", self._post_reset)
        r.add_get("/_sim/health", self._health)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 = a free port); returns the base URL ending in ``/v1``."""
        self._stopping = asyncio.Event()
        runner = web.AppRunner(
            self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await runner.setup()
        await web.TCPSite(runner, host, port, backlog=1024, reuse_address=True).start()
        self._runner = runner
        bound_port = runner.addresses[0][1]
        url_host = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{url_host}:{bound_port}/v1"
        return self.base_url

    async def stop(self) -> None:
        self._stopping.set()  # releases stalled handlers
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def log(self) -> list[LogEntry]:
        return self._log.since(0)

    def log_since(self, seq: int) -> list[LogEntry]:
        return self._log.since(seq)

    def stats(self) -> dict[str, Any]:
        return self._log.stats()

    def clear_log(self) -> None:
        self._log.clear()

    def reset(self) -> None:
        """Clear the log, statistics and ``*K`` counters; restart the seeded fault sequence."""
        self._log.reset()
        self._counter.clear()
        self._rng = random.Random(self.seed)

    async def wait_for(
        self,
        predicate: Callable[[list[LogEntry]], bool],
        timeout: float = 5.0,  # noqa: ASYNC109 - a test helper; a deadline is its whole point
    ) -> list[LogEntry]:
        """Wait until ``predicate(log)`` holds (checked whenever a request opens or closes)."""
        await self._log.wait_for(lambda: predicate(self.log), timeout)
        return self.log

    # -- admin endpoints ----------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "keel-sim"} for m in self.models
        ]
        return _json({"object": "list", "data": data})

    async def _get_log(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0") or 0)
        return _json([e.to_dict() for e in self._log.since(since)])

    async def _delete_log(self, request: web.Request) -> web.Response:
        self._log.clear()
        return _json({"ok": True})

    async def _get_stats(self, request: web.Request) -> web.Response:
        return _json(self._log.stats())

    async def _get_config(self, request: web.Request) -> web.Response:
        return _json(self.config())

    async def _post_config(self, request: web.Request) -> web.Response:
        try:
            return _json(self.configure(**orjson.loads(await request.read())))
        except (TypeError, ValueError) as e:
            return _reply(bad_request(f"bad sim config: {e}"), "")

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json({"ok": True})

    async def _health(self, request: web.Request) -> web.Response:
        return _json({"ok": True, "name": self.name})

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        from keel.sim._speech import speech

        return await speech(self, request)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        from keel.sim._embeddings import embeddings

        return await self._logged(request, "embeddings", embeddings)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        from keel.sim._completions import completions

        return await self._logged(request, "completions", completions)

    # -- what every endpoint does -------------------------------------------------------------

    async def _logged(
        self,
        request: web.Request,
        kind: str,
        handle: Callable[[Simulator, web.Request, LogEntry], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """``handle`` a request of ``kind`` with its log entry: opened as it arrives, closed
        however it ends (handler cancellation: the client went away)."""
        entry = self._log.open(self.name)
        entry.kind = kind
        entry.request_id = f"req_{self._rid}{entry.seq}"
        try:
            return await handle(self, request, entry)
        except asyncio.CancelledError:
            entry.client_disconnected = True
            raise
        finally:
            self._log.close(entry)

    async def _body(self, request: web.Request, entry: LogEntry) -> dict[str, Any] | web.Response:
        """The request's JSON object, or the 400 that says it is none (the entry also learns
        the key's fingerprint)."""
        entry.key = key_fingerprint(_api_key(request))
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._error(entry, bad_request("request body is not valid JSON"))
        if not isinstance(body, dict):
            return self._error(entry, bad_request("request body must be a JSON object"))
        return body

    async def _faults(
        self,
        request: web.Request,
        entry: LogEntry,
        prompt: str,
        d: Directives,
        n: int,
        model: str,
    ) -> dict[str, float] | web.Response:
        """The faults this request gets (``n``: its answer's chunks): the reply of an error
        or a reset; else the faults inside the answer ({name: parameter}), once the waits
        before the headers (``slow_first``, ``latency``) are over."""
        api_key = _api_key(request)
        faults = self._choose_faults(api_key, prompt, d, n, entry.t_open)
        if faults:
            entry.fault = ",".join(f.name for f in faults)
        refusal = self._refusal(request, entry, faults, api_key, model)
        if refusal is not None:
            return refusal
        active = {f.name: f.param() for f in faults if f.spec.phase == "stream"}
        if "slow_first" in active:
            await asyncio.sleep(active["slow_first"])
        if self.latency:
            await asyncio.sleep(self.latency)
        return active

    def _directives(self, request: web.Request, text: str) -> Directives:
        """The faults and settings asked for in ``text`` and the ``x-sim-fault`` header
        (DirectiveError for a malformed one)."""
        d = parse_directives(text, self.name) or Directives()
        header = request.headers.get("x-sim-fault")
        if header and (more := parse_header(header, self.name)):
            d.update(more)
        return d

    # -- chat completions ---------------------------------------------------------------------

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        return await self._chat(request, responses=True)

    async def _chat(self, request: web.Request, responses: bool = False) -> web.StreamResponse:
        entry = self._log.open(self.name)
        entry.request_id = f"req_{self._rid}{entry.seq}"
        if responses:
            entry.kind = "responses"
        try:
            return await self._handle(request, entry, responses)
        except asyncio.CancelledError:  # handler cancellation: the client went away
            entry.client_disconnected = True
            raise
        finally:
            self._log.close(entry)

    async def _handle(
        self, request: web.Request, entry: LogEntry, responses: bool = False
    ) -> web.StreamResponse:
        rid = entry.request_id
        api_key = _api_key(request)
        entry.key = key_fingerprint(api_key)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._error(entry, bad_request("request body is not valid JSON"))
        native = body if responses and isinstance(body, dict) else None
        if native is not None:  # a Responses request, read as the chat body it amounts to
            view = chat_view(native)
            if isinstance(view, str):
                return self._error(entry, bad_request(view))
            body = view
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            return self._error(entry, bad_request("'messages' must be a non-empty array"))
        model = str(body.get("model") or request.match_info.get("deployment") or self.models[0])
        entry.model, entry.stream = model, bool(body.get("stream"))
        entry.messages = len(messages)

        turn = turn_of(messages)
        try:
            d = parse_directives(turn.user, self.name) or Directives()
            if turn.marker and (more := parse_directives(turn.marker, self.name)):
                d.update(more)
            header = request.headers.get("x-sim-fault")
            if header and (more := parse_header(header, self.name)):
                d.update(more)
        except DirectiveError as e:
            return self._error(entry, bad_request(str(e)))
        prompt = strip_directives(turn.user)
        entry.prompt = prompt[:80]
        if native is not None:  # what it stores, and what a previous_response_id names
            previous = native.get("previous_response_id")
            if previous is not None and previous not in self._stored:
                return self._error(entry, ErrorReply(400, not_found(previous)))
            if native.get("store") is not False:
                self._stored.add(f"resp_{rid[4:]}")
        answer = compose(body, turn, d, prompt, self.length)
        entry.tool_call = answer.call is not None
        entry.continuation, entry.continuation_kind = bool(answer.continuation), answer.continuation

        active = await self._faults(request, entry, prompt, d, len(answer.pieces), model)
        if not isinstance(active, dict):
            return active  # an error or a reset
        limit_headers = self.window.headers(entry.t_open) if self._limit_headers() else {}

        n = len(answer.pieces)
        p = prompt_tokens(m for m in messages if isinstance(m, dict))
        usage = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
        chunk_id = f"chatcmpl-{rid[4:]}"
        complete = not any(name in TERMINAL for name in active)
        if entry.stream:
            role, deltas = stream_deltas(answer)
            opts = body.get("stream_options")
            spec = StreamSpec(
                chunk_id=chunk_id,
                request_id=rid,
                created=int(time.time()),
                model=model,
                role_delta=role,
                deltas=deltas,
                finish_reason=answer.finish,
                usage=usage if isinstance(opts, dict) and opts.get("include_usage") else None,
                token_delay=d.delay if d.delay is not None else self.token_delay,
                first_delay=self.first_token_delay + active.get("slow_token", 0.0),
            )
            if native is not None:
                rspec = ResponseSpec(
                    f"resp_{rid[4:]}", spec.created, model, answer, usage,
                    spec.token_delay, spec.first_delay,
                )  # fmt: skip
                plan = responses_plan(rspec, active)
            else:
                plan = stream_plan(spec, active)
            resp = web.StreamResponse(headers=_SSE_HEADERS | {"x-request-id": rid} | limit_headers)
        else:
            for name in _MID_ERRORS:
                if name in active:
                    return self._error(entry, non_stream_mid_error(name, chunk_id, rid))
            if "stall" in active or "stall_ka" in active:
                await self._stopping.wait()  # silent before the headers, until the client leaves
                return _reset(request)
            finish: str | bool | None = True
            if "no_finish" in active or "null_finish" in active or "empty_finish" in active:
                finish = False if "no_finish" in active else None if "null_finish" in active else ""
            if native is not None:
                data = response_json(
                    ResponseSpec(f"resp_{rid[4:]}", int(time.time()), model, answer, usage)
                )
            else:
                data = completion_json(
                    answer, chunk_id=chunk_id, created=int(time.time()), model=model,
                    usage=usage, finish=finish,
                )  # fmt: skip
            if "garbage_fatal" in active:
                data, complete = data[: len(data) // 2], False
            complete = complete and "trunc" not in active and "trunc_mid" not in active
            plan = body_plan(data, active)
            resp = web.StreamResponse(
                headers={"content-type": "application/json", "x-request-id": rid, **limit_headers}
            )
            resp.content_length = len(data)
            entry.tokens = n  # counted up front; a truncated body shows finished=False
        await resp.prepare(request)
        entry.status = 200
        if await self._run(request, resp, plan, entry, count_tokens=entry.stream):
            entry.finished = complete
        return resp

    def _refusal(
        self,
        request: web.Request,
        entry: LogEntry,
        faults: list[Fault],
        api_key: str | None,
        model: str,
    ) -> web.Response | None:
        """The reply of an error or a reset among ``faults``; None: the answer goes ahead."""
        rid = entry.request_id
        for f in faults:
            if f.name in _WALLS and self.wall_wording != "default":
                return self._error(entry, self._wall(f, model, rid, entry.t_open))
            if f.spec.phase == "error":
                reply = error_reply(
                    f.name, f.value, self.dialect, api_key=api_key, model=model, request_id=rid
                )
                return self._error(entry, reply)
            if f.spec.phase == "reset":
                return _reset(request)
        return None

    def _limit_headers(self) -> bool:
        """Do answers carry x-ratelimit-* headers? OpenAI sends them; DashScope and a bare
        proxy do not, so a client must learn their limits from the refusals alone."""
        return self.wall_wording in ("default", "openai")

    def _wall(self, f: Fault, model: str, rid: str, now: float) -> ErrorReply:
        reply = wall_reply(f.name, self.wall_wording, f.param(), model=model, request_id=rid)
        if f.name == "window" and self._limit_headers():
            reply.headers.update(self.window.headers(now))
        return reply

    def _choose_faults(
        self, api_key: str | None, prompt: str, d: Directives, n: int, now: float
    ) -> list[Fault]:
        """First match wins: allow-list, concurrency limit, key fault, forced (header or
        directives, after the ``*K`` counters), seeded draw. A request whose forced faults are
        all used up gets none - ``[[sim:r429*1]]`` means "then succeed", whatever the odds."""
        if self.keys and api_key not in self.keys:
            return [Fault("auth")]
        if self.max_concurrency and self._log.in_flight > self.max_concurrency:
            return [Fault("concurrency")]
        if (wait := self.window.admit(now)) is not None:
            return [Fault("window", wait)]
        if api_key is not None and (kf := self.key_faults.get(api_key)) is not None:
            return [kf]
        drawn = draw(self.rates, self._rng, n) if self.rates else None
        forced = [f for f in d.faults if self._counter.allow(prompt, f)]
        if forced or d.faults:
            return forced
        return [drawn] if drawn is not None else []

    async def _run(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        plan: list[Op],
        entry: LogEntry,
        count_tokens: bool,
    ) -> bool:
        """Execute a plan; True when the body was closed normally."""
        try:
            return await self._execute(request, resp, plan, entry, count_tokens)
        except ConnectionResetError:  # a write found the connection already gone
            entry.client_disconnected = True
            return False

    async def _execute(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        plan: list[Op],
        entry: LogEntry,
        count_tokens: bool,
    ) -> bool:
        for op in plan:
            if isinstance(op, Write):
                await resp.write(op.data)
                if count_tokens:
                    entry.tokens += op.tokens
            elif isinstance(op, Sleep):
                await asyncio.sleep(op.seconds)
            elif isinstance(op, Abort):
                transport = request.transport
                if transport is not None:
                    if op.tail:  # an HTTP chunk header promising more than we send
                        transport.write(b"%x\r\n" % op.claimed + op.tail)
                    transport.abort()
                return False
            elif isinstance(op, Stall):
                if op.keepalive is None:
                    await self._stopping.wait()
                else:
                    while not self._stopping.is_set():
                        await asyncio.sleep(KEEPALIVE_INTERVAL)
                        await resp.write(op.keepalive)
                if request.transport is not None:
                    request.transport.abort()
                return False
        await resp.write_eof()
        return True

    def _error(self, entry: LogEntry, reply: ErrorReply) -> web.Response:
        entry.status = reply.status
        return _reply(reply, entry.request_id)


def _reply(reply: ErrorReply, request_id: str) -> web.Response:
    headers = {**reply.headers, "content-type": reply.content_type}
    if request_id:
        headers["x-request-id"] = request_id
    return web.Response(status=reply.status, body=reply.body, headers=headers)


def _json(obj: Any) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


def _reset(request: web.Request) -> web.Response:
    """Drop the connection with a TCP RST (SO_LINGER 0) before any response byte."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass  # still aborts, just with a FIN instead of a RST
        transport.abort()
    return web.Response()
