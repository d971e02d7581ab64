"""Shared fixtures. Sim fixtures: an in-process simulator on a free loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, settings

from keel.sim import Simulator

# Property tests are deterministic (derandomize: the same examples every run) and judged on
# what they find, not on how fast a busy 2-core CI machine generates inputs.
settings.register_profile(
    "keel", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("keel")


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
