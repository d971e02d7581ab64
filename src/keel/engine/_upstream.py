"""Upstream adapter: one attempt against one deployment over aiohttp.

It turns everything that can go wrong on the wire into a classified ``UpstreamError`` (raised
as ``AttemptFailed``) and never decides what to do about it — that is the plan's job
(``keel._plan``). The driver (``keel.engine._driver``) awaits these pieces itself.

Timeouts: a deadline (``keel.engine._deadlines``: one loop timer for all attempts) bounds the
phase up to the response headers — for a non-stream attempt, up to the whole body; after that
a lazy watchdog (one deadline per attempt, re-armed only when it fires) enforces first-token,
idle and total deadlines without touching a timer per frame. Keep-alive comments are not
progress.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable

import aiohttp

from keel._assembly import Frame, FrameKind, StreamAssembler
from keel._cadence import FLOOR, Cadence, FirstToken
from keel._classify import ErrorKind, UpstreamError, classify_response, transport_error
from keel._sse import Comment, SSEDecoder
from keel.engine._deadlines import Deadlines, Entry, Timeout
from keel.engine._deployment import Deployment

_CHUNK = FrameKind.CHUNK


class AttemptFailed(Exception):
    def __init__(self, error: UpstreamError) -> None:
        super().__init__(error.message)
        self.error = error


def send(
    session: aiohttp.ClientSession, url: str, dep: Deployment, body: bytes
) -> Awaitable[aiohttp.ClientResponse]:
    """The upstream POST to ``url`` (the deployment's for the operation, ``dep.urls[op]``),
    for the caller to await (a plain function: no coroutine frame of its own for every
    wake-up of the request to pass through). No timer of its own: the caller's one deadline
    bounds it; aiohttp's times only the connect (``Deployment.client_timeout``)."""
    return session.post(url, data=body, headers=dep.request_headers, timeout=dep.client_timeout)


def accepted(dep: Deployment, resp: aiohttp.ClientResponse) -> bool:
    """A 2xx? The upstream's x-ratelimit-* headers tighten the deployment's limits either way
    (cheap when absent: two lookups)."""
    ok = resp.status < 300
    dep.limiter.learn_headers(resp.headers, success=ok)
    return ok


async def refused(dep: Deployment, resp: aiohttp.ClientResponse) -> AttemptFailed:
    """A non-2xx response, classified; the response is closed."""
    try:
        try:
            body = await resp.read()
        except (TimeoutError, aiohttp.ClientError):
            body = b""
        err = classify_response(dep.dialect, resp.status, resp.headers, body, time.time())
        return AttemptFailed(err)
    finally:
        resp.close()


def transport_failure(exc: BaseException, phase: str) -> AttemptFailed:
    """A transport exception, translated at the boundary into keel's own (and forgotten)."""
    _forget(exc)
    if isinstance(exc, TimeoutError):
        return AttemptFailed(transport_error(ErrorKind.TIMEOUT, f"upstream timed out {phase}"))
    if isinstance(exc, aiohttp.ClientPayloadError):
        text = "upstream closed the connection inside the response body (truncated)"
        return AttemptFailed(transport_error(ErrorKind.CONNECTION, text))
    detail = type(exc).__name__
    return AttemptFailed(
        transport_error(ErrorKind.CONNECTION, f"upstream connection failed {phase}: {detail}")
    )


async def _send(
    session: aiohttp.ClientSession, url: str, dep: Deployment, body: bytes
) -> aiohttp.ClientResponse:
    """Send the request; return the response once its 2xx headers are in."""
    resp = await send(session, url, dep, body)
    if not accepted(dep, resp):
        raise await refused(dep, resp)
    return resp


def attempt_limit(
    dep: Deployment, deadline: float, deadlines: Deadlines, first_token: float
) -> float:
    """When the attempt's wait for its first token (``first_token`` seconds: the configured
    bound, or the deployment's learned one) ends, within the request's deadline."""
    return min(deadline, deadlines.loop.time() + min(first_token, dep.total_timeout))


def first_token_timer(
    deadlines: Deadlines, dep: Deployment, limit: float, usual: FirstToken | None, size: int
) -> Timeout:
    """The wait for an attempt's first token (a non-stream attempt's whole answer), until
    ``limit``; while ``usual`` (the deployment's history, None: the configured bound) has not
    learned a bound, judged again as it learns (``FirstToken.due``)."""
    if usual is None or usual.learned >= 0.0:
        return deadlines.timeout(limit)
    sent, ceiling = deadlines.loop.time(), dep.timeouts.first_token
    return deadlines.judged(
        usual.due(sent, limit, ceiling, size, sent),
        lambda now: usual.due(sent, limit, ceiling, size, now),
    )


async def post(
    session: aiohttp.ClientSession,
    url: str,
    dep: Deployment,
    body: bytes,
    deadline: float,
    deadlines: Deadlines,
    first_token: float,
    usual: FirstToken | None = None,
) -> aiohttp.ClientResponse:
    """Send the request and wait for a 2xx response's headers (first-token timeout bounds it).
    ``usual``: the deployment's first-token history, when ``first_token`` is its bound and it
    has not learned one yet: the wait is judged again as it learns (``FirstToken.due``)."""
    limit = attempt_limit(dep, deadline, deadlines, first_token)
    try:
        with first_token_timer(deadlines, dep, limit, usual, len(body)):
            return await _send(session, url, dep, body)
    except AttemptFailed:
        raise
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise transport_failure(exc, "before the response") from None


def _forget(exc: BaseException) -> None:
    """Drop what an exception from the transport remembers of us. aiohttp raises one shared,
    module-level instance for every read of a released response: each raise would append
    this request's frames to its traceback, and those frames (with the request, its plan and
    its transcript) would live as long as the process — a leak of ~100 bytes per request
    under faults. keel never re-raises such an instance; it raises its own AttemptFailed."""
    exc.__traceback__ = None
    exc.__context__ = None
    exc.__cause__ = None


class _Watchdog:
    """Closes the upstream response when a deadline passes without progress: first token,
    idle gap between tokens, minimum throughput, attempt total. One timer, re-armed only
    when it fires, so the per-chunk cost is two attribute writes."""

    __slots__ = (
        "_cadence", "_ceiling", "_deadlines", "_due", "_first_ceiling", "_handle", "_idle", "_loop", "_min_tokens", "_own", "_resp", "_sent", "_size", "_total",
        "_usual", "_window", "_window_end", "_window_tokens", "expired", "first_progress", "progressed", "tokens",
    )  # fmt: skip

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        dep: Deployment,
        deadline: float,
        first: float,
        deadlines: Deadlines,
        adaptive: bool = False,
        usual: FirstToken | None = None,
        sent: float = 0.0,
        size: int = 0,
    ) -> None:
        self._deadlines = deadlines
        self._loop = deadlines.loop
        self._resp = resp
        t = dep.timeouts
        # A silence many times the deployment's usual gap is a stall (keel._cadence), when a
        # stall can be repaired; else only the configured idle bound.
        self._idle = dep.cadence.idle(t.idle) if adaptive else t.idle
        # The deployment's pace not known yet: this stream's own, re-judged every FLOOR s
        # (and the deployment's, once it knows it: a stream stalled after 3 tokens in the
        # gateway's first second has no pace of its own to show).
        self._own = adaptive and not dep.cadence.known
        self._cadence = dep.cadence
        self._ceiling = t.idle
        self._min_tokens = t.min_tokens
        self._window = t.min_tokens_window
        self._window_end = 0.0
        self._window_tokens = 0
        self._total = min(deadline, self._loop.time() + t.total)
        self._due = min(first, self._total)
        # The first-token bound was the ceiling because the deployment had not learned its
        # usual one yet (``post``'s ``usual``): judge the wait again as it learns, as for the
        # headers — a stream that sent its headers and then nothing must not wait 60 s.
        self._usual = usual if usual is not None and usual.learned < 0.0 else None
        self._sent, self._size, self._first_ceiling = sent, size, t.first_token
        self.progressed = 0.0  # loop time of the last content; 0 until the first token
        self.first_progress = 0.0
        self.tokens = 0  # content chunks so far
        self.expired = ""
        self._handle: Entry = deadlines.call_at(self._first_due(self._loop.time()), self._fire)

    def _first_due(self, now: float) -> float:
        usual = self._usual
        if usual is None:
            return self._due
        return usual.due(self._sent, self._due, self._first_ceiling, self._size, now)

    def first_token(self, now: float) -> None:
        """Switch from the first-token deadline to the idle/throughput checks."""
        self.progressed = self.first_progress = now
        self._window_end = now + self._window
        self._window_tokens = self.tokens
        self._handle.cancel()
        self._fire()

    def _fire(self) -> None:
        now = self._loop.time()
        if not self.progressed:
            due = self._first_due(now)
        else:
            if self._own:
                cadence = self._cadence
                if cadence.known:  # the deployment's pace was learned meanwhile: judge by it
                    self._idle, self._own = cadence.idle(self._ceiling), False
                else:
                    self._idle = Cadence.own(
                        self._ceiling, self.first_progress, self.progressed, self.tokens
                    )
                if now < self.progressed + self._idle:  # not stalled (yet): look again soon
                    due = min(self.progressed + self._idle, now + FLOOR, self._total)
                else:
                    due = min(self.progressed + self._idle, self._total)
            else:
                due = min(self.progressed + self._idle, self._total)
            if self._min_tokens:
                if now >= self._window_end:
                    if self.tokens - self._window_tokens < self._min_tokens:
                        self._expire(
                            f"too slowly (fewer than {self._min_tokens} tokens in "
                            f"{self._window:g}s)"
                        )
                        return
                    self._window_end = now + self._window
                    self._window_tokens = self.tokens
                due = min(due, self._window_end)
        if now < due:
            self._handle = self._deadlines.call_at(due, self._fire)
            return
        if now >= self._total:
            self._expire("past the attempt deadline")
        elif not self.progressed:
            self._expire("waiting for the first token")
        else:
            self._expire("between stream chunks")

    def _expire(self, why: str) -> None:
        self.expired = why
        self._resp.close()

    def cancel(self) -> None:
        self._handle.cancel()


