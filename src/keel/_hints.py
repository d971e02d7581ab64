"""Retry hints: ``retry-after`` (seconds or HTTP date), ``retry-after-ms``, ``x-ratelimit-reset-*``
Go durations (``1s``, ``6m0s``, ``644ms``), ``anthropic-ratelimit-*-reset`` RFC 3339 timestamps,
and message text ("Please try again in 644ms", "Please retry after 86400 seconds"). Pure.

TODO(issue 2): implementation pending.
"""

from __future__ import annotations

from collections.abc import Mapping


def parse_go_duration(text: str) -> float | None:
    """``"6m0s"`` -> 360.0, ``"644ms"`` -> 0.644, ``"-1"``/garbage -> None."""
    raise NotImplementedError


def retry_after_hint(headers: Mapping[str, str], message: str, now: float) -> float | None:
    """The best retry-after hint in seconds, or None. Header names are matched
    case-insensitively. ``now`` is wall-clock epoch seconds."""
    raise NotImplementedError
