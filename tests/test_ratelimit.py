"""The pure rate-limit, concurrency, health, balancing and token-estimate cores."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keel._balance import p2c_order
from keel._concurrency import Aimd
from keel._health import Admit, Breaker, BreakerState, PeakEwma
from keel._ratelimit import (
    go_duration,
    parse_ratelimit_headers,
    per_minute,
    window_pacing,
)
from keel._tokens import Calibration, completion_budget, prompt_tokens, text_tokens

# --- GCRA ------------------------------------------------------------------------------------


def test_paced_gcra_books_one_slot_per_interval() -> None:
    g = per_minute(600)  # 10 per second, strictly paced
    waits = [g.reserve(100.0, max_wait=10.0) for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_reserve_beyond_max_wait_books_nothing() -> None:
    g = per_minute(60)
    assert g.reserve(0.0) == 0.0
    tat = g.tat
    assert g.reserve(0.0, max_wait=0.5) is None  # would wait 1 s
    assert g.tat == tat
    assert g.wait(0.0) == pytest.approx(1.0)


def test_burst_allows_a_minute_at_once_then_paces() -> None:
    g = per_minute(60, burst_seconds=60)
    assert all(g.reserve(0.0) == 0.0 for _ in range(60))
    assert g.reserve(0.0) is None
    assert g.remaining(0.0) == 0 and g.reset(0.0) == pytest.approx(60.0)
    assert g.reserve(1.0) == 0.0  # one more per second
    assert g.remaining(61.0) == 60


def test_a_request_larger_than_the_burst_still_passes_an_idle_limit() -> None:
    tok = per_minute(6000)  # 100 tokens per second, paced
    assert tok.reserve(0.0, cost=4000) == 0.0
    assert tok.wait(0.0, cost=10) == pytest.approx(40.0)  # the 4000 tokens drain first


def test_adjust_refunds_and_pause_blocks() -> None:
    tok = per_minute(6000)
    tok.reserve(0.0, cost=1000)
    tok.adjust(-900)  # the answer was short
    assert tok.wait(0.0, cost=10) == pytest.approx(1.0)
    g = per_minute(6000)
    g.pause_until(5.0)
    assert g.wait(1.0) == pytest.approx(4.0)


@given(
    rate=st.integers(1, 10_000),
    burst=st.floats(0, 5),
    gaps=st.lists(st.floats(0, 0.05), min_size=1, max_size=300),
)
def test_no_window_ever_sees_more_than_rate_plus_burst(rate, burst, gaps) -> None:
    """Whatever the arrival pattern, requests booked by one GCRA never exceed the limit plus
    the burst in any window of a minute (the property the 3-replica test checks end to end)."""
    g = per_minute(rate, burst_seconds=burst)
    now, sends = 0.0, []
    for gap in gaps:
        now += gap
        w = g.reserve(now, max_wait=math.inf)
        assert w is not None
        sends.append(now + w)
    allowed = rate + math.ceil(burst * rate / 60) + 1
    j = 0
    for i, t in enumerate(sends):
        while sends[j] <= t - 60.0:
            j += 1
        assert i - j + 1 <= allowed


# --- upstream headers --------------------------------------------------------------------------


def test_parse_headers_and_pacing() -> None:
    assert parse_ratelimit_headers({"content-type": "x"}) is None
    info = parse_ratelimit_headers(
        {
            "x-ratelimit-limit-requests": "6000",
            "x-ratelimit-remaining-requests": "40",
            "x-ratelimit-reset-requests": "400ms",
            "x-ratelimit-limit-tokens": "-1",
            "x-ratelimit-remaining-tokens": "149000",
            "x-ratelimit-reset-tokens": "6m0s",
        }
    )
    assert info is not None
    assert (info.requests.limit, info.requests.remaining) == (6000, 40)
    assert info.requests.reset == pytest.approx(0.4)
    assert info.tokens.limit is None and info.tokens.reset == 360.0
    p = window_pacing(info.requests, 10.0)
    assert p is not None and p.interval == pytest.approx(0.01) and p.until == pytest.approx(10.4)
    empty = window_pacing(type(info.requests)(100, 0, 2.0), 0.0)
    assert empty is not None and empty.interval == math.inf and empty.until == 2.0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.644, "644ms"), (0.0001, "1ms"), (1.0, "1s"), (360, "6m0s"), (61.2, "1m2s")],
)
def test_go_duration(seconds, text) -> None:
    assert go_duration(seconds) == text


# --- AIMD --------------------------------------------------------------------------------------


def test_aimd_is_unlimited_until_told_then_cuts_once_per_epoch() -> None:
    a = Aimd(corroborate=1)
    assert a.slots is None
    a.on_success(50, 0, 0.0)
    assert a.slots is None
    assert a.on_overload(11, 0, 1.0)  # 11 in flight was one too many
    assert a.slots == 9  # 10 x 0.9
    assert not a.on_overload(12, 0, 1.0)  # the same overfull moment: counted already
    assert a.on_overload(10, a.epoch, 1.1)  # sent after the cut and still too many
    assert a.slots == 8


def test_aimd_recovers_fast_to_the_ceiling_then_probes_slowly() -> None:
    a = Aimd(corroborate=1)
    a.on_overload(21, 0, 0.0)  # ceiling 20, limit 18
    n = 0
    while a.limit < 20:
        a.on_success(a.slots or 0, a.epoch, 1.0)
        n += 1
    assert n <= 40  # ~one slot per round of `limit` successes
    m = 0
    while a.limit < 21:
        a.on_success(a.slots or 0, a.epoch, 1.0)
        m += 1
    assert m >= 150  # probing above the known capacity is ten times slower
    # a success at a higher in-flight count than known raises the ceiling
    a.on_success(25, a.epoch, 2.0)
    assert a.ceiling == 25


def test_aimd_grows_only_when_the_limit_is_used_and_forgets_old_ceilings() -> None:
    a = Aimd(corroborate=1)
    a.on_overload(11, 0, 0.0)
    before = a.limit
    a.on_success(2, a.epoch, 1.0)  # far below the limit: no evidence
    assert a.limit == before
    for _ in range(100):
        a.on_success(a.slots or 0, a.epoch, 100.0)  # long after the overload: fast again
    assert a.limit > 15


def test_aimd_ignores_stray_refusals_but_not_a_bunch() -> None:
    a = Aimd(window=50, corroborate=4)
    for i in range(1000):  # a healthy fleet refusing 2 % at random, spread out
        if i % 50 == 0:
            assert not a.on_overload(16, a.epoch, i * 0.01)
        else:
            a.on_success(16, a.epoch, i * 0.01)
    assert a.slots is None  # never limited
    # real saturation: refusals come in a bunch
    results = [a.on_overload(17, a.epoch, 20.0) for _ in range(4)]
    assert results == [False, False, False, True]
    assert a.slots == 14  # 16 fit, x 0.9


# --- breaker -------------------------------------------------------------------------------------


def test_breaker_opens_on_consecutive_failures_and_probes_once() -> None:
    b = Breaker(failures=3, cooldown=5.0)
    for i in range(3):
        how = b.admit(0.0)
        assert how is not Admit.REFUSED
        opened = b.record(how, 0.0, False, 0.1 * i)
    assert opened and b.state(1.0) is BreakerState.OPEN
    assert b.admit(1.0) is Admit.REFUSED
    assert b.state(5.3) is BreakerState.HALF_OPEN
    probe = b.admit(5.3)
    assert probe is Admit.PROBE and b.admit(5.3) is Admit.REFUSED  # a single probe
    assert b.record(probe, 5.3, False, 5.4)  # failed probe: open again, twice as long
    assert b.open_until == pytest.approx(15.4)
    probe = b.admit(16.0)
    b.record(probe, 16.0, True, 16.1)
    assert b.state(16.1) is BreakerState.CLOSED and b.admit(16.2) is Admit.NORMAL


def test_breaker_honours_retry_after_and_failure_ratio() -> None:
    b = Breaker(failures=100, failure_ratio=0.5, min_requests=10, window=10.0)
    for i in range(10):
        how = b.admit(i * 0.1)
        ok = i % 2 == 0 if i < 9 else False
        opened = b.record(how, i * 0.1, ok, i * 0.1, retry_after=30.0)
    assert opened and b.open_until == pytest.approx(0.9 + 30.0)


def test_breaker_limits_suspects_during_a_streak() -> None:
    """A dead deployment cannot receive a burst: once a failure is known, at most
    failures - streak attempts may be in flight until the streak ends either way."""
    b = Breaker(failures=5)
    first = b.admit(0.0)
    b.record(first, 0.0, False, 0.001)
    started = [b.admit(0.002) for _ in range(10)]
    assert started.count(Admit.SUSPECT) == 4 and started.count(Admit.REFUSED) == 6
    for how in started[:4]:
        b.record(how, 0.002, False, 0.003)
    assert b.state(0.004) is BreakerState.OPEN  # 5 attempts in all
    # a success ends a streak: everything flows again
    b2 = Breaker(failures=5, proven=True)  # past its start-up (the ramp: test_load_policies)
    b2.record(b2.admit(0.0), 0.0, False, 0.0)
    how = b2.admit(0.0)
    b2.record(how, 0.0, True, 0.1)
    assert all(b2.admit(0.2) is Admit.NORMAL for _ in range(10))


def test_neutral_outcomes_and_forced_open() -> None:
    b = Breaker(failures=2)
    for _ in range(5):
        b.record(b.admit(0.0), 0.0, None, 0.0)  # cancelled / rate limited
    assert b.state(0.0) is BreakerState.CLOSED
    assert b.force_open(3.0) and not b.force_open(2.0)
    assert b.state(1.0) is BreakerState.OPEN and b.state(3.0) is BreakerState.HALF_OPEN


# --- peak-EWMA and power of two choices ----------------------------------------------------------


def test_peak_ewma_jumps_up_and_decays_down() -> None:
    e = PeakEwma(decay=1.0)
    assert e.cost(0.0) is None
    e.observe(0.1, 0.0)
    e.observe(0.3, 0.01)  # a peak is taken at once
    assert e.value == 0.3
    e.observe(0.1, 1.01)  # one time constant later: most of the way back
    assert 0.1 < e.value < 0.2
    assert e.cost(10.0) < 0.001  # idle: decays towards zero, so it is tried again


def test_p2c_prefers_the_lower_score_and_respects_weights() -> None:
    rng = random.Random(7)
    firsts = [p2c_order([1.0, 3.0], [1.0, 1.0], rng)[0] for _ in range(100)]
    assert firsts.count(0) == 100  # two candidates: always compared
    picks = [p2c_order([1.0, 1.0, 1.0], [8.0, 1.0, 1.0], rng)[0] for _ in range(2000)]
    assert picks.count(0) > 1200  # weight 8 of 10 is drawn (and so picked) most often
    order = p2c_order([5.0, 1.0, 3.0, 2.0], [1, 1, 1, 1], random.Random(1))
    assert sorted(order) == [0, 1, 2, 3] and order[1:] == sorted(
        order[1:], key=[5, 1, 3, 2].__getitem__
    )


# --- token estimates -------------------------------------------------------------------------------


def test_token_estimate_handles_cjk() -> None:
    assert text_tokens("hello world, this is text") == 7  # 25 chars / 4
    assert text_tokens("你好世界") == 4  # one per Han character, not 4 chars per token
    assert text_tokens("你好 world") == 2 + 2
    msgs = [{"role": "user", "content": "你好"}, {"role": "user", "content": [
        {"type": "text", "text": "abcd"}, {"type": "image_url", "image_url": {"url": "x"}}]}]  # fmt: skip
    assert prompt_tokens(msgs) == 3 + (4 + 2) + (4 + 1 + 765)
    assert completion_budget({"max_tokens": 50}) == 50
    assert completion_budget({"max_completion_tokens": 9, "max_tokens": 50}) == 9
    assert completion_budget({"max_tokens": True}) is None


def test_each_operation_estimates_its_own_body_once() -> None:
    """``Costed.tokens()``: what the client's TPM and the deployment's both book, the pair of
    the operation's prompt estimate and output cap, computed at the first ask."""
    from keel.engine._auth import Principal
    from keel.engine._completions import COMPLETIONS
    from keel.engine._embeddings import EMBEDDINGS
    from keel.engine._keel import Call
    from keel.engine._limits import RequestCost
    from keel.engine._operation import CHAT

    chat = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 50}
    assert CHAT.estimate(chat) == (3 + 4 + 2, 50)
    tools = [{"x": 1}]  # "[{'x': 1}]": 10 characters, 3 tokens
    assert CHAT.estimate({"messages": [], "tools": tools}) == (3 + 3, None)
    emb = {"input": ["abcdefgh", "ab"], "max_tokens": 7}
    assert EMBEDDINGS.estimate(emb) == (2 + 1, 0)  # no output, whatever the body says
    assert COMPLETIONS.estimate({"prompt": [[1, 2, 3]], "max_completion_tokens": 4}) == (3, 4)
    # Once per request: a body changed after the first ask changes nothing. (Not ``is``: the
    # compiled build, setup.py, keeps a tuple unboxed and returns an equal, new one per ask.)
    body = dict(chat)
    cost = RequestCost(body)  # a chat body's, without a Call
    assert cost.tokens() == (9, 50)
    body["max_tokens"] = 7
    assert cost.tokens() == (9, 50)
    body = dict(emb)
    call = Call("r", body, "m", False, Principal("p"), 0, 1.0, 9.0, op=EMBEDDINGS)
    assert call.tokens() == (3, 0)
    body["input"] = ["a" * 400]
    assert call.tokens() == (3, 0)


def test_calibration_learns_the_upstream_tokenizer() -> None:
    c = Calibration()
    assert c.cost(100, None) == 100 + 256
    assert c.cost(100, 10) == 110
    for _ in range(20):
        c.learn(100, 150, 40)  # this upstream counts 1.5x our estimate, answers ~40 tokens
    assert c.prompt_ratio == pytest.approx(1.5, rel=0.01)
    assert c.cost(100, None) == pytest.approx(150 + 40, abs=2)
