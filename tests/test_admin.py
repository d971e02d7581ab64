"""Operating a running gateway, end to end: real ``keel serve`` processes, real simulators,
counts of upstream attempts from the simulators' logs.

* the admin API's errors (401 without or with a wrong key, 404 for an unknown deployment or
  action, 400 for a bad body), all OpenAI-shaped;
* ``/readyz``: 200, then 503 naming the group and the cause once its only deployment's key is
  benched, 200 again after ``reset``;
* drain: a stream in flight on the drained deployment finishes; no new attempt reaches it;
  ``undrain`` puts it back; a group drained entirely answers 503 saying so;
* reload (``POST /admin/reload`` and SIGHUP): a stream in flight survives it, a new deployment
  serves after it, an unchanged one keeps its state, a bad file changes nothing;
* the ``[[sim:quota]]`` story on ``keel serve``'s built-in simulators.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import yaml

from gw_fixtures import UPSTREAM_KEY_A, UPSTREAM_KEY_B, unique
from keel.engine._reload import NoConfigFile
from keel.sim import answer_text
from keel.testing import GatewayProcess, SimProcess, spawn_gateway, spawn_listening
from limits_helpers import RedisServer, needs_redis

ADMIN = "adm-0123456789abcdef"
AUTH = {"authorization": f"Bearer {ADMIN}"}
SLOW = {"first_token": 10.0, "idle": 10.0}


def admin_config(a: str, b: str) -> dict[str, Any]:
    def dep(url: str, name: str, key: str, **kw: Any) -> dict[str, Any]:
        return {"base_url": url, "api_key": key, "name": name, "timeouts": SLOW, **kw}

    return {
        "server": {"admin_key": ADMIN, "api_keys": ["sk-client"]},
        "retry": {"backoff_base": 0.01, "backoff_cap": 0.05},
        "breaker": {"enabled": False},
        "models": {
            "duo": {
                "deployments": [
                    dep(a, "duo-a", UPSTREAM_KEY_A),
                    dep(b, "duo-b", UPSTREAM_KEY_B, dialect="dashscope"),
                ]
            },
            "lone": {"deployments": [dep(a, "lone-a", UPSTREAM_KEY_A)]},
            "narrow": {"deployments": [dep(a, "narrow-a", UPSTREAM_KEY_A, max_concurrency=1)]},
        },
    }


@pytest.fixture(scope="module")
def gw(
    sims: tuple[SimProcess, SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    a, b = sims
    cfg = admin_config(a.base_url, b.base_url)
    with spawn_gateway(cfg, workdir=str(tmp_path_factory.mktemp("admin"))) as g:
        yield g


def body(model: str, prompt: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": prompt}]}


CLIENT = {"authorization": "Bearer sk-client"}


async def post(
    s: aiohttp.ClientSession, url: str, data: Any = None, raw: bytes | None = None, **kw: Any
) -> tuple[int, Any]:
    if url.endswith("/chat/completions"):
        kw.setdefault("headers", CLIENT)
    async with s.post(url, json=data, data=raw, **kw) as r:
        return r.status, orjson.loads(await r.read())


async def get(s: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any]:
    async with s.get(url, **kw) as r:
        return r.status, orjson.loads(await r.read())


def deployment(state: dict[str, Any], name: str) -> dict[str, Any]:
    return next(d for g in state["groups"] for d in g["deployments"] if d["name"] == name)


async def stream_text(resp: aiohttp.ClientResponse) -> tuple[str, str | None]:
    """The content of a chat completion stream, and its finish_reason."""
    text, finish = [], None
    async for line in resp.content:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = orjson.loads(line[6:])
        for c in chunk.get("choices") or ():
            text.append(c["delta"].get("content") or "")
            finish = c.get("finish_reason") or finish
    return "".join(text), finish


async def logged(gw: GatewayProcess, pattern: str, within: float = 5.0) -> str:
    """The gateway's output line matching ``pattern`` (polled, bounded)."""
    deadline = time.monotonic() + within
    while True:
        if m := re.search(pattern, gw.output_tail()):
            return m.group(0)
        assert time.monotonic() < deadline, f"no log line /{pattern}/:\n{gw.output_tail()}"
        await asyncio.sleep(0.02)


