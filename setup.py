"""The compiled build: a wheel (``pip install .``) compiles keel's pure, per-request modules with
mypyc when a C compiler is there (about -60k instructions per non-stream request,
docs/performance.md); ``KEEL_MYPYC=0``, editable installs and sdists are plain setuptools.
The backend (_build/keel_backend.py) decides and sets ``KEEL_MYPYC=1`` for this file. The
metadata is pyproject.toml's either way.
"""

from __future__ import annotations

import os

from setuptools import setup

# Pure (no I/O), fully annotated, and on the per-request or per-frame path; a module that
# subclasses a compiled class is compiled too (an interpreted class cannot inherit from a
# compiled one). What mypyc does not take: generic dataclasses (``_plan`` uses plain classes),
# ``object.__new__`` on a compiled class (``_assembly`` uses the class's own ``__new__``).
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
    "src/keel/engine/_admission.py",
    "src/keel/engine/_validate.py",
    "src/keel/_sse.py",
    "src/keel/_classify.py",
    "src/keel/engine/_operation.py",
    "src/keel/engine/_router.py",
    "src/keel/engine/_auth.py",
    "src/keel/_assembly.py",
    "src/keel/_transcript.py",
    "src/keel/_text_assembly.py",
    "src/keel/_hints.py",
    "src/keel/_responses_wire.py",
    "src/keel/engine/_responses.py",
    "src/keel/engine/_embeddings.py",
    "src/keel/engine/_completions.py",
    "src/keel/_plan.py",
    "src/keel/_hedge.py",
]

if os.environ.get("KEEL_MYPYC") == "1":  # set by the backend: a wheel, a C compiler there
    from mypyc.build import mypycify

    # Type errors are reported for the compiled modules only (CI's mypy checks the rest; the
    # optional extras, e.g. opentelemetry, are not in the build environment).
    flags = ["--follow-imports=silent"]
    setup(ext_modules=mypycify([*flags, *COMPILED], opt_level="3", debug_level="1"))
else:
    setup()
