"""GET /status in headless Chromium (driven over the DevTools protocol, as in
tests/test_playground.py): without the admin key the page shows readiness only and asks for
the key; opened with it (``#key=…``) it shows every deployment, reflects one being ejected
(breaker open) and one being benched (quota) within 2 s, and its Reset button puts a
deployment back. No console errors, no exceptions, no failed loads; readable at a phone's
width. Screenshots are kept in the test's tmp dir (and ``KEEL_SCREENSHOT_DIR`` when set)."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gw_fixtures import UPSTREAM_KEY_A, UPSTREAM_KEY_B, unique
from keel.testing import GatewayProcess, SimProcess, spawn_gateway
from test_admin import logged
from test_playground import CHROMIUM, Browser, chromium

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="chromium is not installed"
)

ADMIN = "adm-status-page-0123456789"
CLIENT = {"authorization": "Bearer sk-client"}
NAMES = ["steady-a", "steady-b", "eject-a", "bench-b"]


@pytest.fixture(scope="module")
def gw(
    sims: tuple[SimProcess, SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    a, b = sims

    def dep(url: str, name: str, key: str) -> dict[str, Any]:
        return {"base_url": url, "api_key": key, "name": name}

    cfg = {
        "server": {"admin_key": ADMIN, "api_keys": ["sk-client"]},
        "retry": {"backoff_base": 0.01, "backoff_cap": 0.05, "max_retries_per_deployment": 2},
        # three failures in a row open a breaker, for a minute
        "breaker": {"failures": 3, "cooldown": 60.0, "max_cooldown": 60.0},
        "models": {
            "steady": {
                "deployments": [
                    dep(a.base_url, "steady-a", UPSTREAM_KEY_A),
                    dep(b.base_url, "steady-b", UPSTREAM_KEY_B),
                ]
            },
            "eject": {"deployments": [dep(a.base_url, "eject-a", UPSTREAM_KEY_A)]},
            "bench": {"deployments": [dep(b.base_url, "bench-b", UPSTREAM_KEY_B)]},
        },
    }
    with spawn_gateway(cfg, workdir=str(tmp_path_factory.mktemp("status"))) as g:
        yield g


async def chat(s: aiohttp.ClientSession, gw: GatewayProcess, model: str, prompt: str) -> int:
    msgs = [{"role": "user", "content": prompt}]
    async with s.post(
        gw.url + "/v1/chat/completions", json={"model": model, "messages": msgs}, headers=CLIENT
    ) as r:
        await r.read()
        return r.status


def problems(b: Browser) -> list[Any]:
    """Console errors, uncaught exceptions and failed loads the page produced."""
    out = []
    for e in b.events:
        m, p = e["method"], e.get("params", {})
        if m == "Runtime.exceptionThrown":
            out.append(p["exceptionDetails"])
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append(p["args"])
        elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
            out.append(p["entry"])
    return out


async def answer_dialog(b: Browser, text: str) -> None:
    """The page's prompt() (why an action is taken): answer it. While a dialog is open the
    page runs no script, so wait for its event on the protocol itself."""
    while not any(e["method"] == "Page.javascriptDialogOpening" for e in b.events):
        msg = await b.ws.receive(5)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        if "method" in (m := orjson.loads(msg.data)):
            b.events.append(m)
    b.events = [e for e in b.events if e["method"] != "Page.javascriptDialogOpening"]
    await b.call("Page.handleJavaScriptDialog", accept=True, promptText=text)


def _keep(path: Path, png: bytes) -> None:
    path.write_bytes(png)
    if out := os.environ.get("KEEL_SCREENSHOT_DIR"):
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(out) / path.name)


async def shot(b: Browser, path: Path) -> int:
    png = base64.b64decode((await b.call("Page.captureScreenshot", format="png"))["data"])
    await asyncio.to_thread(_keep, path, png)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    return len(png)


def state_of(name: str) -> str:
    return f"document.querySelector('[data-deployment=\"{name}\"]')?.dataset.state"


async def test_the_status_page_shows_every_deployment_and_follows_their_state(
    gw: GatewayProcess, sims: tuple[SimProcess, SimProcess], tmp_path: Path
) -> None:
    async with aiohttp.ClientSession() as s, chromium(tmp_path / "profile") as b:
        await b.call("Log.enable")
        # No key: readiness only, a prompt for the key, no call to /admin/state.
        await b.call("Page.navigate", url=f"{gw.url}/status")
        await b.until("window.keelStatus && keelStatus.polls >= 1 && keelStatus.mode === 'public'")
        assert await b.eval("getComputedStyle(document.getElementById('login')).display") == "flex"
        assert await b.eval("document.querySelectorAll('[data-deployment]').length") == 0
        assert await b.eval("document.getElementById('overall').textContent") == "ready"

        # With the key in the fragment (never sent to the server): the admin view.
        await b.call("Page.navigate", url=f"{gw.url}/status#key={ADMIN}")
        await b.until("keelStatus.mode === 'admin' && keelStatus.polls >= 1")
        shown = await b.eval(
            "[...document.querySelectorAll('[data-deployment]')].map(e => e.dataset.deployment)"
        )
        assert sorted(shown) == sorted(NAMES)
        assert await b.eval("location.hash") == ""  # the key left the address bar
        assert {await b.eval(state_of(n)) for n in NAMES} == {"healthy"}

        # Eject one (three 500s in a row open its breaker) and bench another (quota): the
        # page shows both within 2 s of the request that did it.
        assert await chat(s, gw, "eject", f"{unique('eject')} [[sim:e500]]") == 502
        await b.until(f"{state_of('eject-a')} === 'ejected'", within=2.0)
        assert await chat(s, gw, "bench", f"{unique('bench')} [[sim:quota]]") == 502
        await b.until(f"{state_of('bench-b')} === 'benched'", within=2.0)
        why = await b.eval(
            "document.querySelector('[data-deployment=\"bench-b\"] .why').textContent"
        )
        assert why.startswith("key quota exhausted (insufficient_quota) until ") and why.endswith(
            " UTC"
        )
        group_why = await b.eval(
            "document.querySelector('[data-group=\"bench\"] > .why').textContent"
        )
        assert group_why.startswith("every deployment is benched: bench-b: key quota exhausted")
        assert await b.eval("document.getElementById('overall').textContent") == "not ready"
        failures = await b.eval(
            "document.querySelector('[data-deployment=\"eject-a\"] details summary').textContent"
        )
        assert failures == "recent failures (3)"
        path = tmp_path / "status.png"
        size = await shot(b, path)
        print(f"\nstatus page: screenshot {path} ({size} bytes)")

        # The Reset button (the page asks why) puts the benched one back.
        await b.eval(
            "setTimeout(() => document.querySelector('[data-deployment=\"bench-b\"] [data-action=reset]').click(), 0)"
        )
        await answer_dialog(b, "browser test")
        await b.until(f"{state_of('bench-b')} === 'healthy'", within=2.0)
        assert (
            await b.eval("document.getElementById('message').textContent") == "reset bench-b: done"
        )
        assert await chat(s, gw, "bench", unique("bench-again")) == 200
        await logged(gw, r"admin action reset on bench-b by admin from 127\.0\.0\.1: browser test")

        # Readable on a phone: nothing wider than the screen.
        await b.call(
            "Emulation.setDeviceMetricsOverride",
            width=390,
            height=844,
            deviceScaleFactor=2,
            mobile=True,
        )
        await b.until("keelStatus.polls >= 1 && document.documentElement.scrollWidth <= innerWidth")
        phone = tmp_path / "status-phone.png"
        size = await shot(b, phone)
        print(f"status page (phone): screenshot {phone} ({size} bytes)")
        assert problems(b) == []
        # The page's state came from one source: the same as GET /admin/state.
        async with s.get(
            gw.url + "/admin/state", headers={"authorization": f"Bearer {ADMIN}"}
        ) as r:
            state = orjson.loads(await r.read())
        assert [d["name"] for g in state["groups"] for d in g["deployments"]] == shown
        # put the ejected one back too, for whoever uses these simulators next
        async with s.post(
            gw.url + "/admin/deployments/eject-a/reset",
            headers={"authorization": f"Bearer {ADMIN}"},
        ) as r:
            assert r.status == 200
