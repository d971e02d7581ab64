"""Upstream error classification: (dialect, status, headers, body) -> a typed verdict.

Pure and I/O-free. Every row of shared/faults.md §1 and the mid-stream error frames of §2 map
to exactly one ``UpstreamError`` whose flags tell the attempt loop what to do:

* ``retryable``  - the *same* deployment may succeed if asked again (after ``retry_after``).
* ``failover``   - *another* deployment could succeed (false for client mistakes that fail
                   anywhere: invalid request, context length, input moderation).
* ``disable_key_for`` - seconds to take this deployment's key out of rotation (auth, billing).

TODO(issue 2): implementation pending.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Dialect(StrEnum):
    OPENAI = "openai"
    DASHSCOPE = "dashscope"
    AZURE = "azure"
    ANTHROPIC = "anthropic"  # OpenAI-compatible endpoint that may emit Anthropic-style errors
    DEEPSEEK = "deepseek"
    MOONSHOT = "moonshot"
    VLLM = "vllm"


class ErrorKind(StrEnum):
    RATE_LIMIT = "rate_limit"  # RPM/TPM/concurrency throttling: retry after the hint
    REQUEST_TOO_LARGE = "request_too_large"  # request > TPM limit: fails on same-limit deployments
    QUOTA = "quota"  # billing / spend cap / free tier spent: bench the key, fail over
    AUTH = "auth"  # bad key / wrong region: bench the key, fail over
    INVALID_REQUEST = "invalid_request"  # client mistake: fails anywhere
    NOT_FOUND = "not_found"  # unknown model on this deployment: fail over
    CONTEXT_LENGTH = "context_length"  # prompt too long: fails anywhere with the same context
    MODERATION = "moderation"  # input (or output, mid-stream) content filter
    OVERLOADED = "overloaded"  # provider overloaded: retry
    SERVER = "server"  # 5xx / HTML from a proxy / mid-stream server_error: retry
    TIMEOUT = "timeout"  # connect / first token / idle / total timeout: retry
    CONNECTION = "connection"  # reset, refused, truncated stream: retry
    PROTOCOL = "protocol"  # invalid SSE/JSON, missing finish_reason/[DONE]: retry


@dataclass(frozen=True, slots=True)
class UpstreamError:
    kind: ErrorKind
    message: str  # human text, never containing an API key
    status: int = 0  # upstream HTTP status; 0 when there was no response
    retryable: bool = False
    failover: bool = True
    retry_after: float | None = None  # seconds, from headers or the message text
    disable_key_for: float | None = None  # seconds to bench the key
    code: str | None = None  # upstream error code, normalised
    type: str | None = None  # OpenAI error type to show the client
    param: str | None = None

    @property
    def client_status(self) -> int:
        """The HTTP status keel shows its client when this is the final error."""
        raise NotImplementedError

    def client_body(self) -> dict[str, Any]:
        """OpenAI-shaped ``{"error": {message, type, param, code}}``."""
        raise NotImplementedError


def classify_response(
    dialect: Dialect | str, status: int, headers: Mapping[str, str], body: bytes, now: float
) -> UpstreamError:
    """Classify a non-2xx upstream response. ``now`` is wall-clock epoch seconds (for HTTP
    dates and RFC 3339 reset timestamps)."""
    raise NotImplementedError


def classify_stream_error(dialect: Dialect | str, payload: Mapping[str, Any]) -> UpstreamError:
    """Classify an error frame that arrived inside a 200 stream (OpenAI ``{"error": …}``,
    DashScope output moderation, Anthropic ``{"type":"error","error":{…}}``)."""
    raise NotImplementedError
