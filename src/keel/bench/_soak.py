"""``keel bench --soak DURATION``: hours of faults in minutes of wall time, watching memory.

Two simulators fail the way providers do (``r429=0.02,e500=0.02,trunc=0.02,stall=0.005``
each), a gateway serves both as one model group, and 16 clients send one request after
another: 70 % streams, 5 % abandoned by the client mid-way. Every answer is checked against
the text the simulator would have sent without faults. At every interval the report shows the
gateway's resident memory, open descriptors and live objects (the most numerous types, and
the ones that grew most since the warm-up), so that a leak shows as a slope.

The gateway is ``keel serve``'s own code (``create_app`` + ``start_site`` + ``tune_gc``) in a
child process that also writes a census of its live objects (``gc.get_objects()`` by type,
after a full collection) to a file when sent SIGUSR1 — at every interval:
``python -m keel.bench._soak CONFIG CENSUS``. Linux only (/proc).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAULTS = "r429=0.02,e500=0.02,trunc=0.02,stall=0.005"
CLIENTS = 16
STREAM_SHARE = 0.7
ABORT_SHARE = 0.05
TOP = 12  # types shown per sample
# The simulators' pace (a 20-token answer in ~0.15 s) and keel's timeouts: a stalled stream
# is noticed after IDLE seconds and continued elsewhere, instead of holding a client 30 s.
SIM_ARGS = ("--token-delay", "0.005", "--latency", "0.05")
IDLE = 2.0


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``5m``, ``1h30m`` → seconds."""
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text)
    if not text or parts is None or not any(parts.groups()):
        raise ValueError(f"not a duration: {text!r} (e.g. 90s, 5m, 1h30m)")
    h, m, s = (float(g) if g else 0.0 for g in parts.groups())
    return h * 3600 + m * 60 + s


# --- the gateway side (child process) -------------------------------------------------------------


def census() -> dict[str, int]:
    gc.collect()
    return dict(Counter(type(o).__qualname__ for o in gc.get_objects()))


async def _gateway(config_path: str, census_path: str) -> None:
    from keel._signals import Signals
    from keel.config import load_config
    from keel.gateway import create_app, start_site
    from keel.gateway._serve import tune_gc

    config = load_config(config_path)
    runner, port = await start_site(create_app(config), "127.0.0.1", 0)
    tune_gc()  # as keel serve: the start-up objects are frozen, the census counts the rest
    census()  # the first one creates a few hundred objects of its own (lazy imports), once
    print(f"keel listening on http://127.0.0.1:{port}", flush=True)
    loop = asyncio.get_running_loop()
    with Signals() as signals, open(census_path, "a") as out:  # noqa: ASYNC230 - tiny writes

        def sample() -> None:  # on SIGUSR1: the parent asks, then reads the line
            out.write(json.dumps({"t": time.time(), "objects": census()}) + "\n")
            out.flush()

        loop.add_signal_handler(signal.SIGUSR1, sample)
        await signals.next()
    await runner.cleanup()


# --- the load and the report (parent process) -------------------------------------------------------


@dataclass(slots=True)
class Tally:
    exact: int = 0  # the exact answer
    failed: int = 0  # a well-formed OpenAI error (response or error frame + [DONE])
    aborted: int = 0  # the client left on purpose
    broken: int = 0  # anything else: wrong text, a raw truncation, a hang
    examples: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.exact + self.failed + self.aborted + self.broken

    def bad(self, why: str) -> None:
        self.broken += 1
        if len(self.examples) < 5:
            self.examples.append(why)


def _stream_verdict(raw: bytes, expected: str) -> str:
    frames = [f[6:] for f in raw.split(b"\n\n") if f.startswith(b"data: ")]
    if not frames or frames[-1] != b"[DONE]" or frames.count(b"[DONE]") != 1:
        return "no single [DONE] at the end"
    text, finish = [], None
    for f in frames[:-1]:
        obj = json.loads(f)
        if "error" in obj:
            return "failed" if f is frames[-2] and obj["error"].get("message") else "error mid"
        for c in obj.get("choices") or []:
            text.append(c.get("delta", {}).get("content") or "")
            finish = c.get("finish_reason") or finish
    if finish != "stop":
        return f"finish_reason {finish!r}"
    return "exact" if "".join(text) == expected else "wrong text"


