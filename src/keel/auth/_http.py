"""The HTTP side of keel.auth: the admin API (``/admin/keys…``, ``server.admin_key`` as the
bearer token) and token sessions (``/v1/auth/token``, ``/v1/auth/refresh``).

Answers are OpenAI-shaped errors like every other of keel's; a key's plaintext appears in
exactly two answers — creation and rotation — and nowhere else (not in logs, not in errors).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from aiohttp import web

from keel.auth._service import KeyService
from keel.auth._store import KeySpec, StoreError, public
from keel.engine._auth import bearer, presents
from keel.engine._errors import KeelError
from keel.engine._keel import Keel
from keel.gateway._sink import error_response

log = logging.getLogger("keel.auth")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _keel(request: web.Request) -> Keel:
    from keel.gateway._app import KEEL_KEY

    return request.app[KEEL_KEY]


def _service(keel: Keel) -> KeyService:
    if keel.keys is None:
        raise KeelError(
            404, "Virtual keys need a key database (database_url).", code="keys_disabled"
        )
    return keel.keys


def _admin(request: web.Request) -> KeyService:
    return _service(require_admin(request))


def require_admin(request: web.Request) -> Keel:
    """The engine, when the request carries the admin key (``server.admin_key``) as its
    bearer token; a 401 ``KeelError`` otherwise. Every ``/admin/…`` route checks this."""
    keel = _keel(request)
    key = keel.config.server.admin_key
    if key is None:
        raise KeelError(401, "The admin API is off: set server.admin_key.", code="invalid_api_key")
    if not presents(request.headers, key.get_secret_value()):
        raise KeelError(
            401,
            "The admin API needs the gateway's admin key (server.admin_key) as a bearer token.",
            code="invalid_api_key",
        )
    return keel


async def _body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise KeelError(400, "The body is not valid JSON.", code="invalid_json") from None


def _store_error(exc: StoreError) -> KeelError:
    return KeelError(exc.status, str(exc), code=exc.code, param=exc.param)


def handler(fn: Any) -> Any:
    """KeelError/StoreError → OpenAI-shaped responses; anything else the gateway's 500."""

    async def run(request: web.Request) -> web.StreamResponse:
        try:
            try:
                result: web.StreamResponse = await fn(request)
                return result
            except StoreError as exc:
                raise _store_error(exc) from None
        except KeelError as exc:
            return error_response(exc)
        except Exception as exc:
            if isinstance(exc, OSError) or type(exc).__module__.startswith(("asyncpg", "sqlite3")):
                log.error(
                    "key database error on %s %s: %s",
                    request.method,
                    request.path,
                    type(exc).__name__,
                )
                return error_response(
                    KeelError(
                        503,
                        "The key database is unavailable; try again.",
                        type="server_error",
                        code="database_unavailable",
                        headers={"x-should-retry": "true"},
                    )
                )
            from keel.gateway._app import internal_error

            return await internal_error(request, exc)

    return run


# -- /admin/keys -------------------------------------------------------------------------------


@handler
async def create_key(request: web.Request) -> web.Response:
    svc = _admin(request)
    keel = _keel(request)
    spec = KeySpec.from_json(await _body(request))
    await svc._open(create=True)
    unknown = [m for m in spec.models or () if m not in keel.config.models]
    if unknown:
        raise KeelError(
            400,
            f"Unknown model group(s): {', '.join(unknown)}. "
            f"Available: {', '.join(sorted(keel.config.models))}.",
            code="model_not_found",
            param="models",
        )
    row, token = await svc.store.create_key(spec, reserved=list(keel.config.clients))
    await svc.announce()
    log.info("virtual key %s (%s) created", row["id"], row["name"])
    return _json({**public(row), "key": token}, 201)


@handler
async def keys(request: web.Request) -> web.Response:
    svc = _admin(request)
    if request.method == "POST":
        return await create_key(request)  # type: ignore[no-any-return]
    if request.method not in ("GET", "HEAD"):
        raise _not_allowed(request, "GET, POST")
    rows = await svc.store.list_keys() if await svc._open() else []
    return _json({"object": "list", "data": [_shown(svc, r) for r in rows]})


def _shown(svc: KeyService, row: dict[str, Any]) -> dict[str, Any]:
    """A key with the spend this replica counted and has not written yet."""
    data = public(row)
    vk = svc.by_id.get(row["id"])
    if vk is not None and data["status"] == "active":
        data["spend_usd"] = round(data["spend_usd"] + vk.pending + vk.flushing, 9)
    return data


def _not_allowed(request: web.Request, allowed: str) -> KeelError:
    return KeelError(
        405,
        f"Method {request.method} is not allowed on {request.path}; use {allowed}.",
        code="method_not_allowed",
        headers={"allow": allowed},
    )


async def _opened(svc: KeyService, key_id: str) -> None:
    if not await svc._open():
        raise StoreError(404, f"No key with id {key_id!r}.", "key_not_found")


