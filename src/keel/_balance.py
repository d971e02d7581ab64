"""Weighted power-of-two-choices over scored candidates. Pure; the random source is injected.

Power of two choices (Mitzenmacher): pick two candidates at random and take the better one.
It needs no global sort to stay close to the best choice, and unlike "always the best" it does
not stampede onto one deployment whose score is stale. Candidates are drawn with probability
proportional to their weight; the score a caller passes is already divided by it, so a
deployment with twice the weight is both drawn and preferred twice as readily.

The load score used by the gateway is ``peak_ewma_cost x (in_flight + 1) / weight``: latency
alone would send everything to the fastest deployment until it slows down; in-flight alone
would ignore that one deployment answers in a third of the time.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def _draw(weights: Sequence[float], total: float, rng: random.Random, skip: int = -1) -> int:
    r = rng.random() * total
    last = -1
    for i, w in enumerate(weights):
        if i == skip:
            continue
        last = i
        r -= w
        if r < 0:
            return i
    return last  # rounding at the top end


def p2c_order(scores: Sequence[float], weights: Sequence[float], rng: random.Random) -> list[int]:
    """Candidate indices best first: the winner of one weighted two-choice draw, then the rest
    by score (the fallbacks when the winner fails or is full)."""
    n = len(scores)
    if n <= 1:
        return list(range(n))
    if n == 2:  # both are drawn: compare (a tie goes by weight, at random)
        a, b = scores
        if a == b:
            return [0, 1] if rng.random() * (weights[0] + weights[1]) < weights[0] else [1, 0]
        return [0, 1] if a < b else [1, 0]
    total = sum(weights)
    a = _draw(weights, total, rng)
    b = _draw(weights, total - weights[a], rng, skip=a)
    first = a if scores[a] <= scores[b] else b
    rest = sorted((i for i in range(n) if i != first), key=lambda i: scores[i])
    return [first, *rest]
