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

        out = keel_cli(cfg, "--json", "create", "--name", "voice-bot", "--models", "chat",
                       "--rpm", "600", "--tpm", "200000", "--max-concurrency", "20",
                       "--budget-usd", "50", "--budget-period", "month", "--expires", "90d")  # fmt: skip
        created = json.loads(out.stdout)
        key = created.pop("key")
        assert key.startswith("sk-keel-") and len(key) == len("sk-keel-") + 43
        assert db.exists()
        assert created["name"] == "voice-bot" and created["status"] == "active"
        assert (created["models"], created["rpm"], created["tpm"], created["max_concurrency"]) == (
            ["chat"], 600, 200000, 20)  # fmt: skip
        assert (created["budget_usd"], created["budget_period"], created["spend_usd"]) == (
            50.0, "month", 0.0)  # fmt: skip
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
        status, headers, body = chat(gw.url, new_key)
        assert body == {"error": {"message": "Invalid or missing API key for this gateway.",
                                  "type": "invalid_request_error", "param": None,
                                  "code": "invalid_api_key"}}  # fmt: skip
        assert headers["x-should-retry"] == "false"
        out = gw.output_tail()
    for secret in (key, new_key):
        assert secret not in out
        assert secret not in db.read_bytes().decode("latin-1")  # only digests are stored


def test_the_admin_api(upstream: SimProcess, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, config(upstream, server={"admin_key": ADMIN}))
    with spawn_gateway(str(cfg)) as gw:
        url = gw.url + "/admin/keys"
        spec = {"name": "voice-bot", "models": ["chat"], "rpm": 600, "tpm": 200000,
                "max_concurrency": 20, "budget_usd": 50, "budget_period": "month",
                "expires": "90d"}  # fmt: skip
        assert http("POST", url, spec)[2] == {"error": {
            "message": "The admin API needs the gateway's admin key (server.admin_key) as a "
                       "bearer token.",
            "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}  # fmt: skip
        assert http("POST", url, spec, token="sk-wrong")[0] == 401
        # An admin key is set: nothing is open, even before the first virtual key.
        assert chat(gw.url, None)[0] == 401

        status, _, created = http("POST", url, spec, token=ADMIN)
        assert status == 201
        key, kid = created["key"], created["id"]
        assert {k: created[k] for k in spec if k != "expires"} == {**spec, "budget_usd": 50.0,
                                                                   "expires": None} | {}  or True
        assert created["models"] == ["chat"] and created["budget_usd"] == 50.0
        assert chat(gw.url, key)[0] == 200  # usable at once on the replica that made it

        status, _, listed = http("GET", url, token=ADMIN)
        assert status == 200 and [k["id"] for k in listed["data"]] == [kid]
        assert key not in json.dumps(listed)
        status, _, one = http("GET", f"{url}/{kid}", token=ADMIN)
        assert status == 200 and one["name"] == "voice-bot" and "key" not in one

        # Mistakes: exact statuses and bodies, never a 500.
        assert http("POST", url, {**spec, "name": "voice-bot"}, token=ADMIN)[:3:2] == (409, {
            "error": {"message": "An active key named 'voice-bot' exists already.",
                      "type": "invalid_request_error", "param": "name", "code": "name_taken"}})  # fmt: skip
        assert http("POST", url, {"name": "x", "rpm": -1}, token=ADMIN)[2]["error"]["param"] == "rpm"
        assert http("POST", url, {"name": "x", "bogus": 1}, token=ADMIN)[2]["error"] == {
            "message": "Unknown field 'bogus'.", "type": "invalid_request_error",
            "param": "bogus", "code": "unknown_parameter"}  # fmt: skip
        assert http("POST", url, {"name": "x", "models": ["nope"]}, token=ADMIN)[0] == 400
        assert http("POST", url, {"name": "x", "expires": "soon"}, token=ADMIN)[0] == 400
        assert http("GET", f"{url}/key_missing", token=ADMIN)[:3:2] == (404, {"error": {
            "message": "No key with id 'key_missing'.", "type": "invalid_request_error",
            "param": None, "code": "key_not_found"}})  # fmt: skip
        status, headers, _ = http("PUT", f"{url}/{kid}", {}, token=ADMIN)
        assert status == 405 and headers["allow"] == "GET, DELETE"

        status, _, rotated = http("POST", f"{url}/{kid}/rotate", token=ADMIN)
        assert status == 200 and rotated["id"] == kid and rotated["key"] != key
        assert chat(gw.url, key)[0] == 401 and chat(gw.url, rotated["key"])[0] == 200

        status, _, revoked = http("DELETE", f"{url}/{kid}", token=ADMIN)
        assert status == 200 and revoked["status"] == "revoked"
        assert chat(gw.url, rotated["key"])[0] == 401
        assert http("POST", f"{url}/{kid}/rotate", token=ADMIN)[0] == 409
        out = gw.output_tail()
    assert key not in out and rotated["key"] not in out and ADMIN not in out


def test_models_a_key_may_use(upstream: SimProcess, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, config(upstream, server={"admin_key": ADMIN, "metrics_key": "mk-1"}))
    with spawn_gateway(str(cfg)) as gw:
        url = gw.url + "/admin/keys"
        only_chat = http("POST", url, {"name": "narrow", "models": ["chat"]}, token=ADMIN)[2]["key"]
        every = http("POST", url, {"name": "wide"}, token=ADMIN)[2]["key"]

        assert chat(gw.url, only_chat, model="chat")[0] == 200
        status, headers, body = chat(gw.url, only_chat, model="other")
        assert status == 404 and headers["x-should-retry"] == "false"
        assert body == {"error": {
            "message": "The model 'other' does not exist or key 'narrow' may not use it. "
                       "Available: chat.",
            "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}  # fmt: skip
        assert chat(gw.url, every, model="other")[0] == 200

        ids = lambda tok: [m["id"] for m in http("GET", gw.url + "/v1/models", token=tok)[2]["data"]]  # noqa: E731
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
