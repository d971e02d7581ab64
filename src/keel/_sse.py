"""Server-Sent Events decoder: a pure, I/O-free state machine (bytes in, events out).

Follows the WHATWG EventSource parsing rules: LF, CRLF and CR line endings (a CRLF split across
two feeds is one line ending), comment lines (``:`` prefix), ``event:``/``data:``/``id:``/``retry:``
fields with one optional space after the colon, multi-line ``data:`` joined with ``\\n``, and
UTF-8 decoded only at line boundaries so a multi-byte character split across reads is never
damaged. Comments are surfaced (not dropped) so callers can tell keep-alives from content —
a keep-alive must not reset an inter-token idle timer.

Hot path: a feed holding whole ``data: {...}\\n\\n`` frames and no CR costs one ``rfind``, one
UTF-8 decode and one ``str.split`` for the whole chunk, then a few string operations per line.
Bytes are never rescanned: an unterminated line waits as a list of pieces that is joined once,
when its terminator arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

_BOM = b"\xef\xbb\xbf"
_LF = 0x0A
_CR = 0x0D


class ServerSentEvent(NamedTuple):
    """One dispatched event. A named tuple, not a dataclass: one is built per relayed frame,
    and a tuple is the cheapest immutable value Python has (~1 µs less per frame than a
    frozen slots dataclass)."""

    data: str
    event: str = "message"
    id: str | None = None  # the stream's last event ID when dispatched (it persists, per spec)
    retry: int | None = None  # a valid ``retry:`` field inside this event's block, if any


_new_event = tuple.__new__  # _new_event(ServerSentEvent, (data, event, id, retry)): no __new__ call


@dataclass(frozen=True, slots=True)
class Comment:
    text: str  # the text after ``:``, with one leading space removed (``: ping`` -> "ping")


class SSEDecoder:
    """Incremental decoder. ``feed`` returns the events completed by these bytes."""

    __slots__ = (
        "_at_start",
        "_data",
        "_event",
        "_head",
        "_in_event",
        "_last_id",
        "_retry",
        "_skip_lf",
        "_stream_retry",
        "_tail",
    )

    def __init__(self) -> None:
        # Pieces of the current unterminated line. Invariant: they contain no CR or LF, so a
        # newline search only ever needs to look at newly fed bytes.
        self._tail: list[bytes] = []
        # Until the first 3 bytes are seen we cannot tell a leading BOM from content.
        self._at_start = True
        self._head = b""
        # The previous feed ended with CR: an LF opening the next feed completes that CRLF.
        self._skip_lf = False
        # The event being built (the spec's data/event type buffers).
        self._data: list[str] = []
        self._event = ""
        self._retry: int | None = None
        self._in_event = False  # a field line arrived since the last blank line
        self._last_id: str | None = None
        self._stream_retry: int | None = None

    @property
    def last_event_id(self) -> str | None:
        """The spec's last event ID buffer (``None`` until an ``id:`` field arrives)."""
        return self._last_id

    @property
    def retry(self) -> int | None:
        """The reconnection time (ms) most recently announced by a valid ``retry:`` field."""
        return self._stream_retry

    def data_payloads(self, data: bytes) -> list[bytes] | None:
        """The fast path, what an LLM stream's reads look like: a read of whole ``data: …``
        events (no other field, one line each) with nothing pending. Their payloads, as the
        upstream's bytes (undecoded: a relay may forward them as they are); None for any
        other read, which ``feed`` takes instead. Either way the read is consumed: the
        events are the ones ``feed`` would return (``payload.decode("utf-8", "replace")``,
        event type "message", ``last_event_id``)."""
        if (
            self._tail
            or self._in_event
            or self._at_start
            or self._skip_lf
            or not data
            or data[-1] != _LF  # an index makes no bytes object, a slice does (~400 instructions)
            or _CR in data  # an int membership test is a plain memchr
        ):
            return None
        # One event per read, like an LLM's tokens: no split. Its first LF is the one before
        # the last (so it ends with a blank line). ``find`` of a byte is a memchr; a count
        # walks every byte.
        if data.find(_LF) == len(data) - 2:
            return [data[6:-2]] if data[:6] == b"data: " else None
        if data[-2:] != b"\n\n":
            return None
        blocks = data.split(b"\n\n")
        blocks.pop()  # the b"" after the last event
        for i, block in enumerate(blocks):
            if block[:6] != b"data: " or _LF in block:
                return None  # another field, a comment, a multi-line event: the line parser
            blocks[i] = block[6:]
        return blocks

    def feed(self, data: bytes) -> list[ServerSentEvent | Comment]:
        payloads = self.data_payloads(data)
        if payloads is not None:
            # Same events as the line parser below, without its per-line work. (Decoding each
            # payload alone is decoding the read: an invalid sequence never spans an LF.)
            last_id = self._last_id
            return [
                _new_event(ServerSentEvent, (p.decode("utf-8", "replace"), "message", last_id, None))
                for p in payloads
            ]
        if self._at_start:
            data = self._strip_bom(data)
        if self._skip_lf and data:
            self._skip_lf = False
            if data[0] == _LF:
                data = data[1:]
        if _CR in data:  # an int membership test is a plain memchr, cheaper than b"\r" in data
            # Rare: normalise CRLF and lone CR to LF. A trailing CR is a complete line ending
            # already; remember it so an LF at the start of the next feed is not a blank line.
            self._skip_lf = data[-1] == _CR
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = data.rfind(b"\n")
        if end < 0:
            if data:
                self._tail.append(data)
            return []
        if self._tail:
            new_len = len(data)
            self._tail.append(data)
            data = b"".join(self._tail)
            end += len(data) - new_len
            self._tail = []
        # Decoding all complete lines at once is safe: LF never occurs inside a multi-byte
        # UTF-8 sequence, and "replace" treats an invalid sequence the same whether or not the
        # following line is decoded along with it.
        if end == len(data) - 1:
            lines = data.decode("utf-8", "replace").split("\n")
        else:
            self._tail.append(data[end + 1 :])
            lines = data[: end + 1].decode("utf-8", "replace").split("\n")
        lines.pop()  # the "" after the final LF
        return self._lines(lines)

    def close(self) -> list[ServerSentEvent | Comment]:
        """End of stream. Per the spec an event without its blank line is discarded.

        The buffered state is kept so that ``has_partial`` still reports the truncation."""
        return []

    @property
    def has_partial(self) -> bool:
        """True when bytes of an unfinished line or event are buffered (a truncation sign)."""
        return bool(self._tail or self._head or self._in_event)

    def _strip_bom(self, data: bytes) -> bytes:
        head = self._head + data
        if len(head) < 3 and _BOM.startswith(head):
            self._head = head  # could still become a BOM: wait for more bytes
            return b""
        self._at_start = False
        self._head = b""
        return head[3:] if head.startswith(_BOM) else head

    def _lines(self, lines: list[str]) -> list[ServerSentEvent | Comment]:
        out: list[ServerSentEvent | Comment] = []
        data = self._data
        for line in lines:
            if not line:
                # Blank line: dispatch if any data line arrived, then reset the event buffers.
                if data:
                    out.append(
                        _new_event(
                            ServerSentEvent,
                            (
                                data[0] if len(data) == 1 else "\n".join(data),
                                self._event or "message",
                                self._last_id,
                                self._retry,
                            ),
                        )
                    )
                    data.clear()
                if self._in_event:
                    self._event = ""
                    self._retry = None
                    self._in_event = False
                continue
            name, _, value = line.partition(":")
            if not name:
                out.append(Comment(value[1:] if value[:1] == " " else value))
                continue
            if value[:1] == " ":
                value = value[1:]
            self._in_event = True
            if name == "data":
                data.append(value)
            elif name == "event":
                self._event = value
            elif name == "id":
                if "\0" not in value:
                    self._last_id = value
            elif name == "retry" and value.isascii() and value.isdigit():
                self._retry = self._stream_retry = int(value)
            # any other field name is ignored, per spec
        return out
