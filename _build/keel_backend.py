"""keel's build backend: setuptools', plus mypy when ``KEEL_MYPYC=1`` asks for the compiled build.

Pure Python is the default and needs nothing more. ``KEEL_MYPYC=1 pip install .`` compiles the
policy modules of ``setup.py`` with mypyc, which ships with mypy: only then is mypy a build
requirement (pinned to the version the dev extras resolve to, so the compiled code is what CI
tested). Editable installs stay pure: a compiled ``.so`` next to the ``.py`` would be imported
instead of the source being edited, silently, until rebuilt.
"""

from __future__ import annotations

import contextlib
import os
import tomllib
from collections.abc import Iterator

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 (the other PEP 517 hooks, unchanged)

MYPY = "mypy==2.4.1"


def _compiled() -> bool:
    return os.environ.get("KEEL_MYPYC") == "1"


@contextlib.contextmanager
def _pure() -> Iterator[None]:
    """setup.py as the pure build: for the hooks that only read it (requirements, metadata),
    before mypy is installed, and without compiling everything once more."""
    was = os.environ.pop("KEEL_MYPYC", None)
    try:
        yield
    finally:
        if was is not None:
            os.environ["KEEL_MYPYC"] = was


def get_requires_for_build_wheel(config_settings: dict[str, object] | None = None) -> list[str]:
    if not _compiled():
        return _setuptools.get_requires_for_build_wheel(config_settings)  # type: ignore[arg-type]
    with _pure():
        base = _setuptools.get_requires_for_build_wheel(config_settings)  # type: ignore[arg-type]
    # mypyc compiles by the types mypy infers, which follow the compiled modules' imports into
    # keel's others and their libraries: the same libraries as the dev venv's mypy sees.
    with open("pyproject.toml", "rb") as f:
        runtime = tomllib.load(f)["project"]["dependencies"]
    return [*base, MYPY, "types-PyYAML", *runtime]


def prepare_metadata_for_build_wheel(
    metadata_directory: str, config_settings: dict[str, object] | None = None
) -> str:
    with _pure():  # the metadata is pyproject.toml's either way
        return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)  # type: ignore[arg-type]


def get_requires_for_build_editable(config_settings: dict[str, object] | None = None) -> list[str]:
    if _compiled():
        raise SystemExit(
            "keel: KEEL_MYPYC=1 compiles a wheel; use a non-editable install (pip install .), "
            "an editable one stays pure Python"
        )
    return _setuptools.get_requires_for_build_editable(config_settings)  # type: ignore[arg-type]
