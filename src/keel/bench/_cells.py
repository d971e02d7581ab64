"""The benchmark's cells: one function per measurement, each returning plain numbers.

Sizes live in ``Plan`` (``QUICK`` for CI and a first look, ``FULL`` for docs/performance.md).
CPU comes from /proc accounting of the gateway process, never from the load generator's
clock, so a slow load generator cannot flatter a gateway's CPU figures.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import statistics
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from keel.bench import _hold, _load
from keel.bench._measure import cpu_seconds, pin, rss_bytes
from keel.bench._targets import Target
from keel.testing import SimProcess

T = TypeVar("T")
MiB = 1024 * 1024


@dataclass(frozen=True)
class Plan:
    name: str
    repeats: int  # measured cells run this many times; the report shows medians
    warmup: float  # seconds of load before measuring (connection pools, caches)
    tput_concurrency: int
    tput_seconds: float
    c1_requests: int
    ft_requests: int
    frame_concurrency: int
    frame_delay: float  # seconds between tokens: frames arrive one per read, as from an LLM
    frame_short: int  # stream lengths (tokens) whose CPU difference gives CPU per frame
    frame_long: int
    frame_seconds: float
    equal_rate: float  # req/s offered to every target for "p99 at equal load"
    equal_seconds: float
    stream_levels: tuple[int, ...]
    stream_delay: float
    stream_len: int
    stream_window: float
    launch_rate: float
    hold_workers: int
    dc_samples: int  # per phase and repeat
    dc_batch: int


QUICK = Plan(
    "quick", repeats=1, warmup=0.5, tput_concurrency=32, tput_seconds=2.0, c1_requests=150,
    ft_requests=100, frame_concurrency=50, frame_delay=0.01, frame_short=10, frame_long=60,
    frame_seconds=1.5, equal_rate=20.0, equal_seconds=2.0, stream_levels=(1000,),
    stream_delay=1.0, stream_len=60, stream_window=2.5, launch_rate=400.0, hold_workers=2,
    dc_samples=20, dc_batch=10,
)  # fmt: skip
FULL = Plan(
    "full", repeats=5, warmup=1.0, tput_concurrency=32, tput_seconds=3.0, c1_requests=300,
    ft_requests=200, frame_concurrency=50, frame_delay=0.01, frame_short=10, frame_long=100,
    frame_seconds=3.0, equal_rate=20.0, equal_seconds=3.0, stream_levels=(1000, 5000, 10000),
    stream_delay=2.0, stream_len=90, stream_window=5.0, launch_rate=400.0, hold_workers=4,
    dc_samples=40, dc_batch=10,
)  # fmt: skip

PHASES = ("prefirst", "midstream", "nonstream")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Each async cell gets a fresh uvloop loop: no state leaks from one cell to the next."""
    import uvloop

    return uvloop.run(coro)


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of seconds, in milliseconds."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))
    return s[k] * 1000


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Field-wise median of repeated cells (numbers); other fields from the last run."""
    out = dict(runs[-1])
    for key, value in runs[-1].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            nums = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
            out[key] = statistics.median(nums)
    if len(runs) > 1:
        out["repeats"] = len(runs)
    return out


def paired_ratios(runs: list[dict[str, Any]], bare: list[dict[str, Any]]) -> dict[str, float]:
    """Field-wise median of ``run / bare run`` over the repeats, each repeat's pair measured
    back to back: slow drift of a shared machine cancels within a pair, so these ratios move
    much less between whole benchmark runs than a ratio of medians does."""
    out: dict[str, float] = {}
    for key, value in runs[0].items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        pairs = [
            r[key] / b[key]
            for r, b in zip(runs, bare, strict=False)
            if isinstance(r.get(key), (int, float)) and isinstance(b.get(key), (int, float))
            and b[key] and r[key] == r[key] and b[key] == b[key]  # no zero, no NaN
        ]  # fmt: skip
        if pairs:
            out[key] = statistics.median(pairs)
    return out


def paired_differences(
    runs: list[dict[str, Any]], base: list[dict[str, Any]]
) -> dict[str, float]:
    """Field-wise median of ``run - base run`` over back-to-back pairs: what a feature costs
    in absolute terms (``keel bench --auth``: CPU µs per request over keel with auth off)."""
    out: dict[str, float] = {}
    for key, value in runs[0].items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        diffs = [
            r[key] - b[key]
            for r, b in zip(runs, base, strict=False)
            if isinstance(r.get(key), (int, float)) and isinstance(b.get(key), (int, float))
            and r[key] == r[key] and b[key] == b[key]  # no NaN
        ]  # fmt: skip
        if diffs:
            out[key] = statistics.median(diffs)
    return out


def _measured(target: Target, fn: Callable[[], _load.LoadResult]) -> tuple[_load.LoadResult, float]:
    pid = target.measure_pid
    before = cpu_seconds(pid) if pid else None
    result = fn()
    after = cpu_seconds(pid) if pid else None
    cpu = (after - before) if before is not None and after is not None else float("nan")
    return result, cpu


def _errors(result: _load.LoadResult) -> int:
    return sum(result.errors.values())


# -- cells ----------------------------------------------------------------------------------


def throughput(target: Target, plan: Plan) -> dict[str, Any]:
    """Non-stream requests at fixed concurrency: req/s, latency, CPU µs per request."""
    body = _load.chat_body(target.model, "bench throughput", stream=False)
    return _nonstream(target, plan, target.chat_url, body)


def embeddings(target: Target, plan: Plan) -> dict[str, Any]:
    """``POST /v1/embeddings`` at fixed concurrency, as the openai SDK sends it by default
    (base64, the model's 1536 dimensions): req/s, latency, CPU µs per request."""
    body = _load.embeddings_body(target.model, "bench embeddings")
    return _nonstream(target, plan, target.base_url + "/embeddings", body)


def _nonstream(target: Target, plan: Plan, url: str, body: bytes) -> dict[str, Any]:
    h, c = target.headers, plan.tput_concurrency
    run(_load.closed_loop(url, body, h, c, plan.warmup))
    res, cpu = _measured(target, lambda: run(_load.closed_loop(url, body, h, c, plan.tput_seconds)))
    return {
        "rps": res.ok / res.elapsed,
        # What one fully used core would sustain: robust when other processes share the core.
        "rps_per_core": res.ok / cpu if cpu > 0 else float("nan"),
        "p50_ms": pct(res.latencies, 50),
        "p99_ms": pct(res.latencies, 99),
        "cpu_us_per_req": cpu / max(res.ok, 1) * 1e6,
        "cpu_util": cpu / res.elapsed,  # ~1.0 = the gateway's core was saturated
        "requests": res.ok,
        "errors": _errors(res),
    }


def latency_c1(target: Target, direct: Target, plan: Plan) -> dict[str, Any]:
    """Concurrency 1: the latency a gateway adds over the simulator hit directly."""
    n = plan.c1_requests
    out: dict[str, Any] = {}
    for name, t in (("direct", direct), ("target", target)):
        body = _load.chat_body(t.model, "bench latency", stream=False)
        run(_load.sequential(t.chat_url, body, t.headers, max(10, n // 10)))  # warm
        res = run(_load.sequential(t.chat_url, body, t.headers, n))
        out[f"{name}_p50_ms"] = pct(res.latencies, 50)
        out[f"{name}_p99_ms"] = pct(res.latencies, 99)
        out[f"{name}_errors"] = _errors(res)
    out["added_p50_ms"] = out["target_p50_ms"] - out["direct_p50_ms"]
    out["added_p99_ms"] = out["target_p99_ms"] - out["direct_p99_ms"]
    return out


def first_token(target: Target, direct: Target, plan: Plan) -> dict[str, Any]:
    """Streams at concurrency 1: send → first content frame, over the simulator directly."""
    out: dict[str, Any] = {}
    for name, t in (("direct", direct), ("target", target)):
        body = _load.chat_body(t.model, "bench first token [[sim:len=8]]", stream=True)
        run(_load.sequential(t.chat_url, body, t.headers, 10, first_content=True))
        res = run(_load.sequential(t.chat_url, body, t.headers, plan.ft_requests, True))
        out[f"{name}_p50_ms"] = pct(res.latencies, 50)
        out[f"{name}_p99_ms"] = pct(res.latencies, 99)
        out[f"{name}_errors"] = _errors(res)
    out["overhead_p50_ms"] = out["target_p50_ms"] - out["direct_p50_ms"]
    out["overhead_p99_ms"] = out["target_p99_ms"] - out["direct_p99_ms"]
    return out


def per_frame(target: Target, plan: Plan) -> dict[str, Any]:
    """CPU per relayed frame: the CPU difference between long and short streams divided by
    the frame difference, so per-request costs cancel out."""
    per: dict[int, tuple[float, float, int]] = {}  # length -> (cpu/stream, frames/stream, errs)
    frames_per_s = 0.0
    for length in (plan.frame_short, plan.frame_long):
        prompt = f"bench frames [[sim:len={length},delay={plan.frame_delay}]]"
        body = _load.chat_body(target.model, prompt, stream=True)

        def go(body: bytes = body) -> _load.LoadResult:
            return run(
                _load.closed_loop(
                    target.chat_url, body, target.headers, plan.frame_concurrency,
                    plan.frame_seconds, stream=True,
                )
            )  # fmt: skip

        res, cpu = _measured(target, go)
        n = max(res.ok, 1)
        per[length] = (cpu / n, res.frames / n, _errors(res))
        frames_per_s = res.frames / res.elapsed
    (cs, fs, es), (cl, fl, el) = per[plan.frame_short], per[plan.frame_long]
    valid = fl > fs and fs > 0  # a target whose streams fail has no per-frame figure
    return {
        "cpu_us_per_frame": (cl - cs) / (fl - fs) * 1e6 if valid else float("nan"),
        "cpu_us_per_stream": cs * 1e6 if valid else float("nan"),
        "frames_per_s": frames_per_s,
        "errors": es + el,
    }


def equal_load(target: Target, plan: Plan) -> dict[str, Any]:
    """The same fixed arrival rate for every target (peers included): p50/p99 at equal load."""
    body = _load.chat_body(target.model, "bench equal load", stream=False)
    res = run(
        _load.open_loop(target.chat_url, body, target.headers, plan.equal_rate, plan.equal_seconds)
    )
    return {
        "rate": plan.equal_rate,
        "p50_ms": pct(res.latencies, 50),
        "p99_ms": pct(res.latencies, 99),
        "errors": _errors(res),
    }


def streams(target: Target, plan: Plan, load_cores: set[int], fd_limit: int) -> dict[str, Any]:
    """RSS with many concurrent slow streams, each verified to be *receiving* frames.

    Levels are reached incrementally (1k, then 4k more, …). A gateway holds two sockets per
    stream (client and upstream), so the level is capped by the file-descriptor limit."""
    pid = target.measure_pid
    cap = max(0, (fd_limit - 256) // 2)
    prompt = f"bench hold [[sim:len={plan.stream_len},delay={plan.stream_delay}]]"
    ctx = multiprocessing.get_context("spawn")
    pipes = []
    procs = []
    levels: list[dict[str, Any]] = []
    baseline = rss_bytes(pid) if pid else None
    try:
        for _ in range(plan.hold_workers):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_hold.worker,
                args=(child, target.chat_url, target.model, dict(target.headers), prompt),
                daemon=True,
            )
            p.start()
            assert p.pid is not None
            pin(p.pid, load_cores)
            pipes.append(parent)
            procs.append(p)
        held = 0
        for level in plan.stream_levels:
            n = min(level, cap)
            add = n - held
            if add <= 0:
                continue
            w = len(pipes)
            timeout = add / plan.launch_rate + plan.stream_delay * 3 + 20
            for i, conn in enumerate(pipes):
                conn.send(("open", add // w + (1 if i < add % w else 0), plan.launch_rate / w,
                           timeout))  # fmt: skip
            opened = [conn.recv() for conn in pipes]
            held = n
            for conn in pipes:
                conn.send(("window", plan.stream_window))
            windows = [conn.recv() for conn in pipes]
            rss = rss_bytes(pid) if pid else None
            errors: dict[str, int] = {}
            for r in windows:
                for k, v in r["errors"].items():
                    errors[k] = errors.get(k, 0) + v
            live = sum(r["live"] for r in windows)
            entry = {
                "requested": level,
                "streams": n,
                "opened": sum(r["opened"] for r in opened),
                "live": live,
                "receiving": sum(r["receiving"] for r in windows),
                "rss_mib": rss / MiB if rss is not None else None,
                "kib_per_stream": (
                    (rss - baseline) / 1024 / n
                    if rss is not None and baseline is not None
                    else None
                ),
                "capped_by_fd_limit": n < level,
                "errors": errors,
                "error_sample": next((r["error_sample"] for r in windows if r["error_sample"]), ""),
            }
            levels.append(entry)
    finally:
        for conn in pipes:
            try:
                conn.send(("close",))
                conn.recv() if conn.poll(30) else None
            except (OSError, EOFError):
                pass
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    return {
        "baseline_rss_mib": baseline / MiB if baseline is not None else None,
        "fd_limit": fd_limit,
        "levels": levels,
    }


async def _probes(target: Target, phase: str, n: int, batch: int) -> list[_load.Probe]:
    out: list[_load.Probe] = []
    rng = random.Random(7)
    for start in range(0, n, batch):
        k = min(batch, n - start)
        out += await asyncio.gather(
            *(
                _load.disconnect_probe(
                    target.chat_url, target.model, target.headers, phase, rng.uniform(0.1, 0.2)
                )
                for _ in range(k)
            )
        )
    return out


def disconnect(target: Target, sim: SimProcess, plan: Plan) -> dict[str, Any]:
    """Client disconnect → upstream closed, from the simulator's log (CLOCK_MONOTONIC is
    system-wide, so its ``t_close`` compares with our ``t_cancel``)."""
    n = plan.dc_samples * plan.repeats
    result: dict[str, Any] = {}
    for phase in PHASES:
        sim.clear_log()
        probes = run(_probes(target, phase, n, plan.dc_batch))
        deadline = time.monotonic() + 5.0
        while True:  # wait (bounded) until every upstream request we left has closed
            by_tag = {}
            for e in sim.log():
                for p in probes:
                    if p.tag in e.prompt:
                        by_tag[p.tag] = e
            open_ = [e for e in by_tag.values() if e.t_close is None]
            if not open_ or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        deltas: list[float] = []
        missing = not_closed = 0
        why: dict[str, int] = {}
        for p in probes:
            e = by_tag.get(p.tag)
            if p.error or e is None:
                # The upstream never saw the request (or the probe failed): nothing to time.
                missing += 1
                reason = p.error or "upstream never contacted"
                why[reason] = why.get(reason, 0) + 1
            elif e.t_close is None:
                not_closed += 1
            else:
                deltas.append(max(0.0, e.t_close - p.t_cancel))
        result[phase] = {
            "p50_ms": pct(deltas, 50),
            "p99_ms": pct(deltas, 99),
            "max_ms": max(deltas) * 1000 if deltas else float("nan"),
            "samples": len(deltas),
            "missing": missing,
            "missing_why": why,
            "not_closed": not_closed,
        }
    return result


def plan_dict(plan: Plan) -> dict[str, Any]:
    return asdict(plan)
