"""The ``keel bench`` command: start everything, run the cells, report, stop everything."""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

import keel

# keel per --auth mode (keel.bench._targets.keel_name): the ones paired against the two
# baselines, keel-off (no client) and keel-limits (the same client, not authenticated)
_AUTH_TARGETS = ("keel", "keel-limits", "keel-virtual", "keel-jwt")
_AUTH_BASELINES = {"keel-off": "auth_off", "keel-limits": "limits"}
CELLS = (
    "throughput", "embeddings", "latency", "first_token", "frames", "equal_load", "streams",
    "disconnect",
)  # fmt: skip


def _run_cells(
    targets: list[Any], direct: Any, sim: Any, plan: Any, cells: set[str], load_cores: set[int],
    fd_limit: int, say: Callable[[str], None],
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Cell by cell, repeat by repeat, target after target: every gateway runs all the time
    (idle when not measured), so drift on a shared machine hits every target alike."""
    from keel.bench import _cells as c

    out: dict[str, dict[str, Any]] = {t.name: {} for t in targets}
    repeated: list[tuple[str, str, Callable[[Any], dict[str, Any]]]] = [
        ("throughput", "throughput", lambda t: c.throughput(t, plan)),
        ("embeddings", "embeddings", lambda t: c.embeddings(t, plan)),
        ("latency", "latency_c1", lambda t: c.latency_c1(t, direct, plan)),
        ("first_token", "first_token", lambda t: c.first_token(t, direct, plan)),
        ("frames", "per_frame", lambda t: c.per_frame(t, plan)),
        ("equal_load", "equal_load", lambda t: c.equal_load(t, plan)),
    ]
    for cell, key, fn in repeated:
        if cell not in cells:
            continue
        # The simulator alone (sharing the load generator's core) shows the load side's ceiling.
        who = [direct, *targets] if cell == "throughput" else targets
        runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in who}
        for r in range(plan.repeats):
            # Every other repeat in reverse order: drift within a repeat favours nobody.
            for t in who if r % 2 == 0 else who[::-1]:
                say(f"{cell} {r + 1}/{plan.repeats}: {t.name}")
                runs[t.name].append(fn(t))
                sim.clear_log()  # keep the simulator's log small
        for t in who:
            out.setdefault(t.name, {})[key] = c.median_of(runs[t.name])
            # Every repeat as measured: the spread says how far one median can be trusted.
            out[t.name][key]["runs"] = runs[t.name]
            if t.name != "bare" and "bare" in runs:
                out[t.name][key]["paired_vs_bare"] = c.paired_ratios(runs[t.name], runs["bare"])
            for base, suffix in _AUTH_BASELINES.items():  # --auth: the same pairs
                if t.name in _AUTH_TARGETS and t.name != base and base in runs:
                    got, off = out[t.name][key], runs[base]
                    got[f"paired_vs_{suffix}"] = c.paired_ratios(runs[t.name], off)
                    got[f"paired_minus_{suffix}"] = c.paired_differences(runs[t.name], off)
            if t.name == "keel-otel" and "keel" in runs:  # telemetry on / off, back to back
                out[t.name][key]["paired_vs_keel"] = c.paired_ratios(runs[t.name], runs["keel"])
    # Disconnects before streams: thousands of streams closing at once is the most
    # disruptive cell, and what a gateway does right after it is not what this cell asks.
    if "disconnect" in cells:
        for t in targets:
            say(f"disconnect: {t.name}")
            out[t.name]["disconnect"] = c.disconnect(t, sim, plan)
    if "streams" in cells:
        for t in targets:
            if t.name in ("bare", "keel"):  # peers: not their strength, and it takes minutes
                say(f"streams {plan.stream_levels}: {t.name}")
                out[t.name]["streams"] = c.streams(t, plan, load_cores, fd_limit)
                sim.clear_log()
    return out


def bench(
    quick: bool, out_dir: Path, peers: bool, repeats: int | None, cells: set[str],
    only: set[str] | None, auth: tuple[str, ...] = ("static",), telemetry: bool = False,
) -> dict[str, Any]:  # fmt: skip
    from keel.bench import _cells as c
    from keel.bench import _report, _targets
    from keel.bench._config import UPSTREAM_MODEL, keel_config
    from keel.bench._measure import core_plan, pin, raise_fd_limit

    plan = c.QUICK if quick else c.FULL
    if repeats:
        plan = replace(plan, repeats=repeats)
    fd_limit = raise_fd_limit()  # inherited by every child we start
    gw_cores, load_cores = core_plan()
    pin(os.getpid(), load_cores)  # before any child exists: children inherit it
    t0 = time.monotonic()

    def say(msg: str) -> None:
        typer.echo(f"[{time.monotonic() - t0:6.1f}s] {msg}", err=True)

    # The gateways run on this interpreter, so on this keel: say which build it is up front.
    native = keel.compiled()
    typer.echo(
        f"keel: compiled ({len(native)} modules, mypyc)" if native else "keel: pure Python",
        err=True,
    )
    workdir = tempfile.mkdtemp(prefix="keel-bench-")
    results: dict[str, Any] = {}
    notes: list[str] = []
    sim = _targets.start_sim()
    collector = None
    try:
        direct = _targets.Target("direct", sim.base_url, None, UPSTREAM_MODEL, measure_pid=sim.pid)
        starters: list[tuple[str, Callable[[], _targets.Target]]] = [
            ("bare", lambda: _targets.start_bare(sim.base_url)),
        ]
        for mode in auth:  # one keel per client authentication mode (--auth)
            starters.append(
                ("keel", lambda m=mode: _targets.start_keel(sim.base_url, workdir, m))  # type: ignore[misc]
            )
        if telemetry or (only is not None and "keel-otel" in only):
            collector = _targets.start_collector()
            url = collector.url
            starters.append(
                ("keel-otel", lambda: _targets.start_keel(sim.base_url, workdir, collector=url))
            )
        if peers:
            if _targets.litellm_command():
                starters.append(("litellm", lambda: _targets.start_litellm(sim.base_url, workdir)))
            else:
                notes.append("litellm not installed: skipped (see docs/performance.md)")
            if _targets.portkey_script():
                starters.append(("portkey", lambda: _targets.start_portkey(sim.base_url)))
            else:
                notes.append("portkey not installed: skipped (see docs/performance.md)")
        targets: list[_targets.Target] = []
        try:
            for name, start in starters:
                if only is not None and name not in only:
                    continue
                say(f"starting {name}")
                try:
                    target = start()
                except RuntimeError as exc:
                    notes.append(f"{name} did not start: {exc}")
                    continue
                targets.append(target)
                if target.measure_pid:
                    pin(target.measure_pid, gw_cores)
            results = _run_cells(targets, direct, sim, plan, cells, load_cores, fd_limit, say)
            if only is not None and "direct" not in only:
                results.pop("direct", None)
        finally:
            for target in targets:
                target.stop()
    finally:
        sim.terminate()
        if collector is not None:
            collector.terminate()
        shutil.rmtree(workdir, ignore_errors=True)
    import keel.bench._config as cfg_mod

    report: dict[str, Any] = {
        "meta": {
            "mode": plan.name,
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.monotonic() - t0, 1),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "keel_compiled": list(native),  # keel.compiled(): empty for pure Python
            "cpus": os.cpu_count(),
            "gateway_cores": sorted(gw_cores),
            "load_cores": sorted(load_cores),
            "fd_limit": fd_limit,
            "plan": c.plan_dict(plan),
            "keel_config": keel_config("<simulator>")[0],
            "keel_config_dropped": keel_config("<simulator>")[1],
            "keel_config_source": cfg_mod.__name__,
            "auth": list(auth),
            "notes": notes,
        },
        "results": results,
        "ratios": _report.ratios(results),
        "versus_peers": _report.versus_peers(results),
        "targets": _report.check_targets(results, plan.stream_levels),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _report.print_table(results)
    for name, check in report["targets"].items():
        typer.echo(
            f"{'MET ' if check['met'] else 'MISS'} {name}: {check['value']} ({check['limit']})"
        )
    for peer, v in report["versus_peers"].items():
        typer.echo(f"keel vs {peer}: {v}")
    for line in _report.auth_costs(results):
        typer.echo(line)
    for line in _report.telemetry_lines(results):
        typer.echo(line)
    _report.write_json(out_dir / "bench.json", report)
    (out_dir / "bench.md").write_text(_report.markdown_table(results) + "\n")
    note = _report.write_chart(out_dir / "bench.png", results)
    if note:
        notes.append(note)
        typer.echo(note, err=True)
        _report.write_json(out_dir / "bench.json", report)
    for n in notes:
        typer.echo(f"note: {n}", err=True)
    typer.echo(
        f"wrote {out_dir / 'bench.json'}" + ("" if note else f" and {out_dir / 'bench.png'}")
    )
    return report


def bench_command(
    quick: Annotated[
        bool, typer.Option(help="Small counts (1k streams): under 2 minutes.")
    ] = False,
    out: Annotated[Path, typer.Option(help="Output directory for bench.json/.png/.md.")] = Path(
        "bench-results"
    ),
    peers: Annotated[
        bool, typer.Option(help="Also run LiteLLM and Portkey when installed (never in CI).")
    ] = False,
    repeats: Annotated[
        int, typer.Option(help="Repeats per cell (0 = the mode's default).", min=0)
    ] = 0,
    cells: Annotated[str, typer.Option(help=f"Comma-separated subset of: {', '.join(CELLS)}.")] = (
        ",".join(CELLS)
    ),
    only: Annotated[
        str,
        typer.Option(
            help="Comma-separated targets to run (direct, bare, keel, keel-otel, litellm, portkey)."
        ),
    ] = "",
    soak: Annotated[
        str,
        typer.Option(
            help="Instead: a soak of this duration (90s, 5m, 30m) under the fault mix, "
            "reporting keel's RSS, descriptors and live objects per type (keel.bench._soak)."
        ),
    ] = "",
    interval: Annotated[
        float, typer.Option(help="Seconds between two soak samples (0 = duration/30).", min=0)
    ] = 0.0,
    auth: Annotated[
        str,
        typer.Option(
            help="Comma-separated client authentication modes, one keel each: off (no key, "
            "no client limits), limits (the config's client and its limits, no "
            "authentication), static (the config's key), virtual (a virtual key with a "
            "budget), jwt (its access token). The others are paired against off and limits "
            "when those run; over limits is what authenticating costs."
        ),
    ] = "static",
    telemetry: Annotated[
        str,
        typer.Option(
            help="on: also run keel-otel (keel with OpenTelemetry on, every request sampled, "
            "exporting to a local collector) and report its cost over keel, paired; off: not."
        ),
    ] = "off",
) -> None:
    """Measure keel against a bare proxy from the same stack: throughput, latency, CPU per
    request and per frame, memory per open stream, and disconnect → upstream close."""
    if soak:
        from keel.bench._soak import parse_duration
        from keel.bench._soak import soak as run_soak

        try:
            parse_duration(soak)
        except ValueError as exc:
            typer.echo(f"keel bench: --soak: {exc}", err=True)
            raise typer.Exit(2) from None
        result = run_soak(soak, interval or None, out)
        raise typer.Exit(1 if result["broken"] else 0)
    chosen = {x.strip() for x in cells.split(",") if x.strip()}
    unknown = chosen - set(CELLS)
    if unknown:
        typer.echo(f"keel bench: unknown cells {sorted(unknown)}; choose from {CELLS}", err=True)
        raise typer.Exit(2)
    targets = {x.strip() for x in only.split(",") if x.strip()} or None
    from keel.bench._targets import AUTH_MODES

    modes = tuple(dict.fromkeys(x.strip() for x in auth.split(",") if x.strip()))
    if not modes or set(modes) - set(AUTH_MODES):
        typer.echo(f"keel bench: --auth takes a list of {', '.join(AUTH_MODES)}", err=True)
        raise typer.Exit(2)
    if telemetry not in ("on", "off"):
        typer.echo(f"keel bench: --telemetry must be on or off, not {telemetry!r}", err=True)
        raise typer.Exit(2)
    on = telemetry == "on"
    if on and targets is not None:
        targets |= {"keel", "keel-otel"}  # the pair the cost is measured on
    bench(quick, out, peers, repeats or None, chosen, targets, modes, on)
