"""The streaming request path: attempts whose frames reach the client through the relay.

One ``StreamSession`` per client request. Its attempts are driven by the attempt loop like any
other; what is special about streams lives here:

* **commit** — nothing reaches the client before the first content token (or the configured
  commit buffer), so early failures are retried invisibly;
* **continuation** — after the commit, a failed attempt is followed by one that *continues*
  the answer (``keel._splice``); its frames are spliced in with the committed stream's
  id/created/model, without a second role chunk, with overlap trimmed, so the client sees one
  uninterrupted stream with one role chunk, one terminal chunk, one usage chunk, one [DONE];
* **hedging** — a second attempt races a late first token (``keel.gateway._hedge``).

The first attempt's frames are relayed as the upstream's own bytes: no re-serialisation on the
happy path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from keel._assembly import Frame, FrameKind, StreamAssembler
from keel._classify import ErrorKind
from keel._splice import OverlapTrimmer, continuation_body
from keel.gateway._attempts import Attempts, Exhausted, _bench_for, run_attempts
from keel.gateway._deployment import Deployment
from keel.gateway._errors import Tried, exhausted_response, final_error
from keel.gateway._limits import Permit, release, try_acquire
from keel.gateway._relay import ClientGone, Meta, StreamRelay, frame_bytes, keel_chunk
from keel.gateway._upstream import AttemptFailed, FrameReader, post

if TYPE_CHECKING:
    from keel.gateway._app import Gateway

log = logging.getLogger("keel.gateway")

_CHUNK = FrameKind.CHUNK


def stream(
    request: web.Request, gw: Gateway, rid: str, body: dict[str, Any], state: Attempts
) -> Coroutine[Any, Any, web.StreamResponse]:
    # A plain function handing back the session's coroutine: no extra coroutine frame for
    # every read of the stream to resume through.
    return StreamSession(request, gw, rid, body, state).run()


class _Lost(Exception):
    """A hedged attempt whose rival committed first."""


@dataclasses.dataclass(slots=True)
class _Pending:
    """One attempt's frames before the commit: nobody has seen them yet."""

    frames: list[bytes] = dataclasses.field(default_factory=list)
    texts: list[str] = dataclasses.field(default_factory=list)
    first_at: float = 0.0