async def _one(session: Any, url: str, i: int, rng: random.Random, tally: Tally) -> None:
    import aiohttp

    from keel.sim import answer_text

    prompt = f"soak {i} {rng.getrandbits(32):08x}"
    stream = rng.random() < STREAM_SHARE
    abort = rng.random() < ABORT_SHARE
    body = {"model": "chat", "stream": stream, "messages": [{"role": "user", "content": prompt}]}
    try:
        if abort:
            if stream:
                async with session.post(url, json=body) as r:
                    await r.content.readuntil(b"\n\n")
                    r.close()  # gone mid-stream
            else:
                with _suppress_timeout():
                    async with asyncio.timeout(rng.uniform(0.001, 0.05)):
                        async with session.post(url, json=body) as r:
                            await r.read()
            tally.aborted += 1
            return
        async with session.post(url, json=body) as r:
            raw = await r.read()
            status = r.status
        if stream and status == 200:
            verdict = _stream_verdict(raw, answer_text(prompt))
        elif status == 200:
            got = json.loads(raw)["choices"][0]["message"]["content"]
            verdict = "exact" if got == answer_text(prompt) else "wrong text"
        else:
            verdict = "failed" if json.loads(raw)["error"].get("message") else f"HTTP {status}"
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
        verdict = f"{type(exc).__name__}: {exc}"[:120]
    if verdict == "exact":
        tally.exact += 1
    elif verdict == "failed":
        tally.failed += 1
    else:
        tally.bad(verdict)


class _suppress_timeout:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et: Any, e: Any, tb: Any) -> bool:
        return et is TimeoutError


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _line_at(path: Path, offset: int) -> str:
    with path.open() as f:
        f.seek(offset)
        return f.readline()


async def _census_of(pid: int, path: Path) -> dict[str, int]:
    """Ask the gateway for a census (SIGUSR1) and wait for its line (a full collection takes
    it tens of milliseconds; it is busy serving meanwhile)."""
    before = _size(path)
    os.kill(pid, signal.SIGUSR1)
    for _ in range(500):
        await asyncio.sleep(0.02)
        if _size(path) > before and (line := _line_at(path, before)).endswith("\n"):
            objects: dict[str, int] = json.loads(line)["objects"]
            return objects
    return {}


async def _load(url: str, seconds: float, interval: float, pid: int, census_path: Path,
                seed: int, say: Any) -> dict[str, Any]:  # fmt: skip
    import aiohttp

    from keel.bench._measure import rss_bytes

    tally = Tally()
    counter = iter(range(10**12))
    start = time.monotonic()
    end = start + seconds
    warmup = min(300.0, seconds / 6)
    samples: list[dict[str, Any]] = []
    baseline: dict[str, int] | None = None
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as s:

        async def client(k: int) -> None:
            rng = random.Random(seed * 1000 + k)
            while time.monotonic() < end:
                await _one(s, url, next(counter), rng, tally)

        async def watch() -> None:
            nonlocal baseline
            say(f"{'t':>6} {'requests':>9} {'req/s':>6} {'RSS MB':>7} {'fds':>5} {'objects':>8}")
            last_n, last_t = 0, start
            while True:
                await asyncio.sleep(max(0.0, min(interval, end - time.monotonic())))
                objects = await _census_of(pid, census_path)
                now = time.monotonic()
                rss = rss_bytes(pid) or 0
                row = {
                    "t": round(now - start, 1),
                    "requests": tally.total,
                    "rss_mb": round(rss / 2**20, 2),
                    "fds": _fds(pid),
                    "objects": sum(objects.values()),
                    "top": Counter(objects).most_common(TOP),
                }
                if baseline is None and now - start >= warmup:
                    baseline = objects
                    row["warmup_end"] = True
                if baseline is not None:
                    growth = Counter(objects)
                    growth.subtract(baseline)
                    row["grown"] = [(t, n) for t, n in growth.most_common(TOP) if n > 0]
                samples.append(row)
                rate = (tally.total - last_n) / max(1e-9, now - last_t)
                last_n, last_t = tally.total, now
                grown = ", ".join(f"{t} +{n}" for t, n in row.get("grown", [])[:4])
                say(f"{row['t']:6.0f} {tally.total:9d} {rate:6.0f} {row['rss_mb']:7.1f} "
                    f"{row['fds']:5d} {row['objects']:8d}"
                    + (" (warm-up ends)" if row.get("warmup_end") else "")
                    + (f"  grown since warm-up: {grown}" if grown else ""))  # fmt: skip
                if now >= end - 1.0:
                    return

        await asyncio.gather(watch(), *(client(k) for k in range(CLIENTS)))
    after = [r for r in samples if r["t"] >= warmup]
    growth = after[-1]["rss_mb"] - after[0]["rss_mb"] if after else None
    return {
        "seconds": seconds,
        "warmup_seconds": warmup,
        "requests": tally.total,
        "exact": tally.exact,
        "failed_well_formed": tally.failed,
        "aborted": tally.aborted,
        "broken": tally.broken,
        "broken_examples": tally.examples,
        "rss_growth_after_warmup_mb": None if growth is None else round(growth, 2),
        "samples": samples,
    }


