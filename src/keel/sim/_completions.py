"""The simulator's ``POST /v1/completions`` (legacy text completions), stream and non-stream.

The text is the chat answer's (:func:`keel.sim.answer_text`) of the prompt with its
directives removed — one prompt per request (a string, or one token array, which reads as
``"tokens:1,2,3"``) — cut to ``max_tokens`` (then ``finish_reason`` is ``length``). A stream
is ``text_completion`` chunks, one per token, then the terminal chunk, the usage chunk when
``stream_options.include_usage``, and ``[DONE]``.

Faults come the same ways and mean the same as for chat (``keel.sim._server``): every error
before the first byte, ``reset``, and in the stream ``trunc``, ``trunc_mid``, ``stall``,
``stall_ka``, ``err_mid``, ``inspect_mid``, ``anth_err_mid``, ``garbage_fatal``, the finish and
``[DONE]`` faults, the SSE syntax variants, ``slow_first`` and ``slow_token``; on a non-stream
request as on a non-stream chat request.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from keel.sim._answer import strip_directives, tokens_for
from keel.sim._errors import bad_request, non_stream_mid_error
from keel.sim._faults import TERMINAL, DirectiveError
from keel.sim._stream import StreamSpec, body_plan, stream_plan

if TYPE_CHECKING:
    from keel.sim._log import LogEntry
    from keel.sim._server import Simulator

_MID_ERRORS = ("err_mid", "inspect_mid", "anth_err_mid")


def _prompt(value: Any) -> str | None:
    """The one prompt of a request, as text (None: none the simulator answers)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(type(t) is int for t in value):
        return "tokens:" + ",".join(str(t) for t in value)
    return None


async def completions(sim: Simulator, request: web.Request, entry: LogEntry) -> web.StreamResponse:
    from keel.sim._server import _SSE_HEADERS, _reset

    body = await sim._body(request, entry)
    if not isinstance(body, dict):
        return body
    text = _prompt(body.get("prompt"))
    if text is None:
        return sim._error(
            entry, bad_request("'prompt' must be one string or one token array (simulator)")
        )
    model = str(body.get("model") or request.match_info.get("deployment") or sim.models[0])
    entry.model, entry.stream = model, bool(body.get("stream"))
    try:
        d = sim._directives(request, text)
    except DirectiveError as e:
        return sim._error(entry, bad_request(str(e)))
    prompt = strip_directives(text)
    entry.prompt = prompt[:80]
    pieces = list(tokens_for(prompt, d.length if d.length is not None else sim.length))
    finish_reason = "stop"
    limit = body.get("max_tokens")
    if type(limit) is int and 0 <= limit < len(pieces):
        pieces, finish_reason = pieces[:limit], "length"

    active = await sim._faults(request, entry, prompt, d, len(pieces), model)
    if not isinstance(active, dict):
        return active

    rid = entry.request_id
    n = len(pieces)
    p = math.ceil(len(prompt) / 4)
    usage = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
    cmpl_id = f"cmpl-{rid[4:]}"
    complete = not any(name in TERMINAL for name in active)
    if entry.stream:
        opts = body.get("stream_options")
        spec = StreamSpec(
            chunk_id=cmpl_id,
            request_id=rid,
            created=int(time.time()),
            model=model,
            role_delta={},
            deltas=[{"content": piece} for piece in pieces],
            finish_reason=finish_reason,
            usage=usage if isinstance(opts, dict) and opts.get("include_usage") else None,
            token_delay=d.delay if d.delay is not None else sim.token_delay,
            first_delay=sim.first_token_delay + active.get("slow_token", 0.0),
            text=True,
        )
        plan = stream_plan(spec, active)
        resp = web.StreamResponse(headers=_SSE_HEADERS | {"x-request-id": rid})
    else:
        for name in _MID_ERRORS:
            if name in active:
                return sim._error(entry, non_stream_mid_error(name, cmpl_id, rid))
        if "stall" in active or "stall_ka" in active:
            await sim._stopping.wait()  # silent before the headers, until the client leaves
            return _reset(request)
        choice: dict[str, Any] = {"text": "".join(pieces), "index": 0, "logprobs": None}
        if "no_finish" not in active:
            choice["finish_reason"] = (
                None
                if "null_finish" in active
                else ""
                if "empty_finish" in active
                else finish_reason
            )
        data = orjson.dumps(
            {
                "id": cmpl_id,
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
                "usage": usage,
            }
        )
        if "garbage_fatal" in active:
            data, complete = data[: len(data) // 2], False
        complete = complete and "trunc" not in active and "trunc_mid" not in active
        plan = body_plan(data, active)
        resp = web.StreamResponse(headers={"content-type": "application/json", "x-request-id": rid})
        resp.content_length = len(data)
        entry.tokens = n  # counted up front; a truncated body shows finished=False
    await resp.prepare(request)
    entry.status = 200
    if await sim._run(request, resp, plan, entry, count_tokens=entry.stream):
        entry.finished = complete
    return resp
