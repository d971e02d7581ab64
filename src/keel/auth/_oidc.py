"""An external identity provider's access tokens (OIDC): its JWKS is fetched in the
background (every ``refresh_interval``, and soon after a token names a key id it does not
know: the provider rotated), tokens are verified strictly against it — the configured
public-key algorithms only, ``exp``/``nbf``/``iat`` with leeway, ``iss``, ``aud`` — and one
claim names the virtual key whose limits, models and budget apply."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import jwt

from keel.auth._jwt import InvalidToken, decode, unverified_header
from keel.config._limits import OidcConfig

log = logging.getLogger("keel.auth")

_MIN_REFETCH = 5.0  # seconds between fetches prompted by unknown key ids


class Oidc:
    def __init__(self, cfg: OidcConfig) -> None:
        self.cfg = cfg
        self.keys: dict[str, Any] = {}
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def verify(self, token: str, now: float) -> tuple[str, float]:
        """(the claim naming the virtual key, exp) of a valid token; InvalidToken otherwise."""
        c = self.cfg
        header = unverified_header(token, c.algorithms)
        kid = header.get("kid")
        key = self.keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            self._wanted.set()  # perhaps rotated at the provider: fetch again soon
            raise InvalidToken("unknown signing key id")
        claims = decode(token, key, c.algorithms, c.audience, c.issuer, c.leeway, now,
                        ["exp", "iss", "aud"])  # fmt: skip
        value = claims.get(c.claim)
        if not isinstance(value, str) or not value:
            raise InvalidToken(f"no {c.claim[:40]!r} claim")
        return value, float(claims["exp"])

    def load(self, jwks: Any) -> None:
        keys = {}
        for jwk in jwks.get("keys", []) if isinstance(jwks, dict) else []:
            if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
                continue
            kid = jwk.get("kid")
            if not isinstance(kid, str):
                continue
            try:
                keys[kid] = jwt.PyJWK(jwk).key
            except jwt.PyJWTError:
                continue
        self.keys = keys

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="keel-oidc-jwks")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _loop(self) -> None:
        import aiohttp

        last = 0.0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            while True:
                wait = self.cfg.refresh_interval if self.keys else 1.0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wanted.wait(), wait)
                    await asyncio.sleep(max(0.0, last + _MIN_REFETCH - time.monotonic()))
                self._wanted.clear()
                last = time.monotonic()
                try:
                    async with session.get(self.cfg.jwks_url) as resp:
                        resp.raise_for_status()
                        self.load(await resp.json(content_type=None))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("could not fetch the OIDC provider's keys (%s)", type(exc).__name__)
