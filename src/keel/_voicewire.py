"""The voice-bot worker's messages on the bus (README, "The voice-bot worker"). Pure: bytes in,
checked values out; values in, the dicts to publish out.

* In: ``{"session", "turn", "text"}`` on the requests queue; ``{"type": "cancel", "session"}``
  on the control exchange. Anything else is ``Malformed`` (the worker dead-letters it).
* Out, per turn, ``ChatWire``: segments then exactly one end — as ``segment``/``end`` events
  (``protocol: events``) or in the original chat node's format (``protocol: seq``:
  ``{"seq": 1, 2, 3, …, "text"}``, the last seq negated, *always*: after a stop the last
  sentence carries it, after an error, a cancel or ``length`` an empty one with the reason).
  ``TTSWire``: audio chunks then one end.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Literal

import orjson

Protocol = Literal["events", "seq"]
FINISH_REASONS = ("stop", "length", "content_filter", "cancelled", "error")
_ID_MAX = 256  # a session or turn id longer than this is a bug upstream, not an id


class Malformed(ValueError):
    """A message the worker cannot act on; the text says why (for the log line)."""


@dataclass(frozen=True, slots=True)
class Utterance:
    session: str
    turn: str
    text: str


@dataclass(frozen=True, slots=True)
class Cancel:
    session: str
    # Sent by a worker that received a newer utterance of the session: every worker
    # cancels the session's running turn unless it is this one.
    by_turn: str | None = None


def _object(body: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise Malformed("not JSON") from None
    if not isinstance(obj, dict):
        raise Malformed(f"a JSON {type(obj).__name__}, not an object")
    return obj


def _id(obj: dict[str, Any], key: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not v:
        raise Malformed(f"'{key}' missing or not a non-empty string")
    if len(v) > _ID_MAX:
        raise Malformed(f"'{key}' longer than {_ID_MAX} characters")
    return v


def parse_utterance(body: bytes) -> Utterance:
    obj = _object(body)
    session, turn = _id(obj, "session"), _id(obj, "turn")
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise Malformed("'text' missing or not a non-empty string")
    return Utterance(session, turn, text)


def parse_control(body: bytes) -> Cancel:
    obj = _object(body)
    if obj.get("type") != "cancel":
        raise Malformed(f"unknown control type {obj.get('type')!r}")
    by = obj.get("by_turn")
    return Cancel(_id(obj, "session"), by if isinstance(by, str) else None)


def cancel_message(session: str, by_turn: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "cancel", "session": session}
    if by_turn is not None:
        msg["by_turn"] = by_turn
    return msg


def error_of(body: Any) -> dict[str, Any]:
    """The ``{"message", "type", "code"}`` of an OpenAI-shaped error body."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return {"message": str(body), "type": "server_error", "code": None}
    return {"message": str(err.get("message")), "type": err.get("type"), "code": err.get("code")}


class ChatWire:
    """The chat messages of one turn, in order. ``segment`` and ``end`` return what to publish
    now (seq holds each sentence back until it knows whether it is the last)."""

    __slots__ = ("_held", "_seq", "ended", "protocol", "session", "turn")

    def __init__(self, protocol: Protocol, session: str, turn: str) -> None:
        self.protocol = protocol
        self.session = session
        self.turn = turn
        self._seq = 0
        self._held: str | None = None
        self.ended = False

    def restart(self) -> dict[str, Any]:
        return {"type": "restart", "session": self.session, "turn": self.turn}

    def segment(self, text: str) -> list[dict[str, Any]]:
        assert not self.ended
        if self.protocol == "events":
            msg = {"type": "segment", "session": self.session, "turn": self.turn,
                   "seq": self._seq, "text": text}  # fmt: skip
            self._seq += 1
            return [msg]
        out = self._release()
        self._held = text
        return out

    def end(self, reason: str, error: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        assert not self.ended and reason in FINISH_REASONS
        self.ended = True
        if self.protocol == "events":
            return [{"type": "end", "session": self.session, "turn": self.turn,
                     "seq": self._seq, "finish_reason": reason, "error": error}]  # fmt: skip
        if reason == "stop" and self._held is not None:
            text, self._held = self._held, None
            return [self._seq_msg(text, last=True, reason=reason, error=error)]
        out = self._release()
        out.append(self._seq_msg("", last=True, reason=reason, error=error))
        return out

    def _release(self) -> list[dict[str, Any]]:
        if self._held is None:
            return []
        text, self._held = self._held, None
        return [self._seq_msg(text)]

    def _seq_msg(
        self, text: str, last: bool = False, reason: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        self._seq += 1
        msg: dict[str, Any] = {"session": self.session, "turn": self.turn,
                               "seq": -self._seq if last else self._seq, "text": text}  # fmt: skip
        if last:
            msg["finish_reason"] = reason
            msg["error"] = error
        return msg


class TTSWire:
    """The audio messages of one turn: ``audio`` chunks (base64), then one ``end``."""

    __slots__ = ("_seq", "ended", "session", "turn")

    def __init__(self, session: str, turn: str) -> None:
        self.session = session
        self.turn = turn
        self._seq = 0
        self.ended = False

    def restart(self) -> dict[str, Any]:
        return {"type": "restart", "session": self.session, "turn": self.turn}

    def audio(self, segment: int, data: bytes) -> dict[str, Any]:
        assert not self.ended
        msg = {"type": "audio", "session": self.session, "turn": self.turn, "segment": segment,
               "seq": self._seq, "data": base64.b64encode(data).decode("ascii")}  # fmt: skip
        self._seq += 1
        return msg

    def end(self, reason: str, error: dict[str, Any] | None = None) -> dict[str, Any]:
        assert not self.ended and reason in FINISH_REASONS
        self.ended = True
        return {"type": "end", "session": self.session, "turn": self.turn, "seq": self._seq,
                "finish_reason": reason, "error": error}  # fmt: skip
