"""Waiting for SIGINT/SIGTERM in a server's main coroutine (no heavy imports: the bench's bare
proxy uses it too, and its memory is the floor keel is measured against)."""

from __future__ import annotations

import asyncio
import contextlib
import signal


async def until_signalled() -> None:
    """Return once SIGINT or SIGTERM arrives (Windows: never; stop with Ctrl-C there)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
