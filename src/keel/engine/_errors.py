"""``KeelError``: every failure keel reports, whatever the door — always OpenAI-shaped, never a
traceback, never a key."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from keel._plan import Tried


class KeelError(Exception):
    """A request keel could not serve: ``status`` (the HTTP status the gateway answers with),
    ``body`` (the OpenAI-shaped error object, ``{"error": {"message", "type", "param",
    "code"}}``) and ``headers`` (``retry-after``, ``x-should-retry``, ``x-request-id``, ...).

    Raised before a stream starts, or from a stream's iterator after the chunks it yielded
    when a started stream cannot be completed."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {
            "error": {"message": message, "type": type, "param": param, "code": code}
        }
        # A refusal of keel's own that retrying cannot change (bad input, auth) says so; a
        # 429 or a 5xx may pass with time.
        self.headers: dict[str, str] = (
            {"x-should-retry": "false"} if status < 500 and status != 429 else {}
        )
        if headers:
            self.headers.update(headers)

    @classmethod
    def from_body(cls, status: int, body: dict[str, Any], headers: Mapping[str, str]) -> KeelError:
        """An error whose body was built elsewhere (an upstream's, made safe to show)."""
        err = cls.__new__(cls)
        Exception.__init__(err, body["error"]["message"])
        err.status, err.body, err.headers = status, body, dict(headers)
        return err

    @property
    def message(self) -> str:
        return str(self.body["error"]["message"])

    @property
    def code(self) -> str | None:
        code = self.body["error"].get("code")
        return code if isinstance(code, str) else None

    def __repr__(self) -> str:
        return f"KeelError({self.status}, {self.message!r})"


def final_error(tried: Sequence[Tried], reason: str = "") -> KeelError:
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
    path = "; ".join(f"{t.deployment}: {_short(t)}" for t in tried)
    prefix = f"{reason}. " if reason else ""
    body["error"]["message"] = f"{prefix}{last.message} (upstream attempts: {path})"
    headers = last.client_headers()
    # Several deployments may each have hinted; the client should wait for the soonest.
    hints = [t.error.retry_after for t in tried if t.error.retry_after is not None]
    if "retry-after" in headers and hints:
        headers["retry-after"] = str(max(1, math.ceil(min(hints))))
    return KeelError.from_body(last.client_status, body, headers)


def unavailable_error(reason: str, retry_after: float | None) -> KeelError:
    """Nothing was tried: every deployment was full, benched or behind an open breaker."""
    headers = {}
    if retry_after is not None:  # when capacity should be back
        headers = {"retry-after": str(max(1, math.ceil(retry_after))), "x-should-retry": "true"}
    return KeelError(
        503, reason, type="server_error", code="no_deployment_available", headers=headers
    )


def _short(t: Tried) -> str:
    err = t.error
    return f"{err.kind.value} (HTTP {err.status})" if err.status else err.kind.value
