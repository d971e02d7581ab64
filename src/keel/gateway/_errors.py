"""Errors keel shows its clients: always OpenAI-shaped, never a traceback, never a key."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from keel._classify import UpstreamError

if TYPE_CHECKING:
    from keel.gateway._attempts import Attempts, Exhausted


@dataclass(slots=True)
class ClientError(Exception):
    """A request keel refuses itself (bad input, unknown model, auth, limits)."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, request_id: str = "") -> web.Response:
        headers = {"x-should-retry": "false"} if self.status < 500 and self.status != 429 else {}
        headers.update(self.headers)
        if request_id:
            headers["x-request-id"] = request_id
        return web.Response(
            status=self.status,
            body=orjson.dumps(self.body()),
            content_type="application/json",
            headers=headers,
        )


@dataclass(slots=True)
class Tried:
    deployment: str
    error: UpstreamError


def final_error(
    tried: Sequence[Tried], reason: str = ""
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The error for a request whose attempts all failed: the most telling upstream error,
    with every deployment tried named in the message (names only, never keys or URLs with
    credentials)."""
    last = tried[-1].error
    # A client mistake is the cause whatever else happened; otherwise the last error stands.
    for t in tried:
        if not t.error.failover:
            last = t.error
            break
    body = last.client_body()
    path = "; ".join(f"{t.deployment}: {_short(t.error)}" for t in tried)
    prefix = f"{reason}. " if reason else ""
    body["error"]["message"] = f"{prefix}{last.message} (upstream attempts: {path})"
    headers = last.client_headers()
    # Several deployments may each have hinted; the client should wait for the soonest.
    hints = [t.error.retry_after for t in tried if t.error.retry_after is not None]
    if "retry-after" in headers and hints:
        headers["retry-after"] = str(max(1, math.ceil(min(hints))))
    return last.client_status, body, headers


def _short(err: UpstreamError) -> str:
    return f"{err.kind.value} (HTTP {err.status})" if err.status else err.kind.value


def exhausted_response(request_id: str, state: Attempts, exc: Exhausted) -> web.Response:
    """The HTTP error for a request none of whose attempts succeeded (nothing was streamed)."""
    if not exc.tried:
        err = ClientError(503, exc.reason, type="server_error", code="no_deployment_available")
        if exc.retry_after is not None:  # full or open breakers: when capacity should be back
            err.headers["retry-after"] = str(max(1, math.ceil(exc.retry_after)))
            err.headers["x-should-retry"] = "true"
        resp = err.response(request_id)
        resp.headers.update(state.headers(request_id))
        return resp
    status, body, headers = final_error(exc.tried, exc.reason)
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers={**headers, **state.headers(request_id)},
    )
