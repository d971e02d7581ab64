"""``keel node --demo`` runs end to end on the real broker: exit 0 (every turn ended as
scripted, with the exact text), and it prints the time from barge-in to silence."""

from __future__ import annotations

import re
import subprocess
import sys

from node_helpers import AMQP_URL, require_broker


def test_demo() -> None:
    require_broker()
    out = subprocess.run(
        [sys.executable, "-m", "keel", "node", "--demo", "--amqp-url", AMQP_URL, "--log-level", "warning"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    for reason in ("stop", "content_filter", "cancelled"):
        assert f"[end: {reason};" in text
    assert "r429_ds, r429_ds" in text  # the forced hint-less 429s, retried
    m = re.search(r"connections closed after ([\d.]+) ms", text)
    assert m and float(m.group(1)) <= 100
    assert "5 turns, 0 lost" in text
