"""OpenTelemetry for keel: a span per request, a child span per upstream attempt, and the GenAI
client metrics, exported over OTLP/HTTP.

Spans are built when the request is over, from its ``Record`` (``keel.engine._observe``)
with the record's own timestamps: nothing runs on the request's path but the record's plain
bookkeeping, and a request that is not sampled costs one sampler call. Names and attributes
follow the OpenTelemetry GenAI semantic conventions: the request span is keel's answer to its
client (``SERVER``, ``chat {model group}``), each attempt is keel calling a provider
(``CLIENT``, ``chat {upstream model}``), and the metrics are per attempt, what a GenAI client
measures (``gen_ai.client.operation.duration``, ``gen_ai.client.token.usage``,
``gen_ai.client.operation.time_to_first_chunk``).

The SDK's environment variables apply as everywhere: ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``/``_ARG``, ``OTEL_BSP_*`` (batch delay
and size), ``OTEL_EXPORTER_OTLP_*`` (endpoint, headers, timeout, compression),
``OTEL_METRIC_EXPORT_INTERVAL``, ``OTEL_PROPAGATORS`` (W3C ``traceparent`` by default).
The tracer and meter providers are keel's own: an application that embeds keel keeps its
global ones.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.metrics import Histogram
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

from keel import __version__
from keel._classify import Dialect
from keel.config._observe import TelemetryConfig
from keel.engine._observe import Attempt, Record

# gen_ai.provider.name: the conventions' well-known values where there is one.
PROVIDER = {
    Dialect.OPENAI: "openai",
    Dialect.AZURE: "azure.ai.openai",
    Dialect.ANTHROPIC: "anthropic",
    Dialect.DEEPSEEK: "deepseek",
    Dialect.DASHSCOPE: "alibaba.dashscope",
    Dialect.MOONSHOT: "moonshot",
    Dialect.VLLM: "vllm",
}
# Bucket boundaries the GenAI conventions advise.
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                     40.96, 81.92)  # fmt: skip
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                  16777216, 67108864)  # fmt: skip
_TTFC_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0)  # fmt: skip


def _signal_endpoint(cfg: TelemetryConfig, signal: str) -> str | None:
    """The exporter's endpoint: the environment's when set (the exporter reads it), else the
    config's base URL with the signal's path."""
    if os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    ):
        return None
    if cfg.endpoint:
        return cfg.endpoint.rstrip("/") + f"/v1/{signal}"
    return None


def _metrics_reachable(cfg: TelemetryConfig) -> bool:
    """Metrics go where the traces go only when a collector is named for them: a
    traces-only endpoint must not send metrics to the default localhost:4318."""
    return bool(
        cfg.endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    )


def _resource(cfg: TelemetryConfig) -> Resource:
    attrs: dict[str, Any] = {"service.version": __version__}
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    if not named:
        attrs[SERVICE_NAME] = cfg.service_name
    return Resource.create(attrs)


class Telemetry:
    """The OpenTelemetry observer of one engine."""

    def __init__(self, cfg: TelemetryConfig) -> None:
        resource = _resource(cfg)
        self.tracer_provider: TracerProvider | None = None
        self.meter_provider: MeterProvider | None = None
        if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() != "none":
            self.tracer_provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_*
            exporter = OTLPSpanExporter(endpoint=_signal_endpoint(cfg, "traces"))
            self.tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = (
            self.tracer_provider.get_tracer("keel", __version__)
            if self.tracer_provider is not None
            else None
        )
        self.duration: Histogram | None = None
        metrics_on = os.environ.get("OTEL_METRICS_EXPORTER", "otlp").strip().lower() != "none"
        if cfg.metrics and metrics_on and _metrics_reachable(cfg):
            interval = None
            if not os.environ.get("OTEL_METRIC_EXPORT_INTERVAL"):
                interval = cfg.metrics_interval * 1000
            reader = PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=_signal_endpoint(cfg, "metrics")),
                export_interval_millis=interval,
            )
            self.meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
            meter = self.meter_provider.get_meter("keel", __version__)
            self.duration = meter.create_histogram(
                "gen_ai.client.operation.duration",
                unit="s",
                description="GenAI operation duration.",
                explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
            )
            self.tokens = meter.create_histogram(
                "gen_ai.client.token.usage",
                unit="{token}",
                description="Number of input and output tokens used.",
                explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
            )
            self.first_chunk = meter.create_histogram(
                "gen_ai.client.operation.time_to_first_chunk",
                unit="s",
                description="Time to receive the first chunk of a streamed response.",
                explicit_bucket_boundaries_advisory=_TTFC_BUCKETS,
            )
        self._servers: dict[str, tuple[str, int]] = {}

    # -- the observer -------------------------------------------------------------------------

    def finished(self, record: Record) -> None:
        if self.tracer is not None:
            self._trace(record)
        if self.duration is not None:
            for a in record.attempts:
                self._measure(a)

    def close(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()  # exports what the batch still holds
        if self.meter_provider is not None:
            self.meter_provider.shutdown()

    # -- spans --------------------------------------------------------------------------------

    def _trace(self, rec: Record) -> None:
        tracer = self.tracer
        assert tracer is not None
        parent: Context | None = None
        if rec.traceparent is not None:
            carrier = {"traceparent": rec.traceparent}
            if rec.tracestate is not None:
                carrier["tracestate"] = rec.tracestate
            parent = propagate.extract(carrier)
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "keel.request_id": rec.rid,
            "keel.attempts": len(rec.attempts),
            "http.response.status_code": rec.status,
        }
        if rec.model:
            attrs["gen_ai.request.model"] = rec.model
            attrs["keel.stream"] = rec.stream
        if rec.principal:
            attrs["keel.principal"] = rec.principal
        if rec.attempts:
            attrs["keel.deployments"] = [a.deployment.name for a in rec.attempts]
            answered = next((a for a in reversed(rec.attempts) if a.ok), rec.attempts[-1])
            attrs["gen_ai.provider.name"] = PROVIDER.get(answered.deployment.dialect, "openai")
        if rec.response_model:
            attrs["gen_ai.response.model"] = rec.response_model
        if rec.finish_reasons:
            attrs["gen_ai.response.finish_reasons"] = rec.finish_reasons
        if rec.input_tokens is not None:
            attrs["gen_ai.usage.input_tokens"] = rec.input_tokens
        if rec.output_tokens is not None:
            attrs["gen_ai.usage.output_tokens"] = rec.output_tokens
        error_type = rec.error_type
        if error_type is not None:
            attrs["error.type"] = error_type
        name = f"chat {rec.model}" if rec.model else "chat"
        span = tracer.start_span(name, parent, SpanKind.SERVER, attrs, start_time=rec.start_ns)
        if rec.error is not None:
            span.set_status(Status(StatusCode.ERROR, rec.error.message))
        if rec.first_token_ns:
            span.add_event("gen_ai.first_token", timestamp=rec.first_token_ns)
        if span.is_recording():
            ctx = set_span_in_context(span)
            for a in rec.attempts:
                if a.kind != "first":
                    event: dict[str, Any] = {
                        "keel.deployment": a.deployment.name,
                        "keel.attempt": a.n,
                    }
                    span.add_event(f"keel.{a.kind}", event, timestamp=a.start_ns)
                self._attempt_span(a, ctx, rec)
        span.end(end_time=rec.end_ns)

    def _attempt_span(self, a: Attempt, ctx: Context, rec: Record) -> None:
        tracer = self.tracer
        assert tracer is not None
        dep = a.deployment
        attrs = self._attempt_attributes(a)
        attrs["keel.attempt"] = a.n
        attrs["keel.attempt.kind"] = a.kind
        attrs["keel.attempt.outcome"] = a.outcome
        attrs["keel.deployment"] = dep.name
        if a.continuation is not None:
            attrs["keel.continuation.mode"] = a.continuation
        usage = a.usage
        if usage is not None:
            p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if type(p) is int:
                attrs["gen_ai.usage.input_tokens"] = p
            if type(c) is int:
                attrs["gen_ai.usage.output_tokens"] = c
        err = a.error
        if err is not None and err.status:
            attrs["http.response.status_code"] = err.status
        span = tracer.start_span(
            f"chat {dep.model}", ctx, SpanKind.CLIENT, attrs, start_time=a.start_ns
        )
        if err is not None:
            span.set_status(Status(StatusCode.ERROR, err.message))
        if a.first_token_ns:
            span.add_event("gen_ai.first_token", timestamp=a.first_token_ns)
        span.end(end_time=a.end_ns or rec.end_ns)

    def _attempt_attributes(self, a: Attempt) -> dict[str, Any]:
        """The attributes an attempt's span and metrics share."""
        dep = a.deployment
        server = self._servers.get(dep.name)
        if server is None:
            parts = urlsplit(dep.cfg.base_url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            server = self._servers[dep.name] = (parts.hostname or "", port)
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": PROVIDER.get(dep.dialect, "openai"),
            "gen_ai.request.model": dep.model,
            "server.address": server[0],
            "server.port": server[1],
        }
        if a.ok:
            attrs["gen_ai.response.model"] = dep.model
        if a.error is not None:
            attrs["error.type"] = a.error.kind.value
        return attrs

    # -- metrics -------------------------------------------------------------------------------

    def _measure(self, a: Attempt) -> None:
        if not a.end_ns:
            return
        attrs = self._attempt_attributes(a)
        assert self.duration is not None
        self.duration.record((a.end_ns - a.start_ns) / 1e9, attrs)
        if a.first_token_ns:
            self.first_chunk.record((a.first_token_ns - a.start_ns) / 1e9, attrs)
        usage = a.usage
        if usage is not None:
            p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if type(p) is int:
                self.tokens.record(p, {**attrs, "gen_ai.token.type": "input"})
            if type(c) is int:
                self.tokens.record(c, {**attrs, "gen_ai.token.type": "output"})
