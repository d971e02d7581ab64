"""The "load or noise" scenarios of issue 11, measured: ``keel demo --scenario NAME``.

Each scenario starts real simulators and a ``keel serve`` with **default** policies (the config
names only the deployments), drives a closed-loop workload through the official ``openai`` SDK
(its own retries off), checks every answer for the exact text, and reads the simulators' logs
(every upstream attempt with its open/close time and status) and keel's ``/metrics``:

* ``wall``    - 429 above 8 in flight, 30 clients, once per wording (openai with retry-after,
                DashScope's hint-less "Too many requests in route", a bare proxy's text);
* ``rate``    - 20 requests per sliding 2 s window (exact retry-after; and DashScope's wording);
* ``noise``   - two deployments with 10 % random 429 + 5 % random 503, 32 clients, against the
                same run without faults;
* ``storm``   - two deployments, ~46 % of attempts failing with the full mix incl. mid-stream,
                prefill continuation;
* ``outage``  - one of two deployments refusing connections (1,000 requests); every deployment
                down; a fallback chain dead -> dead -> healthy.

``direct`` figures (the same workload straight at one simulator) come with ``wall``, ``rate``
and ``noise``, where a single upstream is comparable. Figures are printed as a table and
returned as a dict (``--json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from keel.demo import MID_STREAM, PRE_FIRST_BYTE, Result, one_request, percentile
from keel.sim import LogEntry
from keel.testing import SimProcess, spawn_gateway, spawn_sim

SCENARIOS = ("wall", "rate", "noise", "storm", "outage")
WALL_C = 8
WALL_LATENCY = 0.2  # seconds per answer: 8 slots serve 40 req/s
RATE_N, RATE_S = 20, 2.0
HANG_AFTER = 60.0  # seconds: a request still open then is a hang


def _scaled(mix: str, factor: float) -> str:
    out = []
    for item in mix.split(","):
        name, _, p = item.partition("=")
        out.append(f"{name}={float(p) * factor:.4g}")
    return ",".join(out)


# The demo's mix (15.5 % of attempts) three times over: ~46 % failing, mid-stream included.
STORM_MIX = _scaled(f"{PRE_FIRST_BYTE},{MID_STREAM}", 3.0)
NOISE_MIX = "r429=0.1,e503=0.05"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connection refused


# --- workload ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Timed:
    result: Result
    t0: float
    t1: float
    index: int


async def _closed_loop(
    base_url: str,
    model: str,
    prompts: Sequence[tuple[str, bool]],
    clients: int,
    hang_after: float = HANG_AFTER,
) -> list[Timed]:
    import openai

    from keel.sim import answer_text

    client = openai.AsyncOpenAI(
        base_url=base_url, api_key="sk-scenario", max_retries=0, timeout=hang_after
    )
    todo = list(enumerate(prompts))
    todo.reverse()
    out: list[Timed] = []

    async def worker() -> None:
        while todo:
            i, (prompt, stream) = todo.pop()
            t0 = time.monotonic()
            r = await one_request(client, model, prompt, stream, answer_text(prompt), hang_after)
            out.append(Timed(r, t0, time.monotonic(), i))

    try:
        await asyncio.gather(*(worker() for _ in range(clients)))
    finally:
        await client.close()
    out.sort(key=lambda t: t.index)
    return out


def _run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - Windows
        return asyncio.run(coro)


def _prompts(tag: str, n: int, stream_ratio: float, seed: int) -> list[tuple[str, bool]]:
    import random

    rng = random.Random(seed)
    return [(f"{tag} request {i} s{seed}", rng.random() < stream_ratio) for i in range(n)]


# --- figures -------------------------------------------------------------------------------------


def _mean_busy(entries: Sequence[LogEntry], start: float, end: float) -> float:
    busy = 0.0
    for e in entries:
        t1 = e.t_close if e.t_close is not None else end
        busy += max(0.0, min(t1, end) - max(e.t_open, start))
    return busy / (end - start) if end > start else 0.0


def _figures(
    timed: Sequence[Timed],
    logs: Sequence[LogEntry],
    *,
    warmup: int = 0,
    clients: int = 1,
    extra_attempts: float = 0.0,
) -> dict[str, Any]:
    """Exact share, refused share of upstream attempts, throughput, p99 and attempts per
    request over the measured requests (after ``warmup``). The steady window runs from the
    first measured request's start to the moment the first worker ran out of work."""
    measured = list(timed[warmup:])
    if not measured:
        return {}
    ts = min(t.t0 for t in measured)
    te = (
        min(t.t1 for t in measured[-clients:])
        if len(measured) > clients
        else max(t.t1 for t in measured)
    )
    t_end = max(t.t1 for t in measured)
    attempts = [e for e in logs if ts <= e.t_open <= t_end]
    refused = [e for e in attempts if e.status == 429]
    exact = [t for t in measured if t.result.kind == "ok"]
    lat = sorted(t.t1 - t.t0 for t in measured)
    failures: dict[str, int] = {}
    example = ""
    for t in measured:
        if t.result.kind != "ok":
            failures[t.result.kind] = failures.get(t.result.kind, 0) + 1
            example = example or t.result.detail
    done_in = [t for t in measured if ts <= t.t1 <= te and t.result.kind == "ok"]
    return {
        "requests": len(measured),
        "exact": len(exact),
        "exact_pct": 100.0 * len(exact) / len(measured),
        "failures": failures,
        "example": example,
        "attempts": len(attempts) + extra_attempts,
        "attempts_per_request": (len(attempts) + extra_attempts) / len(measured),
        "refused_pct": 100.0 * len(refused) / max(1, len(attempts)),
        "throughput": len(done_in) / (te - ts) if te > ts else 0.0,
        "p50_s": percentile(lat, 50),
        "p99_s": percentile(lat, 99),
        "wall_s": t_end - ts,
        "window": (ts, te),
    }


