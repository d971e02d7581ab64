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
import dataclasses
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from keel._assembly import Frame, FrameKind, StreamAssembler
from keel._classify import ErrorKind
from keel._splice import OverlapTrimmer, continuation_body
from keel.gateway._attempts import Attempts, Exhausted, run_attempts
from keel.gateway._deployment import Deployment
from keel.gateway._errors import exhausted_response, final_error
from keel.gateway._relay import Meta, StreamRelay, frame_bytes, keel_chunk
from keel.gateway._upstream import AttemptFailed, post, stream_frames

if TYPE_CHECKING:
    from keel.gateway._app import Gateway


async def stream(
    request: web.Request, gw: Gateway, rid: str, body: dict[str, Any], state: Attempts
) -> web.StreamResponse:
    return await StreamSession(request, gw, rid, body, state).run()


class StreamSession:
    def __init__(
        self, request: web.Request, gw: Gateway, rid: str, body: dict[str, Any], state: Attempts
    ) -> None:
        self.gw = gw
        self.rid = rid
        self.body = body
        self.state = state
        self.group = gw.config.models[body["model"]]
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
        # Pre-commit buffer, mirrored by relay.held.
        self._held_text: list[str] = []
        self._first_content_at = 0.0
        # Usage across attempts.
        self.usage_frame: bytes | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0

    # -- the loop's view ------------------------------------------------------------------------

    async def run(self) -> web.StreamResponse:
        gw = self.gw
        try:
            await run_attempts(
                self.body["model"],
                gw.router,
                gw.config.retry,
                gw.budget,
                self.state,
                self.attempt,
                self.eligible,
            )
        except Exhausted as exc:
            if not self.relay.committed:
                return exhausted_response(self.rid, self.state, exc)
            _, err_body, _ = final_error(exc.tried, exc.reason)
            await self.relay.end_with_error(err_body)
        assert self.relay.response is not None
        return self.relay.response

    def eligible(self, dep: Deployment) -> bool:
        """Before the commit anyone may answer; after it only deployments that can continue,
        and never inside a tool call (arguments cannot be spliced safely)."""
        if not self.relay.committed:
            return True
        return self.can_splice and not self.tool_calls and dep.continuation != "none"

    # -- one attempt ----------------------------------------------------------------------------

    async def attempt(self, dep: Deployment) -> None:
        continuing = self.relay.committed
        if continuing:
            cont = continuation_body(
                self.body,
                "".join(self.sent),
                dep.continuation,
                dep.dialect,
                self.tokens,  # type: ignore[arg-type]
            )
            if cont is None:  # the cut fell exactly on the client's token limit
                await self._end([self._finish_chunk("length")])
                return
            if self.wants_usage:
                cont["stream_options"] = {
                    **(cont.get("stream_options") or {}),
                    "include_usage": True,
                }
            payload = orjson.dumps({**cont, "model": dep.model})
            self.continued = True
            trimmer = OverlapTrimmer("".join(self.sent)) if dep.continuation == "instruct" else None
        else:
            payload = self.gw.upstream_body(self.body, dep)
            trimmer = None
        loop = asyncio.get_running_loop()
        first_deadline = loop.time() + dep.timeouts.first_token
        resp = await post(self.gw.session, dep, payload, self.state.deadline)  # type: ignore[arg-type]
        asm = StreamAssembler(dialect=dep.dialect, require_done=True)
        relay = self.relay
        relayed = 0  # content chunks of this attempt the client has (or will have) seen
        reported = False  # this attempt's usage chunk arrived
        # The terminal chunk is held until the stream proves complete ([DONE]): if the upstream
        # fails after it, the continuation supplies the ending and the client sees one.
        finish: tuple[bytes, str] | None = None
        clean = False
        try:
            async for frames in stream_frames(resp, dep, asm, self.state.deadline, first_deadline):
                out: list[bytes] = []
                for f in frames:
                    kind = f.kind
                    if kind is FrameKind.CHUNK:
                        obj = f.obj
                        if obj is not None and not obj.get("choices") and obj.get("usage"):
                            self._usage(obj["usage"], f.data)
                            reported = True
                            continue
                        if continuing:
                            data = self._splice(f, trimmer)
                            if data is None:
                                continue
                        else:
                            data = frame_bytes(f.data)
                        if f.content:
                            relayed += 1
                        if f.finish_reason is not None:
                            if not relay.committed:
                                await self._commit(asm)
                            finish = (data, f.content)
                        elif relay.committed:
                            out.append(data)
                            self._shown(f.content, asm)
                        else:
                            self._hold(data, f.content)
                            if self._ready_to_commit(f, asm):
                                await self._commit(asm)
                    elif kind is FrameKind.ERROR or kind is FrameKind.INVALID:
                        assert f.error is not None
                        err = f.error
                        if out:
                            await relay.send(out)
                            out = []
                        if err.kind is ErrorKind.MODERATION:
                            if self.group.on_content_filter == "pass":
                                # Output moderation: end the answer the way OpenAI does.
                                if not relay.committed:
                                    await self._commit(asm)
                                await self._end([self._finish_chunk("content_filter")])
                                clean = True
                                return
                            # Another provider's moderation may let the answer through.
                            err = dataclasses.replace(err, failover=True, retryable=False)
                        raise AttemptFailed(err)
                if out:
                    await relay.send(out)
            outcome = asm.finish()
            if not outcome.complete:
                assert outcome.failure is not None
                raise AttemptFailed(outcome.failure)
            if not relay.committed:  # an empty answer: commit what we have
                await self._commit(asm)
            if not reported:
                self.completion_tokens += relayed
            ending: list[bytes] = []
            if finish is not None:
                ending.append(finish[0])
                self._shown(finish[1], asm)
            await self._end(ending)
            clean = True
        except AttemptFailed:
            if not relay.committed:
                self._held_text.clear()
                relay.discard_held()
            elif not reported:
                # Unreported, but generated (and shown, but for a held terminal chunk).
                self.completion_tokens += relayed - (1 if finish and finish[1] else 0)
            raise
        finally:
            if clean:
                resp.release()
            else:
                resp.close()  # never hand a half-read stream back to the pool

    # -- pieces ---------------------------------------------------------------------------------

    def _hold(self, data: bytes, content: str) -> None:
        if not self.relay.held:
            self._first_content_at = time.monotonic()
        self.relay.hold(data)
        if content:
            self._held_text.append(content)

    def _ready_to_commit(self, f: Frame, asm: StreamAssembler) -> bool:
        if not (f.content or f.finish_reason or asm.tool_calls):
            return False  # the role chunk alone is not worth committing for
        buf = self.group.commit_buffer
        if f.finish_reason or (not buf.tokens and not buf.ms):
            return True
        if buf.tokens and len(self._held_text) >= buf.tokens:
            return True
        return bool(buf.ms) and (time.monotonic() - self._first_content_at) * 1000 >= buf.ms

    async def _commit(self, asm: StreamAssembler) -> None:
        self.meta = (asm.id, asm.created, asm.model)
        await self.relay.commit(self.state.headers(self.rid))
        for text in self._held_text:
            self.sent.append(text)
            self.tokens += 1
        self._held_text.clear()
        self.tool_calls = bool(asm.tool_calls)
        await self.relay.send([])  # flush the held frames

    def _shown(self, content: str, asm: StreamAssembler) -> None:
        if content:
            self.sent.append(content)
            self.tokens += 1
        if not self.tool_calls and asm.tool_calls:
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
