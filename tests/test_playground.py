"""GET /playground in headless Chromium: a chat over the WebSocket that survives a network
drop. The browser reaches keel through a TCP proxy that the test cuts mid-answer; the page
reconnects by itself and resumes, and the answer it shows is the simulator's exact text, with
no duplicate and no gap. The browser is driven over the DevTools protocol (a WebSocket, with
aiohttp's client); the test takes a screenshot (kept in the test's tmp dir and, when
``KEEL_SCREENSHOT_DIR`` is set, copied there)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gw_fixtures import unique
from keel.sim import answer_text
from keel.testing import GatewayProcess, SimProcess, spawn_gateway
from test_resume import resume_config
from ws_helpers import CutProxy, one_closed, sim_entries

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="chromium is not installed"
)


class Browser:
    """Headless Chromium and one page, over the DevTools protocol."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []  # what arrived meanwhile (console, dialogs, …)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        mid = next(self._ids)
        await self.ws.send_str(
            orjson.dumps({"id": mid, "method": method, "params": params}).decode()
        )
        while True:
            msg = await self.ws.receive(30)
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            m = orjson.loads(msg.data)
            if m.get("id") == mid:
                assert "error" not in m, m
                result: dict[str, Any] = m["result"]
                return result
            if "method" in m:
                self.events.append(m)

    async def eval(self, expression: str) -> Any:
        r = await self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        assert "exceptionDetails" not in r, r
        return r["result"].get("value")

    async def until(self, expression: str, within: float = 20.0) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not (value := await self.eval(expression)):
            assert loop.time() < deadline, f"page condition not met: {expression}"
            await asyncio.sleep(0.02)
        return value


@contextlib.asynccontextmanager
async def chromium(tmp: Path) -> AsyncIterator[Browser]:
    assert CHROMIUM is not None, "chromium must be installed (.ci/run installs it)"
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-dev-shm-usage", "--remote-debugging-port=0", f"--user-data-dir={tmp}",
        "--window-size=900,700", "about:blank",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = b""
        while b"DevTools listening on" not in line:
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            assert line, "chromium exited before it listened"
        m = re.search(rb"ws://127\.0\.0\.1:(\d+)/", line)
        assert m is not None, line
        port = int(m.group(1))
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/json/list") as r:
                pages = [t for t in await r.json() if t["type"] == "page"]
            async with s.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                b = Browser(ws)
                await b.call("Page.enable")
                await b.call("Runtime.enable")
                yield b
    finally:
        proc.kill()
        await proc.wait()


def _keep(path: Path, png: bytes) -> None:
    path.write_bytes(png)
    if out := os.environ.get("KEEL_SCREENSHOT_DIR"):
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(out) / "playground.png")


@pytest.fixture(scope="module")
def gw(
    sims: tuple[SimProcess, SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    with spawn_gateway(
        resume_config(sims[0].base_url), workdir=str(tmp_path_factory.mktemp("pg"))
    ) as g:
        yield g


async def test_the_playground_survives_a_network_drop(gw, sims, tmp_path) -> None:
    sim = sims[0]
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    proxy = await CutProxy(host, int(port)).start()
    prompt = unique("browser")
    asked = f"{prompt} [[sim:len=120,delay=0.02]]"
    try:
        async with chromium(tmp_path / "profile") as b:
            await b.call("Page.navigate", url=f"{proxy.url}/playground?model=m&token=sk-alice")
            await b.until("window.keel && window.keel.open")
            rid = await b.eval(f"window.keelAsk({orjson.dumps(asked).decode()})")
            await b.until(f"window.keel.requests[{rid!r}].seq >= 15")
            proxy.cut()  # the network drops mid-answer
            await b.until("window.keel.reconnects >= 1")
            done = await b.until(
                f"window.keel.requests[{rid!r}].done && window.keel.requests[{rid!r}]"
            )
            stats = await b.eval(
                "({d: keel.duplicates, g: keel.gaps, r: keel.reconnects, open: keel.open})"
            )
            shown = await b.eval(
                "document.querySelectorAll('.assistant')[0].firstChild.textContent"
            )
            status = await b.eval("document.getElementById('status').textContent")
            shot = await b.call("Page.captureScreenshot", format="png")
    finally:
        await proxy.close()
    png = base64.b64decode(shot["data"])
    path = tmp_path / "playground.png"
    await asyncio.to_thread(_keep, path, png)
    print(
        f"\nplayground: reconnected {stats['r']}x, answer exact, screenshot {path} ({len(png)} bytes)"
    )
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    assert done["text"] == answer_text(asked, 120) == shown
    assert done["resumed"] >= 1 and not done.get("error") and done["finish"] == "stop"
    assert stats == {"d": 0, "g": 0, "r": stats["r"], "open": True} and stats["r"] >= 1
    assert "reconnected" in status
    (e,) = await sim_entries(sim, prompt, one_closed)
    assert e.finished and not e.client_disconnected  # one upstream request, not restarted


@pytest.fixture(scope="module")
def open_gw(
    sims: tuple[SimProcess, SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """No client keys: a browser's EventSource cannot send an Authorization header."""
    cfg = resume_config(sims[0].base_url)
    del cfg["server"]
    with spawn_gateway(cfg, workdir=str(tmp_path_factory.mktemp("pg-open"))) as g:
        yield g


async def test_chromiums_own_event_source_reconnects_with_last_event_id(
    open_gw, sims, tmp_path
) -> None:
    """The browser's EventSource on GET /v1/streams/{id}: the network drops mid-stream, it
    reconnects by itself (after its own retry delay) sending Last-Event-ID, and gets exactly
    the rest; after [DONE] the page closes it."""
    sim = sims[0]
    host, port = open_gw.url.removeprefix("http://").rsplit(":", 1)
    proxy = await CutProxy(host, int(port)).start()
    prompt = unique("browser-eventsource")
    body = {
        "model": "m",
        "stream": True,
        "messages": [{"role": "user", "content": f"{prompt} [[sim:len=300,delay=0.02]]"}],
    }
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                open_gw.url + "/v1/chat/completions",
                json=body,
                headers={"x-keel-resumable": "true"},
            ) as resp,
        ):
            sid = resp.headers["x-keel-stream-id"]  # and leave: the stream goes on
        async with chromium(tmp_path / "profile") as b:
            await b.call("Page.navigate", url=f"{proxy.url}/healthz")  # the stream's origin
            await b.until("document.readyState === 'complete'")
            await b.eval(
                "window.es = {events: [], errors: 0};"
                f"const src = new EventSource('/v1/streams/{sid}');"
                "src.onmessage = (e) => { window.es.events.push([e.lastEventId, e.data]);"
                "  if (e.data === '[DONE]') { src.close(); window.es.closed = true; } };"
                "src.onerror = () => { window.es.errors++; };"
            )
            await b.until("window.es.events.length >= 20")
            proxy.cut()
            await b.until("window.es.closed", within=30)
            es = await b.eval("window.es")
    finally:
        await proxy.close()
    ids = [i for i, _ in es["events"]]
    assert ids == [f"{sid}:{n}" for n in range(len(ids))]  # no duplicate, no gap
    assert es["errors"] >= 1  # it saw the drop, and came back by itself
    chunks = [orjson.loads(d) for _, d in es["events"][:-1]]
    assert "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
    ) == answer_text(prompt, 300)
    (e,) = await sim_entries(sim, prompt, one_closed)
    assert e.finished
