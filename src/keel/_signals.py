"""Waiting for SIGINT/SIGTERM in a server's main coroutine (no heavy imports: the bench's bare
proxy uses it too, and its memory is the floor keel is measured against)."""

from __future__ import annotations

import asyncio
import contextlib
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def until_signalled() -> None:
    """Return once SIGINT or SIGTERM arrives (Windows: never; stop with Ctrl-C there)."""
    with Signals() as signals:
        await signals.next()


class Signals:
    """SIGINT/SIGTERM as they arrive, one ``next()`` each: the first starts a graceful stop,
    a second one (either) stops at once. While it is open the signals no longer interrupt
    the process; ``close()`` restores the default handlers."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[signal.Signals] = asyncio.Queue()
        self._installed: list[signal.Signals] = []
        for sig in STOP_SIGNALS:
            with contextlib.suppress(NotImplementedError):
                self._loop.add_signal_handler(sig, self._queue.put_nowait, sig)
                self._installed.append(sig)

    async def next(self) -> signal.Signals:
        return await self._queue.get()

    def close(self) -> None:
        for sig in self._installed:
            self._loop.remove_signal_handler(sig)
        self._installed.clear()

    def __enter__(self) -> Signals:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
