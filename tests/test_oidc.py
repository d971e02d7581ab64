"""An external identity provider's JWTs (OIDC): keel fetches its JWKS, verifies its tokens
strictly and maps a claim to a virtual key — the key's models and limits apply. The provider
is a tiny JWKS server on loopback; its signing key rotates mid-test."""

from __future__ import annotations

import http.server as httpserver
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from auth_helpers import ADMIN, chat, http, wait_until, write_config
from keel.testing import SimProcess, spawn_gateway, spawn_sim

ISSUER = "https://idp.example"


class Provider:
    """Serves ``/jwks.json`` with the keys it currently signs with."""

    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.rotate()
        provider = self

        class Handler(httpserver.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                jwks = {
                    "keys": [
                        {
                            **json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(k.public_key())),
                            "kid": kid,
                            "use": "sig",
                            "alg": "RS256",
                        }
                        for kid, k in list(provider.keys.items())
                    ]
                }
                body = json.dumps(jwks).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = httpserver.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def rotate(self) -> str:
        kid = f"idp-{len(self.keys)}"
        self.keys = {kid: rsa.generate_private_key(public_exponent=65537, key_size=2048)}
        self.kid = kid
        return kid

    def token(self, **over: Any) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": "keel-api",
            "sub": "user-7",
            "iat": now,
            "exp": now + 300,
            "keel_key": "partner-app",
            **over,
        }
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, self.keys[self.kid], algorithm="RS256", headers={"kid": self.kid})


@pytest.fixture
def provider() -> Iterator[Provider]:
    p = Provider()
    try:
        yield p
    finally:
        p.server.shutdown()


@pytest.fixture(scope="module")
def upstream() -> Iterator[SimProcess]:
    with spawn_sim("--name", "o") as s:
        yield s


def test_provider_tokens_act_as_the_virtual_key_their_claim_names(
    upstream: SimProcess, provider: Provider, tmp_path: Path
) -> None:
    dep = {"base_url": upstream.base_url}
    cfg = {
        "server": {"admin_key": ADMIN},
        "models": {
            "chat": {"deployments": [dep]},
            "other": {"deployments": [{**dep, "name": "o2"}]},
        },
        "auth": {
            "sync_interval": 0.2,
            "oidc": {"jwks_url": provider.url, "issuer": ISSUER, "audience": "keel-api"},
        },
    }
    with spawn_gateway(str(write_config(tmp_path, cfg))) as gw:
        status, _, key = http(
            "POST", gw.url + "/admin/keys", {"name": "partner-app", "models": ["chat"]}, token=ADMIN
        )
        assert status == 201
        # The JWKS is fetched in the background: accepted once it has arrived.
        wait_until(lambda: chat(gw.url, provider.token())[0] == 200, timeout=5)
        models = http("GET", gw.url + "/v1/models", token=provider.token())[2]
        assert [m["id"] for m in models["data"]] == ["chat"]  # the key's models
        assert chat(gw.url, provider.token(), model="other")[0] == 404

        def refused(token: str) -> str:
            status, _, body = chat(gw.url, token)
            assert status == 401 and body["error"]["code"] == "invalid_api_key"
            return str(body["error"]["message"])

        now = int(time.time())
        assert refused(provider.token(aud="elsewhere")) == "Invalid access token: wrong audience."
        assert refused(provider.token(iss="https://evil")) == "Invalid access token: wrong issuer."
        assert refused(provider.token(iat=now - 900, exp=now - 600)) == (
            "Invalid access token: token expired."
        )
        assert (
            refused(provider.token(keel_key=None)) == "Invalid access token: no 'keel_key' claim."
        )
        assert refused(provider.token(keel_key="nobody")) == (
            "Invalid access token: no active key for its 'keel_key' claim."
        )
        forged = jwt.encode(
            {"iss": ISSUER, "aud": "keel-api", "exp": now + 60, "keel_key": "partner-app"},
            "a-guessed-secret-of-32-bytes-or-more",
            algorithm="HS256",
            headers={"kid": provider.kid},
        )
        assert refused(forged) == "Invalid access token: algorithm 'HS256' is not accepted."

        # The provider rotates its key: the first token with the new kid is refused (unknown),
        # keel fetches the JWKS again, and the new tokens are accepted.
        provider.rotate()
        fresh = provider.token()
        assert refused(fresh) == "Invalid access token: unknown signing key id."
        took = wait_until(lambda: chat(gw.url, provider.token())[0] == 200, timeout=10)
        print(f"provider key rotation picked up after {took:.1f} s")

        # Revoking the virtual key ends what the provider's tokens may do.
        assert http("DELETE", f"{gw.url}/admin/keys/{key['id']}", token=ADMIN)[0] == 200
        assert refused(provider.token()) == "Invalid access token: its key was revoked."
        assert refused(provider.token(sub="user-8")) == (  # a token not seen before
            "Invalid access token: no active key for its 'keel_key' claim."
        )
