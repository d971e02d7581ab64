"""Fault and directive syntax: pure parsing and selection, no I/O.

Three ways to ask for a fault (the server applies them; see ``_server.py``):

* forced, per request: header ``x-sim-fault: trunc=3`` or a directive in the last user message
  ``[[sim:trunc=3,len=40]]``; ``[[sim@a:e500*2]]`` only applies on the simulator named ``a``;
  a ``*K`` suffix limits the fault to the first K attempts of the same prompt on this simulator;
* per API key: ``--key-faults "sk-dead=auth,sk-broke=quota"`` (persistent);
* probabilistic: ``--faults "r429=0.1,trunc=0.05" --seed 7`` draws at most one fault per request
  from a seeded ``random.Random``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Phase = Literal["error", "reset", "stream"]
Param = Literal["n", "s"] | None  # "n": content-chunk index, "s": seconds


@dataclass(frozen=True, slots=True)
class FaultSpec:
    phase: Phase
    param: Param = None
    default: float | None = None  # parameter value when a forced fault gives none


_ERRORS = (
    "r429_ds", "quota", "quota_ds", "free_quota_ds", "too_large", "auth", "arrearage", "balance",
    "ctx", "inspect", "content_filter_az", "e500", "e503", "e529", "e502_html", "e504_html",
    "moonshot",
)  # fmt: skip
# Faults that end or freeze a stream after N content chunks (the earliest one applies).
TERMINAL = frozenset(
    ("trunc", "trunc_mid", "stall", "stall_ka", "err_mid", "inspect_mid", "anth_err_mid")
)
_MODIFIERS = (
    "no_finish", "null_finish", "empty_finish", "no_done", "garbage", "crlf", "cr", "frag",
    "keepalive",
)  # fmt: skip

FAULTS: dict[str, FaultSpec] = {
    **{name: FaultSpec("error") for name in _ERRORS},
    "r429": FaultSpec("error", "s", 0.02),  # short hints by default so tests stay fast
    "r429_long": FaultSpec("error", "s", 86400.0),
    "concurrency": FaultSpec("error", "s", 0.02),  # what --max-concurrency answers with
    "window": FaultSpec("error", "s", 1.0),  # what --rate-limit answers with
    "reset": FaultSpec("reset"),
    **{name: FaultSpec("stream", "n", 3) for name in (*TERMINAL, "garbage_fatal")},
    **{name: FaultSpec("stream") for name in _MODIFIERS},
    "slow_first": FaultSpec("stream", "s", 1.0),
    "slow_token": FaultSpec("stream", "s", 1.0),
}

#: Non-fault directive settings and whether they take a value.
SETTINGS = {"len": True, "delay": True, "overlap": True, "tool": False}


class DirectiveError(ValueError):
    """A malformed or unknown directive; the server answers 400 so typos surface at once."""


@dataclass(frozen=True, slots=True)
class Fault:
    name: str
    value: float | None = None  # chunk index or seconds; None -> the spec's default
    limit: int | None = None  # ``*K``: only the first K attempts of the same prompt

    @property
    def spec(self) -> FaultSpec:
        return FAULTS[self.name]

    def param(self) -> float:
        v = self.value if self.value is not None else self.spec.default
        return float(v) if v is not None else 0.0


@dataclass(slots=True)
class Directives:
    faults: list[Fault] = field(default_factory=list)
    length: int | None = None
    delay: float | None = None
    overlap: int | None = None
    tool: bool = False

    def update(self, other: Directives) -> None:
        """Merge ``other`` into self; its settings win."""
        self.faults.extend(other.faults)
        self.length = other.length if other.length is not None else self.length
        self.delay = other.delay if other.delay is not None else self.delay
        self.overlap = other.overlap if other.overlap is not None else self.overlap
        self.tool = self.tool or other.tool


_ITEM_RE = re.compile(r"^([a-z0-9_]+)(?:=([0-9.eE+-]+))?(?:\*([0-9]+))?$")
_DIRECTIVE_RE = re.compile(r"\[\[sim(?:@([^:\]]*))?:([^\]]*)\]\]")


def parse_items(text: str) -> Directives:
    """``"trunc=3*2,len=40,tool"`` -> Directives."""
    out = Directives()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        m = _ITEM_RE.match(item)
        if not m:
            raise DirectiveError(f"malformed sim directive item {item!r}")
        name, value, limit = m.group(1), m.group(2), m.group(3)
        try:
            num = float(value) if value is not None else None
        except ValueError:
            raise DirectiveError(f"bad value in sim directive item {item!r}") from None
        if name in SETTINGS:
            if SETTINGS[name] and num is None:
                raise DirectiveError(f"sim directive {name!r} needs a value")
            if name == "len":
                out.length = int(num or 0)
            elif name == "delay":
                out.delay = num
            elif name == "overlap":
                out.overlap = int(num or 0)
            else:
                out.tool = True
        elif name in FAULTS:
            if num is not None and FAULTS[name].param is None:
                raise DirectiveError(f"sim fault {name!r} takes no value")
            out.faults.append(Fault(name, num, int(limit) if limit is not None else None))
        else:
            raise DirectiveError(f"unknown sim fault or setting {name!r}")
    return out


def _targets(target: str | None, sim_name: str) -> bool:
    return target is None or target == sim_name


def parse_directives(text: str, sim_name: str) -> Directives | None:
    """All ``[[sim:...]]`` / ``[[sim@name:...]]`` directives in ``text`` addressed to this
    simulator, merged in order; None when there are none (the common, fast case)."""
    if "[[sim" not in text:
        return None
    out: Directives | None = None
    for m in _DIRECTIVE_RE.finditer(text):
        if _targets(m.group(1), sim_name):
            out = out or Directives()
            out.update(parse_items(m.group(2)))
    return out


def parse_header(value: str, sim_name: str) -> Directives | None:
    """``x-sim-fault: trunc=3`` or ``x-sim-fault: @a:trunc=3``."""
    value = value.strip()
    if value.startswith("@"):
        target, _, value = value[1:].partition(":")
        if not _targets(target, sim_name):
            return None
    return parse_items(value)


def parse_rates(text: str | None) -> tuple[tuple[str, float], ...]:
    """``"r429=0.1,trunc=0.05"`` -> ((name, probability), ...); probabilities sum to <= 1."""
    rates: list[tuple[str, float]] = []
    for raw in (text or "").split(","):
        item = raw.strip()
        if not item:
            continue
        name, sep, p = item.partition("=")
        name = name.strip()
        if name not in FAULTS:
            raise DirectiveError(f"unknown sim fault {name!r}")
        try:
            prob = float(p) if sep else 1.0
        except ValueError:
            raise DirectiveError(f"bad probability in {item!r}") from None
        if not 0.0 <= prob <= 1.0:
            raise DirectiveError(f"probability out of range in {item!r}")
        rates.append((name, prob))
    if sum(p for _, p in rates) > 1.0 + 1e-9:
        raise DirectiveError("fault probabilities sum to more than 1")
    return tuple(rates)


def draw(rates: Iterable[tuple[str, float]], rng: random.Random, n_chunks: int) -> Fault | None:
    """At most one fault for one request. Always consumes exactly two numbers from ``rng`` so
    the fault sequence depends only on the seed and the request order. Chunk-index parameters
    are drawn uniformly over the answer's chunks; other parameters take their defaults."""
    r, u = rng.random(), rng.random()
    acc = 0.0
    for name, p in rates:
        acc += p
        if r < acc:
            if FAULTS[name].param == "n":
                return Fault(name, float(int(u * max(1, n_chunks))))
            return Fault(name)
    return None


def parse_key_faults(text: str | None) -> dict[str, Fault]:
    """``"sk-dead=auth,sk-slow=r429=0.5"`` -> {api key: fault}."""
    out: dict[str, Fault] = {}
    for raw in (text or "").split(","):
        item = raw.strip()
        if not item:
            continue
        key, sep, fault = item.partition("=")
        parsed = parse_items(fault) if sep else Directives()
        if len(parsed.faults) != 1:
            raise DirectiveError(f"key fault {item!r} must name exactly one fault")
        out[key.strip()] = parsed.faults[0]
    return out


class AttemptCounter:
    """Per-simulator attempt counts behind the ``*K`` limiter."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[tuple[str, Fault], int] = {}

    def allow(self, prompt: str, fault: Fault) -> bool:
        """Count this attempt; True while it is among the first ``fault.limit`` ones."""
        if fault.limit is None:
            return True
        key = (prompt, fault)
        n = self._counts.get(key, 0)
        self._counts[key] = n + 1
        return n < fault.limit

    def clear(self) -> None:
        self._counts.clear()
