"""The pure cores behind "tell load from noise" (issue 11), table-driven, no sockets:
load evidence (keel._evidence), AIMD on concurrency and on rate (keel._concurrency), the retry
budget earned by retry success (keel._backoff) and breaker health relative to siblings
(keel._health). End to end over real processes: test_load_noise.py."""

from __future__ import annotations

import math
import random

import pytest

from keel._backoff import MAX_RATIO, RetryBudget
from keel._concurrency import HOLD_PAUSE, Aimd, Hold, RateAimd
from keel._evidence import Cause, LoadEvidence, Verdict, binomial_tail
from keel._health import RAMP_DOUBLING, Admit, Breaker, BreakerGroup, BreakerState
from keel._plan import Policy
from test_plan import E500, OK, A, B, drive, make_plan

# --- load evidence -------------------------------------------------------------------------------


def test_binomial_tail() -> None:
    assert binomial_tail(0, 10, 0.3) == 1.0
    assert binomial_tail(11, 10, 0.3) == 0.0
    assert binomial_tail(10, 10, 0.5) == pytest.approx(0.5**10)
    assert binomial_tail(1, 3, 0.5) == pytest.approx(1 - 0.125)
    assert binomial_tail(3, 5, 0.0) == 0.0 and binomial_tail(3, 5, 1.0) == 1.0


def _wall(c: int, clients: int, rounds: int, rng: random.Random, noise: float = 0.0):
    """Outcomes of a concurrency wall at ``c``: requests sent at in-flight 1..clients."""
    t = 0.0
    for _ in range(rounds):
        for f in range(1, clients + 1):
            t += 0.001
            yield t, f, f > c or rng.random() < noise


def _noise(p: float, n: int, rng: random.Random, lo: int = 1, hi: int = 24):
    t = 0.0
    for _ in range(n):
        t += 0.01
        yield t, rng.randint(lo, hi), rng.random() < p


def _rate(n: int, window: float, seconds: float, send_every: float, rng: random.Random):
    """A sliding window of ``n`` per ``window`` s, requests every ``send_every`` s at random
    in-flight counts (a rate wall does not care how many are in flight)."""
    admitted: list[float] = []
    t = 0.0
    while t < seconds:
        t += send_every
        admitted = [a for a in admitted if a > t - window]
        refused = len(admitted) >= n
        if not refused:
            admitted.append(t)
        yield t, rng.randint(1, 6), refused


def _judge(samples) -> tuple[LoadEvidence, float]:
    ev = LoadEvidence()
    t = 0.0
    for t, f, r in samples:
        ev.record(t, f, r)
    return ev, t


@pytest.mark.parametrize(
    ("name", "samples", "cause", "limit"),
    [
        ("wall 8 of 30", lambda r: _wall(8, 30, 1, r), Cause.CONCURRENCY, 8),
        ("wall 8, warm", lambda r: _wall(8, 12, 20, r), Cause.CONCURRENCY, 8),
        ("wall 16 + 5 % noise", lambda r: _wall(16, 24, 20, r, 0.05), Cause.CONCURRENCY, 16),
        ("wall 1", lambda r: _wall(1, 4, 10, r), Cause.CONCURRENCY, 1),
        ("15 % noise", lambda r: _noise(0.15, 500, r), Cause.NOISE, None),
        ("30 % noise", lambda r: _noise(0.30, 500, r), Cause.NOISE, None),
        ("3 % noise", lambda r: _noise(0.03, 500, r), Cause.NOISE, None),
        ("rate 20/2s", lambda r: _rate(20, 2.0, 12.0, 0.03, r), Cause.RATE, None),
        ("no refusals", lambda r: _noise(0.0, 100, r), Cause.UNKNOWN, None),
        ("only refusals", lambda r: _noise(1.0, 100, r), Cause.UNKNOWN, None),
    ],
)
def test_what_refusals_are_evidence_of(name, samples, cause, limit) -> None:
    ev, t = _judge(samples(random.Random(7)))
    v = ev.judge(t)
    assert v.cause is cause, name
    assert v.limit == limit
    if cause is Cause.RATE:  # the window let 10/s through
        assert v.rate == pytest.approx(10.0, rel=0.15)


