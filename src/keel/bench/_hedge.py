"""``keel bench-hedge``: what hedging buys on a deployment with a slow first-token tail.

Two simulated deployments; on one of them 20 % of requests get their first token 2 s late
(forced per request, seeded, so both runs see the same slow requests). The same streaming
workload runs through keel without hedging and with it, and the command prints first-token
p50/p99 for both, their ratio, and how many extra upstream attempts hedging cost (counted in
the simulators' own logs). A benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Annotated, Any

import aiohttp
import typer

from keel.sim import answer_text
from keel.testing import SimProcess, spawn_gateway, spawn_sim


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


def _config(a: str, b: str, hedge: bool, after: float) -> dict[str, Any]:
    group: dict[str, Any] = {
        "deployments": [
            {"base_url": a, "api_key": "sk-a", "name": "slow-tail"},
            {"base_url": b, "api_key": "sk-b", "name": "steady"},
        ]
    }
    if hedge:
        group["hedge"] = {"enabled": True, "after": after, "max_ratio": 0.15}
    return {"models": {"chat": group}}


async def _one(s: aiohttp.ClientSession, url: str, prompt: str) -> tuple[float, bool]:
    body = {"model": "chat", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    t0 = time.monotonic()
    first = 0.0
    text: list[str] = []
    async with s.post(url, json=body) as r:
        buf = b""
        async for chunk in r.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                frame, buf = buf.split(b"\n\n", 1)
                data = frame.removeprefix(b"data: ")
                if data == b"[DONE]" or not data.startswith(b"{"):
                    continue
                import orjson

                obj = orjson.loads(data)
                for c in obj.get("choices") or []:
                    piece = (c.get("delta") or {}).get("content")
                    if piece:
                        if not first:
                            first = time.monotonic() - t0
                        text.append(piece)
    clean = prompt.split(" [[")[0]
    return first, "".join(text) == answer_text(clean)


async def _workload(url: str, prompts: list[str], concurrency: int) -> tuple[list[float], int]:
    sem = asyncio.Semaphore(concurrency)
    firsts: list[float] = []
    exact = 0
    async with aiohttp.ClientSession() as s:

        async def run(p: str) -> None:
            nonlocal exact
            async with sem:
                ttft, ok = await _one(s, url, p)
                firsts.append(ttft)
                exact += ok

        await asyncio.gather(*(run(p) for p in prompts))
    return firsts, exact


def _attempts(sims: list[SimProcess], tag: str) -> int:
    return sum(1 for sim in sims for e in sim.log() if tag in e.prompt)


def hedge_command(
    requests: Annotated[int, typer.Option(help="Streaming requests per run.")] = 400,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 16,
    slow_share: Annotated[
        float, typer.Option(help="Share of requests slow on one deployment.")
    ] = 0.2,
    late: Annotated[float, typer.Option(help="How late those first tokens are (s).")] = 2.0,
    after: Annotated[float, typer.Option(help="Hedge threshold (s).")] = 0.25,
    seed: Annotated[int, typer.Option()] = 7,
) -> None:
    """Hedging on a slow first-token tail: p99 first-token time and extra upstream attempts."""
    rng = random.Random(seed)
    slow = [rng.random() < slow_share for _ in range(requests)]
    with spawn_sim("--name", "a") as a, spawn_sim("--name", "b") as b:
        rows = []
        for hedge in (False, True):
            tag = uuid.uuid4().hex[:8]
            prompts = [
                f"q{i}-{tag}" + (f" [[sim@a:slow_token={late}]]" if s else "")
                for i, s in enumerate(slow)
            ]
            with spawn_gateway(_config(a.base_url, b.base_url, hedge, after)) as gw:
                t0 = time.monotonic()
                firsts, exact = asyncio.run(
                    _workload(gw.base_url + "/chat/completions", prompts, concurrency)
                )
                wall = time.monotonic() - t0
            attempts = _attempts([a, b], tag)
            rows.append((hedge, firsts, exact, attempts, wall))
    typer.echo(
        f"{requests} streaming requests, c={concurrency}; deployment 'slow-tail' answers "
        f"{slow_share:.0%} of its requests {late:g}s late; hedge after {after:g}s\n"
    )
    typer.echo(
        f"{'run':<12}{'exact':>8}{'p50 ttft':>11}{'p99 ttft':>11}{'attempts':>10}{'extra':>8}"
    )
    for hedge, firsts, exact, attempts, _wall in rows:
        extra = attempts / requests - 1
        typer.echo(
            f"{'hedging' if hedge else 'no hedging':<12}{exact:>8}{_pct(firsts, 0.5) * 1000:>9.0f}ms"
            f"{_pct(firsts, 0.99) * 1000:>9.0f}ms{attempts:>10}{extra:>8.1%}"
        )
    p99_off, p99_on = _pct(rows[0][1], 0.99), _pct(rows[1][1], 0.99)
    typer.echo(
        f"\np99 first-token ratio (no hedging / hedging): {p99_off / max(p99_on, 1e-9):.1f}x"
    )