def _metric_sum(gw_url: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(gw_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _dep(url: str, name: str, **kw: Any) -> dict[str, Any]:
    return {"base_url": url, "api_key": "sk-scenario", "model": "sim-model", "name": name, **kw}


@contextlib.contextmanager
def _gateway(models: dict[str, Any]) -> Any:
    with (
        tempfile.TemporaryDirectory(prefix="keel-scenario-") as tmp,
        spawn_gateway({"models": models}, "--log-level", "error", workdir=tmp) as gw,
    ):
        yield gw


def _logs(sims: Sequence[SimProcess]) -> list[LogEntry]:
    return [e for s in sims for e in s.log()]


# --- the scenarios -------------------------------------------------------------------------------


def scenario_wall(seed: int, direct: bool = True) -> dict[str, Any]:
    """8 in flight, 30 clients, 100 warm-up + 300 measured requests, per wording."""
    out: dict[str, Any] = {}
    for wording in ("openai", "dashscope", "bare"):
        args = ("--max-concurrency", str(WALL_C), "--latency", str(WALL_LATENCY),
                "--wall-wording", wording)  # fmt: skip
        with spawn_sim("--name", "wall", *args) as sim:
            prompts = _prompts(f"wall-{wording}", 400, 0.5, seed)
            runs: list[tuple[str, str, str]] = [("keel", "", "chat")]
            if direct:
                runs.insert(0, ("direct", sim.base_url, "sim-model"))
            with _gateway({"chat": {"deployments": [_dep(sim.base_url, "wall")]}}) as gw:
                for path, url, model in runs:
                    sim.reset()
                    timed = _run(_closed_loop(url or gw.base_url, model, prompts, 30))
                    log = sim.log()
                    f = _figures(timed, log, warmup=100, clients=30)
                    ts, te = f.pop("window")
                    ok = [e for e in log if e.status == 200 and e.t_close is not None]
                    dur = sum(e.t_close - e.t_open for e in ok) / max(1, len(ok))  # type: ignore[operator]
                    f["capacity"] = WALL_C / dur if dur else 0.0
                    f["throughput_pct"] = 100.0 * _mean_busy(ok, ts, te) / WALL_C
                    out[f"{wording}/{path}"] = f
    return out


def scenario_rate(seed: int, direct: bool = True) -> dict[str, Any]:
    """20 per sliding 2 s window, 30 clients, 150 requests; OpenAI's wording (exact
    retry-after and x-ratelimit-* headers), DashScope's and a bare proxy's (nothing but the
    429)."""
    out: dict[str, Any] = {}
    for wording in ("openai", "dashscope", "bare"):
        args = ("--rate-limit", str(RATE_N), "--rate-window", str(RATE_S), "--rate-sliding",
                "--wall-wording", wording, "--latency", "0.1")  # fmt: skip
        with spawn_sim("--name", "rate", *args) as sim:
            prompts = _prompts(f"rate-{wording}", 150, 0.5, seed)
            runs: list[tuple[str, str, str]] = [("keel", "", "chat")]
            if direct:
                runs.insert(0, ("direct", sim.base_url, "sim-model"))
            with _gateway({"chat": {"deployments": [_dep(sim.base_url, "rate")]}}) as gw:
                for path, url, model in runs:
                    sim.reset()
                    time.sleep(RATE_S)  # the previous run's window is empty again
                    timed = _run(_closed_loop(url or gw.base_url, model, prompts, 30))
                    f = _figures(timed, sim.log(), clients=30)
                    f.pop("window")
                    f["capacity"] = RATE_N / RATE_S
                    out[f"{wording}/{path}"] = f
    return out


def _pair(seed: int, faults: str, *extra: str) -> tuple[contextlib.ExitStack, list[SimProcess]]:
    stack = contextlib.ExitStack()
    sims = [
        stack.enter_context(
            spawn_sim("--name", name, "--seed", str(seed + i), "--faults", faults, *extra)
        )
        for i, name in enumerate("ab")
    ]
    return stack, sims


def scenario_noise(seed: int, direct: bool = True) -> dict[str, Any]:
    """10 % random 429 + 5 % random 503 on two deployments, 32 clients, 1,000 requests; the
    same run without faults for the throughput baseline."""
    out: dict[str, Any] = {}
    extra = ("--latency", "0.2", "--token-delay", "0.005")
    stack, sims = _pair(seed, NOISE_MIX, *extra)
    with stack:
        deps = [_dep(s.base_url, f"sim-{'ab'[i]}") for i, s in enumerate(sims)]
        with _gateway({"chat": {"deployments": deps}}) as gw:
            prompts = _prompts("noise", 1000, 0.5, seed)
            for label, faults in (("clean", ""), ("noise", NOISE_MIX)):
                for s in sims:
                    s.configure(faults=faults)
                    s.reset()
                timed = _run(_closed_loop(gw.base_url, "chat", prompts, 32))
                f = _figures(timed, _logs(sims), clients=32)
                f.pop("window")
                out[f"{label}/keel"] = f
            if direct:
                sims[0].reset()
                timed = _run(_closed_loop(sims[0].base_url, "sim-model", prompts, 32))
                f = _figures(timed, sims[0].log(), clients=32)
                f.pop("window")
                out["noise/direct"] = f
    clean, noisy = out["clean/keel"]["throughput"], out["noise/keel"]["throughput"]
    out["noise/keel"]["throughput_vs_clean_pct"] = 100.0 * noisy / clean if clean else 0.0
    return out


def scenario_storm(seed: int, direct: bool = True) -> dict[str, Any]:
    """~46 % of attempts failing (the demo's full mix x3), two deployments, prefill
    continuation, 32 clients, 300 requests (70 % streaming)."""
    out: dict[str, Any] = {}
    extra = ("--token-delay", "0.01", "--first-token-delay", "0.05")
    stack, sims = _pair(seed, STORM_MIX, *extra)
    with stack:
        deps = [
            _dep(s.base_url, f"sim-{'ab'[i]}", continuation="prefill") for i, s in enumerate(sims)
        ]
        with _gateway({"chat": {"deployments": deps}}) as gw:
            prompts = _prompts("storm", 300, 0.7, seed)
            timed = _run(_closed_loop(gw.base_url, "chat", prompts, 32))
            logs = _logs(sims)
            f = _figures(timed, logs, clients=32)
            f.pop("window")
            f["failing_attempts_pct"] = _failing_pct(logs)
            _moderated(f, timed, prompts, logs)
            out["storm/keel"] = f
            if direct:
                for s in sims:
                    s.reset()
                timed = _run(_closed_loop(sims[0].base_url, "sim-model", prompts, 32))
                f = _figures(timed, sims[0].log(), clients=32)
                f.pop("window")
                out["storm/direct"] = f
    return out


def _moderated(
    f: dict[str, Any],
    timed: Sequence[Timed],
    prompts: Sequence[tuple[str, bool]],
    logs: Sequence[LogEntry],
) -> None:
    """The mix includes output moderation (``inspect_mid``: DashScope's data_inspection_failed
    on the answer). keel passes it on as ``finish_reason: content_filter`` (the group's default
    ``on_content_filter: pass``, as OpenAI reports its own): the right answer, not a failure —
    when the attempt that ended it was really moderated, which the simulator's log tells."""
    inspected = {e.prompt for e in logs if e.fault and "inspect" in e.fault}
    moderated = sum(
        1
        for t in timed
        if t.result.kind == "content_filter" and prompts[t.index][0][:80] in inspected
    )
    f["moderated"] = moderated
    f["correct_pct"] = 100.0 * (f["exact"] + moderated) / f["requests"]


def _failing_pct(log: Sequence[LogEntry]) -> float:
    bad = sum(1 for e in log if e.fault)
    return 100.0 * bad / max(1, len(log))


def scenario_outage(seed: int, direct: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # 1. one of two deployments refuses connections: 1,000 requests.
    with spawn_sim("--name", "alive", "--latency", "0.02") as alive:
        deps = [_dep(dead_url(), "dead"), _dep(alive.base_url, "alive")]
        with _gateway({"chat": {"deployments": deps}}) as gw:
            timed = _run(_closed_loop(gw.base_url, "chat", _prompts("half", 1000, 0.5, seed), 32))
            dead_attempts = _metric_sum(gw.url, "keel_upstream_attempts_total", deployment="dead")
            f = _figures(timed, alive.log(), clients=32, extra_attempts=dead_attempts)
            f.pop("window")
            f["dead_attempts"] = dead_attempts
            f["dead_attempts_per_1000"] = 1000.0 * dead_attempts / len(timed)
            out["one-dead/keel"] = f
    # 2. every deployment down: 100 requests, 8 clients.
    deps = [_dep(dead_url(), "dead-a"), _dep(dead_url(), "dead-b")]
    with _gateway({"chat": {"deployments": deps}}) as gw:
        timed = _run(_closed_loop(gw.base_url, "chat", _prompts("down", 100, 0.5, seed), 8))
        attempts = _metric_sum(gw.url, "keel_upstream_attempts_total")
        f = _figures(timed, [], clients=8, extra_attempts=attempts)
        f.pop("window")
        f["max_s"] = max(t.t1 - t.t0 for t in timed)
        out["all-dead/keel"] = f
    # 3. fallback chain: chat (dead) -> [second (dead), third (healthy)]: the first request.
    with spawn_sim("--name", "third") as third:
        models = {
            "chat": {
                "deployments": [_dep(dead_url(), "chat-dead")],
                "fallbacks": ["second", "third"],
            },
            "second": {"deployments": [_dep(dead_url(), "second-dead")]},
            "third": {"deployments": [_dep(third.base_url, "third")]},
        }
        with _gateway(models) as gw:
            timed = _run(_closed_loop(gw.base_url, "chat", _prompts("chain", 1, 0.0, seed), 1))
            attempts = _metric_sum(gw.url, "keel_upstream_attempts_total")
            f = _figures(timed, [], extra_attempts=attempts)
            f.pop("window")
            out["chain-first/keel"] = f
    return out


RUNNERS: dict[str, Callable[[int, bool], dict[str, Any]]] = {
    "wall": scenario_wall,
    "rate": scenario_rate,
    "noise": scenario_noise,
    "storm": scenario_storm,
    "outage": scenario_outage,
}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} %"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def render(name: str, figures: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"scenario {name}", title_justify="left")
    cols = ("run", "exact", "refused", "throughput", "p99", "attempts/req", "notes")
    for c in cols:
        table.add_column(c, justify="left" if c in ("run", "notes") else "right")
    for run, f in figures.items():
        if not f:
            continue
        notes = []
        if "throughput_pct" in f:
            notes.append(f"{f['throughput_pct']:.0f} % of capacity {f['capacity']:.1f}/s")
        elif "capacity" in f:
            notes.append(f"capacity {f['capacity']:.1f}/s")
        if "throughput_vs_clean_pct" in f:
            notes.append(f"{f['throughput_vs_clean_pct']:.0f} % of clean throughput")
        if "failing_attempts_pct" in f:
            notes.append(f"{f['failing_attempts_pct']:.0f} % of attempts faulted")
        if "moderated" in f:
            notes.append(
                f"correct {f['correct_pct']:.1f} % (+{f['moderated']} content_filter endings "
                "of moderated answers, passed on)"
            )
        if "dead_attempts_per_1000" in f:
            notes.append(f"{f['dead_attempts_per_1000']:.1f} attempts/1000 on the dead one")
        if "max_s" in f:
            notes.append(f"slowest {f['max_s']:.2f} s")
        if f["failures"]:
            notes.append(", ".join(f"{k} {v}" for k, v in f["failures"].items()))
        if f["example"]:
            notes.append(f["example"][:110])
        table.add_row(
            run,
            f"{f['exact']}/{f['requests']} ({f['exact_pct']:.1f} %)",
            _pct(f["refused_pct"]),
            f"{f['throughput']:.1f}/s",
            _s(f["p99_s"]),
            f"{f['attempts_per_request']:.2f}",
            "; ".join(notes),
        )
    return table


def run_scenarios(
    names: Sequence[str], seed: int = 7, direct: bool = True, console: Any = None
) -> dict[str, dict[str, Any]]:
    from rich.console import Console

    console = console or Console(width=max(160, Console().width))
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        t0 = time.monotonic()
        console.print(f"[bold]scenario {name}[/] …")
        figures = RUNNERS[name](seed, direct)
        results[name] = figures
        console.print(render(name, figures))
        console.print(f"({time.monotonic() - t0:.0f} s)")
    return results
