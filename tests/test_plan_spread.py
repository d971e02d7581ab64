"""The plan spreads attempts over the whole plan (issue 11): an unreachable deployment is
tried once per request and once more only after every fallback; a retry after a load refusal
on a deployment that queues is not charged to the retry budget; the budget's give-up says why.
Table-driven like test_plan.py, with its helpers."""

from __future__ import annotations

from typing import Any

import pytest

from keel._backoff import RetryBudget
from keel._classify import ErrorKind, UpstreamError
from keel._plan import Policy
from test_plan import COMMIT, E500, OK, RESET, A, B, C, Dep, drive, make_plan, r429

REFUSED = UpstreamError(
    ErrorKind.CONNECTION,
    "upstream connection failed before the response: ClientConnectorError",
    retryable=True,
)
NO_ANSWER = UpstreamError(
    ErrorKind.TIMEOUT, "upstream timed out before the response", retryable=True
)
STALLED = UpstreamError(
    ErrorKind.TIMEOUT, "upstream stream stalled: no progress idle", retryable=True
)
OVERLOADED = UpstreamError(ErrorKind.OVERLOADED, "overloaded", status=503, retryable=True)
D = Dep("d")

CASES = [
    (
        "a dead deployment: one attempt, then the sibling",
        {"g": [A, B]},
        [REFUSED, OK],
        ["try a", "try b"],
        {},
    ),
    (
        "dead -> dead -> healthy: the last fallback is reached at once",
        {"chat": [A], "second": [B], "third": [C]},
        [REFUSED, REFUSED, OK],
        ["try a", "try b", "try c"],
        {},
    ),
    (
        "the README's chat -> qwen-plus -> qwen-turbo, first two dead",
        {"chat": [A], "qwen-plus": [B], "qwen-turbo": [C]},
        [REFUSED, REFUSED, OK],
        ["try a", "try b", "try c"],
        {},
    ),
    (
        "no answer in time is not unreachable (it may have been accepted): retried in its group",
        {"g": [A], "f": [B]},
        [NO_ANSWER, OK],
        ["try a", "wait", "try a"],
        {},
    ),
    (
        "unreachable everywhere: each once, then once more at the end, then give up saying so",
        {"g": [A, B]},
        [REFUSED] * 8,
        ["try a", "try b", "wait", "try a", "try b", "give up: every deployment of g is down"],
        {},
    ),
    (
        "a group and its fallback all unreachable: the error says so",
        {"chat": [A], "second": [B]},
        [REFUSED] * 4,
        [
            "try a",
            "try b",
            "wait",
            "try a",
            "try b",
            "give up: every deployment of chat and its fallbacks is down",
        ],
        {},
    ),
    (
        "one of them answered with an error: not all down, the errors tell",
        {"chat": [A], "second": [B]},
        [REFUSED, E500, E500, E500, E500, REFUSED],
        [
            "try a",
            "try b",
            "wait",
            "try b",
            "wait",
            "try b",
            "wait",
            "try b",
            "wait",
            "try a",
            "give up",
        ],
        {},
    ),
    (
        "alone and unreachable: one more look after a backoff",
        {"g": [A]},
        [REFUSED, OK],
        ["try a", "wait", "try a"],
        {},
    ),
    (
        "the fallbacks' own retries come before the dead one's second look",
        {"g": [A], "f": [B]},
        [REFUSED, E500, E500, OK],
        ["try a", "try b", "wait", "try b", "wait", "try b"],
        {},
    ),
    (
        "everything else failed: the dead one's second look is the last attempt",
        {"g": [A], "f": [B]},
        [REFUSED] + [E500] * 4 + [OK],
        ["try a", "try b", "wait", "try b", "wait", "try b", "wait", "try b", "wait", "try a"],
        {},
    ),
    (
        "a stalled stream is an answer that stopped, not an unreachable host",
        {"g": [A]},
        [STALLED, OK],
        ["try a", "wait", "try a"],
        {},
    ),
]


@pytest.mark.parametrize(
    ("groups", "script", "decisions", "options"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_spread_over_the_plan(
    groups: dict[str, list[Dep]], script: list[Any], decisions: list[str], options: dict[str, Any]
) -> None:
    assert drive(make_plan(groups, **options), script) == decisions


def _no_budget() -> RetryBudget:
    return RetryBudget(ratio=0.0, floor_per_s=0.0, clock=lambda: 0.0)


@pytest.mark.parametrize(
    ("queued", "script", "decisions"),
    [
        # The deployment queues (a learned limit): the retry after its 429 waits there, free.
        (True, [r429(0.0), OK], ["try d", "wait", "try d"]),
        (True, [OVERLOADED, OK], ["try d", "wait", "try d"]),
        # Not queueing: a retry is a retry.
        (False, [r429(0.0), OK], ["try d", "wait", "give up: keel's retry budget is spent: too many retries at once"]),
        # Queueing, but a 500 is not a load refusal: charged.
        (True, [E500, OK], ["try d", "wait", "give up: keel's retry budget is spent: too many retries at once"]),
    ],
)  # fmt: skip
def test_a_retry_that_waits_for_admission_is_not_charged(
    queued: bool, script: list[Any], decisions: list[str]
) -> None:
    plan = make_plan({"g": [D]}, budget=_no_budget(), queued=lambda d: queued)
    assert drive(plan, script) == decisions


def test_budget_give_up_names_failing_retries() -> None:
    budget = RetryBudget(ratio=0.2, floor_per_s=0.0, clock=lambda: 0.0)
    for _ in range(10):
        budget.record_retry(False)
    plan = make_plan({"g": [A, B]}, budget=budget, policy=Policy())
    assert drive(plan, [E500, OK]) == [
        "try a",
        "give up: keel's retry budget is spent: most recent retries failed",
    ]


@pytest.mark.parametrize(
    ("queued", "script", "decisions"),
    [
        # A learned wall: its refusals fell on this request; each retry waits for room, so
        # it costs no round (the attempt cap, 8, still bounds it).
        (True, [r429(0.0)] * 5 + [OK], ["try d", *["wait", "try d"] * 5]),
        # Not queueing: the rounds decide (1 + 3 retries).
        (False, [r429(0.0)] * 4, ["try d", *["wait", "try d"] * 3, "give up"]),
    ],
)
def test_retries_that_wait_for_room_at_a_wall_cost_no_rounds(
    queued: bool, script: list[Any], decisions: list[str]
) -> None:
    assert drive(make_plan({"g": [D]}, queued=lambda d: queued), script) == decisions


def test_the_commit_starts_the_retry_rounds_over() -> None:
    """Rounds used up before the commit (a storm: 502, 429, reset, then a stream cut after
    a few tokens): a continuation refused once more is retried, not ended with an error."""
    plan = make_plan({"g": [A]})
    script = [E500, E500, E500, COMMIT, RESET, r429(0.0), OK]
    assert drive(plan, script) == [
        "try a", "wait", "try a", "wait", "try a", "wait", "try a",
        "wait", "try a (continue)", "wait", "try a (continue)",
    ]  # fmt: skip
