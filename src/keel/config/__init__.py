"""Gateway configuration: a YAML file validated by pydantic.

Unknown keys are errors (a typo must not silently disable a limit), ``${VAR}`` and
``${VAR:-default}`` are read from the environment, and API keys are ``SecretStr`` so they
never appear in a repr, a log line or an error message.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from keel._classify import Dialect
from keel.config._limits import (
    AdaptiveConcurrency,
    AuthConfig,
    BalancerConfig,
    BreakerConfig,
    ClientConfig,
    QueueConfig,
    SharedConfig,
)
from keel.config._node import NodeConfig
from keel.config._node import NodeTTS as NodeTTS  # the ``node:`` section, re-exported
from keel.config._observe import LoggingConfig, TelemetryConfig
from keel.config._streams import ResumeConfig, WebSocketConfig


class ConfigError(ValueError):
    """The configuration is invalid; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    """Seconds. ``first_token`` runs from sending the request to the first content token (for a
    non-stream request: to the complete response), ``idle`` between content tokens — keep-alive
    comments do not reset it — and ``total`` bounds one attempt."""

    connect: float = Field(5.0, gt=0)
    first_token: float = Field(60.0, gt=0)
    idle: float = Field(30.0, gt=0)
    total: float = Field(600.0, gt=0)
    # Minimum throughput after the first token: fewer than ``min_tokens`` chunks in any
    # ``min_tokens_window`` seconds counts as a stall (0 = off; ``idle`` still applies).
    min_tokens: int = Field(0, ge=0)
    min_tokens_window: float = Field(10.0, gt=0)


class TimeoutOverrides(_Strict):
    connect: float | None = Field(None, gt=0)
    first_token: float | None = Field(None, gt=0)
    idle: float | None = Field(None, gt=0)
    total: float | None = Field(None, gt=0)
    min_tokens: int | None = Field(None, ge=0)
    min_tokens_window: float | None = Field(None, gt=0)

    def apply(self, base: Timeouts) -> Timeouts:
        return base.model_copy(update=self.model_dump(exclude_none=True))


Continuation = Literal["prefill", "instruct", "none"]


