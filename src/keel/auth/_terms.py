"""The pure arithmetic of virtual keys: key material, durations, budget periods, prices.

No I/O here (mypy --strict): the store, the cache and the admin API build on it.
"""

from __future__ import annotations

import base64
import calendar
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from hashlib import blake2b
from typing import Any

KEY_PREFIX = "sk-keel-"
REFRESH_PREFIX = "rt-keel-"
CODE_PREFIX = "kc-keel-"
PERIODS = ("day", "week", "month", "total")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def new_secret(prefix: str) -> str:
    """A fresh bearer secret: 256 random bits, URL-safe, with a recognisable prefix (so a
    leaked one is easy to spot in a scanner, and the authenticator knows where to look)."""
    return prefix + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def digest(secret: bytes, token: str) -> str:
    """What the store keeps instead of a token: a keyed BLAKE2b (a MAC; the pepper lives
    outside the rows, so a copy of the rows alone cannot even confirm a guess)."""
    return blake2b(token.encode(), key=secret, digest_size=32).hexdigest()


def parse_duration(value: str | float | int) -> float:
    """``"90d"``, ``"12h"``, ``"30m"``, ``"45s"``, ``"2w"`` or plain seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '90d'")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(value)
        if m is None:
            raise ValueError(f"{value!r} is not a duration like '90d', '12h', '30m' or '45s'")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if not seconds > 0 or math.isinf(seconds):
        raise ValueError("a duration must be positive")
    return seconds


def period_start(period: str, now: float) -> float:
    """Unix time at which the budget period containing ``now`` began (UTC calendar periods:
    the 1st of the month, Monday, midnight; ``total``: never resets)."""
    if period == "total":
        return 0.0
    t = datetime.fromtimestamp(now, UTC)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start = day
    elif period == "week":
        start = day.fromordinal(day.toordinal() - day.weekday()).replace(tzinfo=UTC)
    elif period == "month":
        start = day.replace(day=1)
    else:
        raise ValueError(f"budget_period must be one of {', '.join(PERIODS)}")
    return float(calendar.timegm(start.timetuple()))


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per 1M tokens (``models.<group>.price``)."""

    input: float
    output: float
    cached_input: float


def cost(usage: Mapping[str, Any], rates: Rates) -> float:
    """USD for one request's usage: uncached prompt tokens at ``input``, cached ones (OpenAI's
    ``prompt_tokens_details.cached_tokens``) at ``cached_input``, completion at ``output``.
    A count that is not a positive int (a bool, a float, garbage) counts as 0."""
    # Inline type checks, no helper calls and a dict test, not the Mapping ABC: usage is
    # parsed JSON, and this runs for every request of a priced model (half the cost of the
    # same checks through a helper function).
    prompt = usage.get("prompt_tokens")
    if type(prompt) is not int or prompt < 0:
        prompt = 0
    completion = usage.get("completion_tokens")
    if type(completion) is not int or completion < 0:
        completion = 0
    cached = 0
    details = usage.get("prompt_tokens_details")
    if type(details) is dict:
        c = details.get("cached_tokens")
        if type(c) is int and c > 0:
            cached = c if c < prompt else prompt
    return (
        (prompt - cached) * rates.input + cached * rates.cached_input + completion * rates.output
    ) / 1e6


def money(usd: float) -> str:
    """``$50``, ``$12.5``, ``$0.003`` — the way a budget is said in an error message."""
    text = f"{usd:.6f}".rstrip("0").rstrip(".")
    return f"${text}"


def budget_message(name: str, budget: float, period: str) -> str:
    per = "" if period == "total" else f"/{period}"
    return f"budget of {money(budget)}{per} for key {name} reached"
