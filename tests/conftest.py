"""Shared fixtures. Sim fixtures: an in-process simulator on a free loopback port."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, settings

import keel
from keel.sim import Simulator

# Property tests are deterministic (derandomize: the same examples every run) and judged on
# what they find, not on how fast a busy 2-core CI machine generates inputs.
settings.register_profile(
    "keel", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("keel")


def pytest_report_header() -> str:
    """Which keel the run tests: the compiled build (setup.py) or pure Python, and from where."""
    native = keel.compiled()
    build = f"compiled ({len(native)} modules, mypyc)" if native else "pure Python"
    return f"keel: {build}, {os.path.dirname(keel.__file__)}"


def pytest_configure(config: pytest.Config) -> None:
    # CI's compiled check (.ci/run) sets this: fail at once if src/ shadowed the installed build.
    want = os.environ.get("KEEL_EXPECT_COMPILED")
    if want is not None and len(keel.compiled()) != int(want):
        raise pytest.UsageError(f"expected {want} compiled keel modules, got {keel.compiled()}")


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    """A fresh simulator named "a" (so ``[[sim@a:...]]`` targets it)."""
    s = Simulator(name="a")
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


pytest_plugins = ["gw_fixtures"]
