"""OpenTelemetry: a real ``keel serve`` exports its traces and GenAI metrics over OTLP/HTTP to a
receiver the test runs (decoded with ``opentelemetry-proto``); the simulator provokes the
retries and continuations the spans must show."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from gw_fixtures import UPSTREAM_KEY_A, entries_for, unique
from keel.sim import answer_text
from keel.testing import GatewayProcess, SimProcess, spawn_gateway
from otlp_helpers import Receiver, attributes

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
SERVER, CLIENT = 2, 3  # Span.SpanKind values in OTLP


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


def _config(sim: SimProcess, **telemetry: Any) -> dict[str, Any]:
    dep = {
        "base_url": sim.base_url,
        "api_key": UPSTREAM_KEY_A,
        "name": "dep-a",
        "model": "gpt-4o-mini",
        "continuation": "prefill",
        "timeouts": {"first_token": 2, "idle": 0.5},
    }
    cfg: dict[str, Any] = {
        "retry": {"backoff_base": 0.01, "backoff_cap": 0.05},
        "breaker": {"enabled": False},  # faults on purpose
        "models": {"chat": {"deployments": [dep]}},
    }
    if telemetry:
        cfg["telemetry"] = telemetry
    return cfg


@pytest.fixture
def traced(
    sims: tuple[SimProcess, SimProcess],
    receiver: Receiver,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProcess]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": "keel-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "20",  # the standard batch delay, honoured
        "OTEL_METRIC_EXPORT_INTERVAL": "200",
    }
    workdir = str(tmp_path_factory.mktemp("otel"))
    with spawn_gateway(_config(sims[0]), workdir=workdir, env=env) as gw:
        yield gw


async def _post(gw: GatewayProcess, body: dict[str, Any], **headers: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.base_url + "/chat/completions", json=body, headers=headers) as r,
    ):
        return r.status, await r.read()


def _by_trace(receiver: Receiver, trace: str) -> list[Any]:
    return [s for s, _ in receiver.spans() if s.trace_id.hex() == trace]


async def test_one_trace_with_a_retry_and_a_continuation(traced, sims, receiver) -> None:
    prompt = unique("trace me")
    body = {
        "model": "chat",
        "stream": True,
        # attempt 1: a 500 before any byte (retried); attempt 2: cut after 5 tokens, after
        # the commit (continued); attempt 3: the continuation, complete
        "messages": [{"role": "user", "content": f"{prompt} [[sim:e500*1,trunc=5*2]]"}],
        "stream_options": {"include_usage": True},
    }
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    status, raw = await _post(traced, body, traceparent=traceparent)
    assert status == 200
    assert raw.endswith(b"data: [DONE]\n\n")
    first, second, third = entries_for(sims[0], prompt)
    assert not first.continuation and not second.continuation and third.continuation

    await receiver.wait(lambda r: len(_by_trace(r, CLIENT_TRACE)) >= 4)
    spans = _by_trace(receiver, CLIENT_TRACE)
    assert len(spans) == 4  # one trace: the request and its three attempts, nothing else
    (request,) = [s for s in spans if s.kind == SERVER]
    attempts = sorted((s for s in spans if s.kind == CLIENT), key=lambda s: s.start_time_unix_nano)
    # the client's traceparent is continued: its trace, its span as the parent
    assert request.parent_span_id.hex() == CLIENT_SPAN
    assert all(a.parent_span_id == request.span_id for a in attempts)
    assert request.name == "chat chat"
    assert [a.name for a in attempts] == ["chat gpt-4o-mini"] * 3

    r = attributes(request)
    assert r["gen_ai.operation.name"] == "chat"
    assert r["gen_ai.request.model"] == "chat"
    assert r["gen_ai.response.model"] == "gpt-4o-mini"
    assert r["gen_ai.provider.name"] == "openai"
    assert r["gen_ai.response.finish_reasons"] == ["stop"]
    assert r["gen_ai.usage.output_tokens"] == first.tokens + second.tokens + third.tokens
    assert isinstance(r["gen_ai.usage.input_tokens"], int) and r["gen_ai.usage.input_tokens"] > 0
    assert r["keel.attempts"] == 3
    assert r["keel.deployments"] == ["dep-a"] * 3
    assert r["http.response.status_code"] == 200
    assert "error.type" not in r
    assert request.status.code != 2  # not ERROR
    assert [e.name for e in request.events] == [
        "gen_ai.first_token",
        "keel.retry",
        "keel.continuation",
    ]

    a1, a2, a3 = (attributes(a) for a in attempts)
    assert [a["keel.attempt"] for a in (a1, a2, a3)] == [1, 2, 3]
    assert [a["keel.attempt.kind"] for a in (a1, a2, a3)] == ["first", "retry", "continuation"]
    assert [a["keel.attempt.outcome"] for a in (a1, a2, a3)] == ["failed", "failed", "ok"]
    assert a1["error.type"] == "server" and a1["http.response.status_code"] == 500
    assert a2["error.type"] == "connection"  # the truncated stream
    assert "error.type" not in a3 and a3["keel.continuation.mode"] == "prefill"
    assert attempts[0].status.code == 2 and attempts[2].status.code != 2
    for a in (a1, a2, a3):
        assert a["gen_ai.provider.name"] == "openai"
        assert a["gen_ai.request.model"] == "gpt-4o-mini"
        assert a["server.address"] == "127.0.0.1"
        assert a["keel.deployment"] == "dep-a"
    # the attempt that committed the stream saw the first token; the spans nest in time
    assert [e.name for e in attempts[1].events] == ["gen_ai.first_token"]
    assert all(request.start_time_unix_nano <= a.start_time_unix_nano for a in attempts)
    assert all(a.end_time_unix_nano <= request.end_time_unix_nano for a in attempts)
    assert attempts[0].end_time_unix_nano <= attempts[1].start_time_unix_nano
    # the resource: OTEL_SERVICE_NAME honoured
    (res,) = {tuple(sorted(res.items())) for s, res in receiver.spans() if s in spans}
    assert dict(res)["service.name"] == "keel-under-test"

    # the GenAI client metrics: one duration per attempt, by outcome
    def has_metrics(r: Receiver) -> bool:
        points = r.metric_points()
        return sum(p.count for _, p in points.get("gen_ai.client.operation.duration", [])) >= 3

    await receiver.wait(has_metrics)
    points = receiver.metric_points()
    durations = {
        a.get("error.type"): p.count for a, p in points["gen_ai.client.operation.duration"]
    }
    assert durations == {"server": 1, "connection": 1, None: 1}
    for a, _ in points["gen_ai.client.operation.duration"]:
        assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "openai"
        assert a["gen_ai.request.model"] == "gpt-4o-mini"
    (ttfc,) = points["gen_ai.client.operation.time_to_first_chunk"]
    assert ttfc[1].count == 1 and ttfc[1].sum > 0
    kinds = {a["gen_ai.token.type"] for a, _ in points["gen_ai.client.token.usage"]}
    assert kinds == {"input", "output"}


async def test_a_hedge_shows_both_attempts(sims, receiver, tmp_path) -> None:
    """A stream whose first token is late on dep-a (simulator a) is hedged on dep-b
    (simulator b, another provider's dialect): both attempts are children of the request
    span, the hedge wins, the first is cancelled."""
    a, b = sims
    deps = [
        {"base_url": a.base_url, "api_key": UPSTREAM_KEY_A, "name": "dep-a", "model": "m-a"},
        # tried first only when dep-a is not there: its weight keeps it out of first place
        {"base_url": b.base_url, "api_key": UPSTREAM_KEY_A, "name": "dep-b", "model": "m-b",
         "dialect": "dashscope", "weight": 1e-6},
    ]  # fmt: skip
    cfg = {
        "breaker": {"enabled": False},
        "models": {
            "chat": {
                "deployments": deps,
                "hedge": {"enabled": True, "after": 0.3, "max_ratio": 1.0},
            }
        },
    }
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "20"}
    prompt = unique("hedge me")
    body = {
        "model": "chat",
        "stream": True,
        "messages": [{"role": "user", "content": f"{prompt} [[sim@a:slow_first=3]]"}],
    }
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    with spawn_gateway(cfg, workdir=str(tmp_path), env=env) as gw:
        status, raw = await _post(gw, body, traceparent=traceparent)
        assert status == 200
        assert raw.endswith(b"data: [DONE]\n\n")
        # the simulators' logs: the slow attempt was closed unfinished, the hedge answered
        a.wait_for(lambda log: all(e.t_close for e in log if prompt in e.prompt))
        (slow,) = entries_for(a, prompt)
        assert slow.client_disconnected and not slow.finished and slow.tokens == 0
        (fast,) = entries_for(b, prompt)
        assert fast.finished and fast.fault is None
        await receiver.wait(lambda r: len(_by_trace(r, CLIENT_TRACE)) >= 3)

    spans = _by_trace(receiver, CLIENT_TRACE)
    assert len(spans) == 3  # the request and its two attempts
    (request,) = [s for s in spans if s.kind == SERVER]
    first, hedge = sorted(
        (s for s in spans if s.kind == CLIENT), key=lambda s: s.start_time_unix_nano
    )
    assert request.parent_span_id.hex() == CLIENT_SPAN
    assert first.parent_span_id == request.span_id == hedge.parent_span_id
    assert (first.name, hedge.name) == ("chat m-a", "chat m-b")

    r = attributes(request)
    assert r["keel.attempts"] == 2 and r["keel.deployments"] == ["dep-a", "dep-b"]
    assert r["gen_ai.provider.name"] == "alibaba.dashscope"  # who answered
    assert r["gen_ai.response.finish_reasons"] == ["stop"]
    assert r["http.response.status_code"] == 200 and "error.type" not in r
    events = {e.name: e for e in request.events}
    assert list(events) == ["gen_ai.first_token", "keel.hedge"]
    assert attributes(events["keel.hedge"]) == {"keel.deployment": "dep-b", "keel.attempt": 2}
    assert events["keel.hedge"].time_unix_nano == hedge.start_time_unix_nano

    f, h = attributes(first), attributes(hedge)
    assert (f["keel.attempt"], f["keel.attempt.kind"], f["keel.attempt.outcome"]) == (
        1, "first", "cancelled"
    )  # fmt: skip
    assert (h["keel.attempt"], h["keel.attempt.kind"], h["keel.attempt.outcome"]) == (
        2, "hedge", "ok"
    )  # fmt: skip
    assert (f["keel.deployment"], h["keel.deployment"]) == ("dep-a", "dep-b")
    assert (f["gen_ai.provider.name"], h["gen_ai.provider.name"]) == (
        "openai", "alibaba.dashscope"
    )  # fmt: skip
    assert (f["gen_ai.request.model"], h["gen_ai.request.model"]) == ("m-a", "m-b")
    assert h["gen_ai.response.model"] == "m-b" and "gen_ai.response.model" not in f
    assert f["error.type"] == "cancelled" and "error.type" not in h
    assert first.status.code != 2 and hedge.status.code != 2  # a lost race is no error
    # the hedge went after the hedge delay, its first token won and cancelled the first
    assert hedge.start_time_unix_nano - first.start_time_unix_nano >= 0.25e9
    assert [e.name for e in hedge.events] == ["gen_ai.first_token"] and not first.events
    assert first.end_time_unix_nano >= hedge.events[0].time_unix_nano
    assert all(s.end_time_unix_nano <= request.end_time_unix_nano for s in (first, hedge))


async def test_non_stream_answer_and_a_refused_request(traced, receiver) -> None:
    prompt = unique()
    status, _ = await _post(
        traced, {"model": "chat", "messages": [{"role": "user", "content": prompt}]}
    )
    assert status == 200
    status, _ = await _post(traced, {"model": "chat", "messages": "not a list"})
    assert status == 400

    def two_requests(r: Receiver) -> bool:
        return len([s for s, _ in r.spans() if s.kind == SERVER]) >= 2

    await receiver.wait(two_requests)
    requests = sorted(
        (s for s, _ in receiver.spans() if s.kind == SERVER), key=lambda s: s.start_time_unix_nano
    )
    ok, bad = (attributes(s) for s in requests)
    assert ok["gen_ai.response.finish_reasons"] == ["stop"]
    assert (
        ok["gen_ai.usage.output_tokens"] == len(answer_text(prompt).split())
        or ok["gen_ai.usage.output_tokens"] > 0
    )
    assert ok["keel.stream"] is False and ok["keel.attempts"] == 1
    assert bad["http.response.status_code"] == 400 and bad["keel.attempts"] == 0
    assert bad["error.type"] and requests[1].status.code == 2
    # a new trace each (no traceparent came with them)
    assert requests[0].trace_id != requests[1].trace_id


async def test_the_sampler_is_honoured(sims, receiver, tmp_path) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.url + "/v1/traces",
        "OTEL_TRACES_SAMPLER": "parentbased_always_off",
        "OTEL_BSP_SCHEDULE_DELAY": "20",
    }
    with spawn_gateway(_config(sims[0]), workdir=str(tmp_path), env=env) as gw:
        body = {"model": "chat", "messages": [{"role": "user", "content": unique()}]}
        assert (await _post(gw, body))[0] == 200  # no parent: not sampled
        sampled = f"00-{'1' * 32}-{'2' * 16}-01"
        assert (await _post(gw, body, traceparent=sampled))[0] == 200  # a sampled parent
        await receiver.wait(lambda r: len(r.spans()) >= 2)
    # batches go out in order: the first request would have arrived with or before these
    assert {s.trace_id.hex() for s, _ in receiver.spans()} == {"1" * 32}
    assert receiver.metrics == []  # a traces-only endpoint: no metrics sent to a default


async def test_enabled_in_the_config(sims, receiver, tmp_path) -> None:
    cfg = _config(sims[0], enabled=True, endpoint=receiver.url, service_name="from-config")
    env = {"OTEL_BSP_SCHEDULE_DELAY": "20", "OTEL_EXPORTER_OTLP_ENDPOINT": ""}
    with spawn_gateway(cfg, workdir=str(tmp_path), env=env) as gw:
        body = {"model": "chat", "messages": [{"role": "user", "content": unique()}]}
        assert (await _post(gw, body))[0] == 200
        await receiver.wait(lambda r: len(r.spans()) >= 2)
    (res,) = {tuple(sorted(res.items())) for _, res in receiver.spans()}
    assert dict(res)["service.name"] == "from-config"


async def test_export_settings_from_the_environment(sims, receiver, tmp_path) -> None:
    """Headers, gzip, resource attributes and the batch size come from the standard
    variables: with a batch of two spans and a batch delay of ten minutes, every request's
    two spans go out at once, alone, compressed, with the configured headers."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_EXPORTER_OTLP_HEADERS": "x-team=keel,x-tenant=t%201",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test,service.name=from-attrs",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2",
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
        "OTEL_METRICS_EXPORTER": "none",
    }
    with spawn_gateway(_config(sims[0]), workdir=str(tmp_path), env=env) as gw:
        for _ in range(2):
            body = {"model": "chat", "messages": [{"role": "user", "content": unique()}]}
            assert (await _post(gw, body))[0] == 200
        await receiver.wait(lambda r: len(r.spans()) >= 4)
        # (the batch delay is ten minutes: only a full batch went out, before the stop)
        batches = [sum(len(ss.spans) for rs in t.resource_spans for ss in rs.scope_spans)
                   for t in receiver.traces]  # fmt: skip
        assert batches == [2, 2]
    for h, size in zip(receiver.headers, receiver.sizes, strict=True):
        assert h["x-team"] == "keel" and h["x-tenant"] == "t 1"
        assert h["Content-Encoding"] == "gzip" and int(h["Content-Length"]) < size
    (res,) = {tuple(sorted(res.items())) for _, res in receiver.spans()}
    assert dict(res)["deployment.environment"] == "test"
    assert dict(res)["service.name"] == "from-attrs"
    assert receiver.metrics == []  # OTEL_METRICS_EXPORTER=none


