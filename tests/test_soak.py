"""``keel bench --soak``: the duration syntax, and a short run end to end (the real soak is
minutes to hours; docs/performance.md has its figures)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from keel.bench._soak import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("5m", 300), ("1h30m", 5400), ("2.5m", 150)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "5x", "-1m", "1m5h"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_a_short_soak_runs_and_reports(tmp_path) -> None:
    out = tmp_path / "soak"
    proc = subprocess.run(
        [sys.executable, "-m", "keel", "bench", "--soak", "8s", "--interval", "4", "--out",
         str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "soak.json").read_text())
    assert result["requests"] > 100 and result["broken"] == 0, result["broken_examples"]
    assert result["exact"] + result["failed_well_formed"] + result["aborted"] == result["requests"]
    assert len(result["samples"]) == 2
    for s in result["samples"]:
        assert s["rss_mb"] > 10 and s["fds"] > 5 and s["objects"] > 100 and s["top"]
    assert "RSS growth after the warm-up" in proc.stderr
