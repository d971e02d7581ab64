"""keel._otlp, the hand-written OTLP encoding: what it writes decodes with the official
``opentelemetry-proto`` classes to exactly the spans, attributes and histograms meant; W3C
``traceparent`` parsing, table by table."""

from __future__ import annotations

import struct

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from keel import _otlp as otlp
from otlp_helpers import attributes, value


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16383, 16384, 2**31, 2**63 - 1, -1, -(2**63)])
def test_int_attributes_round_trip(n: int) -> None:
    body = otlp.traces_request(
        b"", b"", [otlp.span(b"t" * 16, b"s" * 8, None, b"", 1, 2, [otlp.attr_once("k", n)])]
    )
    msg = ExportTraceServiceRequest.FromString(body)
    assert attributes(msg.resource_spans[0].scope_spans[0].spans[0]) == {"k": n}


@pytest.mark.parametrize("v", ["", "x", "你好" * 100, True, False, 0.25, ["a", "b"], [], 7])
def test_attribute_values_round_trip(v: object) -> None:
    for enc in (otlp.attr("key.name", v), otlp.attr("key.name", v)):  # encoded, then cached
        span = otlp.span(b"t" * 16, b"s" * 8, None, b"", 1, 2, [enc])
        got = ExportTraceServiceRequest.FromString(otlp.traces_request(b"", b"", [span]))
        assert attributes(got.resource_spans[0].scope_spans[0].spans[0]) == {"key.name": v}


def test_a_span_with_everything() -> None:
    resource = otlp.resource({"service.name": "keel", "service.version": "1", "pid": 42})
    scope = otlp.scope("keel", "0.1.0")
    events = [
        otlp.event(15, "first"),
        otlp.event(16, "retry", [otlp.attr("keel.attempt", 2, 3)]),
    ]
    long_name = "m" * 300  # lengths past one varint byte
    spans = [
        otlp.span(
            bytes(range(16)), bytes(range(8)), bytes(range(8, 16)),
            otlp.span_head(f"chat {long_name}", otlp.SERVER), 10, 20,
            [otlp.attr("gen_ai.request.model", long_name), otlp.usage_attrs(12, 300)],
            events, "it broke: 你好", "vendor=1",
        ),
        otlp.span(b"\x01" * 16, b"\x02" * 8, None, otlp.span_head("chat x", otlp.CLIENT), 11, 19,
                  [otlp.usage_attrs(None, 5)]),
    ]  # fmt: skip
    msg = ExportTraceServiceRequest.FromString(otlp.traces_request(resource, scope, spans))
    (rs,) = msg.resource_spans
    assert attributes(rs.resource) == {"service.name": "keel", "service.version": "1", "pid": 42}
    (ss,) = rs.scope_spans
    assert (ss.scope.name, ss.scope.version) == ("keel", "0.1.0")
    first, second = ss.spans
    assert first.trace_id == bytes(range(16)) and first.span_id == bytes(range(8))
    assert first.parent_span_id == bytes(range(8, 16)) and first.trace_state == "vendor=1"
    assert first.name == f"chat {long_name}" and first.kind == otlp.SERVER
    assert (first.start_time_unix_nano, first.end_time_unix_nano) == (10, 20)
    assert attributes(first) == {
        "gen_ai.request.model": long_name,
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 300,
    }
    assert [(e.time_unix_nano, e.name, attributes(e)) for e in first.events] == [
        (15, "first", {}),
        (16, "retry", {"keel.attempt": 2}),
    ]
    assert first.status.code == otlp.STATUS_ERROR and first.status.message == "it broke: 你好"
    assert second.parent_span_id == b"" and second.kind == otlp.CLIENT
    assert second.status.code == 0 and attributes(second) == {"gen_ai.usage.output_tokens": 5}


