"""The benchmark's simulator process: ``keel sim``'s server with a deeper accept queue.

Why not ``keel sim`` itself: thousands of streams open within seconds while the simulator
shares a core with the load generator; a 1,024-deep listen backlog overflows then, SYNs are
dropped and the gateway under test sees connect timeouts that the *test* caused (its breaker
opens, and the cell measures the harness). Same simulator, same behaviour, a 4,096-deep queue.

Run as ``python -m keel.bench._simproc``; prints ``keel-sim listening on URL`` like ``keel sim``.
"""

from __future__ import annotations

from aiohttp import web

from keel._signals import until_signalled
from keel.sim import Simulator

BACKLOG = 4096


async def _serve() -> None:
    sim = Simulator(name="bench")
    runner = web.AppRunner(
        sim.app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, backlog=BACKLOG, reuse_address=True).start()
    port = runner.addresses[0][1]
    print(f"keel-sim listening on http://127.0.0.1:{port}/v1", flush=True)
    try:
        await until_signalled()
    finally:
        await sim.stop()
        await runner.cleanup()


def main() -> None:
    import uvloop

    uvloop.run(_serve())


if __name__ == "__main__":
    main()
