"""The balancer's latency estimate under failures (keel._health.PeakEwma): a burst of errors
raises a deployment's cost by a bounded factor, never compounds, and is forgotten within
seconds once the deployment answers again. Pure: outcomes and a clock, no network."""

from __future__ import annotations

import random

import pytest

from keel._health import FAILURE_WEIGHT, PeakEwma

HEALTHY = 0.005  # seconds per token
PENALTY = 1.0  # the gateway's FAILURE_PENALTY


def drive(e: PeakEwma, start: float, seconds: float, rate: float, error: float, seed: int) -> float:
    """``rate`` outcomes per second for ``seconds``, each a failure with probability ``error``;
    returns the time at the end."""
    rng = random.Random(seed)
    n = int(seconds * rate)
    t = start
    for _ in range(n):
        t += 1.0 / rate
        if rng.random() < error:
            e.penalise(PENALTY, t)
        else:
            e.observe(HEALTHY, t)
    return t


@pytest.mark.parametrize("error", [0.03, 0.2, 0.9, 1.0])
def test_a_burst_of_failures_raises_the_cost_by_a_bounded_factor(error: float) -> None:
    # The figures: after 20 s at 3 % errors the estimate read 2.6e15 s/token, at 20 %
    # 7.9e125. Now it stays within the failure weight's multiple of the healthy latency.
    e = PeakEwma(decay=5.0)
    e.observe(HEALTHY, 0.0)
    t = drive(e, 0.0, 20.0, 100.0, error, seed=1)
    cost = e.cost(t)
    assert cost is not None
    assert cost <= HEALTHY * (1.0 + FAILURE_WEIGHT) * 1.000001
    assert e.value == pytest.approx(HEALTHY)  # failures never touch the latency estimate


def test_after_the_burst_the_cost_is_back_within_seconds() -> None:
    e = PeakEwma(decay=5.0)
    e.observe(HEALTHY, 0.0)
    t = drive(e, 0.0, 20.0, 100.0, 1.0, seed=2)  # every attempt failed for 20 s
    assert e.cost(t) == pytest.approx(HEALTHY * (1.0 + FAILURE_WEIGHT), rel=0.01)
    # A penalised deployment still gets a trickle (the balancer's in-flight term): 20
    # successes at 10/s and the cost is within 10 % of healthy, 30 and it is forgotten.
    t = drive(e, t, 2.0, 10.0, 0.0, seed=3)
    assert e.cost(t) == pytest.approx(HEALTHY, rel=0.1)
    t = drive(e, t, 1.0, 10.0, 0.0, seed=3)
    assert e.failing == 0.0  # exactly: the common path is branch-free again


def test_with_no_traffic_the_penalty_decays_with_time() -> None:
    e = PeakEwma(decay=1.0)
    e.observe(HEALTHY, 0.0)
    for i in range(50):
        e.penalise(PENALTY, 0.01 * i)
    cost = e.cost(5.0)
    assert cost is not None
    # Both the estimate and the failure score decay (e^-5 each), so it is tried again.
    assert cost < HEALTHY * 0.05


def test_a_uniform_error_rate_keeps_the_ratio_between_deployments() -> None:
    # Both deployments fail 4 % of their attempts: the 3x slower one stays ~3x as costly.
    fast, slow = PeakEwma(), PeakEwma()
    fast.observe(HEALTHY, 0.0)
    slow.observe(3 * HEALTHY, 0.0)
    rng = random.Random(4)
    ratios = []
    t = 0.0
    for _ in range(4000):
        t += 0.005
        for e, latency in ((fast, HEALTHY), (slow, 3 * HEALTHY)):
            if rng.random() < 0.04:
                e.penalise(PENALTY, t)
            else:
                e.observe(latency, t)
        fc, sc = fast.cost(t), slow.cost(t)
        assert fc is not None and sc is not None
        ratios.append(sc / fc)
    ratios.sort()
    assert 2.5 < ratios[len(ratios) // 2] < 3.5  # the median


def test_a_deployment_failing_from_the_start_looks_slow_not_average() -> None:
    e = PeakEwma(decay=5.0)
    assert e.cost(0.0) is None  # nothing known: the balancer assumes the group's average
    e.penalise(PENALTY, 0.0)
    cost = e.cost(0.0)
    assert cost is not None and cost >= PENALTY
    e.observe(HEALTHY, 0.1)  # its first success replaces the assumption at once
    assert e.value == HEALTHY
