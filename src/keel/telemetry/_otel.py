"""OpenTelemetry for keel: a span per request, a child span per upstream attempt, and the GenAI
client metrics, exported over OTLP/HTTP (protobuf).

Spans are built when the request is over, from its ``Record`` (``keel.engine._observe``), with
the record's own timestamps, and encoded at once to OTLP protobuf (``keel._otlp``): nothing runs
on the request's path but the record's bookkeeping, an unsampled request costs a sampler call,
and a sampled one a join of mostly cached byte strings. Batches go out from a task on the
engine's loop, over the engine's connection pool. Names and attributes follow the
OpenTelemetry GenAI semantic conventions: the request span is keel's answer to its client
(``SERVER``, ``chat {model group}``), each attempt is keel calling a provider (``CLIENT``,
``chat {upstream model}``), and the metrics are per attempt, what a GenAI client measures
(``gen_ai.client.operation.duration``, ``gen_ai.client.token.usage``,
``gen_ai.client.operation.time_to_first_chunk``).

The standard variables apply, read by the SDK where it has them: ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` (the SDK's resource), ``OTEL_TRACES_SAMPLER``/``_ARG`` (the SDK's
samplers), ``OTEL_BSP_SCHEDULE_DELAY``, ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``,
``OTEL_BSP_MAX_QUEUE_SIZE``, ``OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]ENDPOINT``, ``…_HEADERS``,
``…_TIMEOUT``, ``…_COMPRESSION`` (gzip), ``OTEL_METRIC_EXPORT_INTERVAL``,
``OTEL_TRACES_EXPORTER``/``OTEL_METRICS_EXPORTER=none``. W3C ``traceparent`` is continued.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import os
import random
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import sampling
from opentelemetry.util.re import parse_env_headers

from keel import __version__
from keel import _otlp as otlp
from keel._classify import Dialect
from keel.config._observe import TelemetryConfig
from keel.engine._deployment import Deployment
from keel.engine._observe import FIRST, Attempt, Record

log = logging.getLogger("keel.telemetry")

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
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)  # fmt: skip
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)  # fmt: skip
TTFC_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0)  # fmt: skip
_METRICS = (
    ("duration", "gen_ai.client.operation.duration", "s", "GenAI operation duration."),
    ("tokens", "gen_ai.client.token.usage", "{token}", "Number of input and output tokens used."),
    ("first_chunk", "gen_ai.client.operation.time_to_first_chunk", "s",
     "Time to receive the first chunk of a streamed response."),
)  # fmt: skip
_SHAPES_MAX = 4096  # distinct request shapes cached (beyond: encoded each time)
_REQUEST_ID = otlp.str_attr_head("keel.request_id")
_FIRST_TOKEN = otlp.event_template("gen_ai.first_token")
_FIXED64 = struct.Struct("<Q").pack


_randbits = random.getrandbits
# A request's spans' constant parts (``Telemetry._template``): the request span's, each
# attempt span's, and ``_one``'s layouts by the lengths of a request's own values.
_Layout = tuple[Callable[..., bytes], bytes, bytes]  # a struct's pack, the two spans' heads
_Template = tuple[bytes, tuple[bytes, ...], dict[tuple[Any, ...], _Layout]]


def _one_layout(
    template: _Template, rid: int, u_r: int, u_a: int, ft_r: bool, ft_a: bool, parent: bool
) -> _Layout:
    """``Telemetry._one``'s struct for these lengths, and the two spans' heads: each span's
    field key and length, its constant part, and (the request's) the request id's framing."""
    const_r, (const_a,), _ = template
    ft = 3 + 8 + len(_FIRST_TOKEN[1])  # an event: head, time, name
    rid_head = otlp.str_attr(_REQUEST_ID, "x" * rid)[: -rid or None]  # the value comes last
    ids_r = 4 + 16 + 8 + (10 if parent else 0) + 18  # keys and lengths, ids, times
    ids_a = 4 + 16 + 8 + 10 + 18
    n_r = len(const_r) + len(rid_head) + rid + u_r + (ft if ft_r else 0) + ids_r
    n_a = len(const_a) + u_a + (ft if ft_a else 0) + ids_a
    head_r = otlp.wrap_span(b"\0" * n_r)[:-n_r] + const_r + rid_head
    head_a = otlp.wrap_span(b"\0" * n_a)[:-n_a] + const_a
    event = f"3sQ{len(_FIRST_TOKEN[1])}s"
    fmt = (
        f"<{len(head_r)}s{rid}s{u_r}s" + (event if ft_r else "") + "H16sH8s"
        + ("H8s" if parent else "") + "BQBQ"
        + f"{len(head_a)}s{u_a}s" + (event if ft_a else "") + "H16sH8sH8sBQBQ"
    )  # fmt: skip
    return struct.Struct(fmt).pack, head_r, head_a


def _usage(usage: Mapping[str, Any] | None) -> bytes:
    """An attempt span's token-count attributes from the upstream's usage (ints only)."""
    if usage is None:
        return b""
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return otlp.usage_attrs(p if type(p) is int else None, c if type(c) is int else None)


def _attempt_shape(a: Attempt) -> tuple[Any, ...]:
    """What an attempt span's constant part depends on."""
    err = a.error
    return (
        a.deployment, a.n, a.kind, a.ok, a.continuation,
        err.kind if err is not None else None, err.status if err is not None else 0,
    )  # fmt: skip


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def _env_number(name: str, default: float) -> float:
    try:
        return float(_env(name)) if _env(name) else default
    except ValueError:
        log.warning("%s=%r is not a number: using %g", name, _env(name), default)
        return default


def _endpoint(cfg: TelemetryConfig, signal: str) -> str | None:
    """The signal's URL: ``…_{SIGNAL}_ENDPOINT`` as it is, else the base URL (environment,
    then config) with ``/v1/{signal}``; None: nowhere to send it."""
    own = _env(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    if own:
        return own
    base = _env("OTEL_EXPORTER_OTLP_ENDPOINT") or cfg.endpoint
    if base:
        return base.rstrip("/") + f"/v1/{signal}"
    if signal == "traces":  # enabled without an endpoint: the OTLP/HTTP default
        return "http://localhost:4318/v1/traces"
    return None  # a traces-only endpoint must not send metrics to a default


def _setting(signal: str, name: str) -> str:
    return _env(f"OTEL_EXPORTER_OTLP_{signal.upper()}_{name}") or _env(f"OTEL_EXPORTER_OTLP_{name}")


def _resource(cfg: TelemetryConfig) -> bytes:
    attrs: dict[str, Any] = {"service.version": __version__}
    named = _env("OTEL_SERVICE_NAME") or "service.name=" in _env("OTEL_RESOURCE_ATTRIBUTES")
    if not named:
        attrs[SERVICE_NAME] = cfg.service_name
    res = Resource.create(attrs)  # OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME, detectors
    return otlp.resource(
        {k: v for k, v in res.attributes.items() if isinstance(v, str | bool | int | float)}
    )


def _static_decision(sampler: sampling.Sampler) -> bool | None:
    """True/False when the sampler decides a trace without a parent the same way every time
    (always_on, parentbased_always_on, their _off twins): no call per request then."""
    root = getattr(sampler, "_root", sampler)  # ParentBased keeps its root sampler there
    decision = (
        getattr(root, "_decision", None) if isinstance(root, sampling.StaticSampler) else None
    )
    if decision is None:
        return None
    return bool(decision.is_sampled())


class _Exporter:
    """One signal's OTLP/HTTP endpoint: its URL, headers, compression and timeout."""

    def __init__(self, signal: str, url: str) -> None:
        self.signal, self.url = signal, url
        self.headers = {
            "content-type": "application/x-protobuf",
            "user-agent": f"keel/{__version__}",
        }
        self.headers.update(parse_env_headers(_setting(signal, "HEADERS"), liberal=True))
        self.gzip = _setting(signal, "COMPRESSION").lower() == "gzip"
        if self.gzip:
            self.headers["content-encoding"] = "gzip"
        self.timeout = aiohttp.ClientTimeout(
            total=_env_number(
                f"OTEL_EXPORTER_OTLP_{signal.upper()}_TIMEOUT",
                _env_number("OTEL_EXPORTER_OTLP_TIMEOUT", 10.0),
            )
        )
        self.failing = False

    async def send(self, session: aiohttp.ClientSession, body: bytes) -> bool:
        data = gzip.compress(body) if self.gzip else body
        try:
            async with session.post(
                self.url, data=data, headers=self.headers, timeout=self.timeout
            ) as r:
                await r.read()
                ok = r.status < 300
                why = f"HTTP {r.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            ok, why = False, f"{type(exc).__name__}: {exc}"
        if not ok and not self.failing:  # once per outage, not once per batch
            host = urlsplit(self.url)
            log.warning(
                "telemetry: cannot export %s to %s://%s: %s",
                self.signal,
                host.scheme,
                host.netloc,
                why,
            )
        elif ok and self.failing:
            log.warning("telemetry: %s export works again", self.signal)
        self.failing = not ok
        return ok


class Telemetry:
    """The OpenTelemetry observer of one engine (its session and loop)."""

    def __init__(self, cfg: TelemetryConfig, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.resource = _resource(cfg)
        self.scope = otlp.scope("keel", __version__)
        traces_on = _env("OTEL_TRACES_EXPORTER", "otlp").lower() != "none"
        url = _endpoint(cfg, "traces") if traces_on else None
        self.traces = _Exporter("traces", url) if url else None
        metrics_on = cfg.metrics and _env("OTEL_METRICS_EXPORTER", "otlp").lower() != "none"
        url = _endpoint(cfg, "metrics") if metrics_on else None
        self.metrics = _Exporter("metrics", url) if url else None
        self.sampler = sampling._get_from_env_or_default()  # OTEL_TRACES_SAMPLER and _ARG
        self.root_decision = _static_decision(self.sampler)
        self.delay = _env_number("OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
        self.batch = int(_env_number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512))
        self.queue_max = int(_env_number("OTEL_BSP_MAX_QUEUE_SIZE", 2048))
        interval = _env_number("OTEL_METRIC_EXPORT_INTERVAL", cfg.metrics_interval * 1000)
        self.metrics_interval = interval / 1000
        self.spans: list[tuple[bytes, int]] = []  # each request's spans, and how many
        self.queued = 0  # spans in ``spans``
        self.dropped = 0
        self.started_ns = time.time_ns()
        self.points: dict[str, dict[tuple[str, str], otlp.HistogramPoint]] = {
            key: {} for key, *_ in _METRICS
        }
        self._deps: dict[
            tuple[str, str], tuple[bytes, bytes, bytes]
        ] = {}  # name → head, attrs, metric attrs
        self._groups: dict[tuple[str, str], tuple[bytes, bytes]] = {}  # head, attrs
        self._templates: dict[tuple[Any, ...], _Template] = {}
        self._series: dict[tuple[str, str, str | None], tuple[otlp.HistogramPoint, ...]] = {}
        self._full = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    # -- the observer -------------------------------------------------------------------------

    def finished(self, record: Record) -> None:
        if self.traces is not None:
            self._trace(record)
        if self.metrics is not None:
            for a in record.attempts:
                if a.end_ns:
                    self._measure(a, record.operation)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):  # what is still buffered goes out
                await self._flush_spans()
                await self._flush_metrics()

    # -- export -------------------------------------------------------------------------------

    async def _run(self) -> None:
        next_metrics = time.monotonic() + self.metrics_interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.delay):
                    await self._full.wait()  # a full batch goes at once
            self._full.clear()
            try:
                await self._flush_spans()
                if self.metrics is not None and time.monotonic() >= next_metrics:
                    next_metrics = time.monotonic() + self.metrics_interval
                    await self._flush_metrics()
            except Exception:  # never let the exporter die: log it, go on
                log.exception("telemetry: export failed")

    async def _flush_spans(self) -> None:
        while self.spans and self.traces is not None:
            # whole requests, up to the batch size in spans (at least one request)
            taken, n = 0, 0
            for _, count in self.spans:
                if taken and n + count > self.batch:
                    break
                taken += 1
                n += count
            batch, self.spans = self.spans[:taken], self.spans[taken:]
            self.queued -= n
            body = otlp.traces_request(self.resource, self.scope, [b for b, _ in batch])
            await self.traces.send(self.session, body)
        if self.dropped:
            log.warning("telemetry: %d spans dropped (OTEL_BSP_MAX_QUEUE_SIZE)", self.dropped)
            self.dropped = 0

    async def _flush_metrics(self) -> None:
        if self.metrics is None:
            return
        now = time.time_ns()
        metrics = []
        for key, name, unit, desc in _METRICS:
            points = [p.encode(self.started_ns, now) for p in self.points[key].values() if p.count]
            if points:
                metrics.append(otlp.histogram_metric(name, unit, desc, points))
        if not metrics:
            return
        await self.metrics.send(
            self.session, otlp.metrics_request(self.resource, self.scope, metrics)
        )

    def _queue(self, spans: bytes, count: int) -> None:
        """One request's ``count`` spans, for the next batch (dropped, and counted, when the
        queue is full: the collector is down or slower than keel)."""
        if self.queued >= self.queue_max:
            self.dropped += count
            return
        self.spans.append((spans, count))
        self.queued += count
        if self.queued >= self.batch:
            self._full.set()

    # -- spans --------------------------------------------------------------------------------

    def _sampled(self, rec: Record, trace_id: bytes, parent: otlp.Parent | None) -> bool:
        if parent is None and self.root_decision is not None:
            return self.root_decision
        from opentelemetry import trace as api

        ctx = None
        if parent is not None:
            flags = api.TraceFlags(api.TraceFlags.SAMPLED if parent.sampled else 0)
            remote = api.SpanContext(
                int.from_bytes(parent.trace_id), int.from_bytes(parent.span_id), True, flags
            )
            ctx = api.set_span_in_context(api.NonRecordingSpan(remote))
        result = self.sampler.should_sample(ctx, int.from_bytes(trace_id), f"chat {rec.model}")
        return bool(result.decision.is_sampled())  # type: ignore[no-untyped-call]

    def _trace(self, rec: Record) -> None:
        parent = otlp.parse_traceparent(rec.traceparent) if rec.traceparent else None
        attempts = rec.attempts
        n = 1 + len(attempts)  # spans: the request's, an attempt's each
        ids = _randbits(128 + 64 * n).to_bytes(16 + 8 * n, "little")  # trace, spans
        trace_id = parent.trace_id if parent is not None else ids[:16]
        if parent is None and self.root_decision is not None:
            if not self.root_decision:
                return
        elif not self._sampled(rec, trace_id, parent):
            return
        # Everything a request's spans share with others of the same shape (its group, its
        # outcome, its attempts' deployments, kinds and outcomes) is one cached template:
        # per request there remain the ids and times, the request id, the token counts, the
        # first-token time and error messages.
        error_type = rec.error_type
        if len(attempts) == 1:  # the common case: the key without a tuple of tuples
            shape = _attempt_shape(attempts[0])
        else:
            shape = tuple(map(_attempt_shape, attempts))
        key = (
            rec.operation, rec.model, rec.principal, rec.stream, rec.status, error_type,
            rec.response_model, tuple(rec.finish_reasons), shape,
        )  # fmt: skip
        template = self._templates.get(key)
        if template is None:
            template = self._template(rec, error_type)
            if len(self._templates) < _SHAPES_MAX:
                self._templates[key] = template
        if (
            len(attempts) == 1
            and rec.error is None
            and attempts[0].error is None
            and (parent is None or not rec.tracestate)
        ):
            spans = self._one(rec, template, trace_id, ids, parent)
        else:
            spans = self._spans(rec, template, trace_id, ids, parent)
        self._queue(spans, n)

    def _one(
        self, rec: Record, template: _Template, trace_id: bytes, ids: bytes, parent: otlp.Parent | None
    ) -> bytes:  # fmt: skip
        """The two spans of a request answered by its one attempt (most requests): one
        ``struct`` pack of the template's constant parts and the request's own values, in
        a layout cached by the lengths of those values. Decodes to what ``_spans`` writes
        (the fields in another order, which protobuf allows)."""
        a = rec.attempts[0]
        rid = rec.rid.encode()
        u_r = (
            otlp.usage_attrs(rec.input_tokens, rec.output_tokens)
            if rec.output_tokens is not None
            else b""
        )
        u_a = _usage(a.usage)
        ft_r, ft_a = rec.first_token_ns, a.first_token_ns
        layout = (len(rid), len(u_r), len(u_a), ft_r != 0, ft_a != 0, parent is not None)
        packs = template[2]
        got = packs.get(layout)
        if got is None:
            got = _one_layout(template, *layout)
            if len(packs) < 64:
                packs[layout] = got
        pack, head_r, head_a = got
        span_id = ids[16:24]
        args: list[Any] = [head_r, rid, u_r]
        if ft_r:
            args += (_FIRST_TOKEN[0], ft_r, _FIRST_TOKEN[1])
        args += (0x100A, trace_id, 0x0812, span_id)
        if parent is not None:
            args += (0x0822, parent.span_id)
        args += (0x39, rec.start_ns, 0x41, rec.end_ns, head_a, u_a)
        if ft_a:
            args += (_FIRST_TOKEN[0], ft_a, _FIRST_TOKEN[1])
        args += (0x100A, trace_id, 0x0812, ids[24:32], 0x0822, span_id,
                 0x39, a.start_ns, 0x41, a.end_ns or rec.end_ns)  # fmt: skip
        return pack(*args)

    def _spans(
        self, rec: Record, template: _Template, trace_id: bytes, ids: bytes, parent: otlp.Parent | None
    ) -> bytes:  # fmt: skip
        """A request's spans, any number of attempts, errors and trace state."""
        request_const, attempt_consts, _ = template
        attempts = rec.attempts
        span_id = ids[16:24]
        end_ns = rec.end_ns
        if parent is None:
            body = otlp.ROOT_IDS(0x0A, 16, trace_id, 0x12, 8, span_id, 0x39, rec.start_ns,
                                 0x41, end_ns)  # fmt: skip
            state = b""
        else:
            body = otlp.CHILD_IDS(0x0A, 16, trace_id, 0x12, 8, span_id, 0x22, 8,
                                  parent.span_id, 0x39, rec.start_ns, 0x41, end_ns)  # fmt: skip
            state = otlp.ld(3, rec.tracestate.encode()) if rec.tracestate else b""
        body += state + request_const + otlp.str_attr(_REQUEST_ID, rec.rid)
        if rec.output_tokens is not None:
            body += otlp.usage_attrs(rec.input_tokens, rec.output_tokens)
        if rec.first_token_ns:
            body += _FIRST_TOKEN[0] + _FIXED64(rec.first_token_ns) + _FIRST_TOKEN[1]
        if len(attempts) > 1:
            for a in attempts:
                if a.kind != FIRST:
                    body += otlp.event(
                        a.start_ns,
                        f"keel.{a.kind}",
                        (
                            otlp.attr("keel.deployment", a.deployment.name, 3),
                            otlp.attr("keel.attempt", a.n, 3),
                        ),
                    )
        if rec.error is not None:
            body += otlp.status_error(rec.error.message)
        spans = [otlp.wrap_span(body)]
        own = 24
        for a, const in zip(attempts, attempt_consts, strict=True):
            body = otlp.CHILD_IDS(0x0A, 16, trace_id, 0x12, 8, ids[own : own + 8], 0x22, 8,
                                  span_id, 0x39, a.start_ns, 0x41, a.end_ns or end_ns)  # fmt: skip
            own += 8
            body += state + const
            body += _usage(a.usage)
            if a.first_token_ns:
                body += _FIRST_TOKEN[0] + _FIXED64(a.first_token_ns) + _FIRST_TOKEN[1]
            if a.error is not None:
                body += otlp.status_error(a.error.message)
            spans.append(otlp.wrap_span(body))
        return b"".join(spans)

    def _template(self, rec: Record, error_type: str | None) -> _Template:
        """The constant parts of a request's spans: the request span's name, kind and
        attributes, then each attempt span's; and ``_one``'s layouts of them."""
        op = rec.operation
        group = self._groups.get((op, rec.model))
        if group is None:
            group = self._groups[op, rec.model] = self._group(op, rec.model)
        request = group[0] + self._request_attrs(rec, group[1], error_type)
        attempts = tuple(self._dep(a.deployment, op)[0] + self._attempt_attrs(a, op)
                         for a in rec.attempts)  # fmt: skip
        return request, attempts, {}

    def _request_attrs(self, rec: Record, group: bytes, error_type: str | None) -> bytes:
        parts = [
            group,
            otlp.attr("keel.attempts", len(rec.attempts)),
            otlp.attr("http.response.status_code", rec.status),
        ]
        if rec.model:
            parts.append(otlp.attr("keel.stream", rec.stream))
        if rec.principal:
            parts.append(otlp.attr("keel.principal", rec.principal))
        attempts = rec.attempts
        if attempts:
            parts.append(otlp.attr("keel.deployments", [a.deployment.name for a in attempts]))
            answered = next((a for a in reversed(attempts) if a.ok), attempts[-1])
            provider = PROVIDER.get(answered.deployment.dialect, "openai")
            parts.append(otlp.attr("gen_ai.provider.name", provider))
        if rec.response_model:
            parts.append(otlp.attr("gen_ai.response.model", rec.response_model))
        if rec.finish_reasons:
            parts.append(otlp.attr("gen_ai.response.finish_reasons", rec.finish_reasons))
        if error_type is not None:
            parts.append(otlp.attr("error.type", error_type))
        return b"".join(parts)

    def _group(self, op: str, model: str) -> tuple[bytes, bytes]:
        head = otlp.span_head(f"{op} {model}" if model else op, otlp.SERVER)
        attrs = otlp.attr("gen_ai.operation.name", op)
        if model:
            attrs += otlp.attr("gen_ai.request.model", model)
        return head, attrs

    def _dep(self, dep: Deployment, op: str) -> tuple[bytes, bytes, bytes]:
        """A deployment's span name and kind, its attributes, and those its metrics carry."""
        got = self._deps.get((dep.name, op))
        if got is None:
            parts = urlsplit(dep.cfg.base_url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            metric = (
                otlp.attr("gen_ai.operation.name", op)
                + otlp.attr("gen_ai.provider.name", PROVIDER.get(dep.dialect, "openai"))
                + otlp.attr("gen_ai.request.model", dep.model)
                + otlp.attr("server.address", parts.hostname or "")
                + otlp.attr("server.port", port)
            )
            head = otlp.span_head(f"{op} {dep.model}", otlp.CLIENT)
            got = self._deps[dep.name, op] = (
                head,
                metric + otlp.attr("keel.deployment", dep.name),
                metric,
            )
        return got

    def _attempt_attrs(self, a: Attempt, op: str) -> bytes:
        dep = a.deployment
        parts = [
            self._dep(dep, op)[1],
            otlp.attr("keel.attempt", a.n),
            otlp.attr("keel.attempt.kind", a.kind),
            otlp.attr("keel.attempt.outcome", a.outcome),
        ]
        if a.ok:
            parts.append(otlp.attr("gen_ai.response.model", dep.model))
        if a.continuation is not None:
            parts.append(otlp.attr("keel.continuation.mode", a.continuation))
        err = a.error
        if err is not None:
            parts.append(otlp.attr("error.type", err.kind.value))
            if err.status:
                parts.append(otlp.attr("http.response.status_code", err.status))
        elif not a.ok:  # a hedge that lost its race, an attempt the client left: not an error
            parts.append(otlp.attr("error.type", "cancelled"))
        return b"".join(parts)

    # -- metrics ------------------------------------------------------------------------------

    def _points(self, a: Attempt, op: str, err: str | None) -> tuple[otlp.HistogramPoint, ...]:
        """The series one attempt adds to: duration, time to first chunk, input and output
        tokens (one lookup per attempt)."""
        key = (a.deployment.name, op, err)
        got = self._series.get(key)
        if got is None:
            attrs = self._dep(a.deployment, op)[2]
            if err is not None:
                attrs += otlp.attr("error.type", err)
            series = {
                "duration": otlp.histogram_point(attrs, DURATION_BUCKETS),
                "first_chunk": otlp.histogram_point(attrs, TTFC_BUCKETS),
                "input": otlp.histogram_point(
                    attrs + otlp.attr("gen_ai.token.type", "input"), TOKEN_BUCKETS
                ),
                "output": otlp.histogram_point(
                    attrs + otlp.attr("gen_ai.token.type", "output"), TOKEN_BUCKETS
                ),
            }
            for name, point in series.items():
                metric = "tokens" if name in ("input", "output") else name
                self.points[metric][(a.deployment.name, f"{op}/{err}/{name}")] = point
            got = self._series[key] = tuple(series.values())
        return got

    def _measure(self, a: Attempt, op: str) -> None:
        # an attempt that did not complete has an error type, a cancelled one (a lost hedge)
        # too: its duration is not that of an answer
        err = a.error.kind.value if a.error is not None else None if a.ok else "cancelled"
        got = self._series.get((a.deployment.name, op, err))
        if got is None:
            got = self._points(a, op, err)
        duration, first_chunk, input_tokens, output_tokens = got
        duration.record((a.end_ns - a.start_ns) / 1e9)
        if a.first_token_ns:
            first_chunk.record((a.first_token_ns - a.start_ns) / 1e9)
        usage = a.usage
        if usage is not None:
            p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if type(p) is int:
                input_tokens.record(p)
            if type(c) is int:
                output_tokens.record(c)
