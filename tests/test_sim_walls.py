"""The simulator's walls: a concurrency wall (``--max-concurrency``) and a request-rate wall
(``--rate-limit N --rate-window S``, fixed or ``--rate-sliding``), and how their 429s read
(``--wall-wording``): the simulator's own words, OpenAI's (with retry-after), DashScope's
hint-less "Too many requests in route", or a bare proxy's text. Real sockets, raw aiohttp."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from keel.sim import Simulator
from keel.sim._window import RequestWindow
from keel.testing import spawn_sim


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def post(sim: Simulator, prompt: str, stream: bool = False) -> tuple[int, Any, bytes]:
    payload = {"model": "m", "messages": user(prompt), "stream": stream}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{sim.base_url}/chat/completions", json=payload) as r,
    ):
        return r.status, r.headers, await r.read()


# -- the sliding window, pure ----------------------------------------------------------------


def test_sliding_window_admits_n_in_any_interval_and_hints_exactly() -> None:
    w = RequestWindow(limit=3, seconds=2.0, sliding=True)
    assert [w.admit(t) for t in (10.0, 10.5, 11.0)] == [None, None, None]
    assert w.admit(11.5) == pytest.approx(0.5)  # 10.0 leaves the window at 12.0
    assert w.admit(11.99) == pytest.approx(0.01)
    assert w.admit(12.0) is None  # exactly S after the first: out of the window
    assert w.admit(12.1) == pytest.approx(0.4)  # 10.5 leaves at 12.5
    assert w.used(12.1) == (3, pytest.approx(0.4))
    # refusals are not counted: after the window passes, a full N again
    assert [w.admit(t) for t in (14.5, 14.6, 14.7, 14.8)][:3] == [None, None, None]
    h = w.headers(14.8)
    assert h["x-ratelimit-limit-requests"] == "90" and h["x-ratelimit-remaining-requests"] == "0"


def test_fixed_window_lets_a_boundary_burst_through_sliding_does_not() -> None:
    fixed = RequestWindow(limit=2, seconds=1.0)
    sliding = RequestWindow(limit=2, seconds=1.0, sliding=True)
    times = (0.9, 0.95, 1.0, 1.05)
    assert [fixed.admit(t) is None for t in times] == [True, True, True, True]
    assert [sliding.admit(t) is None for t in times] == [True, True, False, False]


# -- wordings, over the wire -------------------------------------------------------------------


async def _two_stalled(sim: Simulator, s: aiohttp.ClientSession) -> list[Any]:
    payload = {"model": "m", "stream": True, "messages": user("hold [[sim:stall=0]]")}
    url = f"{sim.base_url}/chat/completions"
    held = [await s.post(url, json=payload) for _ in range(2)]
    assert all(r.status == 200 for r in held)
    return held


@pytest.mark.parametrize(
    ("wording", "content_type", "hint", "needle"),
    [
        ("default", "application/json", "20", "Too many concurrent requests"),
        ("openai", "application/json", "500", "Rate limit reached for requests"),
        ("dashscope", "application/json", None, "Too many requests in route. Please try again later."),
        ("bare", "text/plain", None, "429 Too Many Requests"),
    ],
)  # fmt: skip
async def test_concurrency_wall_wordings(
    wording: str, content_type: str, hint: str | None, needle: str
) -> None:
    async with (
        Simulator(max_concurrency=2, wall_wording=wording) as sim,
        aiohttp.ClientSession() as s,
    ):
        held = await _two_stalled(sim, s)
        status, headers, body = await post(sim, "third")
        for r in held:
            r.close()
    assert status == 429 and headers["content-type"].startswith(content_type)
    assert headers.get("retry-after-ms") == hint
    assert needle in body.decode()
    if wording == "dashscope":
        err = json.loads(body)
        assert err["error"]["code"] == "rate_limit_error" and err["request_id"].startswith("req_")
    if wording != "default":  # nothing on the wire names concurrency
        assert "concurren" not in body.decode().lower()
        assert not any(k.startswith("x-ratelimit") for k in headers)
    assert sim.log[2].fault == "concurrency" and sim.log[2].status == 429


@pytest.mark.parametrize("wording", ["default", "openai", "dashscope", "bare"])
async def test_sliding_rate_wall_wordings(wording: str) -> None:
    # A window far longer than the test: the exact hint is the first request's age out.
    async with Simulator(rate_limit=2, rate_window=1000.0, rate_sliding=True,
                         wall_wording=wording) as sim:  # fmt: skip
        first = await post(sim, "r1")
        second = await post(sim, "r2")
        status, headers, _ = await post(sim, "r3")
    assert first[0] == second[0] == 200 and status == 429
    t0 = sim.log[0].t_open
    expect = t0 + 1000.0 - sim.log[2].t_open  # exact: when r1 leaves the window
    with_headers = wording in ("default", "openai")
    assert ("x-ratelimit-limit-requests" in first[1]) is with_headers
    if with_headers:
        assert second[1]["x-ratelimit-remaining-requests"] == "0"
        assert float(headers["retry-after-ms"]) == pytest.approx(expect * 1000, abs=1.0)
        assert headers["x-ratelimit-remaining-requests"] == "0"
    else:
        assert "retry-after" not in headers and "retry-after-ms" not in headers
        assert not any(k.startswith("x-ratelimit") for k in headers)
    assert sim.log[2].fault == "window"


async def test_wall_settings_through_sim_config() -> None:
    async with Simulator() as sim, aiohttp.ClientSession() as s:
        root = sim.base_url.removesuffix("/v1")
        cfg = await (await s.post(f"{root}/_sim/config", json={
            "rate_limit": 1, "rate_window": 1000, "rate_sliding": True,
            "wall_wording": "dashscope"})).json()  # fmt: skip
        assert (cfg["rate_sliding"], cfg["wall_wording"], cfg["rate_limit"]) == (
            True,
            "dashscope",
            1,
        )
        assert (await post(sim, "a"))[0] == 200
        status, _, body = await post(sim, "b")
        assert status == 429 and b"Too many requests in route" in body
        bad = await s.post(f"{root}/_sim/config", json={"wall_wording": "klingon"})
        assert bad.status == 400 and "wall wording" in (await bad.text())
        assert (await (await s.get(f"{root}/_sim/config")).json())["wall_wording"] == "dashscope"


def test_wall_options_on_the_command_line() -> None:
    with spawn_sim("--max-concurrency", "1", "--rate-limit", "5", "--rate-window", "2",
                   "--rate-sliding", "--wall-wording", "bare") as sim:  # fmt: skip
        cfg = sim.configure()
    assert cfg["max_concurrency"] == 1 and cfg["rate_sliding"] is True
    assert cfg["wall_wording"] == "bare" and cfg["rate_window"] == 2.0