def test_histograms() -> None:
    p = otlp.histogram_point(otlp.attr("error.type", "timeout"), (1.0, 2.0, 4.0))
    for x in (0.5, 1.0, 1.5, 4.0, 9.0):  # bucket i holds (bounds[i-1], bounds[i]]
        p.record(x)
    q = otlp.histogram_point(b"", (1.0,))
    metric = otlp.histogram_metric("d", "s", "Duration.", [p.encode(5, 9), q.encode(5, 9)])
    msg = ExportMetricsServiceRequest.FromString(
        otlp.metrics_request(otlp.resource({"a": "b"}), otlp.scope("keel", "1"), [metric])
    )
    (m,) = msg.resource_metrics[0].scope_metrics[0].metrics
    assert (m.name, m.unit, m.description) == ("d", "s", "Duration.")
    assert m.histogram.aggregation_temporality == otlp.CUMULATIVE
    first, empty = m.histogram.data_points
    assert attributes(first) == {"error.type": "timeout"}
    assert list(first.bucket_counts) == [2, 1, 1, 1]
    assert list(first.explicit_bounds) == [1.0, 2.0, 4.0]
    assert (first.count, first.sum, first.min, first.max) == (5, 16.0, 0.5, 9.0)
    assert (first.start_time_unix_nano, first.time_unix_nano) == (5, 9)
    assert empty.count == 0 and list(empty.bucket_counts) == [0, 0]


T, S = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"00-{T}-{S}-01", (T, S, True)),
        (f"00-{T}-{S}-00", (T, S, False)),
        (f" 00-{T}-{S}-03 ", (T, S, True)),  # other flags bits: still sampled
        (f"01-{T}-{S}-01-future", (T, S, True)),  # a later version may add fields
        (f"00-{T}-{S}-01-extra", None),  # version 00 has exactly four
        (f"ff-{T}-{S}-01", None),  # forbidden version
        (f"00-{'0' * 32}-{S}-01", None),  # all-zero trace id
        (f"00-{T}-{'0' * 16}-01", None),  # all-zero parent id
        (f"00-{T.upper()}-{S}-01", None),  # hex is lowercase
        (f"00-{T[:-1]}-{S}-01", None),
        ("", None),
        (None, None),
    ],
)
def test_traceparent(header: str | None, expected: tuple[str, str, bool] | None) -> None:
    got = otlp.parse_traceparent(header)
    if expected is None:
        assert got is None
    else:
        assert got is not None
        assert (got.trace_id.hex(), got.span_id.hex(), got.sampled) == expected


def test_value_helper() -> None:  # the test helper itself decodes arrays
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue

    assert value(AnyValue.FromString(otlp.any_value(["x", "y"]))) == ["x", "y"]


@pytest.mark.parametrize("n", [0, 1, 40, 100, 110, 200, 5000])
def test_the_packed_span_primitives_decode_like_span(n: int) -> None:
    """``ROOT_IDS``/``CHILD_IDS`` + ``wrap_span``, ``str_attr``, ``event_template`` and
    ``status_error`` (what telemetry writes) against ``span``, ``attr_once`` and ``event``."""
    rid = "r" * n
    head = otlp.span_head("chat m", otlp.CLIENT)
    assert otlp.str_attr(otlp.str_attr_head("keel.request_id"), rid) == otlp.attr_once(
        "keel.request_id", rid
    )
    ev_head, ev_tail = otlp.event_template("gen_ai.first_token")
    for parent in (None, b"p" * 8):
        ids = (
            otlp.ROOT_IDS(0x0A, 16, b"t" * 16, 0x12, 8, b"s" * 8, 0x39, 10 + n, 0x41, 2**63)
            if parent is None
            else otlp.CHILD_IDS(0x0A, 16, b"t" * 16, 0x12, 8, b"s" * 8, 0x22, 8, parent,
                                0x39, 10 + n, 0x41, 2**63)
        )  # fmt: skip
        packed = otlp.wrap_span(
            ids + head + otlp.str_attr(otlp.str_attr_head("k"), rid)
            + ev_head + struct.pack("<Q", 12) + ev_tail + otlp.status_error("bad " + rid)
        )  # fmt: skip
        reference = otlp.span(
            b"t" * 16, b"s" * 8, parent, head, 10 + n, 2**63, [otlp.attr_once("k", rid)],
            [otlp.event(12, "gen_ai.first_token")], "bad " + rid,
        )  # fmt: skip
        got, want = (
            ExportTraceServiceRequest.FromString(otlp.traces_request(b"", b"", [s]))
            .resource_spans[0].scope_spans[0].spans[0]
            for s in (packed, reference)
        )  # fmt: skip
        assert got == want
        assert attributes(got) == {"k": rid} and got.status.message == "bad " + rid
