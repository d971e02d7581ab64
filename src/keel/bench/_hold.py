"""Many concurrent slow streams, held open by a few load-generator processes.

The parent drives each worker over a ``multiprocessing`` pipe with three commands:

* ``("open", n, rate, timeout)``: start ``n`` more streams at ``rate`` per second and answer
  once each has received its first frame (or failed, or ``timeout`` passed);
* ``("window", seconds)``: answer how many open streams received at least one frame during
  the next ``seconds`` — "held" means *receiving*, not merely connected;
* ``("close",)``: drop every stream (the client leaves) and exit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from multiprocessing.connection import Connection
from typing import Any

import aiohttp

from keel.bench._load import _headers, chat_body, session
from keel.bench._measure import raise_fd_limit


class Holder:
    def __init__(self, url: str, model: str, headers: dict[str, str], prompt: str) -> None:
        self.url = url
        self.headers = _headers(headers)
        self.body = chat_body(model, prompt, stream=True)
        self.frames: list[int] = []  # per stream
        self.live: list[bool] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.sample = ""  # the first error response's body
        self.tasks: list[asyncio.Task[None]] = []
        self.session: aiohttp.ClientSession | None = None

    async def _one(self, i: int) -> None:
        assert self.session is not None
        try:
            async with self.session.post(self.url, data=self.body, headers=self.headers) as r:
                if r.status != 200:
                    self.errors[f"http {r.status}"] += 1
                    if not self.sample:  # one body is enough to tell why
                        self.sample = (await r.content.read(400)).decode("utf-8", "replace")
                    return
                self.live[i] = True
                async for chunk in r.content.iter_any():
                    self.frames[i] += chunk.count(b"data:")
        except (aiohttp.ClientError, OSError) as exc:
            self.errors[type(exc).__name__] += 1
        finally:
            self.live[i] = False

    async def open(self, n: int, rate: float, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
        if self.session is None:
            self.session = session(0)
        first = len(self.frames)
        self.frames.extend([0] * n)
        self.live.extend([False] * n)
        t0 = time.monotonic()
        for k in range(n):
            # Paced launch: a thundering herd would measure the accept queue, not the gateway.
            delay = t0 + k / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.tasks.append(asyncio.create_task(self._one(first + k)))
        deadline = t0 + timeout
        new = range(first, first + n)
        while time.monotonic() < deadline:
            waiting = sum(1 for i in new if self.frames[i] == 0 and not self.tasks[i].done())
            if not waiting:
                break
            await asyncio.sleep(0.1)
        started = sum(1 for i in new if self.frames[i] > 0 and self.live[i])
        return {"opened": started, "requested": n, "errors": dict(self.errors)}

    async def window(self, seconds: float) -> dict[str, Any]:
        before = list(self.frames)
        await asyncio.sleep(seconds)
        live = [i for i, on in enumerate(self.live) if on]
        receiving = sum(1 for i in live if self.frames[i] > before[i])
        return {
            "live": len(live),
            "receiving": receiving,
            "total": len(self.frames),
            "errors": dict(self.errors),
            "error_sample": self.sample,
        }

    async def close(self) -> dict[str, Any]:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()
        return {"closed": len(self.tasks)}


async def _serve(conn: Connection, holder: Holder) -> None:
    loop = asyncio.get_running_loop()
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd[0] == "open":
            conn.send(await holder.open(*cmd[1:]))
        elif cmd[0] == "window":
            conn.send(await holder.window(cmd[1]))
        else:
            conn.send(await holder.close())
            return


def worker(conn: Connection, url: str, model: str, headers: dict[str, str], prompt: str) -> None:
    """Process entry point (``multiprocessing`` spawn target)."""
    raise_fd_limit()
    # Readers can lag (kernel buffers absorb it); the simulator sharing this core must not,
    # or its accept queue overflows and the gateway sees connect timeouts the test caused.
    with contextlib.suppress(OSError):
        os.nice(10)
    import uvloop

    try:
        uvloop.run(_serve(conn, Holder(url, model, headers, prompt)))
    finally:
        conn.close()
