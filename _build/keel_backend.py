"""keel's build backend: setuptools', plus mypy when the wheel is compiled with mypyc.

A wheel (``pip install .``, ``pip wheel .``) compiles the policy modules of ``setup.py`` with
mypyc when a C compiler is there: the build that meets keel's speed targets
(docs/performance.md), and what a production install should run. ``KEEL_MYPYC=0`` builds
pure Python; ``KEEL_MYPYC=1`` insists on compiling (no compiler: one clear line, no build).
Without a compiler and without the variable the wheel is pure Python, said in one line.

Only a compiled build needs mypy (mypyc ships with it), pinned to the version the dev extras
resolve to, so the compiled code is what CI tested. Editable installs stay pure: a compiled
``.so`` next to the ``.py`` would be imported instead of the source being edited, silently,
until rebuilt. An sdist is the source, never compiled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import sysconfig
import tomllib
from collections.abc import Iterator

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 (the other PEP 517 hooks, unchanged)

MYPY = "mypy==2.4.1"


def _has_compiler() -> bool:
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) is not None


def _compiled() -> bool:
    """Compile this wheel? (setup.py compiles when ``KEEL_MYPYC`` is "1".)"""
    choice = os.environ.get("KEEL_MYPYC", "")
    if choice == "0":
        return False
    if _has_compiler():
        return True
    if choice == "1":
        raise SystemExit(
            "keel: KEEL_MYPYC=1 needs a C compiler (none found); unset it for pure Python"
        )
    print(
        "keel: no C compiler found: building pure Python (slower; docs/performance.md)",
        file=sys.stderr,
    )
    return False


@contextlib.contextmanager
def _build(compiled: bool) -> Iterator[None]:
    """setup.py with ``KEEL_MYPYC`` set to this build's choice (pure: for the hooks that only
    read it — requirements, metadata — and for editable installs and sdists)."""
    was = os.environ.get("KEEL_MYPYC")
    os.environ["KEEL_MYPYC"] = "1" if compiled else "0"
    try:
        yield
    finally:
        if was is None:
            del os.environ["KEEL_MYPYC"]
        else:
            os.environ["KEEL_MYPYC"] = was


def get_requires_for_build_wheel(config_settings: dict[str, object] | None = None) -> list[str]:
    compiled = _compiled()
    with _build(False):
        base = _setuptools.get_requires_for_build_wheel(config_settings)  # type: ignore[arg-type]
    if not compiled:
        return base
    # mypyc compiles by the types mypy infers, which follow the compiled modules' imports into
    # keel's others and their libraries: the same libraries as the dev venv's mypy sees.
    with open("pyproject.toml", "rb") as f:
        runtime = tomllib.load(f)["project"]["dependencies"]
    return [*base, MYPY, "types-PyYAML", *runtime]


def prepare_metadata_for_build_wheel(
    metadata_directory: str, config_settings: dict[str, object] | None = None
) -> str:
    with _build(False):  # the metadata is pyproject.toml's either way
        return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)  # type: ignore[arg-type]


def build_wheel(
    wheel_directory: str,
    config_settings: dict[str, object] | None = None,
    metadata_directory: str | None = None,
) -> str:
    with _build(_compiled()):
        return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)  # type: ignore[arg-type]


def build_sdist(sdist_directory: str, config_settings: dict[str, object] | None = None) -> str:
    with _build(False):
        return _setuptools.build_sdist(sdist_directory, config_settings)  # type: ignore[arg-type]


def get_requires_for_build_editable(config_settings: dict[str, object] | None = None) -> list[str]:
    if os.environ.get("KEEL_MYPYC") == "1":
        raise SystemExit(
            "keel: KEEL_MYPYC=1 compiles a wheel; use a non-editable install (pip install .), "
            "an editable one stays pure Python"
        )
    with _build(False):
        return _setuptools.get_requires_for_build_editable(config_settings)  # type: ignore[arg-type]


def prepare_metadata_for_build_editable(
    metadata_directory: str, config_settings: dict[str, object] | None = None
) -> str:
    with _build(False):
        return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)  # type: ignore[arg-type]


def build_editable(
    wheel_directory: str,
    config_settings: dict[str, object] | None = None,
    metadata_directory: str | None = None,
) -> str:
    with _build(False):
        return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)  # type: ignore[arg-type]
