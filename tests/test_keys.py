"""Virtual keys end to end: real gateways (``keel serve``), a real simulator, the key database
on disk (SQLite, the zero-config default) — created, used, rotated and revoked through the CLI
and the admin API; model restrictions; keys that never show up where they should not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from auth_helpers import ADMIN, chat, http, keel_cli, wait_until, write_config
from keel.testing import SimProcess, spawn_gateway, spawn_sim

UPSTREAM = "sk-upstream-keys-0000000000000000000000"


@pytest.fixture(scope="module")
def upstream() -> Iterator[SimProcess]:
    with spawn_sim("--name", "k") as s:
        yield s


def config(sim: SimProcess, **extra: Any) -> dict[str, Any]:
    dep = {"base_url": sim.base_url, "api_key": UPSTREAM}
    return {
        "models": {
            "chat": {"deployments": [dep], "price": {"input": 0.15, "output": 0.6}},
            "other": {"deployments": [{**dep, "name": "other-0"}]},
        },
        "auth": {"sync_interval": 0.2},
        **extra,
    }


def test_zero_config_sqlite_and_the_cli_lifecycle(upstream: SimProcess, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, config(upstream))
    db = tmp_path / "keel.keys.db"
    with spawn_gateway(str(cfg)) as gw:
        # No keys of any kind yet: open, as before virtual keys (and no file was made).
        assert chat(gw.url, None)[0] == 200
        assert not db.exists()

        out = keel_cli(
            cfg,
            "--json",
            "create",
            "--name",
            "voice-bot",
            "--models",
            "chat",
            "--rpm",
            "600",
            "--tpm",
            "200000",
            "--max-concurrency",
            "20",
            "--budget-usd",
            "50",
            "--budget-period",
            "month",
            "--expires",
            "90d",
        )
        created = json.loads(out.stdout)
        key = created.pop("key")
        assert key.startswith("sk-keel-") and len(key) == len("sk-keel-") + 43
        assert db.exists()
        assert created["name"] == "voice-bot" and created["status"] == "active"
        assert (created["models"], created["rpm"], created["tpm"], created["max_concurrency"]) == (
            ["chat"],
            600,
            200000,
            20,
        )
        assert (created["budget_usd"], created["budget_period"], created["spend_usd"]) == (
            50.0,
            "month",
            0.0,
        )
        assert created["expires_at"] - created["created_at"] == 90 * 86400
        kid = created["id"]

        # The running gateway picks the new file and key up by itself; now keys are required.
        wait_until(lambda: chat(gw.url, None)[0] == 401, timeout=3)
        assert chat(gw.url, key)[0] == 200

        listed = json.loads(keel_cli(cfg, "--json", "list").stdout)
        assert [k["id"] for k in listed] == [kid] and "key" not in listed[0]
        shown = keel_cli(cfg, "show", kid).stdout
        assert kid in shown and "voice-bot" in shown and key not in shown

        rotated = json.loads(keel_cli(cfg, "--json", "rotate", kid).stdout)
        new_key = rotated.pop("key")
        assert new_key != key and rotated["id"] == kid
        took = wait_until(lambda: chat(gw.url, key)[0] == 401, timeout=1.0)
        assert chat(gw.url, new_key)[0] == 200
        print(f"rotation seen by the gateway after {took * 1000:.0f} ms (SQLite poll 0.2 s)")

        revoked = json.loads(keel_cli(cfg, "--json", "revoke", kid).stdout)
        assert revoked["status"] == "revoked" and revoked["revoked_at"] is not None
        took = wait_until(lambda: chat(gw.url, new_key)[0] == 401, timeout=1.0)
        print(f"revocation seen by the gateway after {took * 1000:.0f} ms")
        _status, headers, body = chat(gw.url, new_key)
        assert body == {
            "error": {
                "message": "Invalid or missing API key for this gateway.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
        assert headers["x-should-retry"] == "false"
        out = gw.output_tail()
    for secret in (key, new_key):
        assert secret not in out
        assert secret not in db.read_bytes().decode("latin-1")  # only digests are stored


def test_the_admin_api(upstream: SimProcess, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, config(upstream, server={"admin_key": ADMIN}))
    with spawn_gateway(str(cfg)) as gw:
        url = gw.url + "/admin/keys"
        spec = {
            "name": "voice-bot",
            "models": ["chat"],
            "rpm": 600,
            "tpm": 200000,
            "max_concurrency": 20,
            "budget_usd": 50,
            "budget_period": "month",
            "expires": "90d",
        }
        assert http("POST", url, spec)[2] == {
            "error": {
                "message": "The admin API needs the gateway's admin key (server.admin_key) as a "
                "bearer token.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
        assert http("POST", url, spec, token="sk-wrong")[0] == 401
        # An admin key is set: nothing is open, even before the first virtual key.
        assert chat(gw.url, None)[0] == 401

        status, _, created = http("POST", url, spec, token=ADMIN)
        assert status == 201
        key, kid = created["key"], created["id"]
        assert {k: created[k] for k in spec if k != "expires"} == {
            k: v for k, v in spec.items() if k != "expires"
        }
        assert created["expires_at"] - created["created_at"] == 90 * 86400
        assert chat(gw.url, key)[0] == 200  # usable at once on the replica that made it

        status, _, listed = http("GET", url, token=ADMIN)
        assert status == 200 and [k["id"] for k in listed["data"]] == [kid]
        assert key not in json.dumps(listed)
        status, _, one = http("GET", f"{url}/{kid}", token=ADMIN)
        assert status == 200 and one["name"] == "voice-bot" and "key" not in one

        # Mistakes: exact statuses and bodies, never a 500.
        assert http("POST", url, {**spec, "name": "voice-bot"}, token=ADMIN)[:3:2] == (
            409,
            {
                "error": {
                    "message": "An active key named 'voice-bot' exists already.",
                    "type": "invalid_request_error",
                    "param": "name",
                    "code": "name_taken",
                }
            },
        )
        assert (
            http("POST", url, {"name": "x", "rpm": -1}, token=ADMIN)[2]["error"]["param"] == "rpm"
        )
        assert http("POST", url, {"name": "x", "bogus": 1}, token=ADMIN)[2]["error"] == {
            "message": "Unknown field 'bogus'.",
            "type": "invalid_request_error",
            "param": "bogus",
            "code": "unknown_parameter",
        }
        assert http("POST", url, {"name": "x", "models": ["nope"]}, token=ADMIN)[0] == 400
        assert http("POST", url, {"name": "x", "expires": "soon"}, token=ADMIN)[0] == 400
        assert http("GET", f"{url}/key_missing", token=ADMIN)[:3:2] == (
            404,
            {
                "error": {
                    "message": "No key with id 'key_missing'.",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "key_not_found",
                }
            },
        )
        status, headers, _ = http("PUT", f"{url}/{kid}", {}, token=ADMIN)
        assert status == 405 and headers["allow"] == "GET, DELETE"

        status, _, rotated = http("POST", f"{url}/{kid}/rotate", token=ADMIN)
        assert status == 200 and rotated["id"] == kid and rotated["key"] != key
        assert chat(gw.url, key)[0] == 401 and chat(gw.url, rotated["key"])[0] == 200

        # A key with a lifetime stops working when it ends.
        status, _, short = http("POST", url, {"name": "brief", "expires": 1}, token=ADMIN)
        assert status == 201 and short["expires_at"] - short["created_at"] == 1
        wait_until(lambda: chat(gw.url, short["key"])[0] == 401, timeout=3)
        assert chat(gw.url, short["key"])[2]["error"] == {
            "message": "This API key has expired.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
        assert http("GET", f"{url}/{short['id']}", token=ADMIN)[2]["status"] == "expired"

        status, _, revoked = http("DELETE", f"{url}/{kid}", token=ADMIN)
        assert status == 200 and revoked["status"] == "revoked"
        assert chat(gw.url, rotated["key"])[0] == 401
        assert http("POST", f"{url}/{kid}/rotate", token=ADMIN)[0] == 409
        out = gw.output_tail()
    assert key not in out and rotated["key"] not in out and ADMIN not in out


def test_models_a_key_may_use(upstream: SimProcess, tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path, config(upstream, server={"admin_key": ADMIN, "metrics_key": "mk-1"})
    )
    with spawn_gateway(str(cfg)) as gw:
        url = gw.url + "/admin/keys"
        only_chat = http("POST", url, {"name": "narrow", "models": ["chat"]}, token=ADMIN)[2]["key"]
        every = http("POST", url, {"name": "wide"}, token=ADMIN)[2]["key"]

        assert chat(gw.url, only_chat, model="chat")[0] == 200
        status, headers, body = chat(gw.url, only_chat, model="other")
        assert status == 404 and headers["x-should-retry"] == "false"
        assert body == {
            "error": {
                "message": "The model 'other' does not exist or key 'narrow' may not use it. "
                "Available: chat.",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }
        }
        assert chat(gw.url, every, model="other")[0] == 200

        def ids(tok):
            return [m["id"] for m in http("GET", gw.url + "/v1/models", token=tok)[2]["data"]]

        assert ids(only_chat) == ["chat"]
        assert ids(every) == ["chat", "other"]
        assert http("GET", gw.url + "/v1/models")[0] == 401
        assert http("GET", gw.url + "/v1/models", token="sk-keel-nope")[0] == 401
        # /metrics: its own key; a client's key (virtual or not) does not open it.
        assert http("GET", gw.url + "/metrics", token=every)[0] == 401
        status, _, text = http("GET", gw.url + "/metrics", token="mk-1")
        assert status == 200 and "keel_key_spend_usd" in text
        assert only_chat not in text and every not in text
        out = gw.output_tail()
    assert only_chat not in out and every not in out


PRICE = {"input": 1000.0, "output": 4000.0, "cached_input": 500.0}  # USD per 1M: big, to spend


def usd(prompt: int, completion: int) -> float:
    return (prompt * PRICE["input"] + completion * PRICE["output"]) / 1e6


def _open_stream(gw_url: str, token: str, body: dict[str, Any]) -> Any:
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(gw_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps({**body, "stream": True}),
        {"authorization": f"Bearer {token}", "content-type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


def _events(resp: Any) -> Iterator[str]:
    for raw in resp:
        line = raw.decode().rstrip("\n")
        if line.startswith("data: "):
            yield line[6:]


def test_budget_exhaustion_exact_arithmetic_streams_included(
    upstream: SimProcess, tmp_path: Path
) -> None:
    from keel.sim import prompt_tokens

    cfg = config(upstream, server={"admin_key": ADMIN})
    cfg["models"]["chat"]["price"] = PRICE
    cfg["auth"]["spend_flush_interval"] = 0.2
    cfgp = write_config(tmp_path, cfg)

    def msgs(text: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": text}]

    prompts = [
        "budget one",
        "budget two [[sim:len=20]]",
        "budget three [[sim:len=10]]",
        "budget four [[sim:len=60]]",
        "budget slow [[sim:len=30,delay=0.04]]",
    ]
    lengths = [24, 20, 10, 60, 30]
    costs = [usd(prompt_tokens(msgs(p)), n) for p, n in zip(prompts, lengths, strict=True)]
    # Spent before the fourth request: under budget; after it: over.
    budget = round(sum(costs[:4]) - 0.001, 6)
    assert sum(costs[:3]) < budget <= sum(costs[:4])

    with spawn_gateway(str(cfgp)) as gw:
        created = http(
            "POST",
            gw.url + "/admin/keys",
            {"name": "voice-bot", "budget_usd": budget, "budget_period": "month"},
            token=ADMIN,
        )[2]
        key, kid = created["key"], created["id"]

        # 1: non-stream, priced from the usage it reports.
        status, _, body = chat(gw.url, key, prompt=prompts[0])
        assert status == 200
        u = body["usage"]
        assert usd(u["prompt_tokens"], u["completion_tokens"]) == costs[0]
        # 2: a stream that asked for usage: the client sees the one usage chunk.
        from auth_helpers import stream_chunks

        chunks = stream_chunks(
            gw.url,
            key,
            {
                "model": "chat",
                "messages": msgs(prompts[1]),
                "stream_options": {"include_usage": True},
            },
        )
        u = chunks[-1]["usage"]
        assert usd(u["prompt_tokens"], u["completion_tokens"]) == costs[1]
        # 3: a stream that did not: keel still counts it, and the client gets no usage chunk.
        chunks = stream_chunks(gw.url, key, {"model": "chat", "messages": msgs(prompts[2])})
        assert not any("usage" in c for c in chunks)
        shown = http("GET", f"{gw.url}/admin/keys/{kid}", token=ADMIN)[2]
        assert abs(shown["spend_usd"] - sum(costs[:3])) < 1e-9

        # A slow stream starts while there is budget left ...
        conn, resp = _open_stream(gw.url, key, {"model": "chat", "messages": msgs(prompts[4])})
        events = _events(resp)
        first = next(events)
        # ... 4: this request spends the rest ...
        assert chat(gw.url, key, prompt=prompts[3])[0] == 200
        # ... the next is refused, exactly so ...
        status, headers, body = chat(gw.url, key, prompt="one more")
        assert status == 429 and headers["x-should-retry"] == "false"
        assert body == {
            "error": {
                "message": f"budget of ${budget:g}/month for key voice-bot reached",
                "type": "insufficient_quota",
                "param": None,
                "code": "insufficient_quota",
            }
        }
        assert chat(gw.url, key, prompt="one more", stream=True)[0] == 429
        # ... and the stream in flight finishes, and is charged too.
        rest = [first, *events]
        conn.close()
        assert rest[-1] == "[DONE]"
        content = [json.loads(e) for e in rest[:-1]]
        assert content[-1]["choices"][0]["finish_reason"] == "stop"
        assert (
            sum(1 for c in content if c["choices"] and c["choices"][0]["delta"].get("content"))
            == 30
        )

        total = sum(costs)

        def written() -> bool:
            return abs(_db_spend(tmp_path, kid) - total) < 1e-9

        wait_until(written, timeout=3)  # batched: at most a flush interval later
        shown = http("GET", f"{gw.url}/admin/keys/{kid}", token=ADMIN)[2]
        assert abs(shown["spend_usd"] - total) < 1e-9
        print(f"budget ${budget}: spent ${total:.6f} over 5 requests (3 streams), 6th refused")


def _db_spend(directory: Path, kid: str) -> float:
    import sqlite3

    with sqlite3.connect(directory / "keel.keys.db") as c:
        return float(
            c.execute("SELECT spend_usd FROM keel_keys WHERE id = ?", (kid,)).fetchone()[0]
        )


def test_a_stream_the_client_leaves_is_charged_for_what_was_generated(
    upstream: SimProcess, tmp_path: Path
) -> None:
    from keel.engine._limits import RequestCost

    cfg = config(upstream, server={"admin_key": ADMIN})
    cfg["models"]["chat"]["price"] = PRICE
    cfg["auth"]["spend_flush_interval"] = 0.2
    cfgp = write_config(tmp_path, cfg)
    with spawn_gateway(str(cfgp)) as gw:
        created = http("POST", gw.url + "/admin/keys", {"name": "leaver"}, token=ADMIN)[2]
        body = {
            "model": "chat",
            "messages": [{"role": "user", "content": "leave early [[sim:len=40,delay=0.03]]"}],
        }
        conn, resp = _open_stream(gw.url, created["key"], body)
        events = _events(resp)
        got = [next(events) for _ in range(4)]  # the role chunk and three tokens
        assert all(e != "[DONE]" for e in got)
        conn.close()

        # No usage report arrives from an upstream closed early: the prompt is keel's estimate,
        # the completion what was relayed (three tokens or a few more, never the whole answer).
        prompt = RequestCost(body).tokens()[0]
        wait_until(lambda: _db_spend(tmp_path, created["id"]) > 0, timeout=3)
        spend = _db_spend(tmp_path, created["id"])
        tokens = (spend * 1e6 - prompt * PRICE["input"]) / PRICE["output"]
        assert abs(tokens - round(tokens)) < 1e-6, spend
        assert 3 <= round(tokens) < 40, tokens
        print(f"client left after 3 tokens: charged {prompt} prompt + {round(tokens)} completion")
