"""OTLP's protobuf encoding for keel's spans and histograms, and W3C ``traceparent``. Sans-IO.

Why by hand: the OpenTelemetry SDK builds a Python object per span, validates every attribute
and re-encodes it at export — on this machine ~2x the CPU keel spends on a whole request. keel's
spans are few and regular (a request, its attempts), and most of their attributes are constants
of a model group or a deployment: ``attr`` caches the encoded key/value pair, so a span is a
join of byte strings. The output is the OTLP/HTTP protobuf payload (``opentelemetry-proto``'s
``ExportTraceServiceRequest`` / ``ExportMetricsServiceRequest``), which tests decode with
the official classes. Field numbers: opentelemetry/proto/{trace,metrics,common}/v1/*.proto.
"""

from __future__ import annotations

import re
import struct
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# -- protobuf wire format ----------------------------------------------------------------------

_VARINT, _I64, _LEN = 0, 1, 2
_fixed64 = struct.Struct("<Q").pack
_double = struct.Struct("<d").pack


_SMALL = [bytes((i,)) for i in range(0x80)]  # the one-byte varints
_LEN_KEYS = [bytes(((f << 3) | 2,)) for f in range(16)]  # length-delimited keys of fields < 16


def varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return _SMALL[n]
    if n < 0:
        n += 1 << 64  # int64: two's complement, ten bytes
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def ld(field: int, payload: bytes) -> bytes:
    """A length-delimited field: a string, bytes or an embedded message."""
    n = len(payload)
    key = _LEN_KEYS[field] if field < 16 else _key(field, _LEN)
    return key + (_SMALL[n] if n < 0x80 else varint(n)) + payload


def fixed64(field: int, n: int) -> bytes:
    return _key(field, _I64) + _fixed64(n)


def uint(field: int, n: int) -> bytes:
    return _key(field, _VARINT) + varint(n)


def double(field: int, x: float) -> bytes:
    return _key(field, _I64) + _double(x)


# -- common.v1 ---------------------------------------------------------------------------------

Value = str | bool | int | float | Sequence[str]


def any_value(v: Value) -> bytes:
    if isinstance(v, str):
        return ld(1, v.encode())
    if isinstance(v, bool):  # before int: bool is an int
        return uint(2, int(v))
    if isinstance(v, int):
        return uint(3, v)
    if isinstance(v, float):
        return double(4, v)
    return ld(5, b"".join(ld(1, any_value(x)) for x in v))  # ArrayValue of strings


def key_value(key: str, v: Value) -> bytes:
    """A ``KeyValue`` message (not yet a field of its parent)."""
    return ld(1, key.encode()) + ld(2, any_value(v))


_ATTRS: dict[tuple[str, object, int], bytes] = {}
_ATTRS_MAX = 4096  # distinct pairs cached; beyond that (a runaway label) encode each time


def attr(key: str, v: Value, field: int = 9) -> bytes:
    """An attribute as field ``field`` of its parent (9: a span's, a data point's; 3: an
    event's), cached: model groups, deployments, principals and kinds repeat."""
    ck = (key, tuple(v) if isinstance(v, list) else v, field)
    got = _ATTRS.get(ck)
    if got is None:
        got = ld(field, key_value(key, v))
        if len(_ATTRS) < _ATTRS_MAX:
            _ATTRS[ck] = got
    return got


_KEYS: dict[str, bytes] = {}


def attr_once(key: str, v: str | int, field: int = 9) -> bytes:
    """An attribute whose value does not repeat (a request id, a token count): not cached,
    but its key's encoding is."""
    head = _KEYS.get(key)
    if head is None:
        head = _KEYS[key] = ld(1, key.encode())
    if isinstance(v, str):
        value = ld(1, v.encode())
    else:  # int_value = 3 (field 3, varint), most often one or two bytes
        value = b"\x18" + (_SMALL[v] if 0 <= v < 0x80 else varint(v))
    n = len(value)  # a long string's length takes more than one varint byte
    return ld(field, head + _LEN_KEYS[2] + (_SMALL[n] if n < 0x80 else varint(n)) + value)


_INPUT = ld(1, b"gen_ai.usage.input_tokens") + b"\x12"  # ... then AnyValue's length
_OUTPUT = ld(1, b"gen_ai.usage.output_tokens") + b"\x12"


def _int_kv(head: bytes, n: int) -> bytes:
    value = b"\x18" + (_SMALL[n] if 0 <= n < 0x80 else varint(n))  # AnyValue.int_value
    kv = head + _SMALL[len(value)] + value
    return _LEN_KEYS[9] + _SMALL[len(kv)] + kv  # a span's attribute (field 9)


