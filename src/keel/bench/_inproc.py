"""In-process harness for hot-path work: a canned upstream, the gateway (keel or the bare proxy)
and a client on one uvloop loop, N requests.

Wall-clock figures on a shared machine move ±15 % between runs; an instruction count does not.
Run the harness twice under valgrind with different N and divide the difference by the
difference in N: the instructions one request (or one frame) costs, reproducible to ~0.01 %
with ``--concurrency 1`` and ``PYTHONHASHSEED=0``. The harness's own client and upstream are
in the count (measure ``direct`` to subtract them)::

    ir() { PYTHONHASHSEED=0 valgrind --tool=cachegrind --cache-sim=no \\
             --cachegrind-out-file=/dev/null python -m keel.bench._inproc "$@" 2>&1 \\
           | awk '/I *refs/ {gsub(",", "", $NF); print $NF}'; }
    echo $(( ($(ir keel --requests 300) - $(ir keel --requests 100)) / 200 ))   # per request
    echo $(( ($(ir keel --tokens 60 --requests 30) - $(ir keel --tokens 10 --requests 30)) / 1500 ))  # per frame
    echo $(( ($(ir keel --embeddings base64 --requests 300) - $(ir keel --embeddings base64 --requests 100)) / 200 ))  # per embeddings request

keel runs with the benchmark's realistic config (``keel.bench._config``) and the same
collector settings as ``keel serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

_ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "sim-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there, 你好 world!"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22},
    }
)


def _chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "sim-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


async def _upstream(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    if not body.get("stream"):
        return web.Response(body=_ANSWER, content_type="application/json")
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(_chunk({"role": "assistant", "content": ""}))
    for i in range(request.app[_TOKENS]):
        await resp.write(_chunk({"content": f"tok{i} "}))
        await asyncio.sleep(0)  # one frame per read, as from an LLM
    await resp.write(_chunk({}, "stop") + b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


_TOKENS: web.AppKey[int] = web.AppKey("tokens")
_EMBEDDING: web.AppKey[bytes] = web.AppKey("embedding")


def _embedding_answer(encoding: str, dims: int = 1536) -> bytes:
    """A canned embeddings answer: one vector of ``dims`` float32 values (what the openai
    SDK asks for by default: base64)."""
    import base64
    import struct

    vec = [((i * 7919) % 2001 - 1000) / 32768 for i in range(dims)]
    data: Any = vec
    if encoding == "base64":
        data = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()
    return orjson.dumps(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": data}],
            "model": "sim-model",
            "usage": {"prompt_tokens": 4, "total_tokens": 4},
        }
    )


async def _embeddings(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=request.app[_EMBEDDING], content_type="application/json")


async def _site(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sock: socket.socket = site._server.sockets[0]  # type: ignore[union-attr]
    return runner, sock.getsockname()[1]


async def _gateway(
    which: str, upstream: str, auth: str = "static", telemetry: str | None = None
) -> tuple[web.AppRunner | None, str, str]:
    """(runner, chat URL, model) for keel, the bare proxy, or the upstream itself."""
    if which == "direct":
        return None, upstream + "/chat/completions", "sim-model"
    if which == "keel":
        from keel.bench._config import MODEL, keel_config
        from keel.config import parse_config
        from keel.gateway._app import create_app

        cfg = keel_config(upstream)[0]
        if auth not in ("static", "limits"):
            client = cfg.pop("clients")["bench"]
            if auth != "off":  # the same limits on a virtual key, with a budget and a price
                cfg["database_url"], key = await key_database(client)
                _VIRTUAL_KEY[:] = [key]
                # The hot path alone: no background poll or spend write while measuring
                # (under valgrind they would run ~50x as often per request as for real).
                cfg["auth"] = {"sync_interval": 3600, "spend_flush_interval": 3600}
                cfg["models"][MODEL]["price"] = {"input": 0.15, "output": 0.6}
        if telemetry is not None:  # every request sampled, exported to ``telemetry``
            cfg["telemetry"] = {"enabled": True, "endpoint": telemetry}
        app = create_app(parse_config(cfg))
        if auth == "limits":  # the config's client and its limits, no authentication
            from keel.bench._unauthenticated import unauthenticated

            unauthenticated(app)
        model = MODEL
    else:
        from keel.bench import _bare

        app = web.Application()
        _bare.routes(app, upstream)

        async def session(app: web.Application):  # type: ignore[no-untyped-def]
            app[_bare.SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            yield
            await app[_bare.SESSION].close()

        app.cleanup_ctx.append(session)
        model = "sim-model"
    runner, port = await _site(app)
    return runner, f"http://127.0.0.1:{port}/v1/chat/completions", model


_VIRTUAL_KEY: list[str] = []


async def key_database(client: dict[str, Any], where: str | None = None) -> tuple[str, str]:
    """A SQLite key database (in ``where``, else a temp dir) with one virtual key like the
    bench's client: (database URL, the key)."""
    import tempfile

    from keel.auth._store import KeySpec, KeyStore

    url = f"sqlite:///{tempfile.mkdtemp(prefix='keel-bench-', dir=where)}/keys.db"
    store = KeyStore(url)
    await store.open()
    spec = KeySpec.from_json(
        {
            "name": "bench",
            "budget_usd": 1e9,
            **{k: client[k] for k in ("rpm", "tpm", "max_concurrency")},
        }
    )
    _, key = await store.create_key(spec)
    # One signing key for every run: RSA key generation takes a random number of steps,
    # which would swamp the per-request difference of two runs.
    from keel.auth._jwt import generate_key

    pem_file = Path(tempfile.gettempdir()) / "keel-bench-signing.pem"
    if not pem_file.exists():
        pem_file.write_text(generate_key()[1])
    await store.add_signing_key("kbench", pem_file.read_text())
    await store.close()
    return url, key