class StreamSession:
    def __init__(
        self, request: web.Request, gw: Gateway, rid: str, body: dict[str, Any], state: Attempts
    ) -> None:
        self.gw = gw
        self.rid = rid
        self.body = body
        self.state = state
        self.group_name: str = body["model"]
        self.group = gw.config.models[self.group_name]
        self.relay = StreamRelay(request, {"x-request-id": rid})
        opts = body.get("stream_options")
        self.wants_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
        # Splicing is defined for one choice; n > 1 streams restart only before the commit.
        self.can_splice = body.get("n") in (None, 1)
        # What the client has been shown (the transcript), across attempts.
        self.sent: list[str] = []
        self.tokens = 0
        self.meta: Meta = (None, None, None)
        self.continued = False  # a continuation attempt contributed to the stream
        self.tool_calls = False
        # Usage across attempts.
        self.usage_frame: bytes | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        # Hedging: the racing attempts, so the winner can cancel the rest at its commit.
        self.hedge = gw.hedges.get(self.group_name)
        self._racers: list[asyncio.Task[None]] = []
        self._owner: asyncio.Task[Any] | None = None  # the attempt that committed the stream

    # -- the loop's view ------------------------------------------------------------------------

    async def run(self) -> web.StreamResponse:
        gw = self.gw
        if self.hedge is not None:
            self.hedge.on_request()
        try:
            try:
                await run_attempts(
                    self.group_name,
                    gw.router,
                    gw.config.retry,
                    gw.budget,
                    self.state,
                    # Unhedged groups skip attempt()'s frame: every read resumes through it.
                    self.attempt if self.hedge is not None else self._attempt,
                    self.eligible,
                )
            except Exhausted as exc:
                if not self.relay.committed:
                    return exhausted_response(self.rid, self.state, exc)
                _, err_body, _ = final_error(exc.tried, exc.reason)
                await self.relay.end_with_error(err_body)
        except ClientGone:
            # Normal, not an error: nobody is left to answer. The upstream is closed already.
            log.debug("request %s: the client went away mid-stream", self.rid)
        assert self.relay.response is not None
        return self.relay.response

    def eligible(self, dep: Deployment) -> bool:
        """Before the commit anyone may answer; after it only deployments that can continue,
        and never inside a tool call (arguments cannot be spliced safely)."""
        if not self.relay.committed:
            return True
        return self.can_splice and not self.tool_calls and dep.continuation != "none"

    async def attempt(self, dep: Deployment) -> None:
        """One attempt for the loop — hedged when the group hedges and nothing is committed."""
        delay = self.hedge.delay() if self.hedge is not None else None
        if delay is None or self.relay.committed:
            return await self._attempt(dep)
        return await self._hedged(dep, delay)

    # -- hedging --------------------------------------------------------------------------------

    async def _hedged(self, dep: Deployment, delay: float) -> None:
        """Race a second deployment when the first token is late. The first attempt to commit
        wins and cancels the other (its upstream connection closes in its ``finally``)."""
        assert self.hedge is not None
        first = asyncio.create_task(self._attempt(dep))
        self._racers = [first]
        try:
            done, _ = await asyncio.wait({first}, timeout=delay)
            alt = None if done or self.relay.committed else self._hedge_target(dep)
            if alt is None or not self.hedge.can_hedge():
                return await first
            # A hedge is opportunistic: it goes only if the alternate's limiter (and breaker)
            # let it through at once, and it counts against its limits like any attempt.
            permit = try_acquire(alt, self.state.cost, time.monotonic())
            if permit is None:
                return await first
            self.hedge.try_hedge()
            second = asyncio.create_task(self._attempt(alt))
            self._racers.append(second)
            self.state.count += 1
            alt.in_flight += 1
            second.add_done_callback(lambda task: _hedge_done(alt, permit, task))
            failure: AttemptFailed | None = None
            pending = {first, second}
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception() if not task.cancelled() else None
                    if exc is None and not task.cancelled():
                        if task is second:
                            self.state.last = alt
                        return None
                    if isinstance(exc, AttemptFailed):
                        if task is second:
                            self.state.tried.append(Tried(alt.name, exc.error))
                            policy = self.gw.config.retry
                            alt.record_failure(exc.error, bench_for=_bench_for(exc.error, policy))
                        failure = exc if task is first or failure is None else failure
                    elif exc is not None and not isinstance(exc, _Lost):
                        raise exc
            assert failure is not None
            raise failure
        finally:
            for task in self._racers:
                task.cancel()
            for task in self._racers:
                with contextlib.suppress(BaseException):
                    await task
            self._racers = []

    def _hedge_target(self, busy: Deployment) -> Deployment | None:
        for dep in self.gw.router.order(self.group_name):
            if dep is not busy and self.eligible(dep):
                return dep
        return None

    # -- one attempt ----------------------------------------------------------------------------

    async def _attempt(self, dep: Deployment) -> None:
        continuing = self.relay.committed
        if continuing:
            cont = continuation_body(
                self.body,
                "".join(self.sent),
                dep.continuation,  # type: ignore[arg-type]
                dep.dialect,
                self.tokens,
            )
            if cont is None:  # the cut fell exactly on the client's token limit
                await self._end([self._finish_chunk("length")])
                return
            if self.wants_usage:
                opts = {**(cont.get("stream_options") or {}), "include_usage": True}
                cont["stream_options"] = opts
            payload = orjson.dumps({**cont, "model": dep.model})
            self.continued = True
            trimmer = OverlapTrimmer("".join(self.sent)) if dep.continuation == "instruct" else None
        else:
            payload = self.gw.upstream_body(self.body, dep)
            trimmer = None
        loop = asyncio.get_running_loop()
        started = loop.time()
        first_deadline = started + dep.timeouts.first_token
        gw = self.gw
        assert gw.session is not None and gw.deadlines is not None
        resp = await post(gw.session, dep, payload, self.state.deadline, gw.deadlines)
        asm = StreamAssembler(dialect=dep.dialect, require_done=True)
        relay = self.relay
        sent = self.sent
        pending = _Pending()
        relayed = 0  # content chunks of this attempt the client has (or will have) seen
        reported = False  # this attempt's usage chunk arrived
        # The terminal chunk is held until the stream proves complete ([DONE]): if the upstream
        # fails after it, the continuation supplies the ending and the client sees one.
        finish: tuple[bytes, str] | None = None
        clean = False
        reader = FrameReader(resp, dep, asm, self.state.deadline, first_deadline, gw.deadlines)
        read = resp.content.readany
        try:
            while True:
                try:
                    chunk = await read()  # one await per network read
                except (aiohttp.ClientError, OSError) as exc:
                    failure = reader.failed(exc)
                    if failure is None:
                        break  # the watchdog closed it: reader.end() says why
                    raise failure from None
                if not chunk:
                    break
                out: list[bytes] = []
                for f in reader.frames(chunk):
                    kind = f.kind
                    if kind is _CHUNK:
                        obj = f.obj
                        if obj is not None and not obj.get("choices") and obj.get("usage"):
                            self._usage(obj["usage"], f.data)
                            reported = True
                            continue
                        content = f.content
                        if continuing:
                            data = self._splice(f, trimmer)
                            if data is None:
                                continue
                            content = f.content  # what is left after trimming the overlap
                        else:
                            data = b"data: " + f.data.encode() + b"\n\n"  # frame_bytes
                        if f.finish_reason is None and relay.committed and not pending.frames:
                            # The hot path: a token of a committed stream goes straight out
                            # (what _shown does, inline).
                            out.append(data)
                            if content:
                                relayed += 1
                                sent.append(content)
                                self.tokens += 1
                            if not self.tool_calls and asm.has_tool_calls:
                                self.tool_calls = True
                            continue
                        if content:
                            relayed += 1
                        if f.finish_reason is not None:
                            if not relay.committed or pending.frames:
                                await self._commit(asm, pending, started)
                            finish = (data, content)
                        else:
                            self._hold(pending, data, f.content)
                            if self._ready_to_commit(f, asm, pending):
                                await self._commit(asm, pending, started)
                    elif kind is FrameKind.ERROR or kind is FrameKind.INVALID:
                        assert f.error is not None
                        err = f.error
                        if out:
                            await relay.send(out)
                            out = []
                        if err.kind is ErrorKind.MODERATION:
                            if self.group.on_content_filter == "pass":
                                # Output moderation: end the answer the way OpenAI does.
                                await self._commit(asm, pending, started)
                                await self._end([self._finish_chunk("content_filter")])
                                clean = True
                                return
                            # Another provider's moderation may let the answer through.
                            err = dataclasses.replace(err, failover=True, retryable=False)
                        raise AttemptFailed(err)
                if out:
                    await relay.send(out)
            reader.end()
            outcome = asm.finish()
            if not outcome.complete:
                assert outcome.failure is not None
                raise AttemptFailed(outcome.failure)
            await self._commit(asm, pending, started)  # a short answer may still be held
            if not reported:
                self.completion_tokens += relayed
            ending: list[bytes] = []
            if finish is not None:
                ending.append(finish[0])
                self._shown(finish[1], asm)
            await self._end(ending)
            clean = True
            # For the limiter: token reconciliation, and latency per output token.
            self.state.usage = asm.usage or {"completion_tokens": relayed}
        except AttemptFailed:
            if relay.committed and not pending.frames and not reported:
                # Unreported, but generated (and shown, but for a held terminal chunk).
                self.completion_tokens += relayed - (1 if finish and finish[1] else 0)
            raise
        finally:
            reader.close()
            if clean:
                resp.release()
            else:
                resp.close()  # never hand a half-read stream back to the pool

    # -- pieces ---------------------------------------------------------------------------------

    def _hold(self, pending: _Pending, data: bytes, content: str) -> None:
        if content and not pending.texts:
            pending.first_at = time.monotonic()
        pending.frames.append(data)
        if content:
            pending.texts.append(content)

    def _ready_to_commit(self, f: Frame, asm: StreamAssembler, pending: _Pending) -> bool:
        if not (f.content or asm.has_tool_calls):
            return False  # the role chunk alone is not worth committing for
        buf = self.group.commit_buffer
        if self.relay.committed or (not buf.tokens and not buf.ms):
            return True
        if buf.tokens and len(pending.texts) >= buf.tokens:
            return True
        return bool(buf.ms) and (time.monotonic() - pending.first_at) * 1000 >= buf.ms

    async def _commit(self, asm: StreamAssembler, pending: _Pending, started: float) -> None:
        """Show the client this attempt's held frames. The first attempt to get here owns the
        stream; a hedged rival that gets here second has lost."""
        me = asyncio.current_task()
        if self._owner is None:
            self._owner = me  # set before any await: exactly one winner
            for task in self._racers:
                if task is not me:
                    task.cancel()  # the loser's upstream closes in its `finally`
            if self.hedge is not None:
                self.hedge.observe(asyncio.get_running_loop().time() - started)
            self.meta = (asm.id, asm.created, asm.model)
            await self.relay.commit(self.state.headers(self.rid))
        elif me is not self._owner and me in self._racers:
            raise _Lost
        for text in pending.texts:
            self.sent.append(text)
            self.tokens += 1
        self.tool_calls = self.tool_calls or asm.has_tool_calls
        if pending.frames:
            await self.relay.send(pending.frames)
        pending.frames = []
        pending.texts = []

    def _shown(self, content: str, asm: StreamAssembler) -> None:
        if content:
            self.sent.append(content)
            self.tokens += 1
        if not self.tool_calls and asm.has_tool_calls:
            self.tool_calls = True

    def _usage(self, usage: dict[str, Any], data: str) -> None:
        """Usage chunks are held back: the client gets exactly one, at the end."""
        self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.completion_tokens += int(usage.get("completion_tokens") or 0)
        self.usage_frame = frame_bytes(data)

    def _splice(self, f: Frame, trimmer: OverlapTrimmer | None) -> bytes | None:
        """A continuation's chunk as part of the committed stream, or None to drop it."""
        obj = f.obj
        assert obj is not None
        choices = obj.get("choices") or [{}]
        choice = dict(choices[0])
        delta = dict(choice.get("delta") or {})
        content = f.content
        if trimmer is not None:
            content = trimmer.feed(content)
            if f.finish_reason:
                content += trimmer.flush()
        if not content and not f.finish_reason and not delta.get("tool_calls"):
            return None  # the continuation's role chunk, or text that repeated ours
        delta.pop("role", None)
        if content or "content" in delta:
            delta["content"] = content
        choice["delta"] = delta
        f.content = content
        chunk_id, created, model = self.meta
        spliced = {**obj, "id": chunk_id, "created": created, "model": model, "choices": [choice]}
        return b"data: " + orjson.dumps(spliced) + b"\n\n"

    def _finish_chunk(self, reason: str) -> bytes:
        return keel_chunk(self.meta, [{"index": 0, "delta": {}, "finish_reason": reason}])

    async def _end(self, ending: list[bytes]) -> None:
        """The single ending: the terminal chunk, the single usage chunk (when asked for),
        the single [DONE]."""
        if self.wants_usage:
            if self.usage_frame is not None and not self.continued:
                ending.append(self.usage_frame)  # one attempt: the upstream's own report
            else:
                p, c = self.prompt_tokens, self.completion_tokens
                usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
                ending.append(keel_chunk(self.meta, [], usage))
        await self.relay.send(ending)
        await self.relay.end()


def _hedge_done(dep: Deployment, permit: Permit, task: asyncio.Task[None]) -> None:
    """A hedge ended: its outcome goes to the deployment's limiter, breaker and latency."""
    dep.in_flight -= 1
    if not task.cancelled():
        exc = task.exception()
        if exc is None:
            permit.ok = True
        elif isinstance(exc, AttemptFailed):
            permit.error = exc.error
    release(dep, permit)  # neither ok nor an error: it lost the race (cancelled)