@handler
async def one_key(request: web.Request) -> web.Response:
    svc = _admin(request)
    key_id = request.match_info["id"]
    await _opened(svc, key_id)
    if request.method in ("GET", "HEAD"):
        return _json(_shown(svc, await svc.store.get_key(key_id)))
    if request.method == "DELETE":
        row = await svc.store.revoke_key(key_id)
        await svc.announce()
        log.info("virtual key %s (%s) revoked", row["id"], row["name"])
        return _json(public(row))
    raise _not_allowed(request, "GET, DELETE")


@handler
async def rotate_key(request: web.Request) -> web.Response:
    svc = _admin(request)
    key_id = request.match_info["id"]
    if request.method != "POST":
        raise _not_allowed(request, "POST")
    await _opened(svc, key_id)
    row, token = await svc.store.rotate_key(key_id)
    await svc.announce()
    log.info("virtual key %s (%s) rotated", row["id"], row["name"])
    return _json({**public(row), "key": token})


@handler
async def create_code(request: web.Request) -> web.Response:
    """A one-time code for ``POST /v1/auth/token`` (a device that should never hold the key)."""
    svc = _admin(request)
    key_id = request.match_info["id"]
    if request.method != "POST":
        raise _not_allowed(request, "POST")
    await _opened(svc, key_id)
    ttl = _keel(request).config.auth.jwt.code_ttl
    code = await svc.store.create_code(key_id, ttl)
    return _json({"code": code, "key_id": key_id, "expires_in": int(ttl)}, 201)


# -- token sessions ----------------------------------------------------------------------------


def _session_refused(message: str, code: str = "invalid_api_key") -> KeelError:
    return KeelError(401, message, code=code)


async def _pair(svc: KeyService, key_id: str, family: str | None, refresh: str | None) -> Any:
    cfg = svc.auth.jwt
    if refresh is None:
        refresh, family = await svc.store.issue_refresh(key_id, family, cfg.refresh_ttl)
    assert family is not None
    await svc.signing_ready()
    access, _exp = svc.tokens.issue(key_id, family, time.time())
    return {
        "access_token": access,
        "refresh_token": refresh,
        "token_type": "Bearer",
        "expires_in": int(cfg.access_ttl),
    }


@handler
async def token(request: web.Request) -> web.Response:
    """A virtual key (bearer) or a one-time code (``{"code": …}``) → a new session."""
    svc = _service(_keel(request))
    await svc._open()
    body = await _body(request)
    code = body.get("code") if isinstance(body, dict) else None
    if code is not None:
        key_id = await svc.store.use_code(code) if isinstance(code, str) else None
        vk = svc.by_id.get(key_id) if key_id else None
        if vk is None or vk.revoked or vk.expires_at <= time.time():
            raise _session_refused("Invalid, used or expired one-time code.", "invalid_code")
    else:
        vk = None
        tok = bearer(request.headers)
        header = request.headers.get("authorization", "")
        found = svc.find(tok, header) if tok.startswith(b"sk-keel-") else None
        if found is not None:
            vk = svc.by_id.get(getattr(found.meter, "id", ""))
        if vk is None:
            raise _session_refused(
                "POST /v1/auth/token needs a virtual key as the bearer token, or a one-time code."
            )
    return _json(await _pair(svc, vk.id, None, None))


@handler
async def refresh(request: web.Request) -> web.Response:
    svc = _service(_keel(request))
    await svc._open()
    body = await _body(request)
    rt = body.get("refresh_token") if isinstance(body, dict) else None
    if not isinstance(rt, str) or not rt:
        raise KeelError(
            400, "'refresh_token' is required.", code="invalid_value", param="refresh_token"
        )
    try:
        key_id, family, nxt = await svc.store.use_refresh(rt, svc.auth.jwt.refresh_ttl)
    except StoreError as exc:
        if exc.code == "refresh_token_reused":
            await svc.announce()  # the family's access tokens die here at once, elsewhere soon
            vk = svc.by_id.get(getattr(exc, "key_id", ""))
            log.warning(
                "refresh token reused for key %s (session %s): the whole session is revoked; "
                "likely a stolen token",
                vk.name if vk else "?",
                getattr(exc, "family", "?"),
            )
        raise
    vk = svc.by_id.get(key_id)
    if vk is None or vk.revoked or vk.expires_at <= time.time():
        raise _session_refused("The key behind this session is revoked or expired.")
    return _json(await _pair(svc, key_id, family, nxt))


# Fixed paths (with the gateway's 405 for other methods) and the ones with an id.
ROUTES: list[tuple[str, str, Any]] = [
    ("/v1/auth/token", "POST", token),
    ("/v1/auth/refresh", "POST", refresh),
]


def add_routes(app: web.Application) -> None:
    app.router.add_route("*", "/admin/keys", keys)
    app.router.add_route("*", "/admin/keys/{id}", one_key)
    app.router.add_route("*", "/admin/keys/{id}/rotate", rotate_key)
    app.router.add_route("*", "/admin/keys/{id}/codes", create_code)
