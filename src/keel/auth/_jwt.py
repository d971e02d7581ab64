"""Access tokens: RS256 JWTs, signed and verified strictly.

* One algorithm, fixed: ``RS256``. ``alg: none``, HS256 (even "signed" with the public key
  as an HMAC secret) and anything else are refused before a key is looked at.
* ``kid`` picks the verification key; an unknown one is refused. Signing keys rotate every
  ``rotate_every``; an old key verifies for as long as tokens it signed can live
  (its successor's activation + ``access_ttl`` + ``leeway``). A new key signs only after
  ``ACTIVATE`` seconds, so every replica has heard of it before a token it signed arrives.
* ``exp``, ``nbf``, ``iat`` (with ``leeway``), ``iss``, ``aud``, ``sub`` are required.

The keys live in the key database (``keel_signing``), so every replica signs and verifies
with the same ones; they are generated there on first use.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keel.config._limits import JwtConfig

ALGORITHMS = ["RS256"]  # the only one, ever: no negotiation with the token's header
ACTIVATE = 2.0  # seconds a new signing key is published before it signs
_REQUIRED = ["exp", "nbf", "iat", "iss", "aud", "sub"]


class InvalidToken(Exception):
    """Why a token was refused (for the 401's message; never the token itself)."""


def generate_key() -> tuple[str, str]:
    """A new signing key: (kid, private key PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return f"k{secrets.token_hex(6)}", pem


@dataclass(slots=True)
class _Key:
    kid: str
    created_at: float
    private: rsa.RSAPrivateKey
    public: rsa.RSAPublicKey


@dataclass(frozen=True, slots=True)
class Claims:
    key_id: str  # sub: the virtual key the session belongs to
    family: str  # the refresh-token family (revoking it ends the session's access tokens)
    exp: float


class TokenKeys:
    """The signing and verification keys one replica knows, and what they sign."""

    def __init__(self, cfg: JwtConfig) -> None:
        self.cfg = cfg
        self._keys: dict[str, _Key] = {}

    def add(self, kid: str, private_pem: str, created_at: float) -> None:
        if kid in self._keys:
            return
        private = serialization.load_pem_private_key(private_pem.encode(), password=None)
        assert isinstance(private, rsa.RSAPrivateKey)
        self._keys[kid] = _Key(kid, created_at, private, private.public_key())

    def _ordered(self) -> list[_Key]:
        return sorted(self._keys.values(), key=lambda k: (k.created_at, k.kid))

    def needs_rotation(self, now: float) -> bool:
        keys = self._ordered()
        return not keys or keys[-1].created_at + self.cfg.rotate_every <= now

    def signer(self, now: float) -> _Key | None:
        keys = self._ordered()
        active = [k for k in keys if k.created_at + ACTIVATE <= now]
        return active[-1] if active else keys[-1] if keys else None

    def verifiers(self, now: float) -> dict[str, rsa.RSAPublicKey]:
        """The keys tokens may still be signed with: the newest, and each older one until its
        successor has signed for longer than a token lives."""
        keys = self._ordered()
        keep = {}
        for i, k in enumerate(keys):
            nxt = keys[i + 1] if i + 1 < len(keys) else None
            c = self.cfg
            if nxt is None or nxt.created_at + ACTIVATE + c.access_ttl + c.leeway > now:
                keep[k.kid] = k.public
        return keep

    def prune(self, now: float) -> None:
        keep = self.verifiers(now)
        for kid in [k for k in self._keys if k not in keep]:
            del self._keys[kid]

    def issue(self, key_id: str, family: str, now: float) -> tuple[str, float]:
        """A signed access token and its expiry (unix seconds)."""
        key = self.signer(now)
        if key is None:
            raise RuntimeError("no signing key yet")
        exp = now + self.cfg.access_ttl
        claims = {
            "iss": self.cfg.issuer,
            "aud": self.cfg.audience,
            "sub": key_id,
            "fam": family,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(exp),
            "jti": secrets.token_hex(8),
        }
        token = jwt.encode(claims, key.private, algorithm="RS256", headers={"kid": key.kid})
        return token, float(int(exp))

    def has(self, kid: object, now: float) -> bool:
        """``kid`` is one of this gateway's own verification keys."""
        return isinstance(kid, str) and kid in self.verifiers(now)

    def verify(self, token: str, now: float) -> Claims:
        header = unverified_header(token, ALGORITHMS)
        kid = header.get("kid")
        public = self.verifiers(now).get(kid) if isinstance(kid, str) else None
        if public is None:
            raise InvalidToken("unknown signing key id")
        c = self.cfg
        claims = decode(token, public, ALGORITHMS, c.audience, c.issuer, c.leeway, now, _REQUIRED)
        sub, fam = claims.get("sub"), claims.get("fam")
        if not isinstance(sub, str) or not isinstance(fam, str):
            raise InvalidToken("invalid token")
        return Claims(sub, fam, float(claims["exp"]))


def unverified_header(token: str, algorithms: list[str]) -> dict[str, Any]:
    """The header, once its algorithm is one of ``algorithms`` (checked before any key is
    looked at: the token does not choose how it is verified)."""
    try:
        header: dict[str, Any] = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise InvalidToken("malformed token") from None
    if header.get("alg") not in algorithms:
        raise InvalidToken(f"algorithm {str(header.get('alg'))[:16]!r} is not accepted")
    return header


def decode(
    token: str,
    key: Any,
    algorithms: list[str],
    audience: str,
    issuer: str,
    leeway: float,
    now: float,
    require: list[str],
) -> dict[str, Any]:
    """The verified claims, or InvalidToken saying why. Times are checked here against ``now``
    (one clock for the whole gateway, and testable); signature, audience and issuer by PyJWT."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=algorithms,
            audience=audience,
            issuer=issuer,
            options={
                "require": require,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
    except jwt.InvalidAudienceError:
        raise InvalidToken("wrong audience") from None
    except jwt.InvalidIssuerError:
        raise InvalidToken("wrong issuer") from None
    except jwt.InvalidSignatureError:
        raise InvalidToken("bad signature") from None
    except jwt.PyJWTError:
        raise InvalidToken("invalid token") from None
    exp = claims.get("exp")
    if type(exp) not in (int, float):
        raise InvalidToken("invalid token")
    if float(exp) + leeway <= now:  # type: ignore[arg-type]
        raise InvalidToken("token expired")
    for k in ("nbf", "iat"):
        t = claims.get(k)
        if t is None and k not in require:
            continue
        if type(t) not in (int, float):
            raise InvalidToken("invalid token")
        if float(t) - leeway > now:  # type: ignore[arg-type]
            raise InvalidToken("token not yet valid")
    return claims
