"""The load generator: raw HTTP over aiohttp's client (no SDK on the measuring side) and, for
disconnect probes, plain asyncio sockets so the moment the client leaves is exact.

Every generator is bounded twice: by a request count or duration, and by a timeout. Nothing
here decides what a result means; ``_cells.py`` does.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from keel.bench._rawhttp import RawClient

# A generous connect timeout: a gateway that falls behind on accepting should show up as
# slow streams, not as load-generator errors.
_NO_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=60)


def chat_body(model: str, prompt: str, stream: bool, **extra: Any) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": stream,
        **extra,
    }
    return orjson.dumps(body)


def embeddings_body(model: str, text: str, encoding: str = "base64") -> bytes:
    return orjson.dumps({"model": model, "input": text, "encoding_format": encoding})


def _headers(extra: Mapping[str, str]) -> dict[str, str]:
    return {"content-type": "application/json", "authorization": "Bearer sk-bench", **extra}


def session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        timeout=_NO_TIMEOUT,
        skip_auto_headers=("User-Agent",),
    )


@dataclass
class LoadResult:
    ok: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds
    frames: int = 0


async def closed_loop(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    concurrency: int,
    duration: float,
    max_requests: int = 1_000_000,
    stream: bool = False,
) -> LoadResult:
    """``concurrency`` workers, each sending its next request as soon as the last one ends,
    for ``duration`` seconds (or ``max_requests``). Streams count their ``data:`` frames."""
    result = LoadResult()
    hdrs = _headers(headers)
    deadline = time.monotonic() + duration
    budget = [max_requests]

    async def raw_worker() -> None:
        client = RawClient(url, hdrs)
        try:
            while budget[0] > 0 and time.monotonic() < deadline:
                budget[0] -= 1
                t0 = time.monotonic()
                try:
                    status, _ = await client.post(body)
                except OSError as exc:
                    result.errors[type(exc).__name__] += 1
                    continue
                if status != 200:
                    result.errors[f"http {status}"] += 1
                    continue
                result.latencies.append(time.monotonic() - t0)
                result.ok += 1
        finally:
            client.close()

    async with session(concurrency) as s:

        async def stream_worker() -> None:
            while budget[0] > 0 and time.monotonic() < deadline:
                budget[0] -= 1
                t0 = time.monotonic()
                try:
                    async with s.post(url, data=body, headers=hdrs) as resp:
                        frames = 0
                        async for chunk in resp.content.iter_any():
                            frames += chunk.count(b"data:")
                        result.frames += frames
                        if resp.status != 200:
                            result.errors[f"http {resp.status}"] += 1
                            continue
                except (aiohttp.ClientError, OSError) as exc:
                    result.errors[type(exc).__name__] += 1
                    continue
                result.latencies.append(time.monotonic() - t0)
                result.ok += 1

        worker = stream_worker if stream else raw_worker
        t_start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.elapsed = time.monotonic() - t_start
    return result


async def sequential(
    url: str, body: bytes, headers: Mapping[str, str], n: int, first_content: bool = False
) -> LoadResult:
    """One request at a time on a warm keep-alive connection. With ``first_content`` the
    latency is send → first frame carrying content (the stream keeps being read to its end)."""
    result = LoadResult()
    hdrs = _headers(headers)
    if not first_content:
        client = RawClient(url, hdrs)
        try:
            for _ in range(n):
                t0 = time.monotonic()
                try:
                    status, _ = await client.post(body)
                except OSError as exc:
                    result.errors[type(exc).__name__] += 1
                    continue
                if status != 200:
                    result.errors[f"http {status}"] += 1
                    continue
                result.latencies.append(time.monotonic() - t0)
                result.ok += 1
        finally:
            client.close()
        return result
    async with session(1) as s:
        for _ in range(n):
            t0 = time.monotonic()
            t_first = 0.0
            try:
                async with s.post(url, data=body, headers=hdrs) as resp:
                    seen = b""
                    async for chunk in resp.content.iter_any():
                        if not t_first:
                            seen += chunk
                            if _has_content(seen):
                                t_first = time.monotonic()
                    if resp.status != 200:
                        result.errors[f"http {resp.status}"] += 1
                        continue
            except (aiohttp.ClientError, OSError) as exc:
                result.errors[type(exc).__name__] += 1
                continue
            result.latencies.append((t_first or time.monotonic()) - t0)
            result.ok += 1
    return result


def _has_content(buf: bytes) -> bool:
    """A frame with a non-empty content delta has arrived (the role chunk has ``""``)."""
    i = buf.find(b'"content":"')
    while i >= 0:
        if buf[i + 11 : i + 12] not in (b'"', b""):
            return True
        i = buf.find(b'"content":"', i + 1)
    return False


# -- disconnect probes ----------------------------------------------------------------------


@dataclass
class Probe:
    tag: str  # unique text in the prompt, to find the upstream request in the simulator's log
    t_cancel: float = 0.0  # time.monotonic() just before the client closed its socket
    error: str = ""


async def disconnect_probe(
    url: str,
    model: str,
    headers: Mapping[str, str],
    phase: str,
    wait: float,
    timeout: float = 10.0,  # noqa: ASYNC109 - a bound on the whole probe, used once
) -> Probe:
    """Open one request, leave at the chosen moment by closing the socket, note the time.

    ``prefirst``: a stream whose upstream has sent headers but no token yet;
    ``midstream``: a stream, after a few content frames have arrived;
    ``nonstream``: a non-stream request whose upstream has not answered yet."""
    probe = Probe(tag=f"dc-{phase}-{uuid.uuid4().hex[:12]}")
    directive = {
        "prefirst": "[[sim:slow_token=30]]",
        "midstream": "[[sim:len=2000,delay=0.02]]",
        "nonstream": "[[sim:slow_first=30]]",
    }[phase]
    payload = chat_body(model, f"{probe.tag} {directive}", stream=phase != "nonstream")
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = [
        f"POST {parts.path} HTTP/1.1",
        f"Host: {host}:{port}",
        *(f"{k}: {v}" for k, v in _headers(headers).items()),
        f"Content-Length: {len(payload)}",
    ]
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
            if phase == "midstream":
                buf = b""
                while buf.count(b'"content":"') < 4:
                    chunk = await reader.read(65536)
                    if not chunk:
                        probe.error = "stream ended before the probe left"
                        return probe
                    buf += chunk
            else:
                await asyncio.sleep(wait)  # the upstream request is in flight, nothing relayed
    except (TimeoutError, OSError) as exc:
        probe.error = type(exc).__name__
    finally:
        if writer is not None:
            probe.t_cancel = time.monotonic()
            writer.close()  # FIN, like a client process that goes away
    return probe


async def open_loop(
    url: str, body: bytes, headers: Mapping[str, str], rate: float, duration: float
) -> LoadResult:
    """A fixed arrival rate, whatever the target's speed: the same offered load for every
    target, so their latencies compare at equal load."""
    result = LoadResult()
    hdrs = _headers(headers)
    idle: list[RawClient] = []  # keep-alive connections not in use right now

    async def one() -> None:
        client = idle.pop() if idle else RawClient(url, hdrs)
        t0 = time.monotonic()
        try:
            status, _ = await client.post(body)
        except OSError as exc:
            result.errors[type(exc).__name__] += 1
            return
        idle.append(client)
        if status != 200:
            result.errors[f"http {status}"] += 1
            return
        result.latencies.append(time.monotonic() - t0)
        result.ok += 1

    tasks: list[asyncio.Task[None]] = []
    t_start = time.monotonic()
    try:
        for k in range(int(rate * duration)):
            delay = t_start + k / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=duration + 60)
    finally:
        for c in idle:
            c.close()
    result.elapsed = time.monotonic() - t_start
    return result
