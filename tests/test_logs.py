"""keel's log lines, read from a real ``keel serve``: ``--log-format json`` gives one JSON object
per line, one access line per request with what an operator asks first, one line per decision
worth knowing — and never a key, never a prompt unless ``logging.log_bodies`` is set."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from gw_fixtures import UPSTREAM_KEY_A, UPSTREAM_KEY_B, entries_for, unique
from keel.testing import GatewayProcess, SimProcess, spawn_gateway

CLIENT_KEY = "sk-client-alice-0123456789abcdef"


def _config(a: SimProcess, b: SimProcess, **logging: Any) -> dict[str, Any]:
    def dep(url: str, key: str, name: str, **kw: Any) -> dict[str, Any]:
        fast = {"first_token": 2, "idle": 0.5}
        return {"base_url": url, "api_key": key, "name": name, "timeouts": fast, **kw}

    cfg: dict[str, Any] = {
        "server": {"api_keys": []},
        "clients": {"alice": {"key": CLIENT_KEY}},
        "retry": {"backoff_base": 0.01, "backoff_cap": 0.05},
        "breaker": {"enabled": False},
        "models": {
            "chat": {
                "deployments": [dep(a.base_url, UPSTREAM_KEY_A, "log-a", continuation="prefill")]
            },
            # a key out of quota is benched; the fallback answers
            "quota": {
                "deployments": [dep(a.base_url, UPSTREAM_KEY_A, "log-quota")],
                "fallbacks": ["backup"],
            },
            "backup": {
                "deployments": [dep(b.base_url, UPSTREAM_KEY_B, "log-b", dialect="dashscope")]
            },
        },
    }
    if logging:
        cfg["logging"] = logging
    return cfg


async def _post(gw: GatewayProcess, body: dict[str, Any], key: str = CLIENT_KEY) -> int:
    headers = {"authorization": f"Bearer {key}"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base_url + "/chat/completions", json=body, headers=headers) as r,
    ):
        await r.read()
        return r.status


def _lines(gw: GatewayProcess) -> list[str]:
    return [ln for ln in gw.output_tail().splitlines() if ln.strip()]


def _json_lines(gw: GatewayProcess) -> list[dict[str, Any]]:
    """Every line but the listening line on stdout, each one JSON object."""
    out = []
    for ln in _lines(gw):
        if ln.startswith("keel listening on "):
            continue
        out.append(json.loads(ln))  # fails the test on any line that is not JSON
    return out


def _access(lines: list[dict[str, Any]], rid_or_model: str) -> dict[str, Any]:
    found = [
        e
        for e in lines
        if e.get("event") == "access" and rid_or_model in (e["request_id"], e["model"])
    ]
    assert len(found) == 1, found
    return found[0]


async def test_json_access_and_decision_lines(sims, tmp_path) -> None:
    a, b = sims
    with spawn_gateway(_config(a, b), "--log-format", "json", workdir=str(tmp_path)) as gw:
        plain = unique("plain")
        assert (
            await _post(gw, {"model": "chat", "messages": [{"role": "user", "content": plain}]})
            == 200
        )
        cut = unique("cut")
        body = {
            "model": "chat",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"{cut} [[sim:trunc=5*1]]"}],
        }
        assert await _post(gw, body) == 200
        quota = unique("quota")
        body = {
            "model": "quota",
            "messages": [{"role": "user", "content": f"{quota} [[sim@a:quota]]"}],
        }
        assert await _post(gw, body) == 200
        assert await _post(gw, {"model": "chat", "messages": []}, key="sk-wrong-key-777") == 401
    lines = _json_lines(gw)
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in lines)
    access = [e for e in lines if e.get("event") == "access"]
    assert len(access) == 4  # one per request, the refused one included
    assert all(e["logger"] == "keel.access" and e["level"] == "info" for e in access)

    first, stream, failover, refused = access
    assert first["principal"] == "alice" and first["model"] == "chat"
    assert first["deployments"] == ["log-a"] and first["attempts"] == 1
    assert first["status"] == 200 and first["finish_reason"] == "stop" and first["error"] is None
    assert first["stream"] is False and first["first_token_ms"] is None
    assert first["total_ms"] > 0
    (entry,) = entries_for(a, plain)
    assert first["output_tokens"] == entry.tokens and first["input_tokens"] > 0

    assert stream["stream"] is True and stream["status"] == 200
    assert stream["deployments"] == ["log-a", "log-a"] and stream["attempts"] == 2
    assert stream["attempt_kinds"] == ["first", "continuation"]
    assert 0 < stream["first_token_ms"] <= stream["total_ms"]
    cut1, cut2 = entries_for(a, cut)
    assert stream["output_tokens"] == cut1.tokens + cut2.tokens

    assert failover["deployments"] == ["log-quota", "log-b"]
    assert failover["attempt_kinds"] == ["first", "failover"] and failover["status"] == 200

    assert refused["status"] == 401 and refused["error"] == "invalid_api_key"
    assert refused["attempts"] == 0 and refused["principal"] == ""

    # decisions, each one line with its event
    (cont,) = [e for e in lines if e.get("event") == "continuation"]
    assert cont["deployment"] == "log-a" and cont["mode"] == "prefill" and cont["after_tokens"] == 5
    assert cont["request_id"] == stream["request_id"]
    (benched,) = [e for e in lines if e.get("event") == "benched"]
    assert benched["deployment"] == "log-quota" and benched["reason"] == "quota"
    assert benched["level"] == "error" and benched["seconds"] == 3600

    # never a key (client or upstream), never a prompt
    text = "\n".join(_lines(gw))
    for secret in (CLIENT_KEY, UPSTREAM_KEY_A, UPSTREAM_KEY_B, "sk-wrong-key-777"):
        assert secret not in text
    for prompt in (plain, cut, quota):
        assert prompt not in text


async def test_bodies_only_when_asked(sims, tmp_path) -> None:
    a, b = sims
    cfg = _config(a, b, format="json", log_bodies=True)  # the format from the config
    with spawn_gateway(cfg, workdir=str(tmp_path)) as gw:
        prompt = unique("show me")
        assert (
            await _post(gw, {"model": "chat", "messages": [{"role": "user", "content": prompt}]})
            == 200
        )
    entry = _access(_json_lines(gw), "chat")
    assert entry["messages"] == [{"role": "user", "content": prompt}]
    assert CLIENT_KEY not in gw.output_tail()


async def test_text_format_and_access_off(sims, tmp_path) -> None:
    a, b = sims
    with spawn_gateway(_config(a, b), workdir=str(tmp_path)) as gw:
        assert (
            await _post(gw, {"model": "chat", "messages": [{"role": "user", "content": unique()}]})
            == 200
        )
    (line,) = [ln for ln in _lines(gw) if " keel.access: " in ln]
    assert " INFO keel.access: keel-" in line
    assert " alice chat 200 stop via log-a attempts=1 first_token_ms=- total_ms=" in line
    with spawn_gateway(_config(a, b, access=False), workdir=str(tmp_path)) as gw:
        assert (
            await _post(gw, {"model": "chat", "messages": [{"role": "user", "content": unique()}]})
            == 200
        )
    assert not [ln for ln in _lines(gw) if "keel.access" in ln]


@pytest.mark.parametrize("level", ["warning", "error"])
async def test_no_access_lines_above_info(sims, tmp_path, level) -> None:
    a, b = sims
    args = ("--log-format", "json", "--log-level", level)
    with spawn_gateway(_config(a, b), *args, workdir=str(tmp_path)) as gw:
        assert (
            await _post(gw, {"model": "chat", "messages": [{"role": "user", "content": unique()}]})
            == 200
        )
    assert not [e for e in _json_lines(gw) if e.get("event") == "access"]