# -- errors ------------------------------------------------------------------------------------


async def test_admin_errors_are_openai_shaped(gw: GatewayProcess) -> None:
    u = gw.url
    async with aiohttp.ClientSession() as s:
        for path in ("/admin/deployments/duo-a/reset", "/admin/reload"):
            status, err = await post(s, u + path)
            assert status == 401 and err["error"]["code"] == "invalid_api_key"
            status, err = await post(s, u + path, headers={"authorization": "Bearer nope"})
            assert status == 401 and err["error"]["code"] == "invalid_api_key"
        status, err = await get(s, u + "/admin/state", headers={"authorization": "Bearer x"})
        assert status == 401 and err["error"]["type"] == "invalid_request_error"
        assert ADMIN not in orjson.dumps(err).decode()

        status, err = await post(s, u + "/admin/deployments/nope/drain", headers=AUTH)
        assert (status, err["error"]["code"]) == (404, "deployment_not_found")
        assert err["error"]["message"] == (
            "No deployment is named 'nope'; this gateway has: duo-a, duo-b, lone-a, narrow-a."
        )
        status, err = await post(s, u + "/admin/deployments/duo-a/explode", headers=AUTH)
        assert (status, err["error"]["code"]) == (404, "unknown_url")

        reset = u + "/admin/deployments/duo-a/reset"
        status, err = await post(s, reset, raw=b"{nope", headers=AUTH)
        assert (status, err["error"]["code"]) == (400, "invalid_json")
        status, err = await post(s, reset, data=["why"], headers=AUTH)
        assert (status, err["error"]["code"]) == (400, "invalid_body")
        status, err = await post(s, reset, data={"reason": 5}, headers=AUTH)
        assert (status, err["error"]["param"]) == (400, "reason")
        status, err = await post(s, reset, data={"why": "x"}, headers=AUTH)
        assert (status, err["error"]["param"]) == (400, "why")
        # the gateway's own config came from a file; nothing of this changed anything
        status, state = await get(s, u + "/admin/state", headers=AUTH)
        assert status == 200 and {
            d["state"] for g in state["groups"] for d in g["deployments"]
        } == {"healthy"}


async def test_the_status_page_is_served_without_the_key_and_holds_no_data(
    gw: GatewayProcess,
) -> None:
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/status") as r:
        html = await r.text()
        assert r.status == 200 and r.content_type == "text/html"
        assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "<title>keel status</title>" in html
    assert "duo-a" not in html and ADMIN not in html and "http" not in html.split("<script>")[0]


# -- readiness ---------------------------------------------------------------------------------


async def test_readyz_names_the_group_that_cannot_serve_and_reset_brings_it_back(
    gw: GatewayProcess, sims: tuple[SimProcess, SimProcess]
) -> None:
    a = sims[0]
    u = gw.url
    async with aiohttp.ClientSession() as s:
        assert await get(s, u + "/readyz") == (200, {"status": "ready"})
        prompt = unique("bench-me")
        status, err = await post(
            s, u + "/v1/chat/completions", body("lone", f"{prompt} [[sim:quota]]")
        )
        assert (status, err["error"]["code"]) == (502, "insufficient_quota")
        status, ready = await get(s, u + "/readyz")
        assert status == 503 and list(ready["groups"]) == ["lone"]
        assert re.fullmatch(
            r"every deployment is benched: lone-a: key quota exhausted \(insufficient_quota\) "
            r"until \d\d:\d\d:\d\d UTC",
            ready["groups"]["lone"],
        ), ready
        # one attempt reached the simulator; the next request reaches none (benched)
        status, err = await post(s, u + "/v1/chat/completions", body("lone", prompt))
        assert status == 503 and "key out of rotation (quota)" in err["error"]["message"]
        assert len([e for e in a.log() if prompt in e.prompt]) == 1

        status, done = await post(
            s, u + "/admin/deployments/lone-a/reset", {"reason": "paid the bill", "by": "ops"},
            headers=AUTH,
        )  # fmt: skip
        assert status == 200 and done["changed"] and done["deployment"]["state"] == "healthy"
        await logged(
            gw, r"admin action reset on lone-a by admin \(ops\) from 127\.0\.0\.1: paid the bill"
        )
        assert await get(s, u + "/readyz") == (200, {"status": "ready"})
        status, ok = await post(s, u + "/v1/chat/completions", body("lone", prompt))
        assert status == 200 and ok["choices"][0]["message"]["content"] == answer_text(prompt)
        assert len([e for e in a.log() if prompt in e.prompt]) == 2