def test_random_refusals_almost_never_look_like_load() -> None:
    """15 % random refusals at random in-flight counts, judged at every refusal: a false
    "concurrency" or "rate" verdict is rarer than one in a thousand refusals."""
    rng = random.Random(11)
    wrong = judged = 0
    for _ in range(10):
        ev = LoadEvidence()
        for t, f, r in _noise(0.15, 2000, rng, 8, 24):
            ev.record(t, f, r)
            if r:
                judged += 1
                wrong += ev.judge(t).cause in (Cause.CONCURRENCY, Cause.RATE)
    assert judged > 2500 and wrong / judged < 0.001


def _bursts(p: float, rounds: int, clients: int, rng: random.Random, t: float = 0.0):
    """A closed loop of ``clients`` that send together, ``p`` of them refused at random; the
    samples in the order the attempts *end*: a refusal at once, a success 0.25 s later."""
    for _ in range(rounds):
        sent = [(t + f * 1e-4, f, rng.random() < p) for f in range(1, clients + 1)]
        yield from (s for s in sent if s[2])
        yield from (s for s in sent if not s[2])
        t += 0.3


def test_noise_that_starts_after_a_clean_stretch_is_not_a_rate_wall() -> None:
    """10 % + 5 % random refusals starting after 500 clean answers, 32 clients sending
    together: their refusals come back back-to-back, but in the order they were sent they are
    no runs (judged from the first refusal on), so nothing is paced for them."""
    rng = random.Random(5)
    ev = LoadEvidence()
    for t, f, r in _bursts(0.0, 16, 32, rng):
        ev.record(t, f, r)
    verdicts = []
    for t, f, r in _bursts(0.15, 20, 32, rng, t=5.0):
        ev.record(t, f, r)
        if r:
            verdicts.append(ev.judge(t + 0.25).cause)
    assert len(verdicts) > 60
    assert Cause.RATE not in verdicts and Cause.CONCURRENCY not in verdicts
    assert verdicts[-1] is Cause.NOISE


def test_evidence_is_forgotten_after_the_horizon() -> None:
    ev, t = _judge(_wall(8, 30, 3, random.Random(1)))
    assert ev.judge(t).cause is Cause.CONCURRENCY
    assert ev.judge(t + ev.horizon + 1).cause is Cause.UNKNOWN
    assert len(ev._t) == 0


def test_a_wall_that_moved_is_found_again() -> None:
    ev = LoadEvidence(size=256)
    rng = random.Random(3)
    for t, f, r in _wall(8, 20, 20, rng):
        ev.record(t, f, r)
    assert ev.judge(1.0).limit == 8
    for t, f, r in _wall(12, 20, 40, rng):
        ev.record(1.0 + t, f, r)
    assert ev.judge(2.0).limit == 12


# --- AIMD ------------------------------------------------------------------------------------------


def test_aimd_drops_to_what_fit_and_recovers_to_the_ceiling() -> None:
    a = Aimd()
    assert a.slots is None
    for _ in range(a.corroborate - 1):
        assert not a.on_overload(9, a.epoch, 0.0)
    assert a.on_overload(9, a.epoch, 0.0)
    assert a.slots == 7 and a.ceiling == 8.0  # 8 * 0.9
    for i in range(200):  # the upstream takes 8: more are never in flight to succeed
        a.on_success(min(a.slots or 0, 8), a.epoch, 0.1 + i * 0.01)
    assert a.slots == 9  # back at the ceiling, and one slot of probing above it


