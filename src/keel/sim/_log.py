"""The simulator's in-memory request log and counters (no disk I/O on the hot path)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

LOG_CAPACITY = 100_000


@dataclass(slots=True)
class LogEntry:
    """One request as the simulator saw it. Appended when the request arrives (``t_close`` is
    None while it is in flight) and completed when the handler ends.

    Times are ``time.monotonic()`` (CLOCK_MONOTONIC is system-wide on Linux, so a test in
    another process can compare them with its own readings); ``wall`` is ``time.time()``.
    ``finished`` is True only when the whole planned answer (content and finish chunk) was
    written and the body was closed normally - a truncated, stalled or mid-stream-error response
    is not finished, a response without ``[DONE]`` or ``finish_reason`` (as a fault) is.
    ``key`` is a fingerprint (:func:`keel.sim.key_fingerprint`), never the key itself.
    """

    seq: int
    sim: str
    t_open: float
    wall: float
    t_close: float | None = None
    model: str | None = None
    stream: bool = False
    status: int | None = None  # None: no HTTP response (reset, stall before headers)
    fault: str | None = None  # comma-separated names of the faults applied
    tokens: int = 0  # content chunks actually written
    finished: bool = False
    client_disconnected: bool = False
    continuation: bool = False
    continuation_kind: str | None = None  # "prefill" | "instruct"
    tool_call: bool = False
    key: str | None = None
    prompt: str = ""  # first 80 characters of the directive-free prompt
    request_id: str = ""
    kind: str = "chat"  # "chat" | "speech" | "responses" | "embeddings" | "completions"
    messages: int = 0  # chat: messages in the request (a conversation's history shows here)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RequestLog:
    """Bounded ring of entries plus the counters behind ``/_sim/stats``."""

    def __init__(self, capacity: int = LOG_CAPACITY) -> None:
        self.entries: deque[LogEntry] = deque(maxlen=capacity)
        self.seq = 0  # never reset, so ``since=SEQ`` readers stay consistent
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.by_status: Counter[str] = Counter()
        self.by_fault: Counter[str] = Counter()
        self._changed: asyncio.Event | None = None

    def open(self, sim: str) -> LogEntry:
        self.seq += 1
        self.requests += 1
        entry = LogEntry(self.seq, sim, time.monotonic(), time.time())
        self.entries.append(entry)
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight
        self._notify()
        return entry

    def close(self, entry: LogEntry) -> None:
        entry.t_close = time.monotonic()
        self.in_flight -= 1
        self.by_status[str(entry.status) if entry.status is not None else "none"] += 1
        if entry.fault:
            for name in entry.fault.split(","):
                self.by_fault[name] += 1
        self._notify()

    def _notify(self) -> None:
        # Waking waiters costs nothing when nobody waits (the benchmark case).
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float = 5.0,  # noqa: ASYNC109 - a test helper; a deadline is its whole point
    ) -> None:
        """Wait until ``predicate()`` is true, re-checking whenever a request opens or closes.
        Raises TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not predicate():
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()

    def since(self, seq: int = 0) -> list[LogEntry]:
        if seq <= 0:
            return list(self.entries)
        return [e for e in self.entries if e.seq > seq]

    def clear(self) -> None:
        self.entries.clear()

    def reset(self) -> None:
        self.entries.clear()
        self.requests = 0
        self.max_in_flight = self.in_flight
        self.by_status.clear()
        self.by_fault.clear()

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "by_status": dict(self.by_status),
            "by_fault": dict(self.by_fault),
        }