# -- drain -------------------------------------------------------------------------------------


async def test_drain_lets_the_stream_in_flight_finish_and_sends_nothing_new(
    gw: GatewayProcess, sims: tuple[SimProcess, SimProcess]
) -> None:
    by_name = {"duo-a": sims[0], "duo-b": sims[1]}
    u = gw.url
    prompt = unique("drain-stream")
    asked = f"{prompt} [[sim:len=60,delay=0.03]]"
    async with aiohttp.ClientSession() as s:
        async with s.post(
            u + "/v1/chat/completions", json=body("duo", asked, stream=True), headers=CLIENT
        ) as resp:
            assert resp.status == 200
            drained = resp.headers["x-keel-deployment"]
            other = "duo-b" if drained == "duo-a" else "duo-a"
            status, done = await post(
                s, f"{u}/admin/deployments/{drained}/drain", {"reason": "maintenance"}, headers=AUTH
            )
            assert status == 200 and done["changed"] and done["deployment"]["state"] == "drained"
            assert done["deployment"]["in_flight"] == 1  # the stream, still going
            async with s.get(u + "/metrics", headers=CLIENT) as m:  # a drain is not a benched key
                assert f'keel_deployment_benched{{deployment="{drained}",reason=""}} 0.0' in (
                    await m.text()
                )
            # new requests while it streams: every one goes to the other deployment
            others = [unique("while-drained") for _ in range(6)]
            for p in others:
                async with s.post(
                    u + "/v1/chat/completions", json=body("duo", p), headers=CLIENT
                ) as r:
                    assert r.status == 200 and r.headers["x-keel-deployment"] == other
            text, finish = await stream_text(resp)
        assert (text, finish) == (answer_text(asked, 60), "stop")
        await logged(
            gw, rf"admin action drain on {drained} by admin from 127\.0\.0\.1: maintenance"
        )
        log = by_name[drained].log()
        assert [e.finished for e in log if prompt in e.prompt] == [True]  # one attempt, complete
        assert not [e for e in log if any(p in e.prompt for p in others)]
        assert len([e for e in by_name[other].log() if any(p in e.prompt for p in others)]) == 6
        assert await get(s, u + "/readyz") == (200, {"status": "ready"})  # the other serves

        # the whole group drained: 503 saying so, and /readyz says it too
        await post(s, f"{u}/admin/deployments/{other}/drain", headers=AUTH)
        status, err = await post(s, u + "/v1/chat/completions", body("duo", unique("none")))
        assert status == 503 and "drained by an operator" in err["error"]["message"]
        status, ready = await get(s, u + "/readyz")
        assert status == 503 and ready["groups"]["duo"].startswith("every deployment is drained: ")

        # undrain the first: it takes the requests again (the other is still drained)
        status, done = await post(s, f"{u}/admin/deployments/{drained}/undrain", headers=AUTH)
        assert status == 200 and done["changed"] and done["deployment"]["state"] == "healthy"
        back = unique("undrained")
        async with s.post(u + "/v1/chat/completions", json=body("duo", back), headers=CLIENT) as r:
            assert r.status == 200 and r.headers["x-keel-deployment"] == drained
        assert len([e for e in by_name[drained].log() if back in e.prompt]) == 1
        status, again = await post(s, f"{u}/admin/deployments/{drained}/undrain", headers=AUTH)
        assert status == 200 and not again["changed"]
        await post(s, f"{u}/admin/deployments/{other}/undrain", headers=AUTH)
        assert await get(s, u + "/readyz") == (200, {"status": "ready"})


