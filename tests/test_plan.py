"""The attempt plan, table by table: scripted outcomes in, decisions out. No sockets, no sleeps,
no clock but the one the table turns."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

import pytest

from keel._backoff import RetryBudget
from keel._classify import ErrorKind, UpstreamError
from keel._hedge import HedgePolicy
from keel._plan import Finish, GiveUp, Penalty, Plan, Policy, Try, Wait


@dataclass(eq=False)
class Dep:
    name: str
    continuation: str = "prefill"


def err(kind: ErrorKind, **kw: Any) -> UpstreamError:
    flags = {
        ErrorKind.SERVER: dict(retryable=True, failover=True),
        ErrorKind.CONNECTION: dict(retryable=True, failover=True),
        ErrorKind.TIMEOUT: dict(retryable=True, failover=True),
        ErrorKind.RATE_LIMIT: dict(retryable=True, failover=True),
        ErrorKind.CONTEXT_LENGTH: dict(retryable=False, failover=False),
        ErrorKind.AUTH: dict(retryable=False, failover=True, disable_key_for=300.0),
        ErrorKind.QUOTA: dict(retryable=False, failover=True, disable_key_for=3600.0),
        ErrorKind.MODERATION: dict(retryable=False, failover=False),
    }[kind]
    return UpstreamError(kind, f"{kind.value} error", **{**flags, **kw})  # type: ignore[arg-type]


E500 = err(ErrorKind.SERVER, status=500)
RESET = err(ErrorKind.CONNECTION)
CTX = err(ErrorKind.CONTEXT_LENGTH, status=400)
AUTH = err(ErrorKind.AUTH, status=401)
QUOTA = err(ErrorKind.QUOTA, status=429)
FILTERED = err(ErrorKind.MODERATION, output_filter=True)


def r429(after: float) -> UpstreamError:
    return err(ErrorKind.RATE_LIMIT, status=429, retry_after=after)


OK = "ok"
COMMIT = "commit"  # the attempt commits the stream, then fails with the next outcome
MORE = "more"  # a continuation shows the client 3 more tokens, then fails with the next outcome
NO_ROOM = ("refused", False)
HELD_BACK = ("refused", True)


def make_plan(
    groups: dict[str, list[Dep]],
    *,
    room: set[str] | None = None,
    deadline: float = 300.0,
    budget: RetryBudget | None = None,
    **kw: Any,
) -> Plan[Dep]:
    policy = kw.pop("policy", Policy())
    return Plan(
        groups=list(groups),
        order=lambda g: groups[g],
        has_room=lambda d: room is None or d.name in room,
        policy=policy,
        budget=budget or RetryBudget(ratio=1.0, floor_per_s=100.0, clock=lambda: 0.0),
        deadline=deadline,
        rng=random.Random(7),
        **kw,
    )


def drive(plan: Plan[Dep], script: list[Any], now: float = 0.0) -> list[str]:
    """Run the plan against scripted outcomes (one per Try); the decisions as text."""
    seen: list[str] = []
    script = list(script)
    while True:
        d = plan.next(now)
        if isinstance(d, Try):
            outcome = script.pop(0)
            label = f"try {d.dep.name}" + (" (continue)" if d.continuation else "")
            if isinstance(outcome, tuple):
                seen.append(f"{label}: refused")
                plan.refused(d.dep, "full", None, soon=outcome[1])
                continue
            seen.append(label)
            plan.started(d.dep)
            if outcome == COMMIT:
                plan.commit(d.dep)
                plan.shown(3, tool_call=False)
                outcome = script.pop(0)
            elif outcome == MORE:
                plan.shown(plan.tokens + 3, tool_call=False)
                outcome = script.pop(0)
            if outcome == OK:
                plan.succeeded(d.dep)
                return seen
            plan.failed(d.dep, outcome)
        elif isinstance(d, Wait):
            seen.append("wait")
            now = d.until
        elif isinstance(d, GiveUp):
            seen.append(f"give up: {d.reason}" if d.reason else "give up")
            return seen
        else:
            assert isinstance(d, Finish)
            seen.append(f"finish {d.reason}")
            return seen


A, B, C = Dep("a"), Dep("b"), Dep("c")
NONE = Dep("n", continuation="none")

CASES = [
    # (id, groups, script, decisions, plan options)
    ("first try", {"g": [A, B]}, [OK], ["try a"], {}),
    # The first ask starts the first group; one without candidates moves on as any round does.
    ("an empty first group: the next one", {"g": [], "h": [B]}, [OK], ["try b"], {}),
    ("no candidates at all", {"g": [], "h": []}, [], ["give up"], {}),
    ("failover before retry", {"g": [A, B]}, [E500, OK], ["try a", "try b"], {}),
    (
        "retry after a round, with backoff",
        {"g": [A, B]},
        [E500, RESET, OK],
        ["try a", "try b", "wait", "try a"],
        {},
    ),
    ("retry with the provider's hint", {"g": [A]}, [r429(0.5), OK], ["try a", "wait", "try a"], {}),
    # A hint longer than max_retry_wait: the deployment cools down, never waited for.
    (
        "hint too long: fail over, no retry",
        {"g": [A, B]},
        [r429(60), E500, OK],
        ["try a", "try b", "wait", "try b"],
        {},
    ),
    ("hint too long, alone", {"g": [A]}, [r429(60)], ["try a", "give up"], {}),
    ("fail-anywhere error", {"g": [A, B]}, [CTX], ["try a", "give up"], {}),
    (
        "a benched key is not retried",
        {"g": [A, B]},
        [AUTH, QUOTA],
        ["try a", "try b", "give up"],
        {},
    ),
    (
        "attempt cap",
        {"g": [A, B]},
        [E500] * 5,
        ["try a", "try b", "wait", "try a", "give up: gave up after 3 attempts"],
        {"policy": Policy(max_attempts=3)},
    ),
    (
        "retries per deployment",
        {"g": [A]},
        [E500] * 5,
        ["try a", "wait", "try a", "wait", "try a", "give up"],
        {"policy": Policy(max_retries_per_deployment=2)},
    ),
    (
        "retry budget",
        {"g": [A, B]},
        [E500, OK],
        ["try a", "give up: keel's retry budget is spent: too many retries at once"],
        {"budget": RetryBudget(ratio=0.0, floor_per_s=0.0, clock=lambda: 0.0)},
    ),
    (
        "deadline before the backoff ends",
        {"g": [A]},
        [E500, OK],
        ["try a", "give up: request deadline exceeded"],
        {"deadline": 0.001},
    ),
    ("fallback group after the first", {"g": [A], "f": [B]}, [CTX], ["try a", "give up"], {}),
    (
        "fallback group reached",
        {"g": [A], "f": [B]},
        [AUTH, OK],
        ["try a", "try b"],
        {},
    ),
    # Limiter refusals: nothing was sent. "held back" is worth another look next round.
    ("full: next candidate", {"g": [A, B]}, [NO_ROOM, OK], ["try a: refused", "try b"], {}),
    (
        "held back: looked at again",
        {"g": [A]},
        [HELD_BACK, OK],
        ["try a: refused", "wait", "try a"],
        {},
    ),
    # Retries are counted per deployment: one held back (nothing sent) keeps its turns.
    (
        "held back while its sibling fails: its turn comes",
        {"g": [A, B]},
        [HELD_BACK, E500] * 4 + [OK],
        ["try a: refused", "try b", "wait"] * 4 + ["try a"],
        {},
    ),
    (
        "held back for ever: max_attempts rounds",
        {"g": [A]},
        [HELD_BACK] * 9,
        ["try a: refused", "wait"] * 8 + ["try a: refused", "give up"],
        {},
    ),
    (
        "full everywhere",
        {"g": [A, B]},
        [NO_ROOM, NO_ROOM],
        ["try a: refused", "try b: refused", "give up"],
        {},
    ),
    # Streams, after the commit: only deployments that can continue.
    (
        "continuation after the commit",
        {"g": [A, NONE, B]},
        [COMMIT, RESET, OK],
        ["try a", "try b (continue)"],
        {},
    ),
    (
        "nobody can continue",
        {"g": [Dep("x", continuation="none"), NONE]},
        [COMMIT, RESET],
        ["try x", "give up"],
        {},
    ),
    (
        "the one that can continue is retried",
        {"g": [A, NONE]},
        [COMMIT, RESET, OK],
        ["try a", "wait", "try a (continue)"],
        {},
    ),
    (
        "several choices are never spliced",
        {"g": [A, B]},
        [COMMIT, RESET],
        ["try a", "give up"],
        {"spliceable": False},
    ),
    (
        "length ending",
        {"g": [A, B]},
        [COMMIT, RESET],
        ["try a", "finish length"],
        {"token_limit": 3},
    ),
    (
        "under the token limit: continue",
        {"g": [A, B]},
        [COMMIT, RESET, OK],
        ["try a", "try b (continue)"],
        {"token_limit": 4},
    ),
    # An attempt that showed the client more before it broke (a deployment that cuts every
    # stream) does not start the rounds over: the rounds end, the fallback continues.
    (
        "a continuation that shows more still spends the rounds",
        {"g": [A], "f": [B]},
        [COMMIT, RESET, MORE, RESET, MORE, RESET, OK],
        ["try a", "wait", "try a (continue)", "wait", "try a (continue)", "try b (continue)"],
        {"policy": Policy(max_retries_per_deployment=2)},
    ),
    # Output moderation: the group decides.
    ("content filter: pass", {"g": [A, B]}, [FILTERED], ["try a", "finish content_filter"], {}),
    (
        "content filter: fail over",
        {"g": [A, B]},
        [FILTERED, OK],
        ["try a", "try b"],
        {"policy": Policy(on_content_filter="failover")},
    ),
    (
        "content filter: failover never retries the same deployment",
        {"g": [A, B]},
        [FILTERED, FILTERED],
        ["try a", "try b", "give up"],
        {"policy": Policy(on_content_filter="failover")},
    ),
]


@pytest.mark.parametrize(
    ("groups", "script", "decisions", "options"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_decisions(
    groups: dict[str, list[Dep]], script: list[Any], decisions: list[str], options: dict[str, Any]
) -> None:
    assert drive(make_plan(groups, **options), script) == decisions


def test_the_backoff_honours_the_hint_as_a_floor() -> None:
    plan = make_plan({"g": [A]})
    d = plan.next(10.0)
    assert isinstance(d, Try)
    plan.started(A)
    plan.failed(A, r429(0.5))
    wait = plan.next(10.0)
    assert isinstance(wait, Wait)
    assert 10.5 <= wait.until <= 10.5 + 0.1 * Policy().backoff_base


def test_a_hint_too_long_to_wait_cools_the_deployment_down() -> None:
    plan = make_plan({"g": [A, B]})
    plan.next(0.0)
    plan.started(A)
    assert plan.failed(A, r429(60)) == Penalty(cool_down=60)
    assert plan.failed(B, r429(1.0)) is None  # waited out: no penalty


@pytest.mark.parametrize(("error", "seconds"), [(AUTH, 300.0), (QUOTA, 3600.0)])
def test_a_key_level_failure_benches_for_the_configured_cooldown(
    error: UpstreamError, seconds: float
) -> None:
    plan = make_plan({"g": [A]}, policy=Policy(auth_cooldown=300.0, quota_cooldown=3600.0))
    plan.next(0.0)
    plan.started(A)
    assert plan.failed(A, error) == Penalty(bench_for=seconds)


def test_the_queue_bound_is_zero_while_a_later_candidate_has_room() -> None:
    roomy = make_plan({"g": [A, B]}, room={"b"}, max_wait=10.0)
    d = roomy.next(0.0)
    assert isinstance(d, Try) and d.dep is A and roomy.queue_bound(0.0) == 0.0
    full = make_plan({"g": [A, B]}, room=set(), max_wait=10.0, deadline=4.0)
    full.next(1.0)
    assert full.queue_bound(1.0) == 3.0  # the queue bound within the deadline
    assert full.queue_bound(3.9) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("room", "open_to_it", "queued", "again"),
    [
        ({"b"}, True, False, True),  # passed over while paused: keeps its turn
        (set(), True, False, False),  # offered a wait and refused all the same
        ({"b"}, False, False, False),  # its breaker (or a drain) said no
        ({"b"}, True, True, False),  # behind a learned limit: that limit's own wait
    ],
)
def test_a_deployment_passed_over_for_a_sibling_with_room_keeps_its_turn(
    room: set[str], open_to_it: bool, queued: bool, again: bool
) -> None:
    plan = make_plan({"g": [A, B]}, room=room, queued=lambda d: queued)
    d = plan.next(0.0)
    assert isinstance(d, Try) and d.dep is A
    plan.queue_bound(0.0)
    plan.refused(A, "a: paused by the upstream", None, soon=False, open_to_it=open_to_it)
    d = plan.next(0.0)
    assert isinstance(d, Try) and d.dep is B
    plan.started(B)
    plan.failed(B, E500)
    wait = plan.next(0.0)
    assert isinstance(wait, Wait)
    d = plan.next(wait.until)
    assert isinstance(d, Try) and d.dep is (A if again else B)


def test_a_tool_call_after_the_commit_ends_all_continuation() -> None:
    plan = make_plan({"g": [A, B]})
    plan.next(0.0)
    plan.started(A)
    plan.commit(A)
    plan.shown(2, tool_call=True)
    plan.failed(A, RESET)
    assert isinstance(plan.next(0.0), GiveUp)


def test_failover_records_the_moderation_error_as_failing_over() -> None:
    plan = make_plan({"g": [A, B]}, policy=Policy(on_content_filter="failover"))
    plan.next(0.0)
    plan.started(A)
    plan.failed(A, FILTERED)
    assert plan.tried[0].error == replace(FILTERED, failover=True, retryable=False)


# -- hedges ----------------------------------------------------------------------------------------


def hedged_plan(**kw: Any) -> tuple[Plan[Dep], HedgePolicy]:
    policy = HedgePolicy(after=0.5)
    return make_plan({"g": [A, B]}, hedge=policy, **kw), policy


def test_a_stream_attempt_carries_the_hedge_delay() -> None:
    plan, _ = hedged_plan()
    d = plan.next(0.0)
    assert isinstance(d, Try) and d.hedge_after == 0.5
    d = make_plan({"g": [A, B]}).next(0.0)
    assert isinstance(d, Try) and d.hedge_after is None  # the group does not hedge


def test_each_attempt_cut_for_lateness_adds_one_to_the_patience_of_the_next() -> None:
    late = err(ErrorKind.TIMEOUT)
    plan = make_plan({"g": [A, B]})

    def next_try(now: float = 0.0) -> Try[Dep]:
        while isinstance(d := plan.next(now), Wait):
            now = d.until  # the backoff before the second round
        assert isinstance(d, Try)
        return d

    patience = []
    for outcome in (late, late, E500):
        d = next_try()
        patience.append(d.patience)
        plan.started(d.dep)
        plan.failed(d.dep, outcome)
    assert [*patience, next_try().patience] == [0, 1, 2, 2]  # a 500 is not late


def test_hedge_wins() -> None:
    plan, policy = hedged_plan()
    plan.next(0.0)
    plan.started(A)
    assert plan.hedge_target(A) is B
    plan.hedged(B)
    plan.commit(B)  # the hedge's first token came first
    assert (plan.count, plan.last, policy.hedges) == (2, B, 1)
    assert plan.hedge_target(A) is None  # committed: no more hedging


def test_hedge_loses() -> None:
    plan, _ = hedged_plan()
    plan.next(0.0)
    plan.started(A)
    plan.hedged(B)
    plan.commit(A)
    assert (plan.count, plan.last) == (2, A)


def test_a_failed_hedge_only_counts() -> None:
    plan, _ = hedged_plan()
    plan.next(0.0)
    plan.started(A)
    plan.hedged(B)
    plan.failed(B, E500, hedge=True)
    plan.failed(A, E500)
    # b's failure is on record but it is not scheduled for a retry; a is.
    assert [t.deployment for t in plan.tried] == ["b", "a"]
    assert drive(plan, [OK]) == ["try b"]


def test_no_hedge_without_budget() -> None:
    plan, policy = hedged_plan()
    policy._tokens = 0.0
    plan.next(0.0)
    plan.started(A)
    assert plan.hedge_target(A) is None


def test_no_hedge_without_another_deployment() -> None:
    plan = make_plan({"g": [A]}, hedge=HedgePolicy(after=0.5))
    plan.next(0.0)
    assert plan.hedge_target(A) is None


def test_after_the_commit_no_attempt_hedges() -> None:
    plan, _ = hedged_plan()
    plan.next(0.0)
    plan.started(A)
    plan.commit(A)
    plan.failed(A, RESET)
    d = plan.next(0.0)
    assert isinstance(d, Try) and d.continuation and d.hedge_after is None


def test_a_withdrawn_deployment_gets_no_more_attempts() -> None:
    """An operator drained ``a`` while the request ran: its retry round and its continuation
    go to ``b`` only; with ``b`` gone too, the plan gives up."""
    plan = make_plan({"g": [A, B]})
    seen = []
    for outcome in (E500, E500, OK):
        d = plan.next(0.0)
        while isinstance(d, Wait):
            seen.append("wait")
            d = plan.next(d.until)
        assert isinstance(d, Try)
        seen.append(f"try {d.dep.name}")
        plan.started(d.dep)
        if outcome == OK:
            break
        plan.failed(d.dep, outcome)
        if d.dep is A:
            plan.withdraw(A)
    assert seen == ["try a", "try b", "wait", "try b"]  # not "try a" after the wait

    plan = make_plan({"g": [A]})
    d = plan.next(0.0)
    assert isinstance(d, Try)
    plan.started(A)
    plan.commit(A)
    plan.shown(3, tool_call=False)
    plan.failed(A, RESET)
    plan.withdraw(A)
    assert isinstance(plan.next(0.0), GiveUp)  # no continuation on it
