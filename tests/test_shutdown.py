"""Stopping ``keel serve``: SIGTERM drains (streams in flight finish, new connections are
refused) for at most ``server.drain_timeout``, says so in the log, and a second SIGTERM or
SIGINT stops at once. Also the open-file limit raised at start-up. Real processes."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from gw_fixtures import unique
from keel.sim import answer_text
from keel.testing import GatewayProcess, SimProcess, spawn_gateway, spawn_listening, spawn_sim

SLACK = 1.5  # seconds a busy machine may add to a process's exit


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with spawn_sim("--name", "a") as s:
        yield s


def config(sim: SimProcess, drain_timeout: float) -> dict[str, object]:
    return {
        "server": {"drain_timeout": drain_timeout},
        # A stalled stream must stay stalled: no idle timeout, no retry while we shut down.
        "timeouts": {"idle": 120, "first_token": 120},
        "models": {"m": {"deployments": [{"base_url": sim.base_url, "api_key": "sk-x"}]}},
    }


def wait_output(gw: GatewayProcess, pattern: str, within: float = 10.0) -> re.Match[str]:
    deadline = time.monotonic() + within
    while True:
        if m := re.search(pattern, gw.output_tail()):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"no /{pattern}/ in the output:\n{gw.output_tail()}")
        time.sleep(0.02)


def exit_within(gw: GatewayProcess, seconds: float) -> float:
    """Wait for the process to exit; returns how long it took."""
    start = time.monotonic()
    try:
        gw.proc.wait(seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {seconds}s later:\n{gw.output_tail()}") from None
    return time.monotonic() - start


async def open_stream(
    session: aiohttp.ClientSession, gw: GatewayProcess, prompt: str
) -> tuple[aiohttp.ClientResponse, bytes]:
    """A stream whose first frame has arrived (it is in flight at the gateway)."""
    resp = await session.post(
        gw.base_url + "/chat/completions",
        json={"model": "m", "stream": True, "messages": [{"role": "user", "content": prompt}]},
    )
    assert resp.status == 200
    first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
    assert first.startswith(b"data: {")
    return resp, first


def frames(raw: bytes) -> list[bytes]:
    return [f.removeprefix(b"data: ") for f in raw.split(b"\n\n") if f.strip()]


async def test_sigterm_lets_a_stream_in_flight_finish(sim: SimProcess, tmp_path) -> None:
    prompt = unique("drain") + " [[sim:delay=0.1,len=12]]"
    with spawn_gateway(config(sim, 10.0), workdir=str(tmp_path)) as gw:
        async with aiohttp.ClientSession() as s:
            resp, first = await open_stream(s, gw, prompt)
            gw.proc.send_signal(signal.SIGTERM)
            wait_output(gw, r"shutting down: 1 request in flight, waiting up to 10s")
            # Draining: the port no longer accepts connections.
            with pytest.raises(aiohttp.ClientConnectionError):
                async with aiohttp.ClientSession() as other:
                    await other.get(gw.url + "/healthz")
            rest = await asyncio.wait_for(resp.content.read(), 10)
        took = exit_within(gw, 5)
        assert gw.proc.returncode == 0
        wait_output(gw, r"drained in \d+\.\ds$|drained in \d+\.\ds\n")
    parts = frames(first + rest)
    assert parts[-1] == b"[DONE]" and parts.count(b"[DONE]") == 1
    text = "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in map(json.loads, parts[:-1])
        if c.get("choices")
    )
    assert text == answer_text(prompt, 12)  # the whole exact answer
    assert took < SLACK


async def test_drain_timeout_bounds_the_shutdown(sim: SimProcess, tmp_path) -> None:
    prompt = unique("stuck") + " [[sim:stall=2]]"  # stalls after two content chunks
    drain = 0.5
    with spawn_gateway(config(sim, drain), workdir=str(tmp_path)) as gw:
        async with aiohttp.ClientSession() as s:
            resp, _ = await open_stream(s, gw, prompt)
            start = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            # The client is not left hanging: its stream ends with the process.
            try:
                await asyncio.wait_for(resp.content.read(), drain + 1.0 + SLACK)
            except aiohttp.ClientPayloadError:
                pass  # the stream side has not written its error frame (see the next test)
        exit_within(gw, 5)
        took = time.monotonic() - start
        wait_output(gw, r"shutting down: 1 request in flight, waiting up to 0.5s")
        wait_output(gw, r"drain timeout: ending 1 request still in flight")
        wait_output(gw, r"drained in \d+\.\ds")
    assert drain <= took < drain + 1.0 + SLACK  # drain_timeout, then at most the grace


async def test_a_stream_cut_off_by_the_drain_timeout_ends_with_an_error_frame(
    sim: SimProcess, tmp_path
) -> None:
    """The stream side's part of the drain (see keel.gateway._http.Shutdown): a stream still
    running at the drain timeout ends well-formed, with an error frame and one [DONE]."""
    prompt = unique("stuck") + " [[sim:stall=2]]"
    with spawn_gateway(config(sim, 0.5), workdir=str(tmp_path)) as gw:
        async with aiohttp.ClientSession() as s:
            resp, _ = await open_stream(s, gw, prompt)
            gw.proc.send_signal(signal.SIGTERM)
            rest = await asyncio.wait_for(resp.content.read(), 5)
        exit_within(gw, 5)
    parts = frames(rest)
    assert parts[-1] == b"[DONE]" and parts.count(b"[DONE]") == 1, parts
    err = json.loads(parts[-2])["error"]
    assert err["code"] == "server_shutting_down", err
    assert "drain_timeout" in err["message"]


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
async def test_a_second_signal_stops_at_once(
    sim: SimProcess, tmp_path, second: signal.Signals
) -> None:
    prompt = unique("stuck") + " [[sim:stall=2]]"
    with spawn_gateway(config(sim, 60.0), workdir=str(tmp_path)) as gw:
        async with aiohttp.ClientSession() as s:
            resp, _ = await open_stream(s, gw, prompt)
            gw.proc.send_signal(signal.SIGTERM)
            wait_output(gw, r"shutting down: 1 request in flight, waiting up to 60s")
            gw.proc.send_signal(second)
            took = exit_within(gw, 5)
            try:
                await asyncio.wait_for(resp.content.read(), 5)
            except aiohttp.ClientPayloadError:
                pass
        wait_output(gw, rf"{second.name} received again: stopping now")
    assert took < SLACK


def test_the_open_file_soft_limit_is_raised_to_the_hard_limit(sim: SimProcess, tmp_path) -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip("needs a finite hard limit above 256")
    cfg = tmp_path / "keel.yaml"
    cfg.write_text(json.dumps(config(sim, 1.0)))  # JSON is YAML
    low = (
        "import resource, runpy, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, (256, {hard})); "
        f"sys.argv = ['keel', 'serve', '--config', {str(cfg)!r}, '--port', '0']; "
        "runpy.run_module('keel', run_name='__main__')"
    )
    with spawn_listening([sys.executable, "-c", low], r"keel listening on (\S+)") as gw:
        limits = Path(f"/proc/{gw.pid}/limits").read_text()
        line = next(ln for ln in limits.splitlines() if ln.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)], line
        # (the log line comes on stderr, the listening line on stdout: wait for it)
        wait_output(
            gw, re.escape(f"open-file limit {hard} (hard {hard}); at most {(hard - 64) // 2}")
        )  # type: ignore[arg-type]
