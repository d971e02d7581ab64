"""``keel demo``: two simulated providers with a realistic fault mix, the gateway in front of
them, and one workload through the official openai SDK (its own retries off) — once straight at
one simulator, once through keel. Every answer is checked for the exact text the simulator
would have produced without faults; the table shows what a client experiences on each path.

No API key and no network beyond loopback; every process started here is stopped here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer

# Errors before any byte of the answer (faults.md §1, the retryable rows) plus a TCP reset:
# 10 % of the attempts on each simulator.
PRE_FIRST_BYTE = (
    "r429=0.02,r429_ds=0.01,quota_ds=0.005,e500=0.015,e503=0.01,e529=0.005,"
    "e502_html=0.01,e504_html=0.005,moonshot=0.005,reset=0.015"
)
# Failures after HTTP 200 (faults.md §2): truncation, stalls, error frames, output moderation,
# streams that end without [DONE] or finish_reason, a fatal garbage frame — 5.5 % more.
MID_STREAM = (
    "trunc=0.01,trunc_mid=0.005,stall=0.005,stall_ka=0.005,err_mid=0.01,inspect_mid=0.005,"
    "no_done=0.005,no_finish=0.005,garbage_fatal=0.005"
)

PROMPTS = (
    "Summarise ticket {i} in one sentence",
    "Translate request {i} into French",
    "用一句话总结第 {i} 号工单",
    "Write a haiku about deployment {i}",
    "List three risks of change {i}",
    "Explain error {i} to a new colleague",
)

# Outcome kinds, in table order. ``ok`` is the only success; the rest say what the client saw.
KINDS: dict[str, str] = {
    "ok": "exact answers",
    "rate_limit": "rate limit (429)",
    "server_error": "server error (5xx)",
    "http_error": "other HTTP error",
    "connection": "connection error",
    "timeout": "client timeout",
    "error_frame": "mid-stream error (APIError)",
    "truncated": "truncated stream (raw transport error)",
    "decode_error": "raw decode error (UnicodeDecodeError & co.)",
    "content_filter": "content_filter ending",
    "no_finish": "silently incomplete (no finish_reason)",
    "wrong_text": "wrong text, no error",
    "hang": "hang (no end in time)",
    "other": "other exception",
}
# Outcomes that break keel's promise (a stream must never hang, end silently or raw, never
# repeat or drop text). The others are well-formed, OpenAI-shaped failures.
BROKEN = (
    "connection", "timeout", "truncated", "decode_error", "no_finish", "wrong_text", "hang",
    "other",
)  # fmt: skip


@dataclass(slots=True)
class Result:
    kind: str
    stream: bool
    latency: float
    first_token: float | None = None
    detail: str = ""


@dataclass(slots=True)
class PathReport:
    name: str
    results: list[Result] = field(default_factory=list)
    upstream_attempts: int = 0
    faults_injected: int = 0
    wall: float = 0.0

    def counts(self) -> Counter[str]:
        return Counter(r.kind for r in self.results)

    def summary(self) -> dict[str, Any]:
        counts = self.counts()
        lat = sorted(r.latency for r in self.results if r.kind != "hang")
        ft = sorted(r.first_token for r in self.results if r.first_token is not None)
        examples: dict[str, str] = {}
        for r in self.results:
            if r.kind != "ok" and r.detail and r.kind not in examples:
                examples[r.kind] = r.detail
        return {
            "label": self.name,
            "requests": len(self.results),
            "streaming": sum(r.stream for r in self.results),
            "exact": counts["ok"],
            "failures": len(self.results) - counts["ok"],
            "broken": sum(counts[k] for k in BROKEN),
            "by_kind": {k: counts[k] for k in KINDS if k != "ok" and counts[k]},
            "latency_p50": percentile(lat, 50),
            "latency_p99": percentile(lat, 99),
            "first_token_p50": percentile(ft, 50),
            "first_token_p99": percentile(ft, 99),
            "upstream_attempts": self.upstream_attempts,
            "faults_injected": self.faults_injected,
            "wall_s": round(self.wall, 2),
            "examples": examples,
        }


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when there are none)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


# --- one request through the SDK -------------------------------------------------------------


def classify_exception(exc: BaseException) -> tuple[str, str]:
    import openai

    text = f"{type(exc).__name__}: {exc}"[:160]
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code == 429:
            return "rate_limit", text
        if exc.status_code >= 500:
            return "server_error", text
        return "http_error", text
    if isinstance(exc, openai.APITimeoutError):
        return "timeout", text
    if isinstance(exc, openai.APIConnectionError):
        return "connection", text
    if isinstance(exc, openai.APIError):
        return "error_frame", text
    # Raw transport errors escaping the SDK while it iterates a stream (httpx's
    # "peer closed connection without sending complete message body" & co.).
    module = type(exc).__module__.split(".")[0]
    if module.startswith(("httpx", "httpcore", "h11")) or isinstance(exc, OSError):
        return "truncated", text
    if isinstance(exc, ValueError):  # UnicodeDecodeError, JSONDecodeError on a broken body
        return "decode_error", text
    return "other", text


async def one_request(
    client: Any, model: str, prompt: str, stream: bool, expected: str, hang_after: float
) -> Result:
    t0 = time.monotonic()
    first: float | None = None
    text = ""
    finish: str | None = None
    messages = [{"role": "user", "content": prompt}]
    try:
        async with asyncio.timeout(hang_after):
            if stream:
                response = await client.chat.completions.create(
                    model=model, messages=messages, stream=True
                )
                async with response:
                    async for chunk in response:
                        if not chunk.choices:
                            continue
                        choice = chunk.choices[0]
                        if choice.delta and choice.delta.content:
                            if first is None:
                                first = time.monotonic() - t0
                            text += choice.delta.content
                        if choice.finish_reason:
                            finish = choice.finish_reason
            else:
                done = await client.chat.completions.create(model=model, messages=messages)
                text = done.choices[0].message.content or ""
                finish = done.choices[0].finish_reason
    except TimeoutError:
        return Result("hang", stream, time.monotonic() - t0, first, f"no end after {hang_after}s")
    except Exception as exc:
        kind, detail = classify_exception(exc)
        return Result(kind, stream, time.monotonic() - t0, first, detail)
    latency = time.monotonic() - t0
    if finish == "content_filter":
        return Result("content_filter", stream, latency, first, "finish_reason content_filter")
    if text == expected and finish == "stop":
        return Result("ok", stream, latency, first)
    if text == expected or (not finish and expected.startswith(text)):
        return Result("no_finish", stream, latency, first, f"finish_reason={finish!r}")
    return Result("wrong_text", stream, latency, first, f"{len(text)} of {len(expected)} chars")


# --- the workload ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workload:
    requests: int
    concurrency: int
    seed: int
    stream_ratio: float
    client_timeout: float
    hang_after: float

    def plan(self, tag: str) -> list[tuple[str, bool]]:
        """(prompt, stream) per request: unique prompts, the same stream mix on every path."""
        rng = random.Random(self.seed)
        out = []
        for i in range(self.requests):
            base = PROMPTS[i % len(PROMPTS)].format(i=i)
            out.append((f"{base} [{tag} s{self.seed}]", rng.random() < self.stream_ratio))
        return out


async def run_path(
    name: str,
    base_url: str,
    model: str,
    work: Workload,
    tag: str,
    on_result: Callable[[Result], None],
) -> list[Result]:
    import openai

    from keel.sim import answer_text

    client = openai.AsyncOpenAI(
        base_url=base_url, api_key="sk-demo", max_retries=0, timeout=work.client_timeout
    )
    queue: asyncio.Queue[tuple[str, bool]] = asyncio.Queue()
    for item in work.plan(tag):
        queue.put_nowait(item)
    results: list[Result] = []

    async def worker() -> None:
        while True:
            try:
                prompt, stream = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            r = await one_request(
                client, model, prompt, stream, answer_text(prompt), work.hang_after
            )
            results.append(r)
            on_result(r)

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, work.concurrency))))
    finally:
        await client.close()
    return results


# --- processes ---------------------------------------------------------------------------------


def gateway_config(urls: Sequence[str], first_token: float, idle: float) -> dict[str, Any]:
    dialects = ("openai", "dashscope")
    return {
        "timeouts": {"connect": 2.0, "first_token": first_token, "idle": idle, "total": 60.0},
        "retry": {"deadline": 30.0},
        "models": {
            "chat": {
                "deployments": [
                    {
                        "base_url": url,
                        "api_key": f"sk-demo-{d}",
                        "model": "sim-model",
                        "dialect": d,
                        "name": f"sim-{'ab'[i]}",
                    }
                    for i, (url, d) in enumerate(zip(urls, dialects, strict=False))
                ]
            }
        },
    }


def apply_setting(cfg: dict[str, Any], item: str) -> None:
    """``"retry.max_attempts=4"`` -> cfg["retry"]["max_attempts"] = 4 (the value is YAML)."""
    import yaml

    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {item!r}: expected dotted.key=value")
    *parents, leaf = key.strip().split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {item!r}: {p} is not a mapping")
    node[leaf] = yaml.safe_load(raw)


def run_demo(
    *,
    requests: int = 300,
    concurrency: int = 32,
    seed: int = 7,
    faults: str | None = None,
    mid_stream: bool = True,
    stream_ratio: float = 0.7,
    client_timeout: float = 5.0,
    token_delay: float = 0.01,
    direct: bool = True,
    gateway_settings: Sequence[str] = (),
    console: Any = None,
) -> dict[str, dict[str, Any]]:
    """Run the demo; returns ``{"direct": summary, "keel": summary}`` (see
    :meth:`PathReport.summary`; "direct" only with ``direct=True``)."""
    from rich.console import Console

    from keel.testing import spawn_gateway, spawn_sim

    console = console or Console()
    mix = faults if faults is not None else (f"{PRE_FIRST_BYTE},{MID_STREAM}" if mid_stream else PRE_FIRST_BYTE)  # fmt: skip
    work = Workload(
        requests=requests,
        concurrency=concurrency,
        seed=seed,
        stream_ratio=stream_ratio,
        client_timeout=client_timeout,
        hang_after=max(10.0, 2 * client_timeout),
    )
    common = ["--faults", mix, "--token-delay", str(token_delay), "--first-token-delay", "0.05"]
    console.print(f"[bold]keel demo[/]: {requests} requests ({stream_ratio:.0%} streaming), "
                  f"concurrency {concurrency}, seed {seed}")  # fmt: skip
    console.print(f"fault mix on each simulator: [cyan]{mix or 'none'}[/]")
    reports: dict[str, PathReport] = {}
    with contextlib.ExitStack() as stack:
        sims = [
            stack.enter_context(spawn_sim("--name", "a", "--seed", str(seed), *common)),
            stack.enter_context(
                spawn_sim("--name", "b", "--dialect", "dashscope", "--seed", str(seed + 1), *common)
            ),
        ]
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="keel-demo-"))
        cfg = gateway_config([s.base_url for s in sims], first_token=2.0, idle=1.0)
        for item in gateway_settings:
            apply_setting(cfg, item)
        gw = stack.enter_context(spawn_gateway(cfg, "--log-level", "error", workdir=tmp))

        paths: list[tuple[str, str, str, str, list[Any]]] = []
        if direct:
            paths.append(("direct → sim a", "direct", sims[0].base_url, "sim-model", sims[:1]))
        paths.append(("through keel → sims a+b", "keel", gw.base_url, "chat", sims))
        for label, tag, url, model, upstreams in paths:
            for s in sims:
                s.reset()  # the same seeded fault sequence for each path
            report = PathReport(label)
            t0 = time.monotonic()
            report.results = _with_progress(console, label, url, model, work, tag)
            report.wall = time.monotonic() - t0
            for s in upstreams:
                st = s.stats()
                report.upstream_attempts += st["requests"]
                report.faults_injected += sum(st["by_fault"].values())
            reports[tag] = report
    summaries = {tag: r.summary() for tag, r in reports.items()}
    console.print(render_table(summaries))
    keel = summaries["keel"]
    verdict = (
        "[green]keel kept its promise[/]: every answer exact, or ended well-formed"
        if keel["broken"] == 0
        else f"[red]keel broke its promise on {keel['broken']} request(s)[/]"
    )
    console.print(verdict)
    return summaries


def _with_progress(
    console: Any, label: str, url: str, model: str, work: Workload, tag: str
) -> list[Result]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    counts: Counter[str] = Counter()
    with Progress(
        TextColumn("{task.description:<26}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[green]{task.fields[ok]} exact[/] [red]{task.fields[bad]} failed[/]"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(label, total=work.requests, ok=0, bad=0)

        def on_result(r: Result) -> None:
            counts["ok" if r.kind == "ok" else "bad"] += 1
            progress.update(task, advance=1, ok=counts["ok"], bad=counts["bad"])

        return _run(run_path(label, url, model, work, tag, on_result))


def _run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - Windows
        return asyncio.run(coro)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:,.0f} ms"


def render_table(summaries: dict[str, dict[str, Any]]) -> Any:
    from rich.table import Table

    names = list(summaries)
    table = Table(title="what the client saw", title_justify="left")
    table.add_column("")
    for n in names:
        table.add_column(summaries[n]["label"], justify="right")

    def row(label: str, values: list[str], style: str | None = None) -> None:
        table.add_row(label, *values, style=style)

    s = [summaries[n] for n in names]
    row("requests (streaming)", [f"{x['requests']} ({x['streaming']})" for x in s])
    row("exact answers", [f"{x['exact']} ({x['exact'] / max(1, x['requests']):.1%})" for x in s],
        "bold green")  # fmt: skip
    row("failures", [str(x["failures"]) for x in s], "bold")
    kinds = [k for k in KINDS if k != "ok" and any(k in x["by_kind"] for x in s)]
    for k in kinds:
        style = "red" if k in BROKEN else "yellow"
        row(f"  {KINDS[k]}", [str(x["by_kind"].get(k, 0)) for x in s], style)
    row("latency p50 / p99", [f"{_ms(x['latency_p50'])} / {_ms(x['latency_p99'])}" for x in s])
    row("first token p50 / p99",
        [f"{_ms(x['first_token_p50'])} / {_ms(x['first_token_p99'])}" for x in s])  # fmt: skip
    row("upstream attempts (faults)",
        [f"{x['upstream_attempts']} ({x['faults_injected']})" for x in s])  # fmt: skip
    row("wall time", [f"{x['wall_s']:.1f} s" for x in s])
    return table


# --- the command -------------------------------------------------------------------------------


def _scenarios(names: list[str], seed: int, direct: bool, json_out: str | None) -> None:
    from keel.bench._scenarios import SCENARIOS, run_scenarios

    chosen = list(SCENARIOS) if "all" in names else names
    unknown = [n for n in chosen if n not in SCENARIOS]
    if unknown:
        typer.echo(f"keel demo: unknown scenario {unknown[0]!r}; one of {', '.join(SCENARIOS)}, all",
                   err=True)  # fmt: skip
        raise typer.Exit(2)
    results = run_scenarios(chosen, seed=seed, direct=direct)
    if json_out:
        with open(json_out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, ensure_ascii=False)


def demo_command(
    requests: Annotated[int, typer.Option(help="Requests per path.", min=1)] = 300,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.", min=1)] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the fault sequences and the workload.")] = 7,
    faults: Annotated[
        str | None,
        typer.Option(
            help="Fault mix for both simulators, e.g. 'r429=0.05,reset=0.05' (replaces the "
            "default mix; see the README's simulator reference)."
        ),
    ] = None,
    mid_stream: Annotated[
        bool,
        typer.Option(
            "--mid-stream/--no-mid-stream",
            help="Add failures after HTTP 200 (truncation, stalls, error frames) to the mix.",
        ),
    ] = True,
    stream_ratio: Annotated[
        float, typer.Option(help="Share of streaming requests.", min=0.0, max=1.0)
    ] = 0.7,
    timeout: Annotated[float, typer.Option(help="The SDK client's timeout, seconds.")] = 5.0,
    direct: Annotated[
        bool, typer.Option("--direct/--no-direct", help="Also run the workload without keel.")
    ] = True,
    json_out: Annotated[
        str | None, typer.Option("--json", help="Also write the figures to this JSON file.")
    ] = None,
    scenario: Annotated[
        list[str] | None,
        typer.Option(
            help="Run a load-or-noise scenario instead (repeatable): wall, rate, noise, storm, "
            "outage or all. Default policies; prints exact %, refused %, throughput, p99 and "
            "attempts per request, direct vs keel where comparable.",
        ),
    ] = None,
    gateway_set: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Gateway config override, repeatable: dotted.key=YAML value, e.g. "
            "--set retry.max_attempts=4 --set breaker.enabled=false.",
        ),
    ] = None,
) -> None:
    """Simulators + gateway + a workload through the openai SDK: direct vs through keel.

    Exit code 0 when every request through keel got its exact answer or a well-formed,
    OpenAI-shaped failure; 1 when keel broke that promise (a hang, a silent or raw truncation,
    wrong text); 2 on bad options or a missing dependency.
    """
    try:
        import openai  # noqa: F401
    except ImportError:
        typer.echo(
            "keel demo needs the official openai SDK: pip install 'keel[demo]' "
            "(or pip install openai)",
            err=True,
        )
        raise typer.Exit(2) from None
    if scenario:
        _scenarios(scenario, seed, direct, json_out)
        return
    from keel.sim._faults import DirectiveError, parse_rates

    if faults is not None:
        try:
            parse_rates(faults)
        except DirectiveError as exc:
            typer.echo(f"keel demo: --faults: {exc}", err=True)
            raise typer.Exit(2) from None
    from keel.config import ConfigError, parse_config

    try:  # check the overrides before starting anything
        probe = gateway_config(["http://127.0.0.1:1/v1"] * 2, first_token=2.0, idle=1.0)
        for item in gateway_set or ():
            apply_setting(probe, item)
        parse_config(probe)
    except (ValueError, ConfigError) as exc:
        typer.echo(f"keel demo: {exc}", err=True)
        raise typer.Exit(2) from None
    summaries = run_demo(
        requests=requests,
        concurrency=concurrency,
        seed=seed,
        faults=faults,
        mid_stream=mid_stream,
        stream_ratio=stream_ratio,
        client_timeout=timeout,
        direct=direct,
        gateway_settings=gateway_set or (),
    )
    if json_out:
        with open(json_out, "w", encoding="utf-8") as f:
            json.dump(summaries, f, indent=2, ensure_ascii=False)
    keel = summaries["keel"]
    raise typer.Exit(1 if keel["broken"] else 0)