@pytest.mark.parametrize(
    ("accepted", "cuts", "expect"),
    [
        ([10.0], 1, 9.0),
        ([20.0, 10.0], 2, 9.0),  # a first overestimate is corrected by the next window
        ([10.0, 10.0], 1, 9.0),  # within ``hold``: the same overfull moment
    ],
)
def test_rate_aimd(accepted: list[float], cuts: int, expect: float) -> None:
    r = RateAimd()
    assert not r.active
    t = 0.0
    for rate in accepted:
        r.on_refusal(rate, t)
        t += 1.5 if cuts > 1 else 0.1
    assert r.cuts == cuts and r.rate == pytest.approx(expect)
    for _ in range(100):
        r.on_success()
    assert r.rate == pytest.approx(expect + 100 * r.probe)


# --- retry budget ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _spend(b: RetryBudget) -> int:
    n = 0
    while b.try_withdraw():
        n += 1
    return n


@pytest.mark.parametrize(
    ("retry_success", "expect_share"),
    [
        (None, 0.2),  # nothing known: the configured ratio
        (1.0, MAX_RATIO * 101 / 110),  # every retry works: towards MAX_RATIO
        (0.54, MAX_RATIO * 55 / 110),  # the storm: half the retries pay off
        (0.0, MAX_RATIO * 1 / 110),  # an outage: towards the floor
    ],
)
def test_retry_budget_share_follows_retry_success(
    retry_success: float | None, expect_share: float
) -> None:
    clock = Clock()
    b = RetryBudget(ratio=0.2, floor_per_s=0.0, window=10, clock=clock)
    for _ in range(500):
        b.record_request()
    if retry_success is not None:
        ok = round(100 * retry_success)
        for i in range(100):
            b.record_retry(i < ok)
    assert b.share == pytest.approx(expect_share)
    assert _spend(b) == math.floor(expect_share * 500)


def test_retry_budget_shrinks_to_its_floor_in_an_outage_and_recovers() -> None:
    clock = Clock()
    b = RetryBudget(ratio=0.2, floor_per_s=1.0, window=10, clock=clock)
    for _ in range(1000):
        b.record_request()
    spent = 0
    while b.try_withdraw():  # every retry fails: the share shrinks as they do
        b.record_retry(False)
        spent += 1
    assert b.exhausted_by_failures
    # 200 would be the configured 20 %; failing retries earn only the floor and a few more
    assert spent < 10 + 40 and b.share < 0.05
    clock.t = 11.0  # the window passes: back to the configured ratio
    for _ in range(100):
        b.record_request()
    assert b.share == pytest.approx(0.2) and not b.exhausted_by_failures


@pytest.mark.parametrize(
    ("script", "booked"),
    [
        ([OK], (0, 0)),  # no retry: nothing booked
        ([E500, OK], (1, 1)),  # a retry that worked
        ([E500, E500, OK], (1, 2)),  # two retries: one failed, the last one worked
        ([E500, E500, E500, E500], (0, 3)),  # every retry failed
    ],
    ids=["no-retry", "retry-ok", "one-failed", "all-failed"],
)
def test_the_plan_books_each_retry_outcome_to_the_budget(script, booked) -> None:
    """The plan, which withdrew the retry, reports how it ended (ok, done) — no bridge
    through the limiter: the budget grows with retries that work."""
    clock = Clock()
    b = RetryBudget(ratio=0.2, floor_per_s=1.0, window=10, clock=clock)
    plan = make_plan({"g": [A, B]}, budget=b, policy=Policy(max_attempts=4))
    drive(plan, script)
    assert (b._live(b._ok), b._live(b._done)) == booked


# --- breaker relative to siblings ------------------------------------------------------------------


def _group(n: int, **kw) -> list[Breaker]:
    """``n`` breakers of one group, past their start-up (the suspects' gate and the ramp after
    it have tests of their own: ``proven=False``)."""
    kw.setdefault("proven", True)
    g = BreakerGroup()
    out = [Breaker(failures=5, min_requests=20, window=10.0, **kw) for _ in range(n)]
    for b in out:
        g.add(b)
    return out


def _feed(b: Breaker, ratio: float, n: int, now: float, down: bool = False) -> bool:
    """``n`` attempts, failing ``ratio`` of them spread evenly (never a down-streak unless
    ``down``); True when the breaker opened."""
    opened = False
    bad = 0
    for i in range(n):
        fail = (i + 1) * ratio >= bad + 1
        bad += fail
        how = b.admit(now)
        if how is Admit.REFUSED:
            continue
        opened |= b.record(how, now, not fail, now, down=down)
    return opened


