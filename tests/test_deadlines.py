"""Deadlines on one loop timer: fire on time (at most a grain late), never after being
withdrawn, and a timeout behaves like asyncio.timeout_at, cancellation by others included."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from keel.engine._deadlines import GRAIN, Deadlines


async def test_callbacks_fire_in_order_and_withdrawn_ones_never() -> None:
    d = Deadlines()
    loop = asyncio.get_running_loop()
    fired: list[tuple[str, float]] = []
    t0 = loop.time()
    for name, after in (("c", 0.09), ("a", 0.03), ("b", 0.06), ("x", 0.05)):
        e = d.call_at(t0 + after, lambda n=name: fired.append((n, loop.time() - t0)))
        if name == "x":
            e.cancel()
            e.cancel()  # idempotent
    await asyncio.sleep(0.15)
    assert [n for n, _ in fired] == ["a", "b", "c"]
    for (_, at), due in zip(fired, (0.03, 0.06, 0.09), strict=True):
        assert due - 0.002 <= at <= due + GRAIN + 0.03
    assert len(d) == 0


async def test_an_earlier_deadline_rearms_the_timer() -> None:
    d = Deadlines()
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    d.call_at(loop.time() + 10, lambda: fired.append("late"))
    d.call_at(loop.time() + 0.02, lambda: fired.append("early"))
    await asyncio.sleep(0.08)
    assert fired == ["early"]
    assert len(d) == 1


async def test_a_callback_may_register_another_and_a_failing_one_strands_nothing() -> None:
    d = Deadlines()
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    errors: list[object] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx.get("exception")))

    def again() -> None:
        fired.append("first")
        d.call_at(loop.time() + 0.02, lambda: fired.append("second"))

    def broken() -> None:
        raise ValueError("boom")

    d.call_at(loop.time() + 0.01, broken)
    d.call_at(loop.time() + 0.01, again)
    await asyncio.sleep(0.1)
    assert fired == ["first", "second"]
    assert len(errors) == 1 and isinstance(errors[0], ValueError)


async def test_timeout_raises_timeout_error_and_leaves_the_task_uncancelled() -> None:
    d = Deadlines()
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError), d.timeout(loop.time() + 0.02):
        await asyncio.sleep(5)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # no stray cancellation left behind
    with d.timeout(loop.time() + 5) as t:  # in time: nothing happens
        await asyncio.sleep(0.01)
    assert not t.expired
    assert len(d) == 0


async def test_someone_elses_cancellation_wins() -> None:
    d = Deadlines()
    loop = asyncio.get_running_loop()
    started = asyncio.Event()

    async def victim() -> None:
        with d.timeout(loop.time() + 5):
            started.set()
            await asyncio.sleep(5)

    task = asyncio.create_task(victim())
    await started.wait()
    task.cancel()  # e.g. the client left
    with pytest.raises(asyncio.CancelledError):
        await task

    held: list[Any] = []
    started.clear()

    async def both() -> None:
        with d.timeout(loop.time() + 5) as t:
            held.append(t)
            started.set()
            await asyncio.sleep(5)

    task = asyncio.create_task(both())
    await started.wait()
    held[0].fire()  # the deadline fires...
    task.cancel()  # ...and the client leaves in the same loop iteration: CancelledError wins
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_judged_timeout_waits_as_long_as_it_is_told_then_expires() -> None:
    """``judged``: when it comes, ``again(now)`` says until when to wait (a bound being
    learned); it expires when that is not later than now."""
    d = Deadlines()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    looks: list[float] = []

    def again(now: float) -> float:
        looks.append(now - t0)
        return now + 0.02 if len(looks) < 3 else now  # twice more, then late

    with pytest.raises(TimeoutError), d.judged(t0 + 0.02, again):
        await asyncio.sleep(5)
    assert len(looks) == 3 and looks[-1] < 0.06 + 3 * GRAIN + 0.05
    assert len(d) == 0
    with d.judged(loop.time() + 5, again) as t:  # in time: never asked
        await asyncio.sleep(0.01)
    assert not t.expired and len(looks) == 3 and len(d) == 0