async def _collector(request: web.Request) -> web.Response:
    """An OTLP/HTTP endpoint that takes everything and decodes nothing (empty = success)."""
    await request.read()
    return web.Response(body=b"", content_type="application/x-protobuf")


async def run(
    which: str, requests: int, concurrency: int, tokens: int, auth: str = "static",
    telemetry: bool = False, embeddings: str = "", bearer_length: int = 0,
) -> None:  # fmt: skip
    up = web.Application()
    up[_TOKENS] = tokens
    up[_EMBEDDING] = _embedding_answer(embeddings or "base64")
    up.router.add_post("/v1/chat/completions", _upstream)
    up.router.add_post("/v1/embeddings", _embeddings)
    up.router.add_post("/v1/traces", _collector)
    up.router.add_post("/v1/metrics", _collector)
    up_runner, up_port = await _site(up)
    upstream = f"http://127.0.0.1:{up_port}"
    runner, url, model = await _gateway(
        which, upstream + "/v1", auth, upstream if telemetry else None
    )
    if embeddings:  # POST /v1/embeddings instead of chat completions
        url = url.replace("/chat/completions", "/embeddings")
        body = orjson.dumps(
            {"model": model, "input": "bench embeddings", "encoding_format": embeddings}
        )
    else:
        body = orjson.dumps(
            {
                "model": model,
                "messages": [{"role": "user", "content": "bench throughput"}],
                "stream": tokens > 0,
            }
        )
    token = "sk-bench"
    if auth in ("off", "limits"):  # a token nobody reads: as long as asked (a JWT's, say)
        token = token.ljust(bearer_length, "x")
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    async with aiohttp.ClientSession() as client:
        if auth in ("virtual", "jwt"):
            headers["authorization"] = f"Bearer {_VIRTUAL_KEY[0]}"
        if auth == "jwt":  # an access token for the virtual key
            async with client.post(url.replace("/chat/completions", "/auth/token"),
                                   headers=headers) as r:  # fmt: skip
                token = (await r.json())["access_token"]
            headers["authorization"] = f"Bearer {token}"

        async def one() -> None:
            async with client.post(url, data=body, headers=headers) as r:
                data = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{r.status}: {data[:300]!r}")

        for _ in range(20):  # warm: pools, caches, first-use imports
            await one()
        from keel.gateway._serve import tune_gc

        tune_gc()

        async def worker(n: int) -> None:
            for _ in range(n):
                await one()

        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    if runner is not None:
        await runner.cleanup()
    await up_runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["keel", "bare", "direct"])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=0, help="0: non-stream; N: N-token streams")
    parser.add_argument(
        "--auth",
        choices=["static", "off", "limits", "virtual", "jwt"],
        default="static",
        help="keel's client: the config's key (default), none, the config's client with its "
        "limits but not authenticated, a virtual key, its access JWT",
    )
    parser.add_argument(
        "--telemetry",
        choices=["off", "on"],
        default="off",
        help="keel: OpenTelemetry off, or on (every request sampled, exported over OTLP/HTTP "
        "to a collector on the upstream's server that decodes nothing)",
    )
    parser.add_argument(
        "--embeddings",
        choices=["base64", "float"],
        default="",
        help="POST /v1/embeddings (1536 dimensions, in this encoding) instead of chat",
    )
    parser.add_argument(
        "--bearer-length",
        type=int,
        default=0,
        help="off/limits: pad the (unread) bearer token to this many bytes, to price a header "
        "as long as a JWT's without one",
    )
    args = parser.parse_args()
    import uvloop

    on = args.telemetry == "on"
    uvloop.run(
        run(
            args.which, args.requests, args.concurrency, args.tokens, args.auth, on,
            args.embeddings, args.bearer_length,
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
