"""Helpers for the limits/health/balancing tests: a real redis-server, gateways started in
parallel, a closed-loop load generator (plain aiohttp: cheap enough to drive a few hundred
requests per second on a small machine), and a /metrics reader."""

from __future__ import annotations

import asyncio
import math
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from keel.sim import LogEntry
from keel.testing import GatewayProcess, spawn_gateway

REDIS = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """``redis-server`` without persistence on a fixed port, so it can be killed and started
    again at the same address."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS is not None
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [REDIS, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while True:  # ready when it answers PING
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.01)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def command(self, *args: str) -> Any:
        import redis

        r = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        try:
            return r.execute_command(*args)
        finally:
            r.close()


def spawn_gateways(cfg: dict[str, Any], n: int, workdir: str) -> list[GatewayProcess]:
    """``n`` keel serve processes with the same config, started in parallel."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: spawn_gateway(cfg, workdir=workdir), range(n)))


@dataclass(slots=True)
class Result:
    target: int  # index of the gateway URL
    status: int
    t0: float
    t1: float
    deployment: str
    tag: str
    headers: dict[str, str]
    error: str = ""  # the body of a non-200 answer, for assertion messages

    @property
    def latency(self) -> float:
        return self.t1 - self.t0


def body(prompt: str, model: str = "m", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], **kw}


async def post(
    session: aiohttp.ClientSession,
    base_url: str,
    payload: dict[str, Any],
    headers: dict[str, str] | None = None,
    target: int = 0,
    tag: str = "",
) -> Result:
    t0 = time.monotonic()
    async with session.post(
        base_url + "/chat/completions",
        json=payload,
        headers={"authorization": "Bearer sk-client", **(headers or {})},
    ) as r:
        raw = await r.read()
        return Result(
            target, r.status, t0, time.monotonic(), r.headers.get("x-keel-deployment", ""),
            tag, {k.lower(): v for k, v in r.headers.items()},
            "" if r.status == 200 else raw.decode(errors="replace"),
        )  # fmt: skip


async def closed_loop(
    base_urls: Sequence[str],
    workers_per_url: int,
    until: Callable[[], bool],
    payload: Callable[[int], dict[str, Any]],
    headers: dict[str, str] | None = None,
) -> list[Result]:
    """Each worker sends one request after another to its gateway until ``until()``."""
    results: list[Result] = []
    counter = iter(range(10**9))
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:

        async def worker(i: int) -> None:
            while not until():
                results.append(await post(s, base_urls[i], payload(next(counter)), headers, i))

        await asyncio.gather(
            *(worker(i) for i in range(len(base_urls)) for _ in range(workers_per_url))
        )
    return results


def for_seconds(seconds: float) -> Callable[[], bool]:
    end = time.monotonic() + seconds
    return lambda: time.monotonic() >= end


# The key /metrics is read with: a gateway that asks its clients for a key asks its scraper too
# (an open gateway ignores it).
SCRAPE_KEY = "sk-client"


async def metrics(
    gateway_url: str, as_key: str = SCRAPE_KEY
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of GET /metrics as {(name, sorted labels): value}."""
    auth = {"authorization": f"Bearer {as_key}"}
    async with aiohttp.ClientSession() as s, s.get(gateway_url + "/metrics", headers=auth) as r:
        assert r.status == 200, (r.status, await r.text())
        text = await r.text()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def metric(
    gateway_url: str, name: str, *, as_key: str = SCRAPE_KEY, **labels: str
) -> float | None:
    want = tuple(sorted(labels.items()))
    return (await metrics(gateway_url, as_key)).get((name, want))


async def wait_metric(
    gateway_url: str,
    name: str,
    pred: Callable[[float | None], bool],
    *,
    as_key: str = SCRAPE_KEY,
    **labels: str,
) -> float:
    """Poll /metrics (the gateway's own report) until ``pred(value)``; returns the time taken.
    Bounded by 5 s."""
    t0 = time.monotonic()
    while True:
        value = await metric(gateway_url, name, as_key=as_key, **labels)
        if pred(value):
            return time.monotonic() - t0
        if time.monotonic() - t0 > 5.0:
            raise TimeoutError(f"{name}{labels} = {value} after 5s")
        await asyncio.sleep(0.01)


def windows(entries: Iterable[LogEntry], seconds: float) -> dict[int, int]:
    """Requests the simulator admitted per fixed window (its own alignment: floor(t / s))."""
    counts: dict[int, int] = {}
    for e in entries:
        if e.status == 200:
            w = math.floor(e.t_open / seconds)
            counts[w] = counts.get(w, 0) + 1
    return counts


def mean_concurrency(entries: Sequence[LogEntry], start: float, end: float) -> float:
    """Average number of requests open at the simulator over [start, end]."""
    busy = 0.0
    for e in entries:
        t1 = e.t_close if e.t_close is not None else end
        busy += max(0.0, min(t1, end) - max(e.t_open, start))
    return busy / (end - start)
