"""Configuration of the WebSocket door and of resumable streams (README, "WebSocket and
resumable streams"). Re-exported by ``keel.config``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ResumeConfig(_Strict):
    """Streams a client asked to be resumable (``x-keel-resumable: true`` or
    ``"resumable": true``): their chunks are buffered, and when the client's connection drops
    the upstream keeps generating for ``grace`` seconds, waiting for the client to come back.
    A finished stream stays resumable for ``grace`` seconds too. Memory is bounded: a stream
    keeps at most ``max_stream_bytes`` of chunks (the oldest go first), all streams together
    ``max_total_bytes`` (the oldest finished streams go first, then new resumable streams are
    refused)."""

    grace: float = Field(30.0, gt=0)
    max_stream_bytes: int = Field(1024 * 1024, gt=0)
    max_total_bytes: int = Field(64 * 1024 * 1024, gt=0)
    max_streams: int = Field(10_000, gt=0)


class WebSocketConfig(_Strict):
    """``GET /v1/ws``: ``heartbeat`` seconds between pings (a peer that does not answer
    within half of it is dead and its socket closed), at most ``max_requests`` running
    requests per socket, messages up to ``max_message_bytes`` (larger ones get an error, the
    socket stays open; beyond 4x that the WebSocket protocol's own 1009 close applies), and
    ``auth_timeout`` seconds for a socket opened without credentials to authenticate."""

    heartbeat: float = Field(20.0, gt=0)
    max_requests: int = Field(100, gt=0)
    max_message_bytes: int = Field(1024 * 1024, gt=0)
    auth_timeout: float = Field(10.0, gt=0)
