"""Shared fixtures. Sim fixtures: an in-process simulator on a free loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from keel.sim import Simulator


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
