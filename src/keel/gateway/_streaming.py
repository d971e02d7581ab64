"""The streaming request path: attempts whose frames go through the relay to the client."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any

from aiohttp import web

from keel._assembly import FrameKind, StreamAssembler
from keel._classify import ErrorKind
from keel.gateway._attempts import Attempts, Exhausted, run_attempts
from keel.gateway._deployment import Deployment
from keel.gateway._errors import exhausted_response, final_error
from keel.gateway._relay import StreamRelay, finish_chunk, frame_bytes
from keel.gateway._upstream import AttemptFailed, post, stream_frames

if TYPE_CHECKING:
    from keel.gateway._app import Gateway


async def stream(
    request: web.Request, gw: Gateway, rid: str, body: dict[str, Any], state: Attempts
) -> web.StreamResponse:
    assert gw.session is not None
    session = gw.session
    relay = StreamRelay(request, {"x-request-id": rid})
    group_cfg = gw.config.models[body["model"]]

    async def attempt(dep: Deployment) -> None:
        loop = asyncio.get_running_loop()
        first_deadline = loop.time() + dep.timeouts.first_token
        resp = await post(session, dep, gw.upstream_body(body, dep), state.deadline)
        asm = StreamAssembler(dialect=dep.dialect, require_done=True)
        clean = False
        relay.discard_held()
        try:
            async for frames in stream_frames(resp, dep, asm, state.deadline, first_deadline):
                out: list[bytes] = []
                for f in frames:
                    kind = f.kind
                    if kind is FrameKind.CHUNK:
                        if not relay.committed:
                            if not (f.content or f.finish_reason or asm.tool_calls):
                                relay.hold(frame_bytes(f.data))
                                continue
                            await relay.commit(state.headers(rid))
                        out.append(frame_bytes(f.data))
                    elif kind is FrameKind.ERROR or kind is FrameKind.INVALID:
                        assert f.error is not None
                        err = f.error
                        if (
                            err.kind is ErrorKind.MODERATION
                            and group_cfg.on_content_filter == "pass"
                        ):
                            # Output moderation: end the answer the way OpenAI does.
                            if not relay.committed:
                                await relay.commit(state.headers(rid))
                            out.append(
                                finish_chunk(asm.id, asm.model, asm.created, "content_filter")
                            )
                            await relay.send(out)
                            await relay.end()
                            clean = True
                            return
                        if err.kind is ErrorKind.MODERATION:
                            err = dataclasses.replace(err, failover=True, retryable=False)
                        if out:
                            await relay.send(out)
                        raise AttemptFailed(err)
                if out:
                    await relay.send(out)
            outcome = asm.finish()
            if not outcome.complete:
                assert outcome.failure is not None
                raise AttemptFailed(outcome.failure)
            if not relay.committed:  # an empty answer: nothing was worth committing before
                await relay.commit(state.headers(rid))
            await relay.send([])
            await relay.end()
            clean = True
        finally:
            if clean:
                resp.release()
            else:
                resp.close()  # never hand a half-read stream back to the pool

    def eligible(dep: Deployment) -> bool:
        # Until mid-stream continuation lands, a committed stream is never restarted.
        return not relay.committed

    try:
        await run_attempts(
            body["model"], gw.router, gw.config.retry, gw.budget, state, attempt, eligible
        )
    except Exhausted as exc:
        if not relay.committed:
            return exhausted_response(rid, state, exc)
        _, err_body, _ = final_error(exc.tried, exc.reason)
        await relay.end_with_error(err_body)
    assert relay.response is not None
    return relay.response
