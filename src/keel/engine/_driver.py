"""The driver: the one async loop of a request. It asks the plan (``keel._plan``) what to do,
does it — a limiter permit, an upstream attempt, a backoff — and reports what happened back to
the plan; for streams it feeds every frame to the transcript (``keel._transcript``) and writes
what comes out to the sink. It drives every endpoint the same way: what differs between them —
the upstream path, the body's checks, the token estimate, the answer's validation, the stream's
assembler — is the call's operation (``call.op``, ``keel.engine._operation``).

Why the code is shaped as it is: in CPython every wake-up of a waiting request (the response
headers, each network read of a stream) resumes each coroutine frame of the chain it waits
in. So the non-stream attempt is written inside ``complete``'s loop (the chain is door →
``complete``), and a stream's reads run in ``_attempt`` (door → ``stream`` → ``_attempt``):
one frame fewer each than before the engine existed. Everything that is not waiting is a plain
function.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp

from keel._assembly import FrameKind
from keel._classify import ErrorKind, UpstreamError
from keel._plan import Finish, GiveUp, Plan, Try, Wait
from keel._splice import continuation_body
from keel._transcript import Lost, Transcript
from keel.engine._deployment import Deployment
from keel.engine._errors import KeelError, final_error, unavailable_error
from keel.engine._keel import Call, Keel
from keel.engine._limits import Permit, Saturated, acquire, release, try_acquire
from keel.engine._responses import RESPONSES, native_body, native_payload
from keel.engine._sinks import ClientGone, Sink
from keel.engine._upstream import (
    AttemptFailed,
    FrameReader,
    accepted,
    attempt_limit,
    first_token_timer,
    post,
    refused,
    send,
    transport_failure,
)

log = logging.getLogger("keel.engine")

_CHUNK = FrameKind.CHUNK
_ERROR = FrameKind.ERROR
_INVALID = FrameKind.INVALID


# -- non-stream ----------------------------------------------------------------------------------


async def complete(keel: Keel, call: Call) -> tuple[bytes, dict[str, str]]:
    """A non-stream request of any operation (``call.op``): the upstream's answer, relayed
    unchanged once the operation has validated it, and the response headers; or
    ``KeelError``. One deadline bounds each attempt: for a non-stream request
    ``first_token`` runs to the complete response (``config.Timeouts``)."""
    plan = keel.plan(call)
    op = call.op
    session, deadlines = keel.session, keel.deadlines
    assert session is not None and deadlines is not None
    loop = deadlines.loop
    while True:
        d = plan.next(loop.time())
        if type(d) is Try:
            dep: Deployment = d.dep
            permit = _admit(plan, dep, call) or await _queue(keel, plan, d, call)
            if permit is None:
                continue
            if call.record is not None:  # observers watch (keel.engine._observe)
                call.record.attempt(dep, permit, plan.count)
            resp = None
            wire = RESPONSES if call.responses is not None and dep.native else op
            if wire is RESPONSES:  # a Responses call, natively (keel.engine._responses)
                payload = native_body(call, dep)
            else:
                payload = keel.upstream_body(call.body, dep)
            # A whole answer far later than the deployment's usual one: try elsewhere.
            ceiling = dep.first_token_timeout
            usual = dep.answer_time
            bound = usual.bound(ceiling, len(payload), d.patience)
            sent = loop.time()
            limit = attempt_limit(dep, call.deadline, deadlines, bound)
            try:
                with (
                    deadlines.timeout(limit)
                    if d.patience or usual.learned >= 0.0  # (the common case: no call)
                    else first_token_timer(deadlines, dep, limit, usual, len(payload))
                ):
                    resp = await send(session, dep.urls[wire], dep, payload)
                    if not accepted(dep, resp):
                        rejected, resp = resp, None  # refused() closes it
                        raise await refused(dep, rejected)
                    permit.answered = True
                    raw = await resp.read()
                call.usage = wire.answer(raw, call.body)
            except AttemptFailed as failed:
                _settle(call, plan, dep, permit, failed.error)
                continue
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                if resp is not None:
                    resp.close()
                phase = "before the response" if resp is None else "while reading the response"
                bound = usual.bound(ceiling, len(payload), d.patience)  # (learned meanwhile?)
                if bound < ceiling and isinstance(exc, TimeoutError):
                    phase += _late(bound, usual.mean)
                _settle(call, plan, dep, permit, transport_failure(exc, phase).error)
                continue
            except BaseException:
                _settle(call, plan, dep, permit)  # cancelled: the client left
                raise
            finally:
                if resp is not None:
                    resp.release()
            dep.answer_time.observe(loop.time() - sent)
            _settle(call, plan, dep, permit, ok=True, usage=call.usage)
            if call.record is not None:
                call.record.answered(raw)
            return raw, keel.attempt_headers(call, plan)
        if type(d) is Wait:
            await asyncio.sleep(d.until - loop.time())
        elif type(d) is Finish and (answer := op.filtered(call.rid, call.model)) is not None:
            if call.record is not None:
                call.record.finished_with("content_filter")
            return answer, keel.attempt_headers(call, plan)  # output moderation passed on
        else:
            assert type(d) is GiveUp or type(d) is Finish
            raise _gave_up(keel, call, plan, d.reason)


def _late(bound: float, usual: float) -> str:
    return f" (none within {bound:.1f}s; this deployment usually answers in {usual:.2f}s)"


# -- stream --------------------------------------------------------------------------------------


async def stream(keel: Keel, call: Call, sink: Sink) -> None:
    """A streamed request of any operation that streams (``call.op``), written to ``sink``.
    Failures end up in ``sink.fail``; a consumer that leaves (``ClientGone``) ends it
    quietly."""
    plan = keel.plan(call)
    group = keel.config.models[call.model]
    op = call.op
    t = call.transcript = Transcript(
        wants_usage=call.wants_usage,
        commit_tokens=group.commit_buffer.tokens,
        commit_ms=group.commit_buffer.ms,
        chunk_object=op.chunk_object,
        finish_choice=op.finish_choice,
    )
    loop = asyncio.get_running_loop()
    try:
        while True:
            d = plan.next(loop.time())
            if type(d) is Try:
                dep: Deployment = d.dep
                permit = _admit(plan, dep, call) or await _queue(keel, plan, d, call)
                if permit is None:
                    continue
                if call.record is not None:  # observers watch (keel.engine._observe)
                    call.record.attempt(dep, permit, plan.count, d.continuation)
                t.attempts = plan.count
                if d.hedge_after is not None:
                    if await _hedged(
                        keel, call, plan, t, sink, dep, permit, d.hedge_after, d.patience
                    ):
                        return
                    continue
                try:
                    usage = await _attempt(
                        keel, call, plan, t, sink, dep, permit, d.continuation, d.patience
                    )
                except AttemptFailed as failed:
                    _settle(call, plan, dep, permit, failed.error)
                    continue
                except BaseException:
                    _settle(call, plan, dep, permit)
                    raise
                call.usage = usage
                _settle(call, plan, dep, permit, ok=True, usage=usage)
                return
            if type(d) is Wait:
                await asyncio.sleep(d.until - loop.time())
            elif type(d) is Finish:
                await _finish(keel, call, plan, t, sink, d.reason)
                return
            else:
                assert type(d) is GiveUp
                await sink.fail(_gave_up(keel, call, plan, d.reason))
                return
    except ClientGone:
        # Normal, not an error: nobody is left to answer. The upstream is closed already.
        log.debug("request %s: the client went away mid-stream", call.rid)
        if call.record is not None:
            call.record.gone = True


async def _attempt(
    keel: Keel,
    call: Call,
    plan: Plan[Deployment],
    t: Transcript,
    sink: Sink,
    dep: Deployment,
    permit: Permit,
    continuing: bool,
    patience: int,
) -> Mapping[str, Any]:
    """One streamed attempt, from the request to the last frame. Returns its usage.
    ``permit``: its limiter's, told when the upstream let it in (``Permit.answered``);
    ``patience``: attempts of this request cut for lateness (``Try.patience``)."""
    mode = dep.continuation if continuing else None
    op = call.op
    if mode is not None:
        log.info(
            "request %s: continuing the answer on %s (%s) after %d tokens",
            call.rid, dep.name, mode, t.tokens,
            extra={"event": "continuation", "request_id": call.rid, "deployment": dep.name,
                   "mode": mode, "after_tokens": t.tokens},
        )  # fmt: skip
    if call.responses is not None and dep.native:  # a Responses stream, natively
        op = RESPONSES
        payload = native_payload(call, t, dep, mode)
    elif mode is not None:
        cont = continuation_body(call.body, t.text, mode, dep.dialect, t.tokens)  # type: ignore[arg-type]
        assert cont is not None  # past the token limit the plan ends with "length" instead
        if t.wants_usage:
            cont["stream_options"] = {**(cont.get("stream_options") or {}), "include_usage": True}
        payload = keel.upstream_body(cont, dep)
    else:
        payload = keel.upstream_body(call.body, dep)
    session, deadlines = keel.session, keel.deadlines
    assert session is not None and deadlines is not None
    started = deadlines.loop.time()
    # A first token far later than the deployment's usual one: try elsewhere (keel._cadence).
    ceiling = dep.first_token_timeout
    first = dep.first_token.bound(ceiling, len(payload), patience)
    usual = None if patience else dep.first_token
    resp = await post(session, dep.urls[op], dep, payload, call.deadline, deadlines, first, usual)
    permit.answered = True
    asm = op.assembler(dep.dialect)
    take = t.take(asm, dep.name, mode)  # type: ignore[arg-type]
    # A stall judged by the deployment's usual pace is only worth it where it can be repaired:
    # the answer can be continued (this deployment at least can continue it).
    adaptive = plan.spliceable and not t.tool_calls and dep.continuation != "none"
    reader = FrameReader(
        resp, dep, asm, call.deadline, started + first, deadlines, adaptive, usual, started,
        len(payload),
    )  # fmt: skip
    read = resp.content.readany
    clean = False
    try:
        while True:
            try:
                data = await read()  # one await per network read
            except (aiohttp.ClientError, OSError) as exc:
                failure = reader.failed(exc)
                if failure is None:
                    break  # the watchdog closed it: reader.end() says why
                raise failure from None
            if not data:
                break
            out: list[bytes] = []
            committing = False
            for f in reader.frames(data):
                kind = f.kind
                if kind is _CHUNK:
                    if take.chunk(f, out):
                        committing = True
                elif kind is _ERROR or kind is _INVALID:
                    if committing:
                        await _commit(keel, call, plan, sink, dep, started)
                    if out:
                        await sink.send(out)
                    err = f.error
                    assert err is not None
                    if err.kind is ErrorKind.MODERATION and not err.output_filter:
                        # Moderation inside a stream judges the output: the group's
                        # on_content_filter decides (the plan), as for a non-stream 400.
                        err = dataclasses.replace(err, output_filter=True)
                    raise AttemptFailed(err)
            if committing:
                await _commit(keel, call, plan, sink, dep, started)
            if out:
                await sink.send(out)
        reader.end()
        outcome = asm.finish()
        if not outcome.complete:
            assert outcome.failure is not None
            raise AttemptFailed(outcome.failure)
        reader.completed(dep, started)
        out = []
        if take.commit(out):  # a short answer may still be held
            await _commit(keel, call, plan, sink, dep, started)
        out.extend(t.ending(take.complete()))
        await sink.end(out)
        clean = True
        return take.usage()
    except AttemptFailed:
        take.failed()
        plan.shown(t.tokens, t.tool_calls)
        raise
    except (ClientGone, asyncio.CancelledError):
        take.failed()  # what it generated until the client left still counts (spend)
        raise
    except ConnectionError:  # from a sink's write (the door tells whether its client left)
        take.failed()
        raise
    finally:
        reader.close()
        if clean:
            resp.release()
        else:
            resp.close()  # never hand a half-read stream back to the pool


async def _commit(
    keel: Keel,
    call: Call,
    plan: Plan[Deployment],
    sink: Sink,
    dep: Deployment,
    started: float,
) -> None:
    """The attempt on ``dep`` has just committed the stream: a hedged rival is cancelled
    (its upstream closes in its ``finally``), the client gets the headers."""
    if call.racers:
        me = asyncio.current_task()
        for task in call.racers:
            if task is not me:
                task.cancel()
    plan.commit(dep)
    first = asyncio.get_running_loop().time() - started
    plan.first_token(first)
    dep.first_tokens.add(first)  # the status page's percentiles
    if call.record is not None:
        call.record.first_token(dep)
    await sink.commit(keel.attempt_headers(call, plan))


async def _finish(
    keel: Keel, call: Call, plan: Plan[Deployment], t: Transcript, sink: Sink, reason: str
) -> None:
    """End the answer well-formed with ``reason``: what the last attempt holds is shown
    first (output moderation may stop an answer that has not committed yet)."""
    if call.record is not None:
        call.record.finished_with(reason)
    out: list[bytes] = []
    if t.flush(out):
        await sink.commit(keel.attempt_headers(call, plan))
    out.extend(t.ending(t.finish_chunk(reason)))
    await sink.end(out)


async def _hedged(
    keel: Keel,
    call: Call,
    plan: Plan[Deployment],
    t: Transcript,
    sink: Sink,
    dep: Deployment,
    permit: Permit,
    delay: float,
    patience: int,
) -> bool:
    """An attempt on ``dep`` that races a second deployment when its first token is late.
    The first to commit wins and cancels the other. Every attempt's outcome is settled here;
    True when one of them completed the stream."""
    first = asyncio.create_task(_attempt(keel, call, plan, t, sink, dep, permit, False, patience))
    racers = call.racers = {first: (dep, permit)}
    try:
        done, _ = await asyncio.wait({first}, timeout=delay)
        if not done and (alt := plan.hedge_target(dep)) is not None:
            # A hedge is opportunistic: it goes only if the alternate's limiter (and
            # breaker) let it through at once, and it counts against its limits.
            alt_permit = try_acquire(alt, call, time.monotonic())
            if alt_permit is not None:
                plan.hedged(alt)
                if call.record is not None:
                    call.record.attempt(alt, alt_permit, plan.count, hedge=True)
                t.attempts = plan.count
                alt.in_flight += 1
                second = asyncio.create_task(
                    _attempt(keel, call, plan, t, sink, alt, alt_permit, False, patience)
                )
                racers[second] = (alt, alt_permit)
        pending = set(racers)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                d, p = racers.pop(task)
                if _ended(call, plan, task, d, p, hedge=task is not first):
                    return True
        return False
    finally:
        # Done, or cancelled (the client left): the attempts still racing stop, and each is
        # settled by what it did — one that completed the stream a moment before the client
        # closed is a success, not a cancellation.
        for task in racers:
            task.cancel()
        for task, (d, p) in list(racers.items()):
            with contextlib.suppress(BaseException):
                await task
            with contextlib.suppress(Exception):
                _ended(call, plan, task, d, p, hedge=task is not first)
        call.racers = None


def _ended(
    call: Call,
    plan: Plan[Deployment],
    task: asyncio.Task[Mapping[str, Any]],
    dep: Deployment,
    permit: Permit,
    hedge: bool,
) -> bool:
    """Settle a raced attempt by its own outcome; True when it completed the stream."""
    if task.cancelled():
        _settle(call, plan, dep, permit)
        return False
    exc = task.exception()
    if exc is None:
        call.usage = task.result()
        _settle(call, plan, dep, permit, ok=True, usage=call.usage)
        return True
    if isinstance(exc, AttemptFailed):
        _settle(call, plan, dep, permit, exc.error, hedge=hedge)
        return False
    _settle(call, plan, dep, permit)  # lost the race (or the client left)
    if not isinstance(exc, Lost):
        raise exc
    return False


# -- shared by both --------------------------------------------------------------------------------


def _admit(plan: Plan[Deployment], dep: Deployment, call: Call) -> Permit | None:
    """The attempt the plan proposes, let through at once when nothing limits it (the common
    case: a plain call, no coroutine); None: ask ``_queue``. Either way a permit means the
    attempt has started (``_started``)."""
    permit = try_acquire(dep, call, time.monotonic())
    return None if permit is None else _started(plan, dep, permit)


async def _queue(
    keel: Keel, plan: Plan[Deployment], d: Try[Deployment], call: Call
) -> Permit | None:
    """The deployment's limiter could not let the attempt through at once: wait in its
    queue (up to the plan's bound), or report the refusal to the plan (None)."""
    dep = d.dep
    now = time.monotonic()
    # Every breaker of the plan open: go anyway rather than fail (panic).
    panic = not dep.breaker.would_admit(now) and keel.router.all_open(call.model, now)
    wait = plan.queue_bound(asyncio.get_running_loop().time())
    try:
        permit = await acquire(dep, call, call.priority, now + wait, panic)
    except Saturated as sat:
        open_to_it = dep.breaker.would_admit(now) and not dep.drained
        plan.refused(dep, sat.reason, sat.retry_after, sat.soon, dep.breaker.down, open_to_it)
        return None
    return _started(plan, dep, permit)


def _started(plan: Plan[Deployment], dep: Deployment, permit: Permit) -> Permit:
    """An attempt starts: the plan counts it, the deployment has one more in flight (undone
    by ``_settle``)."""
    plan.started(dep)
    dep.in_flight += 1
    return permit


def _settle(
    call: Call,
    plan: Plan[Deployment],
    dep: Deployment,
    permit: Permit,
    error: UpstreamError | None = None,
    *,
    ok: bool = False,
    usage: Mapping[str, Any] | None = None,
    hedge: bool = False,
) -> None:
    """An attempt is over — ``ok``, failed with ``error``, or neither (cancelled: neutral).
    Its outcome goes to the plan, the deployment (benching, cool-down) and the limiter
    (breaker, adaptive concurrency, latency, tokens); its slot is freed. Once per permit."""
    if permit.released:
        return
    if call.record is not None:
        call.record.settled(permit, error, ok, usage)
    if ok:
        permit.ok = True
        plan.succeeded(dep)
    elif error is not None:
        permit.error = error
        penalty = plan.failed(dep, error, hedge=hedge)
        if dep.drained:  # (failures only: a drained deployment takes no retry, no continuation)
            plan.withdraw(dep)
        dep.record_failure(error, bench_for=penalty.bench_for if penalty else None)
        if penalty is not None and penalty.cool_down:
            dep.cool_down(penalty.cool_down)  # too long to wait: the others take over
        log.info("attempt %d on %s failed: %s", plan.count, dep.name, error.message)
    dep.in_flight -= 1
    permit.usage = usage
    release(dep, permit)


def _gave_up(keel: Keel, call: Call, plan: Plan[Deployment], reason: str) -> KeelError:
    """The error for a request whose plan gave up, with the headers that say how far it got."""
    if plan.tried:
        err = final_error(plan.tried, reason)
    elif plan.saturated is not None:
        why, back = plan.saturated
        err = unavailable_error(f"{reason}: {why}" if reason else why, back)
    else:
        why, back = keel.router.unavailable(call.model)  # all out: say why, and until when
        err = unavailable_error(reason or why, back)
    err.headers.update(keel.attempt_headers(call, plan))
    if call.record is not None:
        call.record.failed(err)
    return err