class FrameReader:
    """The adapter's side of a streamed attempt: SSE decoding, the assembler's validation and
    the watchdog. The caller awaits the response's reads itself — one await per network read,
    no async-generator round trip per read — and hands each read to ``frames``. Timeouts and
    truncation become AttemptFailed (``failed``, ``end``); protocol verdicts (error frames, a
    missing finish_reason) are left to the caller through the frames and
    ``assembler.finish()``. ``close()`` when done (it stops the watchdog)."""

    __slots__ = ("_asm", "_decoder", "_dog", "_time")

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        dep: Deployment,
        assembler: StreamAssembler,
        deadline: float,
        first_token_deadline: float,
        deadlines: Deadlines,
        adaptive: bool = False,
        usual: FirstToken | None = None,
        sent: float = 0.0,
        size: int = 0,
    ) -> None:
        """``usual``, ``sent``, ``size``: as for ``post`` — the deployment's first-token
        history when the bound is its own, the attempt's send time and request size."""
        self._decoder = SSEDecoder()
        self._asm = assembler
        self._dog = _Watchdog(
            resp, dep, deadline, first_token_deadline, deadlines, adaptive, usual, sent, size
        )
        self._time = deadlines.loop.time

    def frames(self, data: bytes) -> list[Frame]:
        """The validated frames completed by one read (keep-alive comments are skipped)."""
        asm = self._asm
        dog = self._dog
        out: list[Frame] = []
        # The common read, whole ``data:`` events, stays bytes: a chunk's payload is relayed
        # as the upstream sent it (``Frame.raw``), never decoded and re-encoded.
        events = self._decoder.data_payloads(data) or self._decoder.feed(data)
        for ev in events:
            if type(ev) is bytes:
                frame = asm.feed_data(ev)
            elif type(ev) is Comment:
                continue  # keep-alives are not progress
            else:
                frame = asm.feed(ev)  # type: ignore[arg-type]
            # The role-only opening chunk is not a token; anything after it is.
            if frame.kind is _CHUNK and (frame.content or asm.chunks > 1):
                dog.tokens += 1
                if dog.progressed:
                    dog.progressed = self._time()
                else:
                    dog.first_token(self._time())
            out.append(frame)
        return out

    def failed(self, exc: BaseException) -> AttemptFailed | None:
        """A read raised ``exc``: the failure to report, or None when the watchdog closed the
        response (``end`` reports the stall)."""
        if self._dog.expired:
            _forget(exc)
            return None
        return transport_failure(exc, "inside the stream")

    def end(self) -> None:
        """The stream ended (or the watchdog closed it): raise for a stall or a truncation."""
        if self._dog.expired:
            raise AttemptFailed(
                transport_error(
                    ErrorKind.TIMEOUT, f"upstream stream stalled: no progress {self._dog.expired}"
                )
            )
        if self._decoder.has_partial and not self._asm.done:
            raise AttemptFailed(
                transport_error(ErrorKind.CONNECTION, "upstream stream ended inside an event")
            )

    def completed(self, dep: Deployment, started: float) -> None:
        """The stream (sent at ``started``) ended complete: its pace and its first token are
        the deployment's usual ones."""
        dog = self._dog
        dep.cadence.observe(dog.first_progress, dog.progressed, dog.tokens)
        if dog.first_progress:
            dep.first_token.observe(dog.first_progress - started)

    def close(self) -> None:
        self._dog.cancel()
