"""Configuration of limits, health, balancing, admission and shared state (see README,
"Limits, balancing, breakers and Redis"). Re-exported by ``keel.config``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

Priority = Literal["interactive", "batch"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BreakerConfig(_Strict):
    """Per deployment: open after ``failures`` consecutive failed attempts, or when
    ``failure_ratio`` of at least ``min_requests`` attempts in ``window`` seconds failed; stay
    open ``cooldown`` seconds (doubling per failed probe up to ``max_cooldown``, never shorter
    than the upstream's Retry-After), then let one probe through."""

    enabled: bool = True  # off: failures never take a deployment out (benching still does)
    failures: int = Field(5, ge=1)
    failure_ratio: float = Field(0.5, gt=0, le=1)
    min_requests: int = Field(20, ge=1)
    window: float = Field(10.0, gt=0)
    cooldown: float = Field(5.0, gt=0)
    max_cooldown: float = Field(60.0, gt=0)


class BalancerConfig(_Strict):
    """Weighted power-of-two-choices on peak-EWMA latency (per output token) x in-flight."""

    decay: float = Field(5.0, gt=0)  # seconds: how fast old latency samples are forgotten


class AdaptiveConcurrency(_Strict):
    """AIMD on the upstream's overload answers (429, 503 overloaded, 529)."""

    enabled: bool = True
    backoff: float = Field(0.9, gt=0, lt=1)  # multiplicative decrease
    probe: float = Field(0.1, gt=0, le=1)  # slots per round of successes above the known ceiling
    min_limit: int = Field(1, ge=1)


class QueueConfig(_Strict):
    """Requests wait for a deployment's capacity up to these bounds (and their deadline);
    interactive ones are served first, batch ones wait longer before being refused."""

    max_waiting: int = Field(1000, ge=0)  # per deployment and replica
    interactive_max_wait: float = Field(10.0, ge=0)
    batch_max_wait: float = Field(120.0, ge=0)


class SharedConfig(_Strict):
    """How replicas share state through ``redis_url``. Redis trouble never fails a request:
    each call has ``timeout`` seconds, then the replica falls back to local limits (taking
    1/N of each budget) and reconnects in the background."""

    prefix: str = "keel"
    timeout: float = Field(0.025, gt=0)
    sync_interval: float = Field(0.2, gt=0)  # breaker/bench/cooldown sync and heartbeat
    reconnect_interval: float = Field(0.5, gt=0)
    replicas: int | None = Field(None, ge=1)  # N before heartbeats tell (default 1)


class ClientConfig(_Strict):
    """A client key (principal) and its limits. Over a limit keel answers 429 with
    ``retry-after`` and OpenAI-style ``x-ratelimit-*`` headers."""

    key: SecretStr
    rpm: int | None = Field(None, gt=0)
    tpm: int | None = Field(None, gt=0)
    max_concurrency: int | None = Field(None, gt=0)
    burst: float = Field(60.0, ge=0)  # seconds of the limit usable at once (60 = a minute's)
    priority: Priority = "interactive"  # default when the request has no x-keel-priority

    @model_validator(mode="after")
    def _key_not_empty(self) -> ClientConfig:
        if not self.key.get_secret_value():
            raise ValueError("client key must not be empty")
        return self


class JwtConfig(_Strict):
    """Access tokens (``POST /v1/auth/token``): RS256 JWTs signed with keys kept in the key
    database (rotated every ``rotate_every`` seconds; old verification keys stay as long as
    tokens they signed can live)."""

    issuer: str = "keel"
    audience: str = "keel"
    access_ttl: float = Field(900.0, gt=0)  # 15 minutes
    refresh_ttl: float = Field(30 * 86400.0, gt=0)
    leeway: float = Field(5.0, ge=0)  # clock skew allowed on exp / nbf / iat
    rotate_every: float = Field(86400.0, gt=0)
    code_ttl: float = Field(600.0, gt=0)  # admin-issued one-time codes


class OidcConfig(_Strict):
    """An external identity provider's JWTs (OIDC), verified with its published keys (JWKS)
    and mapped to a virtual key by one claim: the token may do what that key may."""

    jwks_url: str
    issuer: str
    audience: str
    claim: str = "keel_key"  # its value names the virtual key (its name or its id)
    algorithms: list[str] = ["RS256"]
    refresh_interval: float = Field(300.0, gt=0)  # seconds between JWKS fetches
    leeway: float = Field(5.0, ge=0)

    @model_validator(mode="after")
    def _asymmetric_only(self) -> OidcConfig:
        # A provider's keys are public: an HMAC algorithm would let anyone with the JWKS sign.
        allowed = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                   "ES512", "EdDSA"}  # fmt: skip
        bad = [a for a in self.algorithms if a not in allowed]
        if bad or not self.algorithms:
            raise ValueError(
                f"auth.oidc.algorithms: only public-key algorithms ({', '.join(sorted(allowed))})"
            )
        return self


class AuthConfig(_Strict):
    """Virtual keys (keel.auth): how replicas learn of changes and write spend."""

    # Seconds between polls of the key database; revocations arrive sooner by Postgres
    # LISTEN/NOTIFY or Redis pub/sub (the poll is the safety net, and SQLite's only path).
    sync_interval: float = Field(0.5, gt=0)
    # Spend is counted in memory and written in batches this often.
    spend_flush_interval: float = Field(1.0, gt=0)
    jwt: JwtConfig = JwtConfig()
    oidc: OidcConfig | None = None
