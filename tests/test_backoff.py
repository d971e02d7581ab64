import random

import pytest

from keel._backoff import RetryBudget, backoff_delay


def test_full_jitter_stays_under_the_exponential_ceiling() -> None:
    rng = random.Random(7)
    for attempt, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (10, 2.0)]:
        delays = [backoff_delay(attempt, base=0.1, cap=2.0, rng=rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # jitter really spreads over the range


def test_hint_is_a_floor_with_small_jitter() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(1, base=0.1, cap=2.0, hint=0.644, rng=rng) for _ in range(100)]
    assert all(0.644 <= d <= 0.644 + 0.01 for d in delays)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_budget_floor_then_ratio() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, floor_per_s=1.0, window=10, clock=clock)
    # no traffic: only the floor (1/s over 10 s = 10 retries)
    assert sum(budget.try_withdraw() for _ in range(50)) == 10
    # 100 requests in the window allow 20 more
    for _ in range(100):
        budget.record_request()
    assert sum(budget.try_withdraw() for _ in range(50)) == 20


@pytest.mark.parametrize("elapsed", [10, 11, 25])
def test_budget_refills_after_the_window(elapsed: int) -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.0, floor_per_s=0.5, window=10, clock=clock)
    assert sum(budget.try_withdraw() for _ in range(20)) == 5
    clock.t += elapsed
    assert sum(budget.try_withdraw() for _ in range(20)) == 5


def test_budget_partially_expires() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.0, floor_per_s=0.4, window=10, clock=clock)
    assert budget.try_withdraw() and budget.try_withdraw()
    clock.t += 5
    assert budget.try_withdraw() and budget.try_withdraw()
    assert not budget.try_withdraw()
    clock.t += 5  # the first two fall out of the window
    assert budget.try_withdraw() and budget.try_withdraw()
    assert not budget.try_withdraw()
