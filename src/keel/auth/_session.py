"""``TokenSession``: the client side of a keel token session, as an ``httpx.Auth``.

Give it a virtual key (or a one-time code) once; it trades it for an access JWT and a refresh
token (``POST /v1/auth/token``), puts the JWT on every request, and refreshes it
``refresh_ahead`` seconds before it expires (``POST /v1/auth/refresh``). Requests that need a
token while a refresh is in flight wait for it — many waiting requests make one refresh —
instead of failing; when the refresh token is gone too (expired, revoked) it authenticates
afresh. A 401 from the gateway triggers one renewal and one retry of that request::

    session = TokenSession("http://127.0.0.1:4000/v1", api_key="sk-keel-…")
    client = openai.AsyncOpenAI(base_url="http://127.0.0.1:4000/v1", api_key="unused",
                                http_client=httpx.AsyncClient(auth=session))

Works with ``httpx`` and ``httpx2`` clients (openai 3.x takes either), async only.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any


def _auth_bases() -> tuple[type, ...]:
    bases = []
    for name in ("httpx", "httpx2"):
        try:
            bases.append(importlib.import_module(name).Auth)
        except ImportError:
            continue
    if not bases:
        raise ImportError("keel.auth.TokenSession needs httpx (or httpx2): pip install httpx")
    return tuple(bases)


def _client_module() -> Any:
    for name in ("httpx", "httpx2"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("keel.auth.TokenSession needs httpx (or httpx2)")


class SessionError(Exception):
    """The gateway refused to open a session (a bad key or code): ``status`` and ``body``."""

    def __init__(self, status: int, body: Any) -> None:
        msg = body.get("error", {}).get("message") if isinstance(body, dict) else None
        super().__init__(f"HTTP {status}: {msg or body}")
        self.status, self.body = status, body


class TokenSession(*_auth_bases()):  # type: ignore[misc]
    requires_request_body = False
    requires_response_body = False

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        code: str | None = None,
        refresh_ahead: float = 300.0,
        transport: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if api_key is None and code is None:
            raise ValueError("TokenSession needs an api_key (a virtual key) or a one-time code")
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._code = code
        self.refresh_ahead = refresh_ahead
        self._clock = clock
        self._transport = transport
        self._access: str | None = None
        self._refresh: str | None = None
        self.expires_at = 0.0  # the access token's expiry, by ``clock``
        self._lock: asyncio.Lock | None = None
        self.refreshes = 0  # refresh-token exchanges made
        self.logins = 0  # times it authenticated with the key or code

    # -- httpx.Auth ------------------------------------------------------------------------------

    def sync_auth_flow(self, request: Any) -> Any:
        raise RuntimeError("TokenSession is async: use it with an AsyncClient")

    async def async_auth_flow(self, request: Any) -> AsyncGenerator[Any, Any]:
        token = await self.access_token()
        request.headers["authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            # Revoked elsewhere or expired early (clock skew): renew once, retry once.
            await self._renew(stale=token)
            request.headers["authorization"] = f"Bearer {self._access}"
            yield request

    # -- tokens ----------------------------------------------------------------------------------

    async def access_token(self) -> str:
        """A current access token: the held one, or a fresh one (one refresh at a time)."""
        if self._access is not None and self.expires_at - self._clock() > self.refresh_ahead:
            return self._access
        await self._renew(stale=self._access)
        assert self._access is not None
        return self._access

    async def _renew(self, stale: str | None) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._access is not stale and self._access is not None:
                return  # another request renewed it while this one waited
            if self._refresh is not None:
                status, body = await self._post("/auth/refresh", {"refresh_token": self._refresh})
                if status == 200:
                    self.refreshes += 1
                    self._take(body)
                    return
                if status != 401 and status != 400:
                    raise SessionError(status, body)
                self._refresh = None  # expired or revoked: log in again below
            await self._login()

    async def _login(self) -> None:
        if self._code is not None and self._api_key is None:
            code, self._code = self._code, None  # one-time: never sent twice
            status, body = await self._post("/auth/token", {"code": code})
        else:
            status, body = await self._post("/auth/token", {}, bearer=self._api_key)
        if status != 200:
            raise SessionError(status, body)
        self.logins += 1
        self._take(body)

    def _take(self, body: dict[str, Any]) -> None:
        self._access = body["access_token"]
        self._refresh = body["refresh_token"]
        self.expires_at = self._clock() + float(body["expires_in"])

    async def _post(self, path: str, body: dict[str, Any], bearer: str | None = None) -> Any:
        httpx = _client_module()
        headers = {"authorization": f"Bearer {bearer}"} if bearer else {}
        kw = {"transport": self._transport} if self._transport is not None else {}
        async with httpx.AsyncClient(timeout=30, **kw) as client:
            resp = await client.post(self.base_url + path, json=body, headers=headers)
            try:
                data = resp.json()
            except ValueError:
                data = resp.text
            return resp.status_code, data