_INT_ATTRS: tuple[dict[int, bytes], dict[int, bytes]] = ({}, {})  # input, output
_INT_ATTRS_MAX = 8192  # distinct counts cached each (token counts repeat; beyond: encoded)


def usage_attrs(input_tokens: int | None, output_tokens: int | None) -> bytes:
    """``gen_ai.usage.input_tokens`` and ``output_tokens`` as span attributes (None: absent),
    each count's encoding cached."""
    ins, outs = _INT_ATTRS
    out = b""
    if input_tokens is not None:
        got = ins.get(input_tokens)
        if got is None:
            got = _int_kv(_INPUT, input_tokens)
            if len(ins) < _INT_ATTRS_MAX:
                ins[input_tokens] = got
        out = got
    if output_tokens is not None:
        got = outs.get(output_tokens)
        if got is None:
            got = _int_kv(_OUTPUT, output_tokens)
            if len(outs) < _INT_ATTRS_MAX:
                outs[output_tokens] = got
        out += got
    return out


def resource(attributes: dict[str, Value]) -> bytes:
    """A ``Resource`` message."""
    return b"".join(ld(1, key_value(k, v)) for k, v in attributes.items())


def scope(name: str, version: str) -> bytes:
    """An ``InstrumentationScope`` message."""
    return ld(1, name.encode()) + ld(2, version.encode())


# -- trace.v1 ----------------------------------------------------------------------------------

SERVER, CLIENT = 2, 3  # Span.SpanKind
STATUS_ERROR = 2  # Status.StatusCode


def span(
    trace_id: bytes,
    span_id: bytes,
    parent_id: bytes | None,
    head: bytes,
    start_ns: int,
    end_ns: int,
    attrs: Iterable[bytes],
    events: Iterable[bytes] = (),
    error: str | None = None,
    trace_state: str | None = None,
) -> bytes:
    """A ``Span`` message, as a field of ``ScopeSpans`` (what ``traces_request`` joins).
    ``head``: its name and kind fields (``span_head``), constant per kind of span."""
    # ids have fixed sizes: their keys and lengths are constants
    parts = [b"\x0a\x10", trace_id, b"\x12\x08", span_id]
    if trace_state:
        parts.append(ld(3, trace_state.encode()))
    if parent_id is not None:
        parts += (b"\x22\x08", parent_id)
    parts += (head, b"\x39", _fixed64(start_ns), b"\x41", _fixed64(end_ns))  # fields 7, 8
    parts.extend(attrs)
    parts.extend(events)
    if error is not None:
        parts.append(ld(15, ld(2, error.encode()) + uint(3, STATUS_ERROR)))
    n = sum(map(len, parts))
    parts[0] = b"\x12" + (_SMALL[n] if n < 0x80 else varint(n)) + b"\x0a\x10"  # field 2
    return b"".join(parts)


# A span's ids and times, the fields every span has whose sizes never change, in one pack:
# trace_id (1), span_id (2), [parent_span_id (4)], start (7), end (8). Protobuf fields may
# come in any order, so these go first and the constant rest (``span_head``, attributes) after.
# ROOT_IDS(0x0A, 16, trace, 0x12, 8, span, 0x39, start, 0x41, end); CHILD_IDS the same with
# (0x22, 8, parent) after the span id.
ROOT_IDS = struct.Struct("<BB16sBB8sBQBQ").pack
CHILD_IDS = struct.Struct("<BB16sBB8sBB8sBQBQ").pack


def wrap_span(body: bytes) -> bytes:
    """A span's fields (``ROOT_IDS``/``CHILD_IDS``, then the rest) as a ``Span`` field of
    ``ScopeSpans`` — what ``traces_request`` joins, like ``span``'s output."""
    n = len(body)
    return (b"\x12" + _SMALL[n] if n < 0x80 else b"\x12" + varint(n)) + body


def status_error(message: str) -> bytes:
    """A span's ``Status`` field: ERROR with ``message``."""
    return ld(15, ld(2, message.encode()) + uint(3, STATUS_ERROR))


def event_template(name: str) -> tuple[bytes, bytes]:
    """An attribute-less event as ``head + fixed64 time + tail`` (cheaper than ``event``)."""
    tail = ld(2, name.encode())
    body_len = 9 + len(tail)
    assert body_len < 0x80
    return _LEN_KEYS[11] + _SMALL[body_len] + b"\x09", tail