class DeploymentConfig(_Strict):
    base_url: str
    api_key: SecretStr = SecretStr("")
    model: str | None = None  # the upstream's model name; default: the group name
    dialect: Dialect = Dialect.OPENAI
    name: str | None = None  # shown in logs/headers; default "<group>/<index>"
    weight: float = Field(1.0, gt=0)
    timeouts: TimeoutOverrides = TimeoutOverrides()
    headers: dict[str, str] = {}
    continuation: Continuation | None = None  # default by dialect
    # "responses": the deployment also serves POST /responses natively (OpenAI, Azure, …), so
    # a Responses request goes to it as it is; "chat": Responses requests are translated.
    api: Literal["chat", "responses"] = "chat"
    # limits (enforced by the limiter layer)
    rpm: int | None = Field(None, gt=0)
    tpm: int | None = Field(None, gt=0)
    max_concurrency: int | None = Field(None, gt=0)
    # Seconds of rpm/tpm that may go out at once above the paced rate. 0 (default) paces
    # strictly: providers enforce per-minute limits over much shorter windows.
    burst: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _one_authorization(self) -> DeploymentConfig:
        # Messages name the field, never the URL: it may carry the credentials in question.
        try:
            parts = urlsplit(self.base_url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise ValueError("base_url is not a valid URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("base_url must be an http:// or https:// URL with a host")
        header = any(k.lower() == "authorization" for k in self.headers)
        if self.api_key.get_secret_value() and header:
            raise ValueError(
                "api_key and headers.authorization are both set; an upstream request has one "
                "Authorization header: keep one of them"
            )
        credentials = parts.username is not None or parts.password is not None
        if credentials and (self.api_key.get_secret_value() or header):
            what = "headers.authorization" if header else "api_key"
            raise ValueError(
                f"base_url carries credentials (user:password@) and {what} is set too; "
                "an upstream request has one Authorization header: keep the credentials "
                f"(HTTP Basic auth) or {what}, not both"
            )
        return self


class CommitBuffer(_Strict):
    """Hold the first ``tokens`` content chunks or ``ms`` milliseconds of a stream (whichever
    comes first) before the client sees anything: a failure inside the buffer restarts the
    answer invisibly, even on deployments that cannot continue a stream. 0/0 = commit at the
    first token (lowest first-token latency)."""

    tokens: int = Field(0, ge=0)
    ms: float = Field(0.0, ge=0)


class Hedge(_Strict):
    """Start a second attempt on another deployment when the first token is late; the first
    to produce a token wins and the other is cancelled at once."""

    enabled: bool = False
    after: float | None = Field(None, gt=0)  # fixed threshold in seconds, or:
    percentile: float = Field(0.95, gt=0, lt=1)  # of the group's recent first-token times
    min_after: float = Field(0.2, ge=0)  # never hedge sooner than this
    max_ratio: float = Field(0.1, ge=0, le=1)  # hedges ≤ this share of requests


class Price(_Strict):
    """USD per 1M tokens, for virtual keys' spend and budgets (keel.auth). ``cached_input``:
    prompt tokens the provider served from its cache (default: the ``input`` price)."""

    input: float = Field(0.0, ge=0)
    output: float = Field(0.0, ge=0)
    cached_input: float | None = Field(None, ge=0)


class ModelGroup(_Strict):
    price: Price | None = None  # spend of virtual keys; none: this group costs nothing
    deployments: list[DeploymentConfig] = Field(min_length=1)
    fallbacks: list[str] = []
    # Output moderation mid-stream: end with finish_reason content_filter (pass), or continue
    # the answer on another deployment (failover) — providers' moderation differs.
    on_content_filter: Literal["pass", "failover"] = "pass"
    commit_buffer: CommitBuffer = CommitBuffer()
    hedge: Hedge = Hedge()


class RetryPolicy(_Strict):
    max_attempts: int = Field(8, ge=1)  # all attempts of one request, across deployments
    max_retries_per_deployment: int = Field(3, ge=0)
    backoff_base: float = Field(0.1, ge=0)
    backoff_cap: float = Field(2.0, ge=0)
    max_retry_wait: float = Field(5.0, ge=0)  # a longer retry-after hint → fail over instead
    budget_ratio: float = Field(0.2, ge=0)
    budget_floor_per_s: float = Field(5.0, ge=0)
    deadline: float = Field(300.0, gt=0)  # whole request, all attempts
    auth_cooldown: float = Field(300.0, ge=0)  # a key that failed auth sits out this long
    quota_cooldown: float = Field(3600.0, ge=0)  # a key out of quota/billing sits out this long


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(4000, ge=0, le=65535)
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)
    api_keys: list[SecretStr] = []  # empty → any bearer token is accepted (local use)
    # Bearer token a scraper must send for GET /metrics (client keys do not open it then: a
    # client is not an operator). None: /v1/models's rules — open on an open gateway, else a
    # client's key or the admin key.
    metrics_key: SecretStr | None = None
    # Client connections (nginx's defaults): the request headers must arrive within
    # header_timeout of their first byte, a request body must not stall for body_timeout, a
    # connection without a request closes after keepalive_timeout.
    header_timeout: float = Field(60.0, gt=0)
    body_timeout: float = Field(60.0, gt=0)
    keepalive_timeout: float = Field(75.0, gt=0)
    # Open client connections; at the cap the longest idle one is closed to make room, or,
    # none idle, a new one gets a 503. None: half the open-file limit (each proxied request
    # holds an upstream connection too).
    max_connections: int | None = Field(None, gt=0)
    # On SIGTERM/SIGINT: how long requests in flight may take to finish; then they are ended
    # (a stream with an error frame and [DONE]). A second signal stops at once.
    drain_timeout: float = Field(25.0, ge=0)
    # Bearer token of the admin API (/admin/keys…); None: the admin API answers 401.
    admin_key: SecretStr | None = None


class GatewayConfig(_Strict):
    server: ServerConfig = ServerConfig()
    timeouts: Timeouts = Timeouts()
    retry: RetryPolicy = RetryPolicy()
    redis_url: str | None = None
    # Virtual keys and spend (keel.auth): postgresql://… (replicas share keys and spend) or
    # sqlite:///path; none: a SQLite file next to the config file (keel.auth._store).
    database_url: str | None = None
    auth: AuthConfig = AuthConfig()
    models: dict[str, ModelGroup] = Field(min_length=1)
    # limits, health, balancing, admission, shared state (keel/config/_limits.py)
    clients: dict[str, ClientConfig] = {}  # principal name → key and limits
    breaker: BreakerConfig = BreakerConfig()
    balancer: BalancerConfig = BalancerConfig()
    adaptive_concurrency: AdaptiveConcurrency = AdaptiveConcurrency()
    queue: QueueConfig = QueueConfig()
    shared: SharedConfig = SharedConfig()
    # the WebSocket door and resumable streams (keel/config/_streams.py)
    websocket: WebSocketConfig = WebSocketConfig()
    resume: ResumeConfig = ResumeConfig()
    node: NodeConfig | None = None  # `keel node`: the RabbitMQ voice-bot worker
    # OpenTelemetry export and log lines (keel/config/_observe.py)
    telemetry: TelemetryConfig = TelemetryConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _node_models_exist(self) -> GatewayConfig:
        if self.node is not None:
            names = [("node.model", self.node.model)]
            if self.node.tts is not None:
                names.append(("node.tts.model", self.node.tts.model))
            for where, name in names:
                if name not in self.models:
                    raise ValueError(f"{where} names unknown model group {name!r}")
        return self

    @model_validator(mode="after")
    def _client_keys_unique(self) -> GatewayConfig:
        seen = {k.get_secret_value() for k in self.server.api_keys}
        for name, client in self.clients.items():
            key = client.key.get_secret_value()
            if key in seen:  # never echo the key itself
                raise ValueError(f"clients.{name}.key is used twice")
            seen.add(key)
        return self

    @model_validator(mode="after")
    def _deployment_names_unique(self) -> GatewayConfig:
        # A deployment's name keys its limits, breaker and leases in Redis and labels its
        # metrics: two deployments answering to one name would share (and corrupt) all that.
        seen: dict[str, str] = {}
        for group_name, group in self.models.items():
            for i, dep in enumerate(group.deployments):
                name = dep.name or f"{group_name}/{i}"  # as keel.gateway names it
                where = f"models.{group_name}.deployments[{i}]"
                if name in seen:
                    raise ValueError(
                        f"{where} is named {name!r} like {seen[name]}; deployment names "
                        "must be unique (they key limits, breakers and metrics)"
                    )
                seen[name] = where
        return self

    @model_validator(mode="after")
    def _fallbacks_exist(self) -> GatewayConfig:
        for name, group in self.models.items():
            for fb in group.fallbacks:
                if fb not in self.models:
                    raise ValueError(f"models.{name}.fallbacks names unknown model group {fb!r}")
        return self


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{where}: environment variable {name} is not set")

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def parse_config(data: Any) -> GatewayConfig:
    try:
        return GatewayConfig.model_validate(_expand(data, "config"))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "config"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            msg = msg.removeprefix("Value error, ")  # pydantic's prefix for our own checks
            lines.append(f"  {loc}: {msg}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None


def load_config(path: str | Path) -> GatewayConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with a 'models' key")
    cfg = parse_config(data)
    if cfg.database_url is None:
        # Zero set-up virtual keys: a SQLite file next to the config (created by the first
        # `keel keys create`; until then the gateway only watches for it).
        p = Path(path).resolve()
        default = p.with_name(f"{p.stem}.keys.db")
        cfg = cfg.model_copy(update={"database_url": f"sqlite:///{default}"})
    return cfg