@pytest.mark.parametrize(
    ("mine", "siblings", "opens"),
    [
        (0.46, [0.46], False),  # a noisy fleet: nobody is worse
        (0.60, [0.46], False),  # somewhat worse: not "much"
        (0.50, [0.05], True),  # much worse than its sibling
        (0.30, [0.02, 0.02], True),
        (0.20, [0.02], False),  # worse, but not by the margin
        (0.95, [0.95], True),  # plainly failing: whatever the siblings do
    ],
)
def test_ejected_when_failing_much_more_than_the_siblings(
    mine: float, siblings: list[float], opens: bool
) -> None:
    me, *others = _group(1 + len(siblings))
    for b, r in zip(others, siblings, strict=True):
        _feed(b, r, 100, 1.0)
    assert _feed(me, mine, 100, 1.0) is opens


@pytest.mark.parametrize(
    ("mine", "sibling", "opens"),
    [
        (0.65, 0.30, False),  # equal faults (47 %) read this unequal in a storm's first second
        (0.80, 0.10, True),  # twenty attempts are enough when the difference is this large
    ],
)
def test_a_small_window_ejects_only_beyond_chance(mine: float, sibling: float, opens: bool) -> None:
    """Twenty attempts each: a difference that luck deals equal deployments often keeps both
    in service (the margin and the factor of two alone would eject the first)."""
    me, other = _group(2)
    _feed(other, sibling, 20, 1.0)
    assert _feed(me, mine, 20, 1.0) is opens


def test_alone_the_configured_ratio_is_the_threshold() -> None:
    (b,) = _group(1)
    assert _feed(b, 0.5, 40, 1.0)
    (c,) = _group(1)
    assert not _feed(c, 0.4, 40, 1.0)


def test_max_ejection_keeps_half_the_group_in_service() -> None:
    a, b, c, d = _group(4)
    _feed(c, 0.0, 100, 1.0)
    _feed(d, 0.0, 100, 1.0)
    assert _feed(a, 0.5, 100, 1.0)  # one of four ejected
    assert _feed(b, 0.5, 100, 1.0)  # two of four: still at most half
    e, f = _group(2)
    _feed(f, 0.0, 100, 1.0)
    f.open(1.0)  # the sibling is already out (for being down)
    assert not _feed(e, 0.5, 100, 1.1)  # ejecting e too would leave nothing


def test_down_streak_opens_whatever_the_siblings_do() -> None:
    a, b = _group(2)
    _feed(b, 1.0, 30, 1.0, down=True)  # the sibling is dead too
    assert b.state(1.0) is BreakerState.OPEN
    opened = False
    for i in range(5):
        how = a.admit(2.0 + i)
        opened = a.record(how, 2.0 + i, False, 2.0 + i, down=True)
    assert opened and a.state(6.5) is BreakerState.OPEN


@pytest.mark.parametrize(
    ("sibling_ratio", "run", "opens"),
    [
        (None, 8, False),  # nothing known about the fleet yet: a run is not judged
        (0.02, 5, True),  # a healthy fleet: `failures` in a row
        (0.46, 11, False),  # a noisy fleet: 11 in a row is bad luck at ~46 %
        (0.46, 16, True),  # 16 is not (the run itself raises the pooled ratio)
    ],
)
def test_a_run_of_errors_is_judged_against_the_fleets_failure_rate(
    sibling_ratio: float | None, run: int, opens: bool
) -> None:
    b, sib = _group(2)
    if sibling_ratio is not None:
        _feed(sib, sibling_ratio, 100, 1.0)
    opened = False
    for i in range(run):  # 500s in a row: answers, not "down"
        t = 1.0 + i * 0.001
        opened |= b.record(b.admit(t), t, False, t, down=False)
    assert opened is opens and b.streak == 0


