"""The ``telemetry:`` and ``logging:`` sections: OpenTelemetry export and keel's log lines."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TelemetryConfig(_Strict):
    """OpenTelemetry traces and GenAI metrics over OTLP/HTTP. On when ``enabled`` is true, or
    (``enabled`` unset) when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set; ``enabled: false`` keeps it off whatever
    the environment says. The standard ``OTEL_*`` variables (service name, resource
    attributes, sampler, batch delay, headers) apply; ``endpoint`` and ``service_name`` here
    are defaults they override."""

    enabled: bool | None = None
    endpoint: str | None = None  # the collector's base URL (…:4318); /v1/traces is added
    service_name: str = "keel"
    metrics: bool = True  # the GenAI client metrics, exported next to the traces
    metrics_interval: float = Field(60.0, gt=0)  # seconds between two metric exports

    @field_validator("endpoint")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        from urllib.parse import urlsplit

        if v is not None:
            parts = urlsplit(v)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("telemetry.endpoint must be an http:// or https:// URL")
        return v


class LoggingConfig(_Strict):
    """``format``: text (one readable line per event) or json (one object per line);
    ``keel serve --log-format`` overrides it. ``access``: one line per request at info
    level. ``log_bodies``: the access line carries the request's messages — off by default,
    prompts are the clients' data."""

    format: Literal["text", "json"] = "text"
    access: bool = True
    log_bodies: bool = False
