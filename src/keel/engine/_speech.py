"""Text-to-speech through the engine: ``POST /v1/audio/speech`` on a model group.

The plan, the limiter and the balancer decide exactly as for chat: attempts fail over and
retry until the first audio byte arrives (a 429, a 5xx, a reset, an answer that breaks before
any audio are all invisible to the caller). Audio cannot be spliced, so once bytes have been
handed on a failure ends the stream with a ``KeelError`` instead.

``open_speech`` returns a ``Speech`` — an async iterator of audio byte chunks — only after the
first chunk is in. Leaving it (``aclose()``, ``break``, cancelling the reading task) closes the
upstream connection at once: the voice bot's barge-in, and a gateway client that hangs up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import orjson

from keel._classify import ErrorKind, transport_error
from keel._plan import Finish, GiveUp, Plan, Try, Wait
from keel.engine._auth import Principal
from keel.engine._deployment import Deployment
from keel.engine._driver import _admit, _gave_up, _queue, _settle
from keel.engine._errors import KeelError
from keel.engine._keel import Call, Keel
from keel.engine._limits import PRIORITIES, Permit
from keel.engine._upstream import (
    AttemptFailed,
    accepted,
    attempt_limit,
    refused,
    transport_failure,
)
from keel.engine._validate import bad

FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")


def check_speech_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """What keel relies on in a speech body; the rest passes through to the provider."""
    out = dict(body)
    model = out.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required and must be a non-empty string.", param="model")
    text = out.get("input")
    if not isinstance(text, str) or not text:
        raise bad("'input' is required and must be a non-empty string.", param="input")
    voice = out.get("voice")
    if voice is not None and not isinstance(voice, str):
        raise bad("'voice' must be a string.", param="voice")
    fmt = out.get("response_format")
    if fmt is not None and fmt not in FORMATS:
        raise bad(
            f"'response_format' must be one of {', '.join(FORMATS)}.", param="response_format"
        )
    return out


def speech_call(
    keel: Keel,
    raw: bytes | Mapping[str, Any],
    principal: Principal,
    headers: Mapping[str, str],
    rid: str,
) -> Call:
    """Like ``Keel.call`` for a speech body (checked; a 4xx ``KeelError`` otherwise)."""
    if isinstance(raw, bytes):
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise bad(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(parsed, dict):
            raise bad("The request body must be a JSON object.", code="invalid_json")
        raw = parsed
    body = check_speech_request(raw)
    model = body["model"]
    if model not in keel.router:
        raise KeelError(
            404,
            f"The model '{model}' does not exist on this gateway. "
            f"Available: {', '.join(sorted(keel.router.groups))}.",
            code="model_not_found",
            param="model",
        )
    priority = keel.admission.priority(headers, principal)
    queue = keel.config.queue
    return Call(
        rid=rid,
        body=body,
        model=model,
        stream=False,  # no hedging, no token limit: those are about chat streams
        principal=principal,
        priority=PRIORITIES[priority],
        max_wait=queue.batch_max_wait if priority == "batch" else queue.interactive_max_wait,
        deadline=asyncio.get_running_loop().time() + keel.config.retry.deadline,
    )


async def speech(
    keel: Keel,
    body: bytes | Mapping[str, Any],
    principal: Principal | None = None,
    headers: Mapping[str, str] | None = None,
    rid: str | None = None,
) -> Speech:
    """A speech request from any door: checked, admitted against the client's limits, sent.
    The client's booking is released when the ``Speech`` ends (or here, on failure)."""
    headers = headers or {}
    principal = keel.admission.anonymous if principal is None else principal
    call = speech_call(keel, body, principal, headers, rid or keel.request_id())
    await keel.admit(call)
    try:
        sp = await open_speech(keel, call)
    except BaseException:
        keel.done(call)
        raise
    sp.on_end = lambda: keel.done(call)
    return sp


def _url(dep: Deployment) -> str:
    return dep.cfg.base_url.rstrip("/") + "/audio/speech"


