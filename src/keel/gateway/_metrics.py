"""Prometheus metrics at ``GET /metrics``, read from the live objects at scrape time.

Nothing is updated per request for metrics' sake: deployments already count their attempt
outcomes, limiters their queues, breakers their state; a custom collector turns those into
samples when Prometheus asks. Labels are deployment and client *names*, never keys.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from keel.engine._auth import presents
from keel.engine._errors import KeelError
from keel.gateway._sink import error_response

if TYPE_CHECKING:
    from keel.engine._keel import Keel


class KeelCollector(Collector):
    def __init__(self, keel: Keel) -> None:
        self.gw = keel

    def collect(self) -> Iterator[Metric]:
        now = time.monotonic()
        deps = list(self.gw.router.deployments())
        d = ["deployment"]
        attempts = CounterMetricFamily(
            "keel_upstream_attempts", "Upstream attempts by outcome.", labels=[*d, "outcome"]
        )
        benched = GaugeMetricFamily(
            "keel_deployment_benched",
            "1 while a deployment's key is out of rotation (quota, billing, auth).",
            labels=[*d, "reason"],
        )
        breaker = GaugeMetricFamily(
            "keel_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.", labels=d
        )
        opened = CounterMetricFamily(
            "keel_breaker_opened", "Times the circuit breaker opened.", labels=d
        )
        in_flight = GaugeMetricFamily("keel_deployment_in_flight", "Attempts in flight.", labels=d)
        waiting = GaugeMetricFamily(
            "keel_deployment_waiting", "Requests waiting for capacity.", labels=d
        )
        limit = GaugeMetricFamily(
            "keel_concurrency_limit",
            "Effective concurrency limit (configured and adaptive); absent when unlimited.",
            labels=d,
        )
        saturated = CounterMetricFamily(
            "keel_deployment_saturated",
            "Requests that found no capacity within their wait bound.",
            labels=d,
        )
        latency = GaugeMetricFamily(
            "keel_deployment_latency_seconds_per_token",
            "Peak-EWMA latency per output token the balancer uses.",
            labels=d,
        )
        learned = GaugeMetricFamily(
            "keel_learned_limit",
            "Per-minute limits learned from upstream x-ratelimit-* headers.",
            labels=[*d, "unit"],
        )
        for dep in deps:
            name = dep.name
            for outcome, n in dep.outcomes.items():
                attempts.add_metric([name, outcome], n)
            out = now < dep.benched_until and not dep.drained  # (a drain is not a bench)
            benched.add_metric([name, dep.bench_reason if out else ""], 1.0 if out else 0.0)
            breaker.add_metric([name], float(dep.breaker.state(now)))
            opened.add_metric([name], dep.breaker.opened_total)
            lim = dep.limiter
            in_flight.add_metric([name], lim.in_flight)
            waiting.add_metric([name], lim.waiting)
            cap = lim.cap()
            if cap != float("inf"):
                limit.add_metric([name], cap)
            saturated.add_metric([name], lim.saturated_total)
            if (c := dep.latency.cost(now)) is not None:
                latency.add_metric([name], c)
            if lim.learned_rpm:
                learned.add_metric([name, "requests"], lim.learned_rpm)
            if lim.learned_tpm:
                learned.add_metric([name, "tokens"], lim.learned_tpm)
        yield from (attempts, benched, breaker, opened, in_flight, waiting, limit, saturated)
        yield from (latency, learned)

        refused = CounterMetricFamily(
            "keel_client_rate_limited",
            "Client requests refused with 429 by client limits.",
            labels=["client", "limit"],
        )
        for p in self.gw.admission.principals():
            for what, n in p.refused.items():
                refused.add_metric([p.name, what], n)
        yield refused
        shared = self.gw.shared
        if shared is not None:
            yield GaugeMetricFamily("keel_shared_up", "1 while Redis is reachable.", shared.up)
            yield GaugeMetricFamily(
                "keel_shared_replicas", "Gateway replicas heartbeating in Redis.", shared.live
            )
            yield GaugeMetricFamily(
                "keel_shared_budget_split",
                "N: replicas the budgets are split between (the fallback takes 1/N).",
                shared.peers,
            )
            yield CounterMetricFamily(
                "keel_shared_failures", "Redis calls that failed or timed out.", shared.failures
            )
            yield GaugeMetricFamily(
                "keel_shared_slowest_call_seconds",
                "The longest a request has waited on a Redis call (failures included).",
                shared.slowest,
            )


def registry_for(keel: Keel) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KeelCollector(keel))
    return registry


async def metrics(request: web.Request) -> web.Response:
    from keel.gateway._app import KEEL_KEY, METRICS_KEY

    keel = request.app[KEEL_KEY]
    server = keel.config.server
    key = server.metrics_key
    if key is not None:
        # The scraper's own key: a client's key (virtual or not) is not an operator's.
        if not presents(request.headers, key.get_secret_value()):
            return error_response(
                KeelError(
                    401,
                    "GET /metrics needs the gateway's metrics key (server.metrics_key) as a "
                    "bearer token.",
                    code="invalid_api_key",
                )
            )
    else:
        # No scraper key: the same rules as /v1/models — a gateway that asks its clients for
        # a key does not show its key names, budgets and traffic to anyone without one (the
        # admin key opens it too). An open gateway's metrics stay open.
        try:
            keel.authenticate(request.headers)
        except KeelError as exc:
            admin = server.admin_key
            if admin is None or not presents(request.headers, admin.get_secret_value()):
                return error_response(exc)
    body = generate_latest(request.app[METRICS_KEY])
    return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})
