"""Stalls judged against the deployment's own pace (keel._cadence): a table for the pure core,
then a real stream that goes silent and is continued long before ``timeouts.idle``."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from gw_fixtures import UPSTREAM_KEY_B, unique
from keel import Keel
from keel._cadence import (
    FIRST_FLOOR,
    FLOOR,
    MIN_SAMPLES,
    PREFILL_BYTES_PER_S,
    RELOOK,
    Cadence,
    FirstToken,
)
from keel.sim import answer_text
from keel.testing import SimProcess, spawn_sim


def learned(gap: float, n: int = MIN_SAMPLES) -> Cadence:
    c = Cadence()
    for _ in range(n):
        c.observe(10.0, 10.0 + gap * 9, 10)
    return c


@pytest.mark.parametrize(
    ("cadence", "ceiling", "idle"),
    [
        (Cadence(), 30.0, 30.0),  # no pace known yet: the configured bound
        (learned(0.03, MIN_SAMPLES - 1), 30.0, 30.0),  # not yet trusted
        (learned(0.03), 30.0, FLOOR),  # 20 x 30 ms is under the floor
        (learned(0.5), 30.0, 10.0),  # 20 x 0.5 s
        (learned(5.0), 30.0, 30.0),  # never over the ceiling
        (learned(0.5), 4.0, 4.0),
    ],
    ids=["unknown", "too-few", "floor", "factor", "ceiling", "low-ceiling"],
)
def test_the_stall_bound(cadence: Cadence, ceiling: float, idle: float) -> None:
    assert cadence.idle(ceiling) == pytest.approx(idle)


def test_a_single_token_or_no_time_teaches_nothing() -> None:
    c = Cadence()
    c.observe(1.0, 1.0, 1)
    c.observe(1.0, 1.0, 5)
    assert c.samples == 0


def test_the_pace_is_an_average_not_a_peak() -> None:
    c = learned(0.03)
    c.observe(0.0, 9.0, 10)  # one slow stream (1 s per token)
    assert 0.03 < c.gap < 0.3


def usual(seconds: float, n: int = MIN_SAMPLES, jitter: float = 0.0) -> FirstToken:
    f = FirstToken()
    for i in range(n):
        f.observe(seconds + (jitter if i % 2 else -jitter))
    return f


@pytest.mark.parametrize(
    ("first", "ceiling", "request_bytes", "bound"),
    [
        (FirstToken(), 60.0, 0, 60.0),  # nothing known yet: the configured bound
        (usual(0.05, MIN_SAMPLES - 1), 60.0, 0, 60.0),  # not yet trusted
        (usual(0.05), 60.0, 0, FIRST_FLOOR),  # 50 ms usually: the floor
        (usual(2.0), 60.0, 0, pytest.approx(3.0 * (2.0 + 4.0 * 0.35), rel=0.05)),  # mean+4dev
        (usual(2.0, 20, 1.0), 60.0, 0, pytest.approx(3.0 * (2.0 + 4.0 * 1.0), rel=0.1)),
        (usual(30.0), 60.0, 0, 60.0),  # never over the ceiling
        (usual(0.05), 3.0, 0, 3.0),  # a ceiling under the floor stays the ceiling
        # a long prompt takes longer to prefill: the floor grows with the request's size
        (usual(0.05), 60.0, 40_000, FIRST_FLOOR + 40_000 / PREFILL_BYTES_PER_S),
        (usual(0.05), 60.0, 10_000_000, 60.0),
    ],
    ids=[
        "unknown",
        "too-few",
        "floor",
        "steady",
        "jittery",
        "ceiling",
        "low-ceiling",
        "long-prompt",
        "huge-prompt",
    ],
)
def test_the_late_first_token_bound(
    first: FirstToken, ceiling: float, request_bytes: int, bound: float
) -> None:
    assert first.bound(ceiling, request_bytes) == bound


@pytest.mark.parametrize(
    ("first", "patience", "bound"),
    [
        (usual(0.05), 0, FIRST_FLOOR),
        (usual(0.05), 1, 2 * FIRST_FLOOR),  # cut once: twice the bound
        (usual(0.05), 2, 4 * FIRST_FLOOR),  # cut twice: four times
        (usual(0.05), 4, 60.0),  # never over the ceiling
        (FirstToken(), 1, 60.0),  # nothing known yet: the configured bound, as before
    ],
    ids=["none", "once", "twice", "ceiling", "unknown"],
)
def test_each_cut_for_lateness_doubles_the_next_bound(
    first: FirstToken, patience: int, bound: float
) -> None:
    # RFC 6298's backoff: a big request gets the time it needs within a few attempts, and a
    # second stall is cut at twice the bound, not after the whole first_token ceiling.
    assert first.bound(60.0, 0, patience) == bound


@pytest.mark.parametrize(
    ("first", "now", "due"),
    [
        # sent at 10, its own end (deadline, total) at 70, the ceiling 60 s
        (FirstToken(), 10.0, 10.0 + RELOOK),  # nothing known: looked at again soon
        (FirstToken(), 69.5, 70.0),  # ... never past its own end
        (usual(0.05, MIN_SAMPLES - 1), 12.0, 12.0 + RELOOK),  # not yet trusted
        (usual(0.05), 12.0, 10.0 + FIRST_FLOOR),  # learned meanwhile: its bound from now on
        (usual(0.05), 16.0, 10.0 + FIRST_FLOOR),  # ... which may be over already: late
        (usual(30.0), 12.0, 70.0),  # a slow deployment's bound: the ceiling
    ],
    ids=["unknown", "own-end", "too-few", "learned", "late", "slow"],
)
def test_a_first_token_wait_judged_again_while_the_bound_is_learned(
    first: FirstToken, now: float, due: float
) -> None:
    assert first.due(10.0, 70.0, 60.0, 0, now) == pytest.approx(due)


def test_a_slower_deployment_raises_its_own_bound() -> None:
    """Answers that got slower (a provider under load) are learned, not cut for ever: after a
    handful of 8 s answers the bound is above 8 s again."""
    f = usual(0.05, 20)
    assert f.bound(60.0) == FIRST_FLOOR
    for _ in range(3):
        f.observe(8.0)
    assert f.bound(60.0) > 8.0


@pytest.fixture(scope="module")
def paced() -> Iterator[SimProcess]:
    with spawn_sim("--name", "p", "--dialect", "dashscope", "--token-delay", "0.02") as s:
        yield s


async def test_a_silent_stream_is_continued_after_a_few_of_its_usual_gaps(
    paced: SimProcess,
) -> None:
    cfg = {"timeouts": {"idle": 30.0}, **_one(paced)}
    async with Keel.from_config(cfg) as gw:
        for _ in range(MIN_SAMPLES):  # the deployment shows its pace
            done = [c async for c in gw.stream(_body(unique("pace")))]
            assert done
        prompt = unique("silent") + " [[sim:stall=5*1]]"
        t = time.monotonic()
        chunks = [c async for c in gw.stream(_body(prompt))]
        took = time.monotonic() - t
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == answer_text(prompt)
    assert chunks[-1]["keel"]["continued"][0]["mode"] == "prefill"
    assert took < FLOOR + 2.0, f"{took:.1f} s: waited for the 30 s idle bound"
    tag = prompt.rsplit("#", 1)[1].split()[0]
    attempts = [e for e in paced.log() if tag in e.prompt]
    assert len(attempts) == 2  # the stalled one, then its continuation


def _one(paced: SimProcess) -> dict[str, object]:
    """A config whose model ``m`` is the paced simulator alone."""
    dep = {"name": "paced", "base_url": paced.base_url, "api_key": UPSTREAM_KEY_B,
           "dialect": "dashscope"}  # fmt: skip
    return {"models": {"m": {"deployments": [dep]}}}


def _body(prompt: str) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": prompt}]}


def _timed_out(tag: str, sim: SimProcess) -> list[object]:
    return [e for e in sim.log() if tag in (e.prompt or "")]


@pytest.mark.parametrize("streaming", [False, True], ids=["non-stream", "stream"])
async def test_a_first_token_far_later_than_usual_is_tried_again_long_before_first_token(
    paced: SimProcess, streaming: bool
) -> None:
    """After a handful of answers, an attempt silent before its headers (a stall for the
    non-stream request, a 30 s slow first token for the stream) is cut at the learned bound
    (the 5 s floor here, the deployment answers in ~0.1 s) and tried again — not left to
    ``timeouts.first_token`` (60 s)."""
    cfg = _one(paced)
    fault = "slow_first=30*1" if streaming else "stall*1"
    async with Keel.from_config(cfg) as gw:
        for _ in range(MIN_SAMPLES):  # the deployment shows how soon it answers
            if streaming:
                assert [c async for c in gw.stream(_body(unique("soon")))]
            else:
                assert await gw.chat(_body(unique("soon")))
        prompt = unique("late") + f" [[sim:{fault}]]"
        t = time.monotonic()
        if streaming:
            chunks = [c async for c in gw.stream(_body(prompt))]
            text = "".join(
                c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
            )
        else:
            text = (await gw.chat(_body(prompt)))["choices"][0]["message"]["content"]
        took = time.monotonic() - t
    assert text == answer_text(prompt)
    assert FIRST_FLOOR <= took < FIRST_FLOOR + 3.0, f"{took:.1f} s"
    tag = prompt.rsplit("#", 1)[1].split()[0]
    assert len(_timed_out(tag, paced)) == 2  # the late one, then the retry


@pytest.mark.parametrize(
    ("streaming", "fault"),
    [(False, "stall*1"), (True, "slow_first=30*1"), (True, "stall=0*1")],
    ids=["non-stream", "stream", "stream-silent-after-headers"],
)
async def test_an_attempt_silent_on_a_fresh_deployment_is_cut_once_its_pace_is_learned(
    paced: SimProcess, streaming: bool, fault: str
) -> None:
    """The very first attempt of a fresh deployment is silent before its headers (or, for
    the last case, sends its headers and role chunk and then nothing), while the next ones
    answer at once: it is judged again as the deployment's usual first token is learned (a
    storm's stalls in the first second waited out the 60 s ``first_token``; the one after
    its headers hung a storm request for the client's whole 60 s)."""
    import asyncio

    async def one(gw: Keel, prompt: str) -> str:
        if streaming:
            chunks = [c async for c in gw.stream(_body(prompt))]
            return "".join(
                c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
            )
        return str((await gw.chat(_body(prompt)))["choices"][0]["message"]["content"])

    async with Keel.from_config(_one(paced)) as gw:
        prompt = unique("stuck") + f" [[sim:{fault}]]"
        t = time.monotonic()
        stuck = asyncio.create_task(one(gw, prompt))
        for _ in range(MIN_SAMPLES):  # meanwhile the deployment shows how soon it answers
            assert await one(gw, unique("soon"))
        text = await stuck
        took = time.monotonic() - t
    assert text == answer_text(prompt)
    assert FIRST_FLOOR <= took < FIRST_FLOOR + RELOOK + 3.0, f"{took:.1f} s"
    assert len(_timed_out(prompt.rsplit("#", 1)[1].split()[0], paced)) == 2