@pytest.mark.parametrize(
    ("enabled", "env", "on"),
    [
        (None, {}, False),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        (False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, False),
        (True, {}, True),
        (True, {"OTEL_SDK_DISABLED": "true"}, False),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_SDK_DISABLED": "TRUE"}, False),
    ],
)
def test_when_telemetry_is_on(
    enabled: bool | None, env: dict[str, str], on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keel.config._observe import TelemetryConfig
    from keel.telemetry import wanted

    for k in list(os.environ):
        if k.startswith("OTEL_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert wanted(TelemetryConfig(enabled=enabled)) is on


_OFF = """
import asyncio, sys
from keel import Keel
from keel.sim import Simulator

async def main():
    sim = Simulator(name="a")
    url = await sim.start()
    cfg = {"models": {"chat": {"deployments": [{"base_url": url, "api_key": "sk-x"}]}}}
    async with Keel.from_config(cfg) as gw:
        await gw.chat({"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
        assert gw.observers == [], gw.observers
    await sim.stop()
    # (redis-py imports the OpenTelemetry metrics API when it is installed: not keel's doing)
    ours = ("keel.telemetry._otel", "opentelemetry.sdk.trace", "opentelemetry.exporter")
    print(sorted(m for m in sys.modules if m.startswith(ours)))

asyncio.run(main())
"""


def test_off_imports_no_tracing() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", _OFF], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("value", ["not-a-url", "ftp://collector:4318"])
def test_a_bad_endpoint_is_refused_at_load(value: str) -> None:
    from keel.config import ConfigError, parse_config

    cfg = {
        "telemetry": {"endpoint": value},
        "models": {"m": {"deployments": [{"base_url": "http://x"}]}},
    }
    with pytest.raises(
        ConfigError, match=r"telemetry.endpoint: telemetry.endpoint must be an http"
    ):
        parse_config(cfg)


class _Keep:
    """An observer that keeps the records it is given (the engine's observer interface)."""

    def __init__(self) -> None:
        self.records: list[Any] = []

    def finished(self, record: Any) -> None:
        self.records.append(record)

    async def close(self) -> None:
        pass


async def test_the_one_attempt_layout_decodes_like_the_general_one(receiver) -> None:
    """Most requests take ``Telemetry._one``, a single struct pack; every other request
    ``_spans``. Fed the same records and ids, both decode to the same spans."""
    import dataclasses

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from keel import Keel
    from keel import _otlp as otlp
    from keel.sim import Simulator

    sim = Simulator(name="a")
    url = await sim.start()
    cfg = {
        "telemetry": {"enabled": True, "endpoint": receiver.url},
        "models": {"chat": {"deployments": [{"base_url": url, "api_key": "sk-x"}]}},
    }
    keep = _Keep()
    try:
        async with Keel.from_config(cfg) as gw:
            (tel,) = gw.observers
            gw.observers.append(keep)
            await gw.chat({"model": "chat", "messages": [{"role": "user", "content": unique()}]})
            body = {
                "model": "chat",
                "messages": [{"role": "user", "content": unique()}],
                "stream_options": {"include_usage": True},
            }
            async for _ in gw.stream(body):
                pass
            async for _ in gw.stream({**body, "stream_options": {"include_usage": False}}):
                pass
            records = list(keep.records)
            parent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
            records += [dataclasses.replace(r, traceparent=parent) for r in keep.records]
            assert len(records) == 6 and all(len(r.attempts) == 1 for r in records)
            assert records[1].first_token_ns and not records[0].first_token_ns
            ids = bytes(range(32))
            for rec in records:
                tp = otlp.parse_traceparent(rec.traceparent)
                trace_id = tp.trace_id if tp is not None else ids[:16]
                template = tel._template(rec, rec.error_type)
                fast = tel._one(rec, template, trace_id, ids, tp)
                general = tel._spans(rec, template, trace_id, ids, tp)
                assert fast != general  # another field order...
                decoded = [
                    list(
                        ExportTraceServiceRequest.FromString(
                            otlp.traces_request(b"", b"", [spans])
                        ).resource_spans[0].scope_spans[0].spans
                    )
                    for spans in (fast, general)
                ]
                assert decoded[0] == decoded[1]  # ...the same spans
                request, attempt = decoded[0]
                assert attributes(request)["keel.request_id"] == rec.rid
                assert attempt.parent_span_id == request.span_id
                assert (request.parent_span_id.hex() == CLIENT_SPAN) == (tp is not None)
    finally:
        await sim.stop()
