"""Opt-in compiled build: ``KEEL_MYPYC=1 pip install .`` compiles keel's pure policy modules with
mypyc (about -42k instructions per non-stream request, docs/performance.md); without the
variable this is plain setuptools and the metadata is pyproject.toml's. See _build/keel_backend.py.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig

from setuptools import setup

# Pure, fully annotated, and on the per-request path. Not keel/_plan.py: its generic slotted
# dataclasses do not compile (mypyc cannot write a type's __dict__).
COMPILED = [
    "src/keel/_health.py",
    "src/keel/_tokens.py",
    "src/keel/_ratelimit.py",
    "src/keel/_cadence.py",
    "src/keel/_status.py",
    "src/keel/_backoff.py",
    "src/keel/_evidence.py",
    "src/keel/_concurrency.py",
    "src/keel/engine/_balancer.py",
    "src/keel/engine/_limits.py",
    "src/keel/engine/_deadlines.py",
]

if os.environ.get("KEEL_MYPYC") == "1":
    # Without a C compiler the build would fail pages into the compiler's output: say it in one line.
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        sys.exit(f"keel: KEEL_MYPYC=1 needs a C compiler ({cc} not found); unset it for pure Python")
    from mypyc.build import mypycify

    # Type errors are reported for the compiled modules only (CI's mypy checks the rest; the
    # optional extras, e.g. opentelemetry, are not in the build environment).
    flags = ["--follow-imports=silent"]
    setup(ext_modules=mypycify([*flags, *COMPILED], opt_level="3", debug_level="1"))
else:
    setup()
