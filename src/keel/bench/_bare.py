"""The floor: a bare pass-through proxy built from keel's own stack, with no policy at all.

aiohttp.web + one aiohttp client session, uvloop, ``handler_cancellation=True`` (a client that
leaves cancels the handler; the upstream response is closed in ``finally``). Streams are relayed
the way the design notes measured them: each SSE ``data:`` frame is parsed and re-serialised
with orjson, so the comparison with keel is "same work per frame, minus keel's policies".

Run as ``python -m keel.bench._bare --upstream URL [--port 0]``; prints
``bare listening on http://HOST:PORT`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import socket

import aiohttp
import orjson
from aiohttp import web

from keel._signals import until_signalled

SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session")
UPSTREAM: web.AppKey[str] = web.AppKey("upstream")
EMBEDDINGS: web.AppKey[str] = web.AppKey("embeddings")
_SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
_DONE = b"data: [DONE]\n\n"


def _reframe(lines: list[bytes]) -> list[bytes]:
    """Complete SSE lines → re-serialised frames (``data: [DONE]`` passes through)."""
    out: list[bytes] = []
    for line in lines:
        if not line.startswith(b"data: "):
            continue  # blank separators, comments
        payload = line[6:]
        if payload == b"[DONE]":
            out.append(_DONE)
        else:
            out.append(b"data: " + orjson.dumps(orjson.loads(payload)) + b"\n\n")
    return out


async def chat(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    body = orjson.loads(await request.read())
    headers = {"content-type": "application/json"}
    if auth := request.headers.get("authorization"):
        headers["authorization"] = auth
    resp = await session.post(request.app[UPSTREAM], data=orjson.dumps(body), headers=headers)
    done = False
    try:
        if not body.get("stream") or resp.status != 200:
            data = await resp.read()
            done = True
            return web.Response(
                status=resp.status, body=data, content_type=resp.content_type or "application/json"
            )
        out = web.StreamResponse(headers=_SSE_HEADERS)
        await out.prepare(request)
        tail = b""
        while chunk := await resp.content.readany():
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            if frames := _reframe(lines):
                await out.write(b"".join(frames))
        done = True
        await out.write_eof()
        return out
    finally:
        # A fully read response goes back to the pool; anything else (cancellation included:
        # the client left) closes the upstream connection at once.
        if done:
            resp.release()
        else:
            resp.close()


async def embeddings(request: web.Request) -> web.Response:
    """``POST /v1/embeddings``: the body parsed and re-serialised, the answer relayed."""
    session = request.app[SESSION]
    body = orjson.loads(await request.read())
    headers = {"content-type": "application/json"}
    if auth := request.headers.get("authorization"):
        headers["authorization"] = auth
    resp = await session.post(request.app[EMBEDDINGS], data=orjson.dumps(body), headers=headers)
    done = False
    try:
        data = await resp.read()
        done = True
        return web.Response(
            status=resp.status, body=data, content_type=resp.content_type or "application/json"
        )
    finally:
        if done:
            resp.release()
        else:
            resp.close()  # the client left mid-answer: the upstream closes at once


def routes(app: web.Application, upstream: str) -> None:
    """The bare proxy's endpoints on ``app``, relaying to ``upstream`` (a base URL)."""
    base = upstream.rstrip("/")
    app[UPSTREAM] = base + "/chat/completions"
    app[EMBEDDINGS] = base + "/embeddings"
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)


async def serve(upstream: str, host: str, port: int) -> None:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    routes(app, upstream)

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        connector = aiohttp.TCPConnector(limit=0)
        app[SESSION] = aiohttp.ClientSession(connector=connector)
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(lifecycle)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    await site.start()
    sock: socket.socket = site._server.sockets[0]  # type: ignore[union-attr]
    print(f"bare listening on http://{host}:{sock.getsockname()[1]}", flush=True)
    try:
        await until_signalled()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="base URL ending in /v1")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.upstream, args.host, args.port))


if __name__ == "__main__":
    main()
