"""`keel bench --quick` still runs end to end. No timing asserts: CI machines are noisy and
the numbers belong in docs/performance.md, not in a pass/fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_quick_runs_and_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "keel", "bench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert set(report) >= {"meta", "results", "ratios", "targets"}
    assert report["meta"]["mode"] == "quick"
    results = report["results"]
    assert {"bare", "keel"} <= set(results)
    for name in ("bare", "keel"):
        cells = results[name]
        assert set(cells) >= {
            "throughput", "latency_c1", "first_token", "per_frame", "equal_load", "streams",
            "disconnect",
        }  # fmt: skip
        assert cells["throughput"]["requests"] > 0
        assert cells["streams"]["levels"][0]["streams"] == 1000
        assert set(cells["disconnect"]) == {"prefirst", "midstream", "nonstream"}
    assert "keel" in report["ratios"]
    assert {
        "nonstream_throughput_vs_bare", "added_latency_c1_p50_ms", "cpu_per_frame_vs_bare",
        "disconnect_prefirst_p99_ms", "disconnect_midstream_p99_ms", "disconnect_nonstream_p99_ms",
    } <= set(report["targets"])  # fmt: skip
    assert (out / "bench.md").exists()
    # The chart is optional (matplotlib is an extra); when it is missing a note says so.
    assert (out / "bench.png").exists() or any("matplotlib" in n for n in report["meta"]["notes"])


def test_inproc_harness_runs_every_gateway_both_ways() -> None:
    # The instruction-count harness of docs/performance.md: it must keep working as the
    # gateway changes (it raises on any non-200 answer).
    for which in ("keel", "bare", "direct"):
        for tokens in ("0", "3"):
            args = [which, "--requests", "4", "--tokens", tokens]
            proc = subprocess.run(
                [sys.executable, "-m", "keel.bench._inproc", *args],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == 0, (which, tokens, proc.stderr[-2000:])


def test_bench_auth_modes_run_paired_against_auth_off(tmp_path: Path) -> None:
    # keel bench --auth: one keel per mode, each answering 200 with its own credential (a
    # virtual key, its access JWT; keel-limits reads none), paired against keel with auth off
    # (no client) and keel-limits (the same client limits, no authentication).
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "keel", "bench", "--quick", "--cells", "throughput", "--only",
         "keel", "--auth", "off,limits,virtual,jwt", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["meta"]["auth"] == ["off", "limits", "virtual", "jwt"]
    results = report["results"]
    assert set(results) == {"keel-off", "keel-limits", "keel-virtual", "keel-jwt"}
    for name, cells in results.items():
        tput = cells["throughput"]
        assert tput["requests"] > 0 and tput["errors"] == 0, (name, tput)
        assert ("paired_minus_auth_off" in tput) == (name != "keel-off"), name
        assert ("paired_minus_limits" in tput) == (name in ("keel-virtual", "keel-jwt")), name
    target = report["targets"]["auth_cpu_us_per_request_over_auth_off"]
    assert target["baseline"] == "keel-limits" and target["mode"] in ("keel-virtual", "keel-jwt")
    lines = proc.stdout.replace("\n", " ")
    assert "keel-jwt: " in lines and "µs CPU per request over keel-limits" in lines
    assert "µs CPU per request over keel-off" in lines
    assert "no authentication" in lines  # keel-limits over keel-off: what its line measures


def test_bench_refuses_an_unknown_auth_mode() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "keel", "bench", "--auth", "off,oauth"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--auth takes a list of off, limits, static, virtual, jwt" in proc.stderr


def test_bench_measures_telemetry_on_against_off(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    args = ["--quick", "--cells", "throughput", "--only", "bare", "--telemetry", "on"]
    proc = subprocess.run(
        [sys.executable, "-m", "keel", "bench", *args, "--repeats", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert set(report["results"]) == {"bare", "keel", "keel-otel"}
    otel = report["results"]["keel-otel"]["throughput"]
    assert otel["requests"] > 0 and otel["errors"] == 0
    assert set(otel["paired_vs_keel"]) >= {"cpu_us_per_req", "rps_per_core"}
    assert "telemetry_cpu_per_request_vs_off" in report["targets"]
    assert "telemetry on / off: throughput cpu_us_per_req x" in proc.stdout


def test_inproc_harness_with_telemetry_on() -> None:
    for tokens in ("0", "3"):
        args = ["keel", "--requests", "4", "--tokens", tokens, "--telemetry", "on"]
        proc = subprocess.run(
            [sys.executable, "-m", "keel.bench._inproc", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, (tokens, proc.stderr[-2000:])
        assert "Failed to export" not in proc.stderr


def test_inproc_harness_runs_every_auth_mode(tmp_path: Path) -> None:
    # The instruction counts of docs/performance.md's auth section (it raises on any non-200:
    # keel-limits must answer whatever token it is sent, virtual and jwt their credential).
    import os

    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the harness keeps its signing key there
    for auth in (["off"], ["limits", "--bearer-length", "600"], ["virtual"], ["jwt"]):
        proc = subprocess.run(
            [sys.executable, "-m", "keel.bench._inproc", "keel", "--requests", "4", "--auth",
             *auth],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )  # fmt: skip
        assert proc.returncode == 0, (auth, proc.stderr[-2000:])
