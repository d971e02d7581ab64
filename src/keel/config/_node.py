"""Configuration of ``keel node``, the RabbitMQ voice-bot worker (README, "The voice-bot
worker"). Re-exported by ``keel.config`` as the ``node:`` section."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeTTS(_Strict):
    """Synthesis of every segment on a model group whose deployments serve
    ``/v1/audio/speech``."""

    model: str
    voice: str = "alloy"
    format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "pcm"
    # Segments synthesised ahead of the one whose audio is being published (order on the
    # bus is kept either way): 1 lets segment k+1 synthesise while k plays.
    lookahead: int = Field(1, ge=0, le=8)


class NodeConfig(_Strict):
    # A URL with credentials: kept secret so it never shows in a repr or a log line.
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    model: str = "chat"  # the model group that answers (its fallbacks and all)
    system: str | None = None  # the system prompt of every conversation
    history_turns: int = Field(10, ge=0)  # earlier turns sent with each new one, per session
    max_tokens: int | None = Field(None, ge=1)  # bound on an answer (ends with "length")
    tts: NodeTTS | None = None
    # "events": segment/end messages (README); "seq": the original chat node's wire format
    # ({"seq": 1, 2, …, "text"}, the last seq negated — always).
    protocol: Literal["events", "seq"] = "events"
    # Names on the bus (configurable so tests and several deployments never share them).
    requests_queue: str = "keel.chat.requests"
    events_exchange: str = "keel.chat.events"
    control_exchange: str = "keel.control"
    tts_exchange: str = "keel.tts.events"
    dead_letter_exchange: str = "keel.chat.dead"  # malformed requests go here (and its queue)
    # Unacked requests per node: the bound on turns one node runs at once.
    prefetch: int = Field(32, ge=1, le=10000)
    max_segment_chars: int = Field(100, ge=1)
    min_segment_chars: int = Field(0, ge=0)
    max_sessions: int = Field(10000, ge=1)  # conversations remembered (least recent forgotten)
    finished_ttl: float = Field(3600.0, gt=0)  # seconds a finished turn is remembered (Redis)