async def test_a_request_cut_for_lateness_once_waits_the_configured_bound_after(
    paced: SimProcess,
) -> None:
    """A big request is not cut twice: every attempt answers 6 s late (over the learned 5 s
    floor), the first attempt is cut, the retry waits twice the bound (``Try.patience``) and answers."""
    cfg = _one(paced)
    async with Keel.from_config(cfg) as gw:
        for _ in range(MIN_SAMPLES):
            assert await gw.chat(_body(unique("soon")))
        prompt = unique("big") + " [[sim:slow_first=6]]"
        answer = await gw.chat(_body(prompt))
    assert answer["choices"][0]["message"]["content"] == answer_text(prompt)
    tag = prompt.rsplit("#", 1)[1].split()[0]
    assert len(_timed_out(tag, paced)) == 2


async def test_a_silent_stream_on_a_fresh_deployment_is_judged_by_its_own_pace(
    paced: SimProcess,
) -> None:
    """Before the deployment has shown its pace (a gateway just started), a stream that has
    streamed 12 tokens at 20 ms and goes silent is judged by its own pace: continued after
    ~2-4 s (re-judged every FLOOR seconds), not after the 30 s idle bound."""
    async with Keel.from_config({"timeouts": {"idle": 30.0}, **_one(paced)}) as gw:
        prompt = unique("fresh") + " [[sim:len=40,stall=12*1]]"
        t = time.monotonic()
        chunks = [c async for c in gw.stream(_body(prompt))]
        took = time.monotonic() - t
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == answer_text(prompt, 40)
    assert chunks[-1]["keel"]["continued"][0]["mode"] == "prefill"
    assert took < 2 * FLOOR + 2.0, f"{took:.1f} s: waited for the 30 s idle bound"
    tag = prompt.rsplit("#", 1)[1].split()[0]
    assert len([e for e in paced.log() if tag in e.prompt]) == 2


@pytest.mark.parametrize(
    ("first", "last", "tokens", "idle"),
    [
        (0.0, 0.18, 10, FLOOR),  # 20 ms a token: the floor
        (0.0, 4.5, 10, 10.0),  # 0.5 s a token: 20 of them
        (0.0, 0.18, 9, 30.0),  # too few tokens to say
        (1.0, 1.0, 12, 30.0),  # no time between them
        (0.0, 90.0, 10, 30.0),  # never over the ceiling
    ],
)
def test_a_streams_own_pace(first: float, last: float, tokens: int, idle: float) -> None:
    assert Cadence.own(30.0, first, last, tokens) == pytest.approx(idle)