def test_alone_a_run_of_failures_opens_as_it_always_did() -> None:
    (b,) = _group(1)
    for i in range(5):
        opened = b.record(b.admit(float(i)), float(i), False, float(i), down=False)
    assert opened and "5 failures in a row" in b.why


def test_an_unreachable_streak_marks_the_breaker_down_others_do_not() -> None:
    a, _ = _group(2)
    for i in range(5):
        a.record(a.admit(float(i)), float(i), False, float(i), down=True)
    assert a.state(5.0) is BreakerState.OPEN and a.down and "unreachable 5" in a.why
    (c,) = _group(1)
    for i in range(5):
        c.record(c.admit(float(i)), float(i), False, float(i), down=False)
    assert c.state(5.0) is BreakerState.OPEN and not c.down


def test_held_for_says_when_a_suspect_stops_counting() -> None:
    (b,) = _group(1, proven=False)
    hows = [b.admit(1.0 + i * 0.01) for i in range(6)]  # not proven yet: five suspects
    assert hows[:5] == [Admit.SUSPECT] * 5 and hows[5] is Admit.REFUSED
    assert b.held_for(1.05) == pytest.approx(0.05)  # the first suspect (1.0) ages out at 1.1
    b.record(Admit.SUSPECT, 1.0, True, 1.06)  # it answered: no more suspects, the ramp
    assert b.admit(1.07) is Admit.NORMAL and b.ramping(1.07) and not b.healthy
    assert b.held_for(1.07) == pytest.approx(1 / 50 / 2 ** (0.01 / RAMP_DOUBLING))  # next start
    b.open(2.0)
    assert b.held_for(2.5) is None


RAMP_START = 50.0  # starts/s: the suspects' own pace (5 per SUSPECT_HORIZON)


@pytest.mark.parametrize(
    ("since_first", "spacing"),
    [
        (0.0, 1 / RAMP_START),  # the gate's pace at first
        (RAMP_DOUBLING, 1 / (2 * RAMP_START)),  # doubling every RAMP_DOUBLING
        (3 * RAMP_DOUBLING, 1 / (8 * RAMP_START)),
        (5 * RAMP_DOUBLING, 1 / (32 * RAMP_START)),
        (5.4 * RAMP_DOUBLING, None),  # past RAMP_END a second: over, no gate at all
    ],
)
def test_after_its_first_answer_a_fresh_deployment_ramps(
    since_first: float, spacing: float | None
) -> None:
    """TCP's slow start, paced: the starts that waited at the start-up gate are not all let
    go at once (a rate window that says nothing but 429 refused 15 of that burst)."""
    (b,) = _group(1, proven=False)
    assert b.admit(1.0) is Admit.SUSPECT
    b.record(Admit.SUSPECT, 1.0, True, 1.1)  # the first answer: the ramp starts
    now = 1.1 + since_first
    assert b.admit(now) is Admit.NORMAL
    if spacing is None:
        assert b.healthy and not b.ramping(now) and b.admit(now) is Admit.NORMAL
        return
    assert b.ramping(now) and not b.healthy
    assert b.admit(now) is Admit.REFUSED  # one start per spacing
    assert b.held_for(now) == pytest.approx(spacing)
    assert b.admit(now + spacing * 1.001) is Admit.NORMAL


def test_a_failure_streak_in_the_ramp_is_judged_by_suspects() -> None:
    """A deployment that answered once and then cannot be reached (it died in its first
    second) is held back as in any failure streak, not paced as a ramp."""
    (b,) = _group(1, proven=False)
    b.admit(1.0)
    b.record(Admit.SUSPECT, 1.0, True, 1.1)
    assert b.admit(1.1) is Admit.NORMAL
    b.record(Admit.NORMAL, 1.1, False, 1.11, down=True)
    hows = [b.admit(1.12) for _ in range(5)]
    assert hows == [Admit.SUSPECT] * 4 + [Admit.REFUSED]  # failures - streak at once


