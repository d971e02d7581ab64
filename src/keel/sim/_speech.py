"""The simulator's ``POST /v1/audio/speech``: OpenAI's text-to-speech endpoint, streamed.

The "audio" is a pure function of the input text (:func:`audio_bytes`: SHAKE-256 of the text,
``AUDIO_BYTES_PER_CHAR`` bytes per character), so a test can check every byte that came
through keel. It is written in ``audio_chunk`` byte chunks with ``audio_delay`` seconds
before each one but the first, so cancelling mid-synthesis is observable: the request log
records the chunks written and the monotonic time the connection closed, like a chat request.

Faults come the same ways as for chat (directives in ``input``, ``x-sim-fault``, key faults,
the seeded draw); the ones that apply to audio: every error before the first byte, ``reset``,
``slow_first=S`` (before the headers), ``trunc=N`` / ``trunc_mid=N`` (the connection drops
after N chunks) and ``stall=N`` / ``stall_ka=N`` (silence after N chunks until the client
leaves).
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from keel.sim._answer import strip_directives
from keel.sim._errors import bad_request, error_reply, key_fingerprint
from keel.sim._faults import DirectiveError, Directives, parse_directives, parse_header

if TYPE_CHECKING:
    from keel.sim._log import LogEntry
    from keel.sim._server import Simulator

AUDIO_BYTES_PER_CHAR = 200
CONTENT_TYPES = {
    "pcm": "audio/pcm",
    "mp3": "audio/mpeg",
    "wav": "audio/wav",
    "opus": "audio/opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
}


def audio_bytes(text: str) -> bytes:
    """The simulator's audio for ``text`` (directives are stripped first)."""
    prompt = strip_directives(text)
    return hashlib.shake_256(prompt.encode("utf-8", "surrogatepass")).digest(
        AUDIO_BYTES_PER_CHAR * max(1, len(prompt))
    )


async def speech(sim: Simulator, request: web.Request) -> web.StreamResponse:
    entry = sim._log.open(sim.name)
    entry.kind = "speech"
    entry.stream = True
    entry.request_id = f"req_{sim._rid}{entry.seq}"
    try:
        return await _handle(sim, request, entry)
    except asyncio.CancelledError:  # handler cancellation: the client went away
        entry.client_disconnected = True
        raise
    finally:
        sim._log.close(entry)


async def _handle(sim: Simulator, request: web.Request, entry: LogEntry) -> web.StreamResponse:
    from keel.sim._server import _api_key, _reset

    api_key = _api_key(request)
    entry.key = key_fingerprint(api_key)
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return sim._error(entry, bad_request("request body is not valid JSON"))
    text = body.get("input") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text:
        return sim._error(entry, bad_request("'input' must be a non-empty string"))
    fmt = body.get("response_format", "mp3")
    if fmt not in CONTENT_TYPES:
        return sim._error(
            entry, bad_request(f"'response_format' must be one of {list(CONTENT_TYPES)}")
        )
    model = str(body.get("model") or sim.models[0])
    entry.model = model
    try:
        d = parse_directives(text, sim.name) or Directives()
        header = request.headers.get("x-sim-fault")
        if header and (more := parse_header(header, sim.name)):
            d.update(more)
    except DirectiveError as e:
        return sim._error(entry, bad_request(str(e)))
    prompt = strip_directives(text)
    entry.prompt = prompt[:80]
    audio = audio_bytes(text)
    size = max(1, sim.audio_chunk)
    chunks = [audio[i : i + size] for i in range(0, len(audio), size)]
    faults = sim._choose_faults(api_key, prompt, d, len(chunks), entry.t_open)
    if faults:
        entry.fault = ",".join(f.name for f in faults)
    cut: int | None = None  # chunks written before a break
    stall = False
    for f in faults:
        if f.spec.phase == "error":
            reply = error_reply(
                f.name, f.value, sim.dialect, api_key=api_key, model=model,
                request_id=entry.request_id,
            )  # fmt: skip
            return sim._error(entry, reply)
        if f.spec.phase == "reset":
            return _reset(request)
        if f.name == "slow_first":
            await asyncio.sleep(f.param())
        elif f.name in ("trunc", "trunc_mid", "stall", "stall_ka"):
            cut = int(f.param())
            stall = f.name.startswith("stall")
    if sim.latency:
        await asyncio.sleep(sim.latency)
    resp = web.StreamResponse(
        headers={"content-type": CONTENT_TYPES[fmt], "x-request-id": entry.request_id}
    )
    await resp.prepare(request)
    entry.status = 200
    try:
        for i, chunk in enumerate(chunks):
            if cut is not None and i >= cut:
                if stall:
                    await sim._stopping.wait()
                if request.transport is not None:
                    request.transport.abort()
                return resp
            if i and sim.audio_delay:
                await asyncio.sleep(sim.audio_delay)
            await resp.write(chunk)
            entry.tokens += 1
        await resp.write_eof()
    except ConnectionResetError:  # a write found the connection already gone
        entry.client_disconnected = True
        return resp
    entry.finished = True
    return resp