async def test_a_stream_that_breaks_on_a_drained_deployment_is_not_continued_there(
    gw: GatewayProcess, sims: tuple[SimProcess, SimProcess]
) -> None:
    """Drained mid-stream, the stream then breaks: a continuation would be a new attempt, so
    there is none — the client gets the answer's start and a well-formed error, and the
    simulator saw exactly one attempt. (Undrained, the same break is continued there.)"""
    u = gw.url
    async with aiohttp.ClientSession() as s:
        for drain in (True, False):
            prompt = unique(f"drain-break-{drain}")
            asked = f"{prompt} [[sim:trunc=20*1,len=60,delay=0.03]]"
            async with s.post(
                u + "/v1/chat/completions", json=body("lone", asked, stream=True), headers=CLIENT
            ) as resp:
                assert resp.status == 200
                if drain:
                    status, _ = await post(s, u + "/admin/deployments/lone-a/drain", headers=AUTH)
                    assert status == 200
                raw = await resp.read()
            attempts = [e for e in sims[0].log() if prompt in e.prompt]
            if drain:
                assert (
                    len(attempts) == 1 and b'"error"' in raw and raw.endswith(b"data: [DONE]\n\n")
                )
                assert b"lone-a" in raw  # the error names the attempt that broke
                await post(s, u + "/admin/deployments/lone-a/undrain", headers=AUTH)
            else:
                assert len(attempts) == 2 and b'"error"' not in raw  # continued on lone-a


async def test_a_request_waiting_for_room_on_a_drained_deployment_does_not_go_there(
    gw: GatewayProcess, sims: tuple[SimProcess, SimProcess]
) -> None:
    u = gw.url
    prompt, queued = unique("narrow-stream"), unique("narrow-queued")
    asked = f"{prompt} [[sim:len=40,delay=0.03]]"
    async with aiohttp.ClientSession() as s:
        async with s.post(
            u + "/v1/chat/completions", json=body("narrow", asked, stream=True), headers=CLIENT
        ) as resp:
            waiting = asyncio.create_task(
                post(s, u + "/v1/chat/completions", body("narrow", queued))
            )
            deadline = time.monotonic() + 5
            while (
                deployment((await get(s, u + "/admin/state", headers=AUTH))[1], "narrow-a")[
                    "queued"
                ]
                != 1
            ):
                assert time.monotonic() < deadline and not waiting.done()
                await asyncio.sleep(0.02)
            await post(s, u + "/admin/deployments/narrow-a/drain", headers=AUTH)
            text, finish = await stream_text(resp)
        assert (text, finish) == (answer_text(asked, 40), "stop")
        status, err = await waiting
        assert status == 503 and "narrow-a: drained by an operator" in err["error"]["message"]
        assert not [e for e in sims[0].log() if queued in e.prompt]
        await post(s, u + "/admin/deployments/narrow-a/undrain", headers=AUTH)


async def test_state_reports_load_latency_errors_and_history(gw: GatewayProcess) -> None:
    async with aiohttp.ClientSession() as s:
        prompt = unique("state")
        status, _ = await post(s, gw.url + "/v1/chat/completions", body("lone", prompt))
        assert status == 200
        async with s.post(
            gw.url + "/v1/chat/completions", json=body("lone", prompt, stream=True), headers=CLIENT
        ) as r:
            await stream_text(r)
        status, _ = await post(
            s, gw.url + "/v1/chat/completions", body("lone", f"{prompt}-x [[sim:e500*1]]")
        )
        assert status == 200  # retried
        status, state = await get(s, gw.url + "/admin/state", headers=AUTH)
    assert status == 200 and state["object"] == "keel.state" and state["ready"]
    assert [g["name"] for g in state["groups"]] == ["duo", "lone", "narrow"]
    d = deployment(state, "lone-a")
    assert d["state"] == "healthy" and d["in_flight"] == 0 and d["queued"] == 0
    assert d["limit"] is None  # no max_concurrency, nothing learned
    assert all(v is not None and v > 0 for v in d["latency_ms"].values())
    assert d["first_token_ms"]["p50"] is not None
    assert d["attempts_last_minute"] >= 4 and d["error_rate"]["server"] > 0
    (f, *_) = d["recent_failures"]
    assert (f["kind"], f["status"]) == ("server", 500)
    assert (
        d["endpoint"].startswith("http://127.0.0.1:") and "sk-" not in orjson.dumps(state).decode()
    )
    assert d["history"]["step"] == 5.0 and len(d["history"]["attempts"]) >= 1