def str_attr_head(key: str, field: int = 9) -> tuple[bytes, int]:
    """For ``str_attr``: the key's encoding and the field's key byte."""
    return ld(1, key.encode()), (field << 3) | 2


def str_attr(head: tuple[bytes, int], v: str) -> bytes:
    """``attr_once`` for a string, from ``str_attr_head``: a value that does not repeat."""
    b = v.encode()
    n = len(b)
    key, tag = head
    if n < 0x7C - len(key):  # every length below is one varint byte
        return bytes((tag, len(key) + n + 4)) + key + bytes((0x12, n + 2, 0x0A, n)) + b
    return ld(tag >> 3, key + ld(2, ld(1, b)))


def span_head(name: str, kind: int) -> bytes:
    return ld(5, name.encode()) + uint(6, kind)


def event(time_ns: int, name: str, attrs: Iterable[bytes] = ()) -> bytes:
    """An event as a span's field 11 (``attrs`` encoded with ``attr(..., field=3)``)."""
    return ld(11, fixed64(1, time_ns) + ld(2, name.encode()) + b"".join(attrs))


def traces_request(resource_msg: bytes, scope_msg: bytes, spans: Iterable[bytes]) -> bytes:
    """An ``ExportTraceServiceRequest`` of one resource and one scope (``spans`` from
    ``span``)."""
    scope_spans = ld(1, scope_msg) + b"".join(spans)
    return ld(1, ld(1, resource_msg) + ld(2, scope_spans))


# -- metrics.v1 --------------------------------------------------------------------------------

CUMULATIVE = 2  # AggregationTemporality


@dataclass(slots=True)
class HistogramPoint:
    """One explicit-bucket histogram series: what ``record`` adds up."""

    attrs: bytes  # its attributes, encoded (``attr`` fields)
    bounds: Sequence[float]
    counts: list[int]
    count: int = 0
    total: float = 0.0
    low: float = float("inf")
    high: float = float("-inf")

    def record(self, x: float) -> None:
        self.counts[bisect_left(self.bounds, x)] += 1  # a bucket holds (bounds[i-1], bounds[i]]
        self.count += 1
        self.total += x
        if x < self.low:
            self.low = x
        if x > self.high:
            self.high = x

    def encode(self, start_ns: int, now_ns: int) -> bytes:
        packed_counts = b"".join(_fixed64(c) for c in self.counts)
        packed_bounds = b"".join(_double(b) for b in self.bounds)
        return (
            self.attrs
            + fixed64(2, start_ns)
            + fixed64(3, now_ns)
            + fixed64(4, self.count)
            + double(5, self.total)
            + ld(6, packed_counts)
            + ld(7, packed_bounds)
            + double(11, self.low)
            + double(12, self.high)
        )


def histogram_point(attrs: bytes, bounds: Sequence[float]) -> HistogramPoint:
    return HistogramPoint(attrs, bounds, [0] * (len(bounds) + 1))


def histogram_metric(name: str, unit: str, description: str, points: Iterable[bytes]) -> bytes:
    """A ``Metric`` message with cumulative histogram data points (``HistogramPoint.encode``)."""
    hist = b"".join(ld(1, p) for p in points) + uint(2, CUMULATIVE)
    return ld(1, name.encode()) + ld(2, description.encode()) + ld(3, unit.encode()) + ld(9, hist)


def metrics_request(resource_msg: bytes, scope_msg: bytes, metrics: Iterable[bytes]) -> bytes:
    """An ``ExportMetricsServiceRequest`` of one resource and one scope."""
    scope_metrics = ld(1, scope_msg) + b"".join(ld(2, m) for m in metrics)
    return ld(1, ld(1, resource_msg) + ld(2, scope_metrics))


# -- W3C trace context -------------------------------------------------------------------------

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


@dataclass(frozen=True, slots=True)
class Parent:
    trace_id: bytes
    span_id: bytes
    sampled: bool


def parse_traceparent(header: str | None) -> Parent | None:
    """The caller's span from a W3C ``traceparent`` header; None when absent or invalid (then
    keel starts a new trace, as the W3C spec says)."""
    if header is None:
        return None
    m = _TRACEPARENT.fullmatch(header.strip())
    if m is None:
        return None
    version, trace, parent, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None  # ff is forbidden; version 00 has exactly four fields
    if trace == "0" * 32 or parent == "0" * 16:
        return None
    return Parent(bytes.fromhex(trace), bytes.fromhex(parent), bool(int(flags, 16) & 1))