@pytest.mark.parametrize(
    ("refused_at", "running", "cause", "limit"),
    [
        (range(9, 31), 8, Cause.CONCURRENCY, 8),  # the first burst on a wall of 8
        (range(9, 31), 0, Cause.UNKNOWN, None),  # nothing let in: no wall to see
        (range(1, 11), 5, Cause.UNKNOWN, None),  # refused below what is running: not that
        (range(9, 11), 8, Cause.UNKNOWN, None),  # two refusals are not evidence
        (range(4, 9), 3, Cause.UNKNOWN, None),  # a few random refusals while few are running
    ],
)
def test_before_the_first_success_running_attempts_are_the_evidence(
    refused_at: range, running: int, cause: Cause, limit: int | None
) -> None:
    ev = LoadEvidence()
    for f in refused_at:
        ev.record(0.0, f, True)
    v = ev.judge(0.01, [(0.0, f) for f in range(1, running + 1)])  # sent first, let in
    assert (v.cause, v.limit) == (cause, limit)


def test_forget_makes_aimd_unlimited_again() -> None:
    a = Aimd(corroborate=1)
    assert a.on_overload(9, a.epoch, 0.0) and a.slots == 7
    a.forget()
    assert a.slots is None and not a.active


# --- the hold: slow start after a hint-less refusal --------------------------------------------


@pytest.mark.parametrize(
    ("events", "pauses", "caps", "active"),
    [
        # the first refusal: pause a second, then one probe
        ([("refused", 0.0, 20, 1.0)], [1.0], [1.0], True),
        # refusals of attempts sent before the pause ended are no news (a paced slot)
        ([("refused", 0.0, 20, 1.0), ("refused", 1.5, 1, 1.5)], [1.0, 0.0], [1.0, 1.0], True),
        # refused probes double the pause, up to 4 s
        (
            [("refused", 0.0, 20, 1.0), ("refused", 2.0, 1, 2.0), ("refused", 4.0, 1, 4.0),
             ("refused", 8.0, 1, 8.0), ("refused", 12.0, 1, 12.0)],
            [1.0, 2.0, 4.0, 4.0, 4.0], [1.0] * 5, True,
        ),
        # each success of an attempt sent after the pause lets one more in flight...
        ([("refused", 0.0, 4, 1.0), ("ok", 2.0), ("ok", 2.1)], [1.0], [1.0, 2.0, 3.0], True),
        # ...and a success of one sent before it says nothing
        ([("refused", 0.0, 4, 1.0), ("ok", 1.9)], [1.0], [1.0, 1.0], True),
        # until as many may be in flight as when the refusals began
        (
            [("refused", 0.0, 4, 1.0), ("ok", 2.0), ("ok", 2.1), ("ok", 2.2)],
            [1.0], [1.0, 2.0, 3.0, math.inf], False,
        ),
        # a refusal during the slow start halves what may be in flight, without a pause
        (
            [("refused", 0.0, 9, 1.0), ("ok", 2.0), ("ok", 2.1), ("ok", 2.2),
             ("refused", 2.3, 4, 2.4)],
            [1.0, 0.0], [1.0, 2.0, 3.0, 4.0, 2.0], True,
        ),
        # ...and one while a single probe is out doubles the pause
        (
            [("refused", 0.0, 9, 1.0), ("ok", 2.0), ("refused", 2.1, 2, 2.2),
             ("refused", 2.3, 1, 2.3)],
            [1.0, 0.0, 2.0], [1.0, 2.0, 1.0, 1.0], True,
        ),
        # a refusal with others in flight while the cap is one is not the probe's
        ([("refused", 0.0, 9, 1.0), ("refused", 2.0, 2, 2.05)], [1.0, 0.0], [1.0, 1.0], True),
    ],
    ids=["first", "old-news", "doubling", "slow-start", "old-success", "ends", "halved",
         "probe-refused", "not-the-probe"],
)  # fmt: skip
def test_the_hold_probes_then_ramps_up(events, pauses, caps, active) -> None:
    h = Hold()
    got_pauses: list[float] = []
    got_caps: list[float] = []
    for kind, sent, *rest in events:
        if kind == "refused":
            in_flight, now = rest
            got_pauses.append(h.on_refusal(sent, in_flight, now))
        else:
            h.on_success(sent)
        got_caps.append(h.cap)
    assert got_pauses == pauses and got_caps == caps and h.active is active


