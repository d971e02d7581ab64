"""Token sessions through a real gateway: a virtual key (or a one-time code) for an access JWT
and a refresh token; refresh rotation; reuse of a spent refresh token revokes the family;
bad JWTs are 401s; ``keel.auth.TokenSession`` under the official openai SDK."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from auth_helpers import ADMIN, chat, http, write_config
from keel.testing import GatewayProcess, SimProcess, spawn_gateway, spawn_sim

UNAUTHORIZED = {"type": "invalid_request_error", "param": None, "code": "invalid_api_key"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[SimProcess]:
    with spawn_sim("--name", "s") as s:
        yield s


def _gateway(sim: SimProcess, directory: Path, **jwt_cfg: Any) -> GatewayProcess:
    cfg = {
        "server": {"admin_key": ADMIN, "api_keys": ["sk-static-0123456789"]},
        "models": {"chat": {"deployments": [{"base_url": sim.base_url}]}},
        "auth": {"sync_interval": 0.2, "jwt": jwt_cfg},
    }
    return spawn_gateway(str(write_config(directory, cfg)))


def _key(gw: GatewayProcess, name: str = "browser") -> dict[str, Any]:
    status, _, body = http("POST", gw.url + "/admin/keys", {"name": name}, token=ADMIN)
    assert status == 201
    return body


def _token(gw: GatewayProcess, key: str) -> dict[str, Any]:
    status, _, body = http("POST", gw.url + "/v1/auth/token", {}, token=key)
    assert status == 200, body
    return body


def _refresh(gw: GatewayProcess, rt: str) -> tuple[int, Any]:
    status, _, body = http("POST", gw.url + "/v1/auth/refresh", {"refresh_token": rt})
    return status, body


def test_sessions_refresh_rotation_and_reuse_detection(
    upstream: SimProcess, tmp_path: Path
) -> None:
    with _gateway(upstream, tmp_path) as gw:
        key = _key(gw)
        pair = _token(gw, key["key"])
        assert set(pair) == {"access_token", "refresh_token", "token_type", "expires_in"}
        assert pair["token_type"] == "Bearer" and pair["expires_in"] == 900
        assert pair["refresh_token"].startswith("rt-keel-")
        header = jwt.get_unverified_header(pair["access_token"])
        assert header["alg"] == "RS256" and header["kid"]
        # The JWT is accepted wherever a key is.
        assert chat(gw.url, pair["access_token"])[0] == 200
        assert http("GET", gw.url + "/v1/models", token=pair["access_token"])[0] == 200

        # Only a virtual key opens a session.
        for bad in (None, "sk-static-0123456789", "sk-keel-nope", pair["access_token"]):
            status, _, body = http("POST", gw.url + "/v1/auth/token", {}, token=bad)
            assert status == 401 and body["error"]["code"] == "invalid_api_key", bad

        # Rotation: each refresh token works once and yields a new pair.
        status, second = _refresh(gw, pair["refresh_token"])
        assert status == 200 and second["refresh_token"] != pair["refresh_token"]
        assert chat(gw.url, second["access_token"])[0] == 200
        status, third = _refresh(gw, second["refresh_token"])
        assert status == 200

        # Reuse of a spent one: refused, and the whole family is revoked — the newest refresh
        # token and every access token of the session stop working.
        status, body = _refresh(gw, pair["refresh_token"])
        assert status == 401 and body == {
            "error": {
                "message": "This refresh token was used before; the session is revoked.",
                "type": "invalid_request_error",
                "param": None,
                "code": "refresh_token_reused",
            }
        }
        status, body = _refresh(gw, third["refresh_token"])
        assert status == 401 and body["error"]["code"] == "session_revoked"
        for access in (pair["access_token"], second["access_token"], third["access_token"]):
            status, _, body = chat(gw.url, access)
            assert status == 401 and body["error"] == {
                "message": "Invalid access token: the session was revoked.",
                **UNAUTHORIZED,
            }
        # Another session of the same key is not affected.
        assert chat(gw.url, _token(gw, key["key"])["access_token"])[0] == 200
        assert _refresh(gw, "rt-keel-unknown")[0] == 401
        assert http("POST", gw.url + "/v1/auth/refresh", {})[0] == 400

        # A one-time code opens a session once.
        status, _, code = http("POST", f"{gw.url}/admin/keys/{key['id']}/codes", token=ADMIN)
        assert status == 201 and code["code"].startswith("kc-keel-")
        status, _, pair2 = http("POST", gw.url + "/v1/auth/token", {"code": code["code"]})
        assert status == 200 and chat(gw.url, pair2["access_token"])[0] == 200
        status, _, body = http("POST", gw.url + "/v1/auth/token", {"code": code["code"]})
        assert status == 401 and body["error"]["code"] == "invalid_code"

        # Revoking the key ends its sessions.
        assert http("DELETE", f"{gw.url}/admin/keys/{key['id']}", token=ADMIN)[0] == 200
        assert chat(gw.url, pair2["access_token"])[0] == 401
        assert _refresh(gw, pair2["refresh_token"])[0] == 401
        out = gw.output_tail()
    assert "likely a stolen token" in out
    for secret in (key["key"], pair["refresh_token"], pair["access_token"], code["code"]):
        assert secret not in out


def _forge(pem: str, kid: str, **over: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": "keel",
        "aud": "keel",
        "sub": over.pop("sub"),
        "fam": over.pop("fam"),
        "iat": now,
        "nbf": now,
        "exp": now + 900,
    }
    claims.update(over)
    return jwt.encode(
        {k: v for k, v in claims.items() if v is not None},
        pem,
        algorithm="RS256",
        headers={"kid": kid},
    )


def test_bad_access_tokens_are_401s(upstream: SimProcess, tmp_path: Path) -> None:
    with _gateway(upstream, tmp_path) as gw:
        key = _key(gw)
        good = _token(gw, key["key"])["access_token"]
        claims = jwt.decode(good, options={"verify_signature": False})
        kid = jwt.get_unverified_header(good)["kid"]
        with sqlite3.connect(tmp_path / "keel.keys.db") as c:
            pem = c.execute(
                "SELECT private_pem FROM keel_signing WHERE kid = ?", (kid,)
            ).fetchone()[0]
        ids = {"sub": claims["sub"], "fam": claims["fam"]}
        assert chat(gw.url, _forge(pem, kid, **ids))[0] == 200  # the forger holds the real key
        now = int(time.time())
        head, body, sig = good.split(".")
        import base64

        tampered_body = (
            base64.urlsafe_b64encode(json.dumps({**claims, "sub": "key_other"}).encode())
            .rstrip(b"=")
            .decode()
        )
        bad = {
            "token expired": _forge(pem, kid, **ids, iat=now - 1000, nbf=now - 1000, exp=now - 100),
            "token not yet valid": _forge(pem, kid, **ids, nbf=now + 120),
            "wrong audience": _forge(pem, kid, **ids, aud="not-keel"),
            "wrong issuer": _forge(pem, kid, **ids, iss="not-keel"),
            "unknown signing key id": _forge(pem, "k-unknown", **ids),
            "algorithm 'none' is not accepted": jwt.encode(
                {**claims}, None, algorithm="none", headers={"kid": kid}
            ),
            "algorithm 'HS256' is not accepted": jwt.encode(
                claims,
                "a-secret-of-32-bytes-or-more-abcdef",
                algorithm="HS256",
                headers={"kid": kid},
            ),
            "bad signature": f"{head}.{tampered_body}.{sig}",
        }
        for reason, token in bad.items():
            status, headers, body = chat(gw.url, token)
            assert (status, body) == (
                401,
                {"error": {"message": f"Invalid access token: {reason}.", **UNAUTHORIZED}},
            ), reason
            assert headers["x-should-retry"] == "false"
            assert token not in json.dumps(body)


def test_token_session_50_requests_across_an_expiry_make_one_refresh(
    upstream: SimProcess, tmp_path: Path
) -> None:
    import httpx2
    import openai

    from keel.auth import TokenSession

    # 3 s: the first ask must finish inside the token's life, even on a loaded machine (with
    # 1 s, a login and a first answer taking longer made the first ask refresh already).
    ttl = 3
    with _gateway(upstream, tmp_path, access_ttl=ttl, leeway=0) as gw:
        key = _key(gw)

        async def scenario() -> tuple[TokenSession, list[Any], str]:
            session = TokenSession(gw.base_url, api_key=key["key"], refresh_ahead=0)
            async with httpx2.AsyncClient(auth=session, timeout=30) as http_client:
                client = openai.AsyncOpenAI(
                    base_url=gw.base_url, api_key="unused", http_client=http_client, max_retries=0
                )

                async def ask(i: int) -> Any:
                    return await client.chat.completions.create(
                        model="chat", messages=[{"role": "user", "content": f"session {i}"}]
                    )

                await ask(-1)
                assert (session.logins, session.refreshes) == (1, 0)
                first = session._access
                assert first is not None
                # Wait (bounded) until the gateway itself refuses the first access token.
                t0 = time.monotonic()
                while chat(gw.url, first)[0] != 401:
                    assert time.monotonic() - t0 < ttl + 4
                    await asyncio.sleep(0.05)
                results = await asyncio.gather(*(ask(i) for i in range(50)), return_exceptions=True)
                return session, results, first

        session, results, first = asyncio.run(scenario())
        failures = [r for r in results if isinstance(r, BaseException)]
        assert failures == []
        assert all(r.choices[0].finish_reason == "stop" for r in results)
        assert (session.logins, session.refreshes) == (1, 1)
        # The gateway agrees: one family, two refresh tokens (the first and its one rotation).
        with sqlite3.connect(tmp_path / "keel.keys.db") as c:
            rows = c.execute("SELECT family, COUNT(*) FROM keel_refresh GROUP BY family").fetchall()
        assert [n for _, n in rows] == [2]
        assert session._access != first


def test_token_session_logs_in_again_when_its_refresh_token_is_gone(
    upstream: SimProcess, tmp_path: Path
) -> None:
    import httpx2

    from keel.auth import TokenSession

    with _gateway(upstream, tmp_path) as gw:
        key = _key(gw)

        async def scenario() -> TokenSession:
            session = TokenSession(gw.base_url, api_key=key["key"])
            async with httpx2.AsyncClient(auth=session) as client:
                body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
                assert (
                    await client.post(gw.base_url + "/chat/completions", json=body)
                ).status_code == 200
                # Someone else spends the session's refresh token (a thief): the session's own
                # refresh is then a reuse, the family dies, and the session logs in afresh.
                assert _refresh(gw, session._refresh)[0] == 200  # type: ignore[arg-type]
                session.expires_at = 0.0  # due for a refresh now
                resp = await client.post(gw.base_url + "/chat/completions", json=body)
                assert resp.status_code == 200
            return session

        session = asyncio.run(scenario())
        assert (session.logins, session.refreshes) == (2, 0)


def test_access_tokens_and_virtual_keys_over_the_websocket(
    upstream: SimProcess, tmp_path: Path
) -> None:
    """The WebSocket door authenticates like every other: a JWT in the upgrade's header, a
    virtual key in an ``auth`` message; a revoked key's socket takes no new requests."""
    import aiohttp

    with _gateway(upstream, tmp_path) as gw:
        key = _key(gw, "ws-client")
        access = _token(gw, key["key"])["access_token"]
        ws_url = gw.url.replace("http://", "ws://") + "/v1/ws"

        async def ask(ws: Any, rid: str) -> list[dict[str, Any]]:
            body = {"model": "chat", "messages": [{"role": "user", "content": f"ws {rid}"}]}
            await ws.send_json({"type": "chat.completions.create", "id": rid, "body": body})
            seen = []
            while True:
                msg = json.loads((await ws.receive(timeout=10)).data)
                if msg.get("id") == rid:
                    seen.append(msg)
                    if msg["type"] == "done":
                        return seen

        async def scenario() -> None:
            async with aiohttp.ClientSession() as s:
                headers = {"authorization": f"Bearer {access}"}
                async with s.ws_connect(ws_url, headers=headers) as ws:
                    seen = await ask(ws, "jwt-1")
                    assert [m["type"] for m in seen][-1] == "done"
                    assert not [m for m in seen if m["type"] == "error"]
                async with s.ws_connect(ws_url) as ws:
                    await ws.send_json({"type": "auth", "token": key["key"]})
                    seen = await ask(ws, "key-1")
                    assert not [m for m in seen if m["type"] == "error"]
                    assert http("DELETE", f"{gw.url}/admin/keys/{key['id']}", token=ADMIN)[0] == 200
                    await ws.send_json({"type": "auth", "token": key["key"]})  # now refused
                    seen = await ask(ws, "key-2")
                    errors = [m for m in seen if m["type"] == "error"]
                    assert errors and errors[0]["error"]["code"] == "invalid_api_key"
                with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                    await s.ws_connect(ws_url, headers=headers)  # the key's JWT is dead too
                assert err.value.status == 401

        asyncio.run(scenario())
