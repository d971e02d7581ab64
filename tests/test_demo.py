"""``keel demo`` end to end: real simulators, the gateway and the openai SDK, small workloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from keel.demo import BROKEN, percentile


def run_demo(tmp_path: Path, *args: str) -> tuple[int, str, dict[str, Any]]:
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "keel", "demo", "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "120", "PYTHONUNBUFFERED": "1"},
    )
    figures = json.loads(out.read_text()) if out.exists() else {}
    return proc.returncode, proc.stdout + proc.stderr, figures


def test_pre_first_byte_faults_cost_the_keel_client_nothing(tmp_path: Path) -> None:
    code, output, figures = run_demo(
        tmp_path, "--requests", "80", "--concurrency", "16", "--seed", "3", "--no-mid-stream"
    )
    assert code == 0, output
    direct, keel = figures["direct"], figures["keel"]
    assert keel["requests"] == direct["requests"] == 80
    assert 40 <= keel["streaming"] <= 75  # ~70 % streaming, the same plan on both paths
    assert keel["streaming"] == direct["streaming"]
    assert keel["exact"] == 80 and keel["failures"] == 0 and keel["by_kind"] == {}
    # the faults were there: the direct client saw them, keel retried them away
    assert direct["failures"] > 0
    assert direct["failures"] == sum(direct["by_kind"].values())
    assert keel["upstream_attempts"] > 80 and keel["faults_injected"] > 0
    assert keel["latency_p50"] <= keel["latency_p99"]
    assert keel["first_token_p50"] is not None
    # the table shows the same figures
    assert "what the client saw" in output
    assert "80 (100.0%)" in output
    assert f"{direct['exact']} ({direct['exact'] / 80:.1%})" in output
    assert "keel kept its promise" in output


def test_mid_stream_faults_end_well_formed_through_keel(tmp_path: Path) -> None:
    code, output, figures = run_demo(
        tmp_path,
        "--requests", "60", "--concurrency", "16", "--no-direct", "--stream-ratio", "1",
        "--faults", "err_mid=0.15,trunc=0.1,stall=0.05,no_done=0.05,inspect_mid=0.05,e500=0.1",
    )  # fmt: skip
    assert code == 0, output
    keel = figures["keel"]
    assert set(figures) == {"keel"}
    assert keel["requests"] == keel["streaming"] == 60
    assert keel["broken"] == 0, keel
    assert not set(keel["by_kind"]) & set(BROKEN), keel
    assert set(keel["by_kind"]) <= {"error_frame", "content_filter", "server_error"}


def test_bad_faults_option_is_a_usage_error(tmp_path: Path) -> None:
    code, output, _ = run_demo(tmp_path, "--faults", "nope=0.1")
    assert code == 2
    assert "nope" in output


def test_missing_openai_sdk_says_how_to_install_it() -> None:
    code = (
        "import sys; sys.modules['openai'] = None; sys.argv = ['keel', 'demo'];"
        "from keel.cli import main; main()"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "keel[demo]" in proc.stderr


@pytest.mark.parametrize(
    ("values", "p", "expected"),
    [([], 50, None), ([1.0], 99, 1.0), ([1.0, 2.0, 3.0, 4.0], 50, 2.0), ([*range(100)], 99, 98)],
)
def test_percentile_nearest_rank(values: list[float], p: float, expected: float | None) -> None:
    assert percentile(values, p) == expected


def test_gateway_overrides_are_checked_before_anything_starts(tmp_path: Path) -> None:
    code, output, _ = run_demo(tmp_path, "--set", "retry.no_such_key=1")
    assert code == 2
    assert "retry.no_such_key" in output and "unknown key" in output


def test_apply_setting_parses_yaml_values() -> None:
    from keel.demo import apply_setting

    cfg: dict[str, Any] = {"retry": {"deadline": 30.0}}
    apply_setting(cfg, "retry.max_attempts=4")
    apply_setting(cfg, "breaker.enabled=false")
    apply_setting(cfg, "models.chat.fallbacks=[a, b]")
    assert cfg == {
        "retry": {"deadline": 30.0, "max_attempts": 4},
        "breaker": {"enabled": False},
        "models": {"chat": {"fallbacks": ["a", "b"]}},
    }
    with pytest.raises(ValueError, match=r"dotted\.key=value"):
        apply_setting(cfg, "novalue")
