"""A deployment at run time: its config plus the facts the driver, the limiter and the
balancer read — its key taken out of rotation (auth/billing), a cool-down (a retry hint too
long to wait out), and as fields its limiter, breaker and latency estimate, so that every
layer looks at one place per deployment.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp

from keel import __version__
from keel._cadence import Cadence, FirstToken
from keel._classify import Dialect, UpstreamError
from keel._health import Breaker, PeakEwma
from keel._status import Ring
from keel.config import DeploymentConfig, Timeouts

if TYPE_CHECKING:
    from keel.engine._limits import DeploymentLimiter
    from keel.engine._operation import Operation

log = logging.getLogger("keel.deployment")
USER_AGENT = f"keel/{__version__}"

_DEFAULT_CONTINUATION = {
    # Providers that continue a trailing assistant message (prefill) natively or with a flag.
    Dialect.DASHSCOPE: "prefill",
    Dialect.DEEPSEEK: "prefill",
    Dialect.VLLM: "prefill",
    Dialect.ANTHROPIC: "prefill",
    Dialect.MOONSHOT: "prefill",
    # OpenAI and Azure ignore a trailing assistant message as a prefix: ask in words instead.
    Dialect.OPENAI: "instruct",
    Dialect.AZURE: "instruct",
}


class Urls(dict["Operation", str]):
    """A deployment's upstream URL per operation (``keel.engine._operation``), made the first
    time one is asked for: ``dep.urls[op]``."""

    __slots__ = ("base", "dialect")

    def __init__(self, base: str, dialect: Dialect) -> None:
        super().__init__()
        self.base = base
        self.dialect = dialect

    def __missing__(self, op: Operation) -> str:
        url = self[op] = self.base + op.path_for(self.dialect)
        return url


@dataclass(eq=False, slots=True)
class Deployment:
    group: str
    index: int
    cfg: DeploymentConfig
    timeouts: Timeouts
    name: str = ""
    urls: Urls = field(default=None, repr=False)  # type: ignore[assignment]  # per operation
    native: bool = False  # api: responses — it serves POST /responses itself
    endpoint: str = ""  # scheme://host:port of base_url, safe to log
    model: str = ""
    auth_header: str = ""
    continuation: str = "none"
    weight: float = 1.0  # the balancer's share (cfg.weight, read per request)
    # Headers of every upstream request (built once: aiohttp copies them per request).
    request_headers: dict[str, str] = field(default_factory=dict, repr=False)
    # Read on every attempt, so copied out of ``timeouts`` once: an attribute of a pydantic
    # model costs ~0.3k instructions more than a slot's. aiohttp's own timer, for the connect
    # only (our deadlines bound the rest), is built once too (~1.5 µs each).
    first_token_timeout: float = field(default=0.0, repr=False)
    total_timeout: float = field(default=0.0, repr=False)
    client_timeout: aiohttp.ClientTimeout = field(default=None, repr=False)  # type: ignore[assignment]
    in_flight: int = 0
    # health
    benched_until: float = 0.0  # monotonic; auth/billing: out of rotation
    cooldown_until: float = 0.0  # monotonic; a rate-limit hint longer than we wait for
    bench_reason: str = ""
    bench_code: str = ""  # the upstream's code for it (insufficient_quota, …), for operators
    # An operator's drain: out of rotation like a benched key (``benched_until`` is infinite,
    # so the balancer's one check covers both); the key's own bench is held here meanwhile.
    drained: bool = False
    _held_bench: tuple[float, str, str] = (0.0, "", "")
    # limits, breaker and latency (keel.engine._limits.wire sets them from the config)
    limiter: DeploymentLimiter = field(default=None, repr=False)  # type: ignore[assignment]
    breaker: Breaker = field(default_factory=Breaker)
    latency: PeakEwma = field(default_factory=PeakEwma)
    cadence: Cadence = field(default_factory=Cadence)  # the usual gap between stream tokens
    first_token: FirstToken = field(default_factory=FirstToken)  # a stream's, usually
    answer_time: FirstToken = field(default_factory=FirstToken)  # a non-stream answer's
    outcomes: Counter[str] = field(default_factory=Counter)  # attempts by outcome (metrics)
    # For the status page (keel.engine._snapshot): written once per attempt, read on demand.
    took: Ring = field(default_factory=Ring, repr=False)  # seconds per successful attempt
    first_tokens: Ring = field(default_factory=Ring, repr=False)  # seconds to a stream's commit
    # (wall time, kind, upstream status, message) of the last failed attempts
    failures: deque[tuple[float, str, int, str]] = field(
        default_factory=lambda: deque(maxlen=20), repr=False
    )

    def __post_init__(self) -> None:
        self.name = self.cfg.name or f"{self.group}/{self.index}"
        self.urls = Urls(self.cfg.base_url.rstrip("/"), self.cfg.dialect)
        self.native = self.cfg.api == "responses"
        # For logs: scheme, host and port only — a base URL may carry credentials
        # (user:pass@host, ?api-key=…) that must never reach a log line.
        parts = urlsplit(self.cfg.base_url)
        port = f":{parts.port}" if parts.port else ""
        self.endpoint = f"{parts.scheme}://{parts.hostname or ''}{port}"
        self.model = self.cfg.model or self.group
        self.weight = self.cfg.weight
        key = self.cfg.api_key.get_secret_value()
        self.auth_header = f"Bearer {key}" if key else ""
        # An explicit User-Agent keeps aiohttp from adding its own (and on its fast header
        # path); a deployment's own ``headers:`` may override it.
        h = {"content-type": "application/json", "user-agent": USER_AGENT, **self.cfg.headers}
        if self.auth_header:
            h["authorization"] = self.auth_header
        self.request_headers = h
        t = self.timeouts
        self.first_token_timeout, self.total_timeout = t.first_token, t.total
        self.client_timeout = aiohttp.ClientTimeout(total=None, sock_connect=t.connect)
        self.continuation = self.cfg.continuation or _DEFAULT_CONTINUATION.get(
            self.cfg.dialect, "none"
        )

    @property
    def dialect(self) -> Dialect:
        return self.cfg.dialect

    def available(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return now >= self.benched_until and now >= self.cooldown_until

    def record_failure(
        self, err: UpstreamError, bench_for: float | None = None, now: float | None = None
    ) -> None:
        """Report one failed attempt; ``bench_for`` seconds takes the key out of rotation."""
        now = time.monotonic() if now is None else now
        self.failures.append((time.time(), err.kind.value, err.status, err.message[:300]))
        if bench_for:
            if self.drained:  # an attempt that was in flight when it was drained
                until = max(self._held_bench[0], now + bench_for)
                self._held_bench = (until, err.kind.value, err.code or "")
            else:
                self.benched_until = max(self.benched_until, now + bench_for)
                self.bench_reason = err.kind.value
                self.bench_code = err.code or ""
            # Loud on purpose: an operator has to act (rotate a key, pay a bill). No key here.
            log.error(
                "deployment %s (%s) taken out of rotation for %.0fs: %s — %s",
                self.name,
                self.endpoint,
                bench_for,
                err.kind.value,
                err.message,
                extra={"event": "benched", "deployment": self.name, "reason": err.kind.value,
                       "seconds": bench_for},
            )  # fmt: skip

    def cool_down(self, seconds: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.cooldown_until = max(self.cooldown_until, now + seconds)

    # -- operator actions (keel.gateway._admin) -----------------------------------------------

    def drain(self) -> bool:
        """No new attempts (those in flight finish); False when it already was drained."""
        if self.drained:
            return False
        self.drained = True
        self._held_bench = (self.benched_until, self.bench_reason, self.bench_code)
        self.benched_until = math.inf
        return True

    def undrain(self) -> bool:
        """Back in rotation (a key bench that ran meanwhile still applies)."""
        if not self.drained:
            return False
        self.drained = False
        self.benched_until, self.bench_reason, self.bench_code = self._held_bench
        self._held_bench = (0.0, "", "")
        return True

    def reset(self) -> None:
        """Put it back: its key bench, cool-down, pause or hold and breaker (an ejection
        included) are forgotten, as is its failure score. A drain stays (``undrain`` ends
        that)."""
        if self.drained:
            self._held_bench = (0.0, "", "")
        else:
            self.benched_until, self.bench_reason, self.bench_code = 0.0, "", ""
        self.cooldown_until = 0.0
        self.breaker.reset()
        self.latency.failing = 0.0
        lim = self.limiter
        if lim is not None:
            lim.paused_until = 0.0
            lim.end_hold()  # a hold after hint-less refusals (pause, probe, slow start)
            if lim.shared is not None:  # what this replica published must not bench it again
                lim.shared.forget(lim.health_key)
