"""Stalls judged against the deployment's own pace (keel._cadence): a table for the pure core,
then a real stream that goes silent and is continued long before ``timeouts.idle``."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from gw_fixtures import UPSTREAM_KEY_B, unique
from keel import Keel
from keel._cadence import FLOOR, MIN_SAMPLES, Cadence
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


@pytest.fixture(scope="module")
def paced() -> Iterator[SimProcess]:
    with spawn_sim("--name", "p", "--dialect", "dashscope", "--token-delay", "0.02") as s:
        yield s


async def test_a_silent_stream_is_continued_after_a_few_of_its_usual_gaps(
    paced: SimProcess,
) -> None:
    cfg = {
        "timeouts": {"idle": 30.0},
        "models": {
            "m": {
                "deployments": [
                    {
                        "name": "paced",
                        "base_url": paced.base_url,
                        "api_key": UPSTREAM_KEY_B,
                        "dialect": "dashscope",
                    }
                ]
            }
        },
    }
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


def _body(prompt: str) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": prompt}]}
