"""An OTLP/HTTP collector for the benchmark: takes every export and decodes nothing, so that
``keel-otel`` pays for producing and sending its telemetry and nothing else is measured.

Prints ``collector listening on http://HOST:PORT`` once it accepts connections."""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web


async def _take(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b"", content_type="application/x-protobuf")  # empty = success


async def _serve() -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", _take)
    app.router.add_post("/v1/metrics", _take)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"collector listening on http://127.0.0.1:{port}", flush=True)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(_serve())
