"""An OTLP/HTTP receiver for tests: a small aiohttp server on loopback that decodes what an
exporter posts (``opentelemetry-proto``) and keeps it for the test to read."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attributes(obj: Any) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in obj.attributes}


class Receiver:
    """POST /v1/traces and /v1/metrics, decoded; ``wait`` for a condition on what arrived."""

    def __init__(self) -> None:
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self.sizes: list[int] = []  # each body's size, decoded
        self._arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _body(self, request: web.Request) -> bytes:
        # aiohttp's server undoes a gzip Content-Encoding itself (and fails the request when
        # the body is not gzip): what ``read`` gives is the protobuf message
        raw = await request.read()
        self.headers.append(dict(request.headers))
        self.sizes.append(len(raw))
        return raw

    async def _traces(self, request: web.Request) -> web.Response:
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(await self._body(request))
        self.traces.append(msg)
        self._arrived.set()
        body = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    async def _metrics(self, request: web.Request) -> web.Response:
        msg = ExportMetricsServiceRequest()
        msg.ParseFromString(await self._body(request))
        self.metrics.append(msg)
        self._arrived.set()
        body = ExportMetricsServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    def spans(self) -> list[tuple[Span, dict[str, Any]]]:
        """Every span received, with its resource's attributes."""
        out = []
        for req in self.traces:
            for rs in req.resource_spans:
                res = attributes(rs.resource)
                for ss in rs.scope_spans:
                    out.extend((s, res) for s in ss.spans)
        return out

    def metric_points(self) -> dict[str, list[tuple[dict[str, Any], Any]]]:
        """Metric name → its data points (attributes, point), across exports."""
        out: dict[str, list[tuple[dict[str, Any], Any]]] = {}
        for req in self.metrics:
            for rm in req.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        kind = m.WhichOneof("data")
                        points = getattr(m, kind).data_points
                        out.setdefault(m.name, []).extend((attributes(p), p) for p in points)
        return out

    async def wait(self, until: Callable[[Receiver], bool], within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            while not until(self):
                self._arrived.clear()
                await self._arrived.wait()
