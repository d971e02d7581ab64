"""The README's library example runs as printed, with the exact answers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from keel.sim import answer_text

EXAMPLE = Path(__file__).parent.parent / "examples" / "library.py"


def test_the_library_example_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    assert out[0] == f"chat:   {answer_text('Hello [[sim:e500*1]]')}"
    repair = "{'attempts': 2, 'continued': [{'at_char': 15, 'deployment': 'primary', 'mode': 'prefill'}]}"
    assert out[1] == f"stream: {answer_text('Story [[sim:trunc=5*1]]')} stop {repair}"
    assert out[2:] == ["sdk:    404 model_not_found", "error:  400 context_length_exceeded"]