def test_a_paced_deployment_pauses_a_paced_interval_at_least() -> None:
    assert Hold().on_refusal(0.0, 3, 0.0, step=1.5) == 1.5
    assert Hold().on_refusal(0.0, 3, 0.0, step=0.01) == HOLD_PAUSE


def test_a_window_that_reopened_paces_at_what_it_let_through_over_the_cycle() -> None:
    r = RateAimd()
    assert r.on_refusal(16.7, 1.0) and r.rate == pytest.approx(15.03)  # the burst's view
    assert r.on_reopened(6.5, 3.2) and r.rate == 6.5  # the whole cycle's
    assert not r.on_reopened(8.0, 9.0) and r.rate == 6.5  # never raised by it


@pytest.mark.parametrize(
    ("outcomes", "burst"),
    [
        ([False] * 20 + [True] * 3, False),  # a few refusals: not yet
        ([False] * 20 + [True] * 8, True),  # a window spent: everything refused
        ([False] * 4 + [True] * 4, True),  # half of the last 8
        ([True] * 5, False),  # too few outcomes to say
        ([False, True] * 10, True),  # every other one: half
        ([False] * 19 + [True], False),  # a stray refusal
    ],
)
def test_a_burst_of_refusals(outcomes: list[bool], burst: bool) -> None:
    ev = LoadEvidence()
    for i, r in enumerate(outcomes):
        ev.record(i * 0.01, 5, r)
    assert ev.burst() is burst


def _storm_burst() -> tuple[LoadEvidence, list[tuple[float, int]]]:
    """A storm's burst of sends, as the evidence sees it a few milliseconds later: six
    answers at low concurrency just before, then 24 sent at once (in flight 1..24), of which
    8 random refusals and 2 random 500s have come back while the other 14 still stream."""
    ev = LoadEvidence()
    for i in range(6):
        ev.record(0.6 + 0.05 * i, 1 + i % 2, False)
    refused = {3, 6, 8, 11, 14, 17, 20, 23}
    failed = {5, 16}
    running = []
    for f in range(1, 25):
        t = 1.0 + 0.0001 * f
        if f in refused or f in failed:
            ev.record(t, f, f in refused)
        else:
            running.append((t, f))
    return ev, running


def test_a_burst_of_sends_is_not_read_as_a_wall_while_its_successes_still_stream() -> None:
    """Refusals come back at once, successes do not: read from the ended attempts alone, a
    burst's random refusals look like a concurrency wall of ~2 (and like a burst of
    refusals: a hold), which queued storm requests for 10 s. The running attempts are the
    evidence that settles it: 8 of 24 refused, all over the in-flight range."""
    ev, running = _storm_burst()
    assert ev.judge(1.01) == Verdict(Cause.CONCURRENCY, limit=2)  # without them: misread
    assert ev.burst()
    ev, running = _storm_burst()
    assert ev.judge(1.01, running).cause is Cause.UNKNOWN  # too few samples to say noise yet
    assert not ev.burst(running)


def test_a_spent_window_is_a_burst_whatever_ran_before_it() -> None:
    """Streams let in before a window closed still run; everything sent since is refused."""
    ev = LoadEvidence()
    running = [(0.1 * i, i + 1) for i in range(10)]  # long streams, sent before
    for i in range(8):
        ev.record(1.0 + 0.01 * i, 11, True)
    assert ev.burst(running)


def test_random_refusals_rarely_look_like_a_burst() -> None:
    rng = random.Random(4)
    ev = LoadEvidence()
    bursts = 0
    for i in range(20_000):
        ev.record(i * 0.001, 5, rng.random() < 0.05)
        bursts += ev.burst()
    assert bursts < 20  # under 1 in 1,000 outcomes
