"""Two gateway replicas, one key database: a key revoked on replica A is refused by replica B
within a second — through PostgreSQL LISTEN/NOTIFY, and through Redis pub/sub next to a shared
SQLite file. Each replica's own poll is set to 30 s here, so only the push can make it in
time. Spend written by both replicas adds up in the database. Run with ``-s`` for figures."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from auth_helpers import ADMIN, chat, http, keel_cli, needs_pg, pg_url, wait_until, write_config
from keel.testing import SimProcess, spawn_gateway, spawn_sim
from limits_helpers import RedisServer, needs_redis

__all__ = ["pg_url"]  # the fixture


@pytest.fixture(scope="module")
def upstream() -> Iterator[SimProcess]:
    with spawn_sim("--name", "r") as s:
        yield s


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _config(sim: SimProcess, **extra: Any) -> dict[str, Any]:
    return {
        "server": {"admin_key": ADMIN},
        "models": {
            "chat": {
                "deployments": [{"base_url": sim.base_url}],
                "price": {"input": 1000.0, "output": 4000.0},
            }
        },
        "auth": {"sync_interval": 30, "spend_flush_interval": 0.2},
        **extra,
    }


def _seen_within(check: Any, bound: float) -> float:
    took = wait_until(check, timeout=bound, step=0.005)
    assert took < bound
    return took


@needs_pg
def test_revoked_on_a_refused_on_b_within_a_second_postgres(
    upstream: SimProcess, tmp_path: Path, pg_url: str
) -> None:
    from keel.sim import prompt_tokens

    cfg = write_config(tmp_path, _config(upstream, database_url=pg_url))
    with spawn_gateway(str(cfg)) as a, spawn_gateway(str(cfg)) as b:
        status, _, created = http("POST", a.url + "/admin/keys", {"name": "shared"}, token=ADMIN)
        assert status == 201
        key, kid = created["key"], created["id"]
        # (/v1/models: authenticated like a completion, but costs nothing)
        t_new = _seen_within(lambda: http("GET", b.url + "/v1/models", token=key)[0] == 200, 1.0)

        # Spend from both replicas lands in one row.
        costs = []
        for gw, prompt in ((a, "on a"), (b, "on b"), (a, "on a again")):
            status, _, body = chat(gw.url, key, prompt=prompt)
            assert status == 200
            p = prompt_tokens([{"role": "user", "content": prompt}])
            assert body["usage"]["prompt_tokens"] == p
            costs.append((p * 1000.0 + body["usage"]["completion_tokens"] * 4000.0) / 1e6)
        spent = lambda: http("GET", f"{b.url}/admin/keys/{kid}", token=ADMIN)[2]["spend_usd"]  # noqa: E731
        wait_until(lambda: abs(spent() - sum(costs)) < 1e-9, timeout=3)

        # An access JWT of the key, verified once on B and cached there by its bytes.
        status, _, pair = http("POST", a.url + "/v1/auth/token", {}, token=key)
        assert status == 200
        access = pair["access_token"]
        assert chat(b.url, access)[0] == 200 and chat(b.url, access)[0] == 200

        revoked_at = time.monotonic()
        assert http("DELETE", f"{a.url}/admin/keys/{kid}", token=ADMIN)[0] == 200
        assert chat(a.url, key)[0] == 401  # at once on the replica that revoked it
        wait_until(lambda: chat(b.url, key)[0] == 401, timeout=1.0, step=0.005)
        t_revoke = time.monotonic() - revoked_at
        assert t_revoke < 1.0
        # ... and so is the cached access token (checked against the key on every use).
        wait_until(lambda: chat(b.url, access)[0] == 401, timeout=1.0, step=0.005)
        t_jwt = time.monotonic() - revoked_at
        assert t_jwt < 1.0
        status, _, body = chat(b.url, access)
        assert (status, body["error"]["message"], body["error"]["code"]) == (
            401, "Invalid access token: its key was revoked.", "invalid_api_key"
        )  # fmt: skip
        # The CLI against the same database: a key it makes is usable on both within 1 s.
        import json

        made = json.loads(keel_cli(cfg, "--json", "create", "--name", "cli-made").stdout)
        t_cli = max(
            _seen_within(lambda gw=gw: chat(gw.url, made["key"])[0] == 200, 1.0) for gw in (a, b)
        )
        out = a.output_tail() + b.output_tail()
    assert key not in out and made["key"] not in out and access not in out
    print(
        f"postgres NOTIFY: new key on B after {t_new * 1000:.0f} ms, revocation after "
        f"{t_revoke * 1000:.0f} ms (its cached access JWT after {t_jwt * 1000:.0f} ms), "
        f"CLI key after {t_cli * 1000:.0f} ms (poll 30 s)"
    )


@needs_redis
def test_revoked_on_a_refused_on_b_within_a_second_redis(
    upstream: SimProcess, tmp_path: Path, redis_server: RedisServer
) -> None:
    db = tmp_path / "shared.keys.db"
    cfg = write_config(
        tmp_path, _config(upstream, database_url=f"sqlite:///{db}", redis_url=redis_server.url)
    )
    import json

    made = json.loads(keel_cli(cfg, "--json", "create", "--name", "bus").stdout)
    with spawn_gateway(str(cfg)) as a, spawn_gateway(str(cfg)) as b:
        assert chat(a.url, made["key"])[0] == 200 and chat(b.url, made["key"])[0] == 200
        t0 = time.monotonic()
        assert http("DELETE", f"{a.url}/admin/keys/{made['id']}", token=ADMIN)[0] == 200
        wait_until(lambda: chat(b.url, made["key"])[0] == 401, timeout=1.0, step=0.005)
        t_api = time.monotonic() - t0
        # Rotation through the CLI (another process): both replicas switch within 1 s.
        other = json.loads(keel_cli(cfg, "--json", "create", "--name", "bus-2").stdout)
        for gw in (a, b):
            _seen_within(lambda gw=gw: chat(gw.url, other["key"])[0] == 200, 1.0)
        t0 = time.monotonic()
        keel_cli(cfg, "revoke", other["id"])
        for gw in (a, b):
            wait_until(lambda gw=gw: chat(gw.url, other["key"])[0] == 401, timeout=1.0, step=0.005)
        t_cli = time.monotonic() - t0  # includes the CLI's own start-up
    print(
        f"redis pub/sub: revocation on B after {t_api * 1000:.0f} ms (admin API on A), "
        f"{t_cli * 1000:.0f} ms after `keel keys revoke` started (poll 30 s)"
    )