async def open_speech(keel: Keel, call: Call) -> Speech:
    """Attempts until one delivers its first audio bytes (or ``KeelError``)."""
    plan = keel.plan(call)
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
            resp: aiohttp.ClientResponse | None = None
            try:
                with deadlines.timeout(
                    attempt_limit(dep, call.deadline, deadlines, dep.first_token_timeout)
                ):
                    resp = await session.post(
                        _url(dep),
                        data=orjson.dumps({**call.body, "model": dep.model}),
                        headers=dep.request_headers,
                        timeout=dep.client_timeout,
                    )
                    if not accepted(dep, resp):
                        rejected, resp = resp, None  # refused() closes it
                        raise await refused(dep, rejected)
                    permit.answered = True  # let in: the load evidence counts it so
                    first = await resp.content.readany()
                if not first:
                    raise AttemptFailed(
                        transport_error(
                            ErrorKind.CONNECTION, "upstream ended the audio before its first byte"
                        )
                    )
            except AttemptFailed as failed:
                if resp is not None:
                    resp.close()
                _settle(call, plan, dep, permit, failed.error)
                continue
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                phase = "before the response" if resp is None else "before the first audio byte"
                if resp is not None:
                    resp.close()
                _settle(call, plan, dep, permit, transport_failure(exc, phase).error)
                continue
            except BaseException:
                if resp is not None:
                    resp.close()  # cancelled: the caller left
                _settle(call, plan, dep, permit)
                raise
            plan.commit(dep)
            return Speech(call, plan, dep, permit, resp, first, keel.attempt_headers(call, plan))
        if type(d) is Wait:
            await asyncio.sleep(d.until - loop.time())
        else:
            assert type(d) is GiveUp or type(d) is Finish
            raise _gave_up(keel, call, plan, d.reason)


class Speech:
    """The audio of one speech request: ``async for chunk in speech`` (bytes). ``headers``:
    the upstream's content type and keel's own (``x-request-id``, ``x-keel-attempts``,
    ``x-keel-deployment``)."""

    def __init__(
        self,
        call: Call,
        plan: Plan[Deployment],
        dep: Deployment,
        permit: Permit,
        resp: aiohttp.ClientResponse,
        first: bytes,
        headers: dict[str, str],
    ) -> None:
        self._call, self._plan, self._dep, self._permit, self._resp = call, plan, dep, permit, resp
        self._first: bytes | None = first
        self.bytes = 0
        self.content_type = resp.headers.get("content-type", "application/octet-stream")
        self.headers = {**headers, "content-type": self.content_type}
        self._done = False
        self.on_end: Callable[[], None] | None = None

    def __aiter__(self) -> Speech:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        first, self._first = self._first, None
        if first is not None:
            self.bytes += len(first)
            return first
        try:
            async with asyncio.timeout(self._dep.timeouts.idle):
                data = await self._resp.content.readany()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._end(transport_failure(exc, "inside the audio").error)
            raise KeelError(
                502,
                f"The upstream audio stream broke after {self.bytes} bytes "
                f"({self._dep.name}); audio cannot be continued elsewhere.",
                type="server_error",
                code="upstream_stream_broken",
            ) from None
        except BaseException:
            self._end()  # cancelled: the caller left, the connection closes now
            raise
        if not data:
            self._end(ok=True)
            raise StopAsyncIteration
        self.bytes += len(data)
        return data

    def _end(self, error: Any = None, *, ok: bool = False) -> None:
        if self._done:
            return
        self._done = True
        if ok:
            self._resp.release()
        else:
            self._resp.close()
        _settle(self._call, self._plan, self._dep, self._permit, error, ok=ok)
        if self.on_end is not None:
            self.on_end()

    async def aclose(self) -> None:
        """Stop: the upstream connection closes at once."""
        self._end()

    async def __aenter__(self) -> Speech:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._end()

    def __del__(self) -> None:
        # Dropped without aclose(): free the upstream and the slot now.
        with contextlib.suppress(Exception):
            self._end()