# -- reload ------------------------------------------------------------------------------------


def write(path: Path, cfg: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(cfg))


async def test_reload_keeps_streams_in_flight_and_adds_deployments(
    sims: tuple[SimProcess, SimProcess], tmp_path: Path
) -> None:
    a, b = sims

    def dep(url: str, name: str, **kw: Any) -> dict[str, Any]:
        return {"base_url": url, "api_key": UPSTREAM_KEY_A, "name": name, "timeouts": SLOW, **kw}

    cfg: dict[str, Any] = {
        "server": {"admin_key": ADMIN, "api_keys": ["sk-client"]},
        "breaker": {"enabled": False},
        "models": {
            "m1": {"deployments": [dep(a.base_url, "r-a")]},
            "q": {"deployments": [dep(a.base_url, "r-q")]},
        },
    }
    path = tmp_path / "keel.yaml"
    write(path, cfg)
    prompt = unique("reload-stream")
    asked = f"{prompt} [[sim:len=60,delay=0.03]]"
    with spawn_gateway(str(path)) as gw:
        u = gw.url
        async with aiohttp.ClientSession() as s:
            # r-q's key benched before the reload: unchanged, it stays benched after it
            await post(s, u + "/v1/chat/completions", body("q", f"{unique('q')} [[sim:quota]]"))
            async with s.post(
                u + "/v1/chat/completions", json=body("m1", asked, stream=True), headers=CLIENT
            ) as resp:
                assert resp.status == 200 and resp.headers["x-keel-deployment"] == "r-a"
                # the stream's own deployment changes (a timeout), a group and deployment are added
                cfg["models"]["m1"]["deployments"][0]["timeouts"] = {
                    "first_token": 9.0,
                    "idle": 9.0,
                }
                cfg["models"]["m2"] = {"deployments": [dep(b.base_url, "r-b", dialect="dashscope")]}
                write(path, cfg)
                status, result = await post(
                    s, u + "/admin/reload", {"reason": "add m2"}, headers=AUTH
                )
                assert status == 200, result
                assert result == {
                    "object": "keel.reload",
                    "added": ["r-b"],
                    "removed": [],
                    "changed": ["r-a"],
                    "kept": ["r-q"],
                    "restart_needed": [],
                }
                text, finish = await stream_text(resp)
            assert (text, finish) == (answer_text(asked, 60), "stop")
            assert [e.finished for e in a.log() if prompt in e.prompt] == [True]
            await logged(
                gw, r"admin action reload on \S+keel\.yaml by admin from 127\.0\.0\.1: add m2"
            )

            new = unique("after-reload")
            status, ok = await post(s, u + "/v1/chat/completions", body("m2", new))
            assert status == 200 and ok["choices"][0]["message"]["content"] == answer_text(new)
            assert len([e for e in b.log() if new in e.prompt]) == 1
            status, state = await get(s, u + "/admin/state", headers=AUTH)
            assert deployment(state, "r-b")["state"] == "healthy"
            assert deployment(state, "r-q")["state"] == "benched"  # kept, with its state

            # a file that is not valid: 400 naming it, and the running config stays
            path.write_text("models: [not, a, mapping")
            status, err = await post(s, u + "/admin/reload", headers=AUTH)
            assert (status, err["error"]["code"]) == (400, "invalid_config")
            assert "is not valid YAML" in err["error"]["message"]
            # a section that needs a restart is reported, not applied
            cfg["server"]["max_body_bytes"] = 1234
            cfg["models"]["m3"] = {"deployments": [dep(a.base_url, "r-c")]}
            del cfg["models"]["m2"]
            write(path, cfg)
            gw.proc.send_signal(signal.SIGHUP)  # what POST /admin/reload does
            line = await logged(gw, r"SIGHUP: reloaded .*")
            assert "added ['r-c'], removed ['r-b']" in line
            await logged(gw, r"reload: changes to server need a restart; running on the old")
            status, state = await get(s, u + "/admin/state", headers=AUTH)
            assert [g["name"] for g in state["groups"]] == ["m1", "m3", "q"]  # (the file's order)
            status, err = await post(s, u + "/v1/chat/completions", body("m2", new))
            assert (status, err["error"]["code"]) == (404, "model_not_found")


