"""Access-token verification, table-driven: every way a JWT can be wrong is a refusal with its
reason; signing keys rotate and old ones verify exactly as long as their tokens can live."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from keel.auth._jwt import ACTIVATE, InvalidToken, TokenKeys, generate_key
from keel.config._limits import JwtConfig

CFG = JwtConfig(access_ttl=900, leeway=5, rotate_every=86400)
T0 = 1_800_000_000.0


@pytest.fixture(scope="module")
def keys() -> tuple[TokenKeys, str, str]:
    kid, pem = generate_key()
    k = TokenKeys(CFG)
    k.add(kid, pem, T0 - 3600)
    return k, kid, pem


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(now: float = T0, **over: object) -> dict[str, object]:
    c: dict[str, object] = {
        "iss": "keel",
        "aud": "keel",
        "sub": "key_1",
        "fam": "fam_1",
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now + 900),
    }
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def signed(pem: str, kid: str, body: dict[str, object], alg: str = "RS256") -> str:
    return jwt.encode(body, pem, algorithm=alg, headers={"kid": kid})


def test_a_token_it_issued_verifies(keys: tuple[TokenKeys, str, str]) -> None:
    k, _, _ = keys
    token, exp = k.issue("key_1", "fam_1", T0)
    c = k.verify(token, T0 + 10)
    assert (c.key_id, c.family, c.exp) == ("key_1", "fam_1", exp) and exp == T0 + 900


def _hs256_with_public_key(pem: str, kid: str) -> str:
    """The classic confusion attack: HMAC "signed" with the RSA public key as the secret."""
    priv = serialization.load_pem_private_key(pem.encode(), None)
    public = priv.public_key().public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = _b64(json.dumps(claims()).encode())
    sig = hmac.new(public, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def _none(kid: str) -> str:
    head = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
    return f"{head}.{_b64(json.dumps(claims()).encode())}."


def _tampered(pem: str, kid: str) -> str:
    head, _, sig = signed(pem, kid, claims()).split(".")
    return f"{head}.{_b64(json.dumps(claims(sub='key_admin')).encode())}.{sig}"


CASES = {
    "expired": (lambda pem, kid: signed(pem, kid, claims(T0 - 1000)), "token expired"),
    "not yet valid": (
        lambda pem, kid: signed(pem, kid, claims(nbf=int(T0 + 60))),
        "token not yet valid",
    ),
    "issued in the future": (
        lambda pem, kid: signed(pem, kid, claims(iat=int(T0 + 60))),
        "token not yet valid",
    ),
    "wrong audience": (
        lambda pem, kid: signed(pem, kid, claims(aud="someone-else")),
        "wrong audience",
    ),
    "wrong issuer": (lambda pem, kid: signed(pem, kid, claims(iss="evil")), "wrong issuer"),
    "no exp": (lambda pem, kid: signed(pem, kid, claims(exp=None)), "invalid token"),
    "alg none": (lambda pem, kid: _none(kid), "algorithm 'none' is not accepted"),
    "HS256 with the RS public key": (_hs256_with_public_key, "algorithm 'HS256' is not accepted"),
    "unknown kid": (lambda pem, kid: signed(pem, "k-unknown", claims()), "unknown signing key id"),
    "tampered payload": (_tampered, "bad signature"),
    "garbage": (lambda pem, kid: "not.a.jwt", "malformed token"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_bad_token_is_refused_with_its_reason(
    keys: tuple[TokenKeys, str, str], case: str
) -> None:
    k, kid, pem = keys
    make, reason = CASES[case]
    with pytest.raises(InvalidToken) as err:
        k.verify(make(pem, kid), T0)
    assert str(err.value) == reason


def test_leeway_is_small_and_exact(keys: tuple[TokenKeys, str, str]) -> None:
    k, kid, pem = keys
    token = signed(pem, kid, claims(T0 - 900))  # exp == T0
    k.verify(token, T0 + 4.0)  # within the 5 s leeway
    with pytest.raises(InvalidToken, match="token expired"):
        k.verify(token, T0 + 6.0)


def test_signing_keys_rotate_and_old_ones_verify_for_a_token_lifetime() -> None:
    k = TokenKeys(CFG)
    assert k.needs_rotation(T0) and k.signer(T0) is None
    old_kid, old_pem = generate_key()
    k.add(old_kid, old_pem, T0)
    assert k.signer(T0).kid == old_kid  # the only key signs at once  # type: ignore[union-attr]
    old_token, _ = k.issue("key_1", "fam_1", T0 + 100)
    assert not k.needs_rotation(T0 + 86399) and k.needs_rotation(T0 + 86400)

    new_kid, new_pem = generate_key()
    t1 = T0 + 86400
    k.add(new_kid, new_pem, t1)
    # Published, not yet signing: a replica that has not heard of it must not see its tokens.
    assert k.signer(t1 + ACTIVATE - 0.1).kid == old_kid  # type: ignore[union-attr]
    assert k.signer(t1 + ACTIVATE).kid == new_kid  # type: ignore[union-attr]
    last_old, _ = k.issue("key_1", "fam_1", t1 + ACTIVATE - 0.1)
    # The old key verifies as long as the last token it signed can live, then it is gone.
    limit = t1 + ACTIVATE + CFG.access_ttl + CFG.leeway
    assert k.verify(last_old, limit - 1.5).key_id == "key_1"
    assert set(k.verifiers(limit - 1)) == {old_kid, new_kid}
    assert set(k.verifiers(limit)) == {new_kid}
    k.prune(limit)
    with pytest.raises(InvalidToken, match="unknown signing key id"):
        k.verify(old_token, limit)
