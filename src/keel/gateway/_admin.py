"""Operating a running gateway: the status page, its data, the admin actions, readiness.

* ``GET /status`` — the status page (``status.html``: no build step, no CDN). The page itself
  holds no data: without the admin key it shows what ``/readyz`` says per model group and asks
  for the key; with it (typed in, or in the URL fragment ``#key=…``, which browsers never send)
  it polls ``/admin/state`` every second and offers the admin buttons.
* ``GET /admin/state`` — ``Keel.snapshot()`` as JSON (admin key).
* ``POST /admin/deployments/{name}/reset|drain|undrain`` and ``POST /admin/reload`` (admin
  key; an optional JSON body ``{"reason": "…", "by": "…"}`` is logged with the action).
* ``GET /readyz`` — 200 when every model group could be served now, else 503 naming each
  group that cannot and why (for load balancers; no key needed, no key shown).
"""

from __future__ import annotations

import asyncio
import logging
import time
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from keel.auth._http import require_admin
from keel.config import ConfigError
from keel.engine._errors import KeelError
from keel.engine._keel import Keel
from keel.engine._reload import NoConfigFile
from keel.engine._snapshot import deployment_view
from keel.gateway._sink import error_response

log = logging.getLogger("keel.admin")

_ACTIONS = ("reset", "drain", "undrain")
_STATUS_HTML: bytes | None = None


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _guard(fn: Any) -> Any:
    """KeelError → its OpenAI-shaped answer; anything else the gateway's 500."""

    async def run(request: web.Request) -> web.StreamResponse:
        try:
            result: web.StreamResponse = await fn(request)
            return result
        except KeelError as exc:
            return error_response(exc)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:
            from keel.gateway._app import internal_error

            return await internal_error(request, exc)

    return run


async def _intent(request: web.Request) -> tuple[str, str]:
    """Who asks (the admin key's holder, and the name they give) and why, from the body."""
    raw = await request.read()
    body: Any = {}
    if raw.strip():
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise KeelError(400, "The body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise KeelError(
            400, 'The body must be a JSON object like {"reason": "…"}.', code="invalid_body"
        )
    unknown = sorted(set(body) - {"reason", "by"})
    if unknown:
        raise KeelError(
            400,
            f"Unknown field {unknown[0]!r}; an admin action takes 'reason' and 'by'.",
            code="invalid_body",
            param=unknown[0],
        )
    for field in ("reason", "by"):
        if field in body and not isinstance(body[field], str):
            raise KeelError(400, f"'{field}' must be a string.", code="invalid_body", param=field)
    by = body.get("by", "")[:100]
    who = f"admin ({by})" if by else "admin"
    return who, body.get("reason", "")[:500]


def _log(action: str, target: str, who: str, why: str, request: web.Request) -> None:
    log.warning(
        "admin action %s on %s by %s from %s: %s",
        action,
        target,
        who,
        request.remote or "?",
        why or "(no reason given)",
        extra={"action": action, "target": target, "who": who, "reason": why},
    )


@_guard
async def state(request: web.Request) -> web.Response:
    return _json(require_admin(request).snapshot())


@_guard
async def deployment_action(request: web.Request) -> web.Response:
    keel = require_admin(request)
    name, action = request.match_info["name"], request.match_info["action"]
    if action not in _ACTIONS:
        raise KeelError(
            404,
            f"Unknown admin action {action!r}; use one of {', '.join(_ACTIONS)}.",
            code="unknown_url",
        )
    dep = next((d for d in keel.router.deployments() if d.name == name), None)
    if dep is None:
        names = ", ".join(d.name for d in keel.router.deployments())
        raise KeelError(
            404,
            f"No deployment is named {name!r}; this gateway has: {names}.",
            code="deployment_not_found",
        )
    who, why = await _intent(request)
    if action == "reset":
        dep.reset()
        changed = True
    elif action == "drain":
        changed = dep.drain()
    else:
        changed = dep.undrain()
    _log(action, name, who, why, request)
    view = deployment_view(dep, keel.monitor, time.monotonic(), time.time())
    return _json(
        {"object": "keel.admin_action", "action": action, "changed": changed, "deployment": view}
    )


@_guard
async def reload_config(request: web.Request) -> web.Response:
    keel = require_admin(request)
    who, why = await _intent(request)
    try:
        result = keel.reload()
    except NoConfigFile as exc:
        raise KeelError(409, f"Nothing to reload: {exc}.", code="no_config_file") from None
    except ConfigError as exc:
        raise KeelError(400, f"The config was not reloaded: {exc}", code="invalid_config") from None
    _log("reload", str(keel.config_path), who, why, request)
    return _json({"object": "keel.reload", **result})


def reload_now(keel: Keel) -> None:
    """SIGHUP: what ``POST /admin/reload`` does, logged (a bad file leaves the running config)."""
    try:
        result = keel.reload()
    except (NoConfigFile, ConfigError) as exc:
        log.error("SIGHUP: config not reloaded: %s", exc)
        return
    log.warning(
        "SIGHUP: reloaded %s (added %s, removed %s, changed %s)",
        keel.config_path,
        result["added"] or "none",
        result["removed"] or "none",
        result["changed"] or "none",
        extra={"action": "reload", "who": "SIGHUP"},
    )


@_guard
async def readyz(request: web.Request) -> web.Response:
    from keel.gateway._app import KEEL_KEY

    blocked = request.app[KEEL_KEY].readiness()
    if not blocked:
        return _json({"status": "ready"})
    return _json({"status": "not ready", "groups": blocked}, status=503)


@_guard
async def status_page(request: web.Request) -> web.Response:
    global _STATUS_HTML
    if _STATUS_HTML is None:
        _STATUS_HTML = resources.files("keel.gateway").joinpath("status.html").read_bytes()
    return web.Response(
        body=_STATUS_HTML,
        content_type="text/html",
        charset="utf-8",
        headers={
            # The page's own script and style only; it talks to this origin alone.
            "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; "
            "style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
            "referrer-policy": "no-referrer",
            "cache-control": "no-store",
        },
    )


ROUTES: list[tuple[str, str, Any]] = [
    ("/readyz", "GET", readyz),
    ("/status", "GET", status_page),
    ("/admin/state", "GET", state),
    ("/admin/deployments/{name:.+}/{action}", "POST", deployment_action),
    ("/admin/reload", "POST", reload_config),
]