# -- the [[sim:quota]] story on the built-in simulators ----------------------------------------


def builtin(env: dict[str, str] | None = None) -> Any:
    return spawn_listening(
        [sys.executable, "-m", "keel", "serve", "--port", "0"],
        r"keel listening on (\S+)",
        env=env,
    )


async def test_a_simulated_quota_fault_shows_in_readyz_and_an_admin_reset_undoes_it() -> None:
    with builtin({"KEEL_ADMIN_KEY": ADMIN}) as gw:
        u = gw.url
        client = openai.AsyncOpenAI(base_url=u + "/v1", api_key="sk-anything", max_retries=0)
        prompt = unique("quota-story")
        with pytest.raises(openai.InternalServerError) as exc:  # 502: keel's upstream account
            await client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": f"{prompt} [[sim:quota]]"}]
            )
        assert (exc.value.status_code, exc.value.code) == (502, "insufficient_quota")
        async with aiohttp.ClientSession() as s:
            status, ready = await get(s, u + "/readyz")
            assert status == 503, ready
            assert re.fullmatch(
                r"every deployment is benched: "
                r"sim-a: key quota exhausted \(insufficient_quota\) until \d\d:\d\d:\d\d UTC; "
                r"sim-b: key quota exhausted \(insufficient_quota\) until \d\d:\d\d:\d\d UTC",
                ready["groups"]["chat"],
            ), ready
            # Without a reset every request fails at once, naming why.
            with pytest.raises(openai.APIStatusError) as exc2:
                await client.chat.completions.create(
                    model="chat", messages=[{"role": "user", "content": prompt}]
                )
            assert exc2.value.status_code == 503 and "key out of rotation (quota)" in str(
                exc2.value
            )
            # The fault was that request's alone: the simulators themselves answer.
            status, state = await get(s, u + "/admin/state", headers=AUTH)
            for d in state["groups"][0]["deployments"]:
                assert d["recent_failures"][0]["kind"] == "quota"
                status, direct = await post(
                    s, d["endpoint"] + "/v1/chat/completions", body("sim", prompt)
                )
                assert status == 200 and direct["choices"][0]["message"]["content"] == answer_text(
                    prompt
                )
            for name in ("sim-a", "sim-b"):
                status, done = await post(
                    s, f"{u}/admin/deployments/{name}/reset", {"reason": "it was a test"},
                    headers=AUTH,
                )  # fmt: skip
                assert status == 200 and done["deployment"]["state"] == "healthy"
            assert await get(s, u + "/readyz") == (200, {"status": "ready"})
        answer = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": prompt}]
        )
        assert answer.choices[0].message.content == answer_text(prompt)
        await client.close()


async def test_the_built_in_config_prints_a_status_link_with_a_key_of_its_own() -> None:
    with builtin() as gw:
        deadline = time.monotonic() + 5
        while not (m := re.search(r"status page: (\S+)/status#key=(\S+)", gw.output_tail())):
            assert time.monotonic() < deadline, gw.output_tail()
            await asyncio.sleep(0.02)
        assert m.group(1) == gw.url
        key = m.group(2)
        async with aiohttp.ClientSession() as s:
            status, state = await get(
                s, gw.url + "/admin/state", headers={"authorization": f"Bearer {key}"}
            )
            assert status == 200 and [d["name"] for d in state["groups"][0]["deployments"]] == [
                "sim-a",
                "sim-b",
            ]
            status, _ = await get(s, gw.url + "/admin/state", headers=AUTH)
            assert status == 401
        assert gw.output_tail().count(key) == 1  # printed once, logged nowhere


