"""Metrics of virtual keys, read from the cache at scrape time. Labels are key *names* and
ids, never a key."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from keel.auth._service import KeyService


class KeyCollector(Collector):
    def __init__(self, keys: KeyService) -> None:
        self.keys = keys

    def collect(self) -> Iterator[Metric]:
        labels = ["key", "id"]
        spend = GaugeMetricFamily(
            "keel_key_spend_usd", "Spend of a virtual key in its budget period.", labels=labels
        )
        budget = GaugeMetricFamily("keel_key_budget_usd", "A virtual key's budget.", labels=labels)
        refused = CounterMetricFamily(
            "keel_key_rate_limited",
            "Requests refused by a virtual key's limits.",
            labels=[*labels, "limit"],
        )
        active = 0
        for vk in list(self.keys.by_id.values()):
            if vk.revoked:
                continue
            active += 1
            spend.add_metric([vk.name, vk.id], vk.spent())
            if vk.budget is not None:
                budget.add_metric([vk.name, vk.id], vk.budget)
            for what, n in vk.principal.refused.items():
                refused.add_metric([vk.name, vk.id, what], n)
        yield spend
        yield budget
        yield refused
        yield GaugeMetricFamily("keel_keys_active", "Virtual keys not revoked.", active)