def soak(duration: str, interval: float | None, out_dir: Path, seed: int = 7) -> dict[str, Any]:
    import typer
    import yaml

    from keel.bench._measure import raise_fd_limit
    from keel.testing import spawn_listening, spawn_sim

    seconds = parse_duration(duration)
    interval = interval or max(5.0, min(60.0, seconds / 30))
    raise_fd_limit()
    t0 = time.monotonic()

    def say(msg: str) -> None:
        typer.echo(msg, err=True)

    workdir = Path(tempfile.mkdtemp(prefix="keel-soak-"))
    census_path = workdir / "census.jsonl"
    args = ("--faults", FAULTS, *SIM_ARGS)
    with (
        spawn_sim("--name", "a", "--seed", str(seed), *args) as a,
        spawn_sim("--name", "b", "--seed", str(seed + 1), *args) as b,
    ):
        cfg = {
            "server": {"port": 0},
            "timeouts": {"idle": IDLE, "first_token": 5.0},
            "models": {"chat": {"deployments": [
                {"base_url": a.base_url, "api_key": "sk-sim", "model": "sim", "name": "sim-a"},
                {"base_url": b.base_url, "api_key": "sk-sim", "model": "sim", "name": "sim-b"},
            ]}},
        }  # fmt: skip
        cfg_path = workdir / "keel.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, "-m", "keel.bench._soak", str(cfg_path), str(census_path)]
        with spawn_listening(cmd, r"keel listening on (\S+)") as gw:
            say(f"soak: {duration} ({seconds:.0f}s), {CLIENTS} clients, faults {FAULTS} on two "
                f"simulators, {STREAM_SHARE:.0%} streams, {ABORT_SHARE:.0%} aborted; keel pid "
                f"{gw.pid}, a sample every {interval:.0f}s")  # fmt: skip
            url = gw.url + "/v1/chat/completions"
            import uvloop

            result = uvloop.run(_load(url, seconds, interval, gw.pid, census_path, seed, say))
    result["meta"] = {
        "faults": FAULTS, "clients": CLIENTS, "stream_share": STREAM_SHARE,
        "abort_share": ABORT_SHARE, "sim_args": list(SIM_ARGS), "idle_timeout": IDLE,
        "wall_seconds": round(time.monotonic() - t0, 1), "interval": interval, "seed": seed,
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "soak.json").write_text(json.dumps(result, indent=1))
    say(
        f"requests {result['requests']}: exact {result['exact']}, well-formed failures "
        f"{result['failed_well_formed']}, aborted by the client {result['aborted']}, broken "
        f"{result['broken']} {result['broken_examples'] or ''}"
    )
    say(f"RSS growth after the warm-up ({result['warmup_seconds']:.0f}s): "
        f"{result['rss_growth_after_warmup_mb']} MB; wrote {out_dir / 'soak.json'}")  # fmt: skip
    return result


if __name__ == "__main__":  # the gateway child: CONFIG CENSUS
    import uvloop

    uvloop.run(_gateway(sys.argv[1], sys.argv[2]))