# -- with Redis: a reset is not undone by the health this replica published ----------------------


@needs_redis
async def test_a_reset_holds_when_the_bench_was_shared_through_redis(
    sims: tuple[SimProcess, SimProcess], tmp_path: Path
) -> None:
    redis = RedisServer()
    redis.start()
    try:
        cfg = {
            "redis_url": redis.url,
            "server": {"admin_key": ADMIN, "api_keys": ["sk-client"]},
            "models": {
                "one": {"deployments": [{"base_url": sims[0].base_url, "name": "shared-a"}]}
            },
        }
        key = b"keel:health:shared-a"
        with spawn_gateway(cfg, workdir=str(tmp_path)) as gw:
            async with aiohttp.ClientSession() as s:
                prompt = unique("shared-bench")
                status, _ = await post(
                    s, gw.url + "/v1/chat/completions", body("one", f"{prompt} [[sim:quota]]")
                )
                assert status == 502
                await until(lambda: redis.command("HGET", key, "bench") is not None)
                status, done = await post(
                    s, gw.url + "/admin/deployments/shared-a/reset", headers=AUTH
                )
                assert status == 200 and done["deployment"]["state"] == "healthy"
                await until(lambda: redis.command("EXISTS", key) == 0)
                # two syncs (heartbeats) after the deletion: the bench was not applied again
                for _ in range(2):
                    sec, usec = redis.command("TIME")
                    t = int(sec) * 1000 + int(usec) / 1000

                    def synced(t: float = t) -> bool:
                        (_, score), *_ = redis.command(
                            "ZRANGE", b"keel:replicas", 0, -1, "WITHSCORES"
                        )
                        return float(score) > t

                    await until(synced)
                assert await get(s, gw.url + "/readyz") == (200, {"status": "ready"})
                status, ok = await post(s, gw.url + "/v1/chat/completions", body("one", prompt))
                assert status == 200 and ok["choices"][0]["message"]["content"] == answer_text(
                    prompt
                )
    finally:
        redis.kill()


async def until(cond: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(cond):
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.02)


# -- the library: the same snapshot, readiness and reload in-process ----------------------------


async def test_the_library_reads_and_reloads_its_engine(sim: Any) -> None:
    from keel import Keel
    from keel.config import parse_config

    def config(*names: str) -> dict[str, Any]:
        deps = [{"base_url": sim.base_url, "api_key": "sk-x", "name": n} for n in names]
        return {"breaker": {"enabled": False}, "models": {"m": {"deployments": deps}}}

    async with Keel.from_config(config("lib-a")) as gw:
        prompt = unique("library")
        answer = await gw.chat(body("m", prompt))
        assert answer["choices"][0]["message"]["content"] == answer_text(prompt)
        (d,) = gw.snapshot()["groups"][0]["deployments"]
        assert (d["name"], d["state"], d["attempts_last_minute"]) == ("lib-a", "healthy", 1)
        assert gw.readiness() == {}
        gw.router.groups["m"][0].drain()
        assert gw.readiness() == {"m": "every deployment is drained: lib-a: drained by an operator"}
        kept = gw.router.groups["m"][0]
        result = gw.reload(parse_config(config("lib-a", "lib-b")))
        assert (result["added"], result["kept"]) == (["lib-b"], ["lib-a"])
        assert gw.router.groups["m"][0] is kept and kept.drained  # carried over as it was
        assert gw.readiness() == {}  # lib-b can serve
        answer = await gw.chat(body("m", prompt))
        assert answer["choices"][0]["message"]["content"] == answer_text(prompt)
        with pytest.raises(NoConfigFile):
            gw.reload()  # not started from a file
