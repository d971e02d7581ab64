"""Server-Sent Events decoder: a pure, I/O-free state machine (bytes in, events out).

Follows the WHATWG EventSource parsing rules: LF, CRLF and CR line endings (a CRLF split across
two feeds is one line ending), comment lines (``:`` prefix), ``event:``/``data:``/``id:``/``retry:``
fields with one optional space after the colon, multi-line ``data:`` joined with ``\\n``, and
UTF-8 decoded only at line boundaries so a multi-byte character split across reads is never
damaged. Comments are surfaced (not dropped) so callers can tell keep-alives from content —
a keep-alive must not reset an inter-token idle timer.

TODO(issue 2): implementation pending.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


@dataclass(frozen=True, slots=True)
class Comment:
    text: str


class SSEDecoder:
    """Incremental decoder. ``feed`` returns the events completed by these bytes."""

    def feed(self, data: bytes) -> list[ServerSentEvent | Comment]:
        raise NotImplementedError

    def close(self) -> list[ServerSentEvent | Comment]:
        """End of stream. Per the spec an event without its blank line is discarded."""
        raise NotImplementedError

    @property
    def has_partial(self) -> bool:
        """True when bytes of an unfinished line or event are buffered (a truncation sign)."""
        raise NotImplementedError
