"""The simulator's ``POST /v1/embeddings``.

Each vector is a pure function of its input and ``dimensions`` (:func:`embedding_for`): the
input's directive-free text (a token array reads as ``"tokens:1,2,3"``) hashed with SHAKE-256
into ``dimensions`` int16 values, scaled to unit length and rounded to float32 — the precision
OpenAI's vectors have — so a test can compare every number that came through keel, and the
``base64`` encoding (little-endian float32, what the openai SDK asks for by default) decodes
to exactly the same floats as the ``float`` one.

Faults come the same ways as for chat (directives in the inputs, ``x-sim-fault``, key faults,
the seeded draw) and act like on a non-stream chat request: every error before the first
byte, ``reset``, ``slow_first=S`` (before the headers), ``stall``/``stall_ka`` (silent before
the headers), ``slow_token=S`` (headers, then the pause), ``trunc``/``trunc_mid`` (the body cut
off), ``garbage_fatal`` (half a body, then a clean close), and the mid-stream errors as the
error response a non-stream request gets.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from array import array
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from keel.sim._answer import strip_directives
from keel.sim._errors import bad_request, non_stream_mid_error
from keel.sim._faults import DirectiveError
from keel.sim._stream import body_plan

if TYPE_CHECKING:
    from keel.sim._log import LogEntry
    from keel.sim._server import Simulator

DIMENSIONS = 1536  # text-embedding-3-small's, when a request names none
MAX_DIMENSIONS = 8192
_MID_ERRORS = ("err_mid", "inspect_mid", "anth_err_mid")


def input_text(item: str | list[int]) -> str:
    """What an input's vector is computed from: its text without directives, or its tokens."""
    if isinstance(item, str):
        return strip_directives(item)
    return "tokens:" + ",".join(str(t) for t in item)


@lru_cache(maxsize=4096)
def _vector(text: str, dimensions: int) -> tuple[float, ...]:
    digest = hashlib.shake_256(text.encode("utf-8", "surrogatepass")).digest(2 * dimensions)
    raw = struct.unpack(f"<{dimensions}h", digest)
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return tuple(array("f", [x / norm for x in raw]))  # float32, read back as floats


def embedding_for(item: str | list[int], dimensions: int = DIMENSIONS) -> list[float]:
    """The simulator's embedding of one input (a string, directives stripped first, or a
    token array)."""
    return list(_vector(input_text(item), dimensions))


def embedding_base64(item: str | list[int], dimensions: int = DIMENSIONS) -> str:
    """The same embedding as ``encoding_format: base64`` sends it."""
    vec = _vector(input_text(item), dimensions)
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()


def _items(value: Any) -> list[str | list[int]] | None:
    """The inputs of a request (None: no shape the endpoint accepts)."""
    if isinstance(value, str):
        return [value] if value else None
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, str) and v for v in value):
        return list(value)
    if all(type(v) is int for v in value):
        return [value]
    if all(isinstance(v, list) and v and all(type(t) is int for t in v) for v in value):
        return list(value)
    return None


def _tokens(item: str | list[int]) -> int:
    return math.ceil(len(input_text(item)) / 4) if isinstance(item, str) else len(item)


async def embeddings(sim: Simulator, request: web.Request, entry: LogEntry) -> web.StreamResponse:
    from keel.sim._server import _reset

    body = await sim._body(request, entry)
    if not isinstance(body, dict):
        return body
    items = _items(body.get("input"))
    if items is None:
        return sim._error(
            entry,
            bad_request("'input' must be a string, strings, a token array or token arrays"),
        )
    dims = body.get("dimensions", DIMENSIONS)
    if type(dims) is not int or not 1 <= dims <= MAX_DIMENSIONS:
        return sim._error(entry, bad_request(f"'dimensions' must be 1..{MAX_DIMENSIONS}"))
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        return sim._error(entry, bad_request("'encoding_format' must be float or base64"))
    model = str(body.get("model") or sim.models[0])
    entry.model = model
    texts = "\n".join(i for i in items if isinstance(i, str))
    try:
        d = sim._directives(request, texts)
    except DirectiveError as e:
        return sim._error(entry, bad_request(str(e)))
    prompt = strip_directives(texts) if texts else input_text(items[0])
    entry.prompt = prompt[:80]
    rid = entry.request_id
    active = await sim._faults(request, entry, prompt, d, 1, model)
    if not isinstance(active, dict):
        return active
    for name in _MID_ERRORS:
        if name in active:
            return sim._error(entry, non_stream_mid_error(name, f"emb-{rid[4:]}", rid))
    if "stall" in active or "stall_ka" in active:
        await sim._stopping.wait()  # silent before the headers, until the client leaves
        return _reset(request)
    encode = embedding_base64 if fmt == "base64" else embedding_for
    n = sum(_tokens(i) for i in items)
    data = orjson.dumps(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": k, "embedding": encode(item, dims)}
                for k, item in enumerate(items)
            ],
            "model": model,
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }
    )
    complete = "trunc" not in active and "trunc_mid" not in active
    if "garbage_fatal" in active:
        data, complete = data[: len(data) // 2], False
    resp = web.StreamResponse(headers={"content-type": "application/json", "x-request-id": rid})
    resp.content_length = len(data)
    await resp.prepare(request)
    entry.status = 200
    entry.tokens = len(items)
    if await sim._run(request, resp, body_plan(data, active), entry, count_tokens=False):
        entry.finished = complete
    return resp
