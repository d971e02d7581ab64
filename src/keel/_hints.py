"""Retry hints: ``retry-after`` (seconds or HTTP date), ``retry-after-ms``, ``x-ratelimit-reset-*``
Go durations (``1s``, ``6m0s``, ``644ms``), ``anthropic-ratelimit-*-reset`` RFC 3339 timestamps,
and message text ("Please try again in 644ms", "Please retry after 86400 seconds"). Pure.

Sources, most trusted first (shared/faults.md §1, "Headers worth reading"):

1. ``retry-after-ms`` - milliseconds; the most precise thing a provider says.
2. ``retry-after`` - delta-seconds or an HTTP date (relative to ``now``; past dates -> 0).
3. the error message - OpenAI/Azure put the real wait there ("Please try again in 644ms").
4. ``x-ratelimit-reset-{requests,tokens}`` - Go durations; when the reset of the full bucket
   happens, so an upper bound on the wait (see ``_ratelimit_reset``).
5. ``anthropic-ratelimit-*-reset`` - RFC 3339 timestamps, same idea.

Sources 4 and 5 are sent with *every* response, so they only mean "wait this long" on a rate
limit; callers pass ``use_reset_headers=False`` for other errors. Every value is clamped to >= 0;
negative, non-finite and garbage values are ignored as if absent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

__all__ = [
    "lower_headers",
    "parse_go_duration",
    "retry_after_hint",
    "retry_after_hint_with_source",
]

# Go's time.ParseDuration units as (multiplier, divisor): dividing by 1000 rather than
# multiplying by 1e-3 keeps "644ms" == 0.644 exactly. "ms" must precede "m" and "s" in the
# alternation below. Both micro signs (U+00B5 and U+03BC) are accepted, as Go does.
_GO_UNITS: dict[str, tuple[float, float]] = {
    "ns": (1.0, 1e9),
    "us": (1.0, 1e6),
    "\u00b5s": (1.0, 1e6),
    "\u03bcs": (1.0, 1e6),
    "ms": (1.0, 1e3),
    "s": (1.0, 1.0),
    "m": (60.0, 1.0),
    "h": (3600.0, 1.0),
}
_GO_UNIT_RE = "ns|us|\u00b5s|\u03bcs|ms|s|m|h"
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_GO_PART = re.compile(rf"({_NUMBER})({_GO_UNIT_RE})")
_GO_DURATION = re.compile(rf"(?:{_NUMBER}(?:{_GO_UNIT_RE}))+")
_PLAIN_SECONDS = re.compile(rf"\+?({_NUMBER})")

# "Please try again in 644ms." / "try again in 1.5s" / "try again in 6m0s" /
# "Please retry after 86400 seconds." / "retry after 20 seconds" / "try again in 2 minutes".
_MESSAGE_HINT = re.compile(
    r"(?:try\s+again|retry)\s+(?:in|after)\s+"
    rf"(?:(?P<go>(?:{_NUMBER}(?:{_GO_UNIT_RE}))+)(?![A-Za-z])"
    rf"|(?P<num>{_NUMBER})\s*(?P<unit>[A-Za-z]+))",
    re.IGNORECASE,
)

_RESET_LIMITS = ("requests", "tokens")
_ANTHROPIC_LIMITS = ("requests", "tokens", "input-tokens", "output-tokens")


def parse_go_duration(text: str) -> float | None:
    """``"6m0s"`` -> 360.0, ``"644ms"`` -> 0.644, ``"-1"``/garbage -> None.

    Also accepts a plain number of seconds (``"2"``, ``"0.5"``): some providers send that in
    the ``x-ratelimit-reset-*`` headers. Negative durations are rejected (None): a reset in the
    past is not a wait.
    """
    text = text.strip()
    plain = _PLAIN_SECONDS.fullmatch(text)
    if plain is not None:
        return _finite(float(plain.group(1)))
    if text.startswith("+"):  # Go accepts an explicit plus sign
        text = text[1:]
    if not _GO_DURATION.fullmatch(text):
        return None
    total = 0.0
    for num, unit in _GO_PART.findall(text):
        mult, div = _GO_UNITS[unit]
        total += float(num) * mult / div
    return _finite(total)


def retry_after_hint(
    headers: Mapping[str, str],
    message: str,
    now: float,
    *,
    limit: str | None = None,
    use_reset_headers: bool = True,
) -> float | None:
    """The best retry-after hint in seconds, or None. Header names are matched
    case-insensitively. ``now`` is wall-clock epoch seconds.

    ``limit`` is the exhausted limit when the caller knows it (``"requests"`` or ``"tokens"``,
    e.g. OpenAI's error ``type``); it picks the matching ``x-ratelimit-reset-*`` header.
    ``use_reset_headers=False`` skips sources 4 and 5 (for errors that are not rate limits).
    """
    found = retry_after_hint_with_source(
        headers, message, now, limit=limit, use_reset_headers=use_reset_headers
    )
    return None if found is None else found[0]


def retry_after_hint_with_source(
    headers: Mapping[str, str],
    message: str,
    now: float,
    *,
    limit: str | None = None,
    use_reset_headers: bool = True,
) -> tuple[float, str] | None:
    """Like ``retry_after_hint`` but also names the source (a header name or ``"message"``),
    for logging why keel waited."""
    h = lower_headers(headers)

    ms = _plain_seconds(h.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000.0, "retry-after-ms"

    retry_after = _retry_after(h.get("retry-after"), now)
    if retry_after is not None:
        return retry_after, "retry-after"

    in_message = _message_hint(message)
    if in_message is not None:
        return in_message, "message"

    if not use_reset_headers:
        return None
    return _ratelimit_reset(h, limit) or _anthropic_reset(h, now)


def lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Lower-cased header names. Works for plain dicts with mixed-case keys as well as
    multidicts (first value wins, like ``CIMultiDict.get``)."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        if isinstance(name, str) and isinstance(value, str):
            out.setdefault(name.lower(), value)
    return out


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _plain_seconds(text: str | None) -> float | None:
    """A non-negative decimal number, or None (rejects "-1", "inf", "1e3", "")."""
    if text is None:
        return None
    match = _PLAIN_SECONDS.fullmatch(text.strip())
    return None if match is None else _finite(float(match.group(1)))


def _retry_after(text: str | None, now: float) -> float | None:
    """``retry-after``: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if text is None:
        return None
    seconds = _plain_seconds(text)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" means UTC with unknown local zone
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def _message_hint(message: str) -> float | None:
    match = _MESSAGE_HINT.search(message)
    if match is None:
        return None
    if match.group("go") is not None:
        return parse_go_duration(match.group("go").lower())
    unit = _word_unit(match.group("unit"))
    if unit is None:
        return None
    mult, div = unit
    return _finite(float(match.group("num")) * mult / div)


def _word_unit(unit: str) -> tuple[float, float] | None:
    """(multiplier, divisor) for a unit written out in a message ("20 seconds", "500 ms")."""
    unit = unit.lower()
    if unit in ("ms", "msec", "msecs") or unit.startswith("millisecond"):
        return 1.0, 1e3
    if unit in ("s", "sec", "secs") or unit.startswith("second"):
        return 1.0, 1.0
    if unit in ("m", "min", "mins") or unit.startswith("minute"):
        return 60.0, 1.0
    if unit in ("h", "hr", "hrs") or unit.startswith("hour"):
        return 3600.0, 1.0
    return None


def _ratelimit_reset(h: Mapping[str, str], limit: str | None) -> tuple[float, str] | None:
    """OpenAI-style ``x-ratelimit-reset-{requests,tokens}``.

    Which one? The one for the exhausted limit: ``limit`` when the caller knows it (OpenAI's
    429 ``type`` is ``requests`` or ``tokens``), else the one whose ``x-ratelimit-remaining-*``
    is ``0``. When that is still ambiguous, the *larger* reset: a reset value is when the bucket
    is full again, so the larger one is an upper bound after which both limits have room.
    Waiting for the smaller one is optimistic and risks a second 429 that costs an attempt
    from the retry budget; the plan caps long hints (and fails over) anyway.

    Zero and negative values are ignored: Azure sends ``-1``/``0`` when it has no value, and a
    reset of zero on a 429 contradicts the 429 itself.
    """
    resets: dict[str, float] = {}
    for name in _RESET_LIMITS:
        raw = h.get(f"x-ratelimit-reset-{name}")
        value = None if raw is None else parse_go_duration(raw)
        if value is not None and value > 0:
            resets[name] = value
    return _pick(resets, h, "x-ratelimit-remaining-{}", "x-ratelimit-reset-{}", limit)


def _anthropic_reset(h: Mapping[str, str], now: float) -> tuple[float, str] | None:
    """``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-reset``: RFC 3339
    timestamps. A timestamp in the past means the limit has already reset: 0."""
    resets: dict[str, float] = {}
    for name in _ANTHROPIC_LIMITS:
        raw = h.get(f"anthropic-ratelimit-{name}-reset")
        when = None if raw is None else _rfc3339(raw)
        if when is not None:
            resets[name] = max(0.0, when - now)
    return _pick(
        resets, h, "anthropic-ratelimit-{}-remaining", "anthropic-ratelimit-{}-reset", None
    )


def _pick(
    resets: Mapping[str, float],
    h: Mapping[str, str],
    remaining_header: str,
    reset_header: str,
    limit: str | None,
) -> tuple[float, str] | None:
    """The relevant reset: the named limit, else the exhausted ones, else all; the largest."""
    if not resets:
        return None
    if limit is not None and limit in resets:
        return resets[limit], reset_header.format(limit)
    exhausted = [n for n in resets if h.get(remaining_header.format(n), "").strip() == "0"]
    name = max(exhausted or resets, key=lambda n: resets[n])
    return resets[name], reset_header.format(name)


def _rfc3339(text: str) -> float | None:
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()
