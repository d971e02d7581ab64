"""deploy/: the Grafana dashboard and the Prometheus alert rules are built from the metrics keel
actually exports — every metric an expression names is in a real gateway's ``GET /metrics``
(with Redis and virtual keys on, so that every family is there)."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from keel.testing import SimProcess, spawn_gateway
from limits_helpers import REDIS, RedisServer

DEPLOY = Path(__file__).parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "keel-dashboard.json"
RULES = DEPLOY / "prometheus" / "keel-alerts.yml"
# Names an expression may use that keel does not export: Prometheus' own.
PROMETHEUS_OWN = {"up"}


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names or Grafana variables."""
    no_strings = re.sub(r'"[^"]*"', '""', expr)
    no_matchers = re.sub(r"\{[^}]*\}", "{}", no_strings)
    no_groupings = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", no_matchers
    )
    no_ranges = re.sub(r"\[[^\]]*\]", "[]", no_groupings)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", no_ranges))
    functions = set(re.findall(r"([a-zA-Z_]+)\s*\(", no_ranges))
    keywords = {"by", "without", "on", "ignoring", "bool", "and", "or", "unless", "offset"}
    return {w for w in words - functions - keywords if not w.startswith("__")}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"]
            exprs.append(re.sub(r"label_values\((\w+),\s*\w+\)", r"\1", q))
    return exprs


def rule_exprs() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def test_the_files_are_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and len(ids) >= 10
    assert all(p["targets"] and p["title"] for p in dash["panels"])
    rules = yaml.safe_load(RULES.read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    names = [r["alert"] for r in alerts]
    assert len(names) == len(set(names))
    for r in alerts:
        assert r["labels"]["severity"] in ("critical", "warning", "info")
        assert r["annotations"]["summary"]
        assert re.fullmatch(r"\d+[smh]", r["for"])
    for expr in dashboard_exprs() + rule_exprs():
        assert expr.count("(") == expr.count(")"), expr
        assert metric_names(expr), expr


def test_metric_names_of_an_expression() -> None:
    expr = 'sum by (deployment) (rate(keel_upstream_attempts_total{outcome!~"a|b"}[5m])) / max(keel_x) > 0.2'
    assert metric_names(expr) == {"keel_upstream_attempts_total", "keel_x"}


@pytest.fixture(scope="module")
def exported(
    sims: tuple[SimProcess, SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[set[str]]:
    """The sample names a real gateway exports, with Redis, client limits and virtual keys."""
    if REDIS is None:
        pytest.skip("redis-server is not installed")
    redis = RedisServer()
    redis.start()
    try:
        cfg: dict[str, Any] = {
            "redis_url": redis.url,
            "clients": {"app": {"key": "sk-app-deploy", "rpm": 1000}},
            "models": {
                "chat": {
                    "deployments": [
                        {"base_url": sims[0].base_url, "api_key": "sk-up", "max_concurrency": 8}
                    ]
                }
            },
        }
        with spawn_gateway(cfg, workdir=str(tmp_path_factory.mktemp("deploy"))) as gw:
            body = json.dumps(
                {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
            ).encode()
            req = urllib.request.Request(
                gw.base_url + "/chat/completions",
                data=body,
                headers={
                    "authorization": "Bearer sk-app-deploy",
                    "content-type": "application/json",
                },
            )
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 200
            scrape = urllib.request.Request(
                gw.url + "/metrics", headers={"authorization": "Bearer sk-app-deploy"}
            )
            with urllib.request.urlopen(scrape, timeout=10) as r:
                text = r.read().decode()
    finally:
        redis.kill()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("keel_"):
            continue
        suffixes = {"counter": ("_total", "_created")}.get(family.type, ("",))
        names.update(family.name + s for s in suffixes)
    yield names


def test_keel_exports_what_the_files_need(exported: set[str]) -> None:
    # the families every deployment has, whatever the traffic
    for name in (
        "keel_upstream_attempts_total",
        "keel_breaker_state",
        "keel_shared_up",
        "keel_keys_active",
    ):
        assert name in exported


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_expression_names_an_exported_metric(exported: set[str], source: str) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else rule_exprs()
    used = set().union(*(metric_names(e) for e in exprs))
    unknown = sorted(used - exported - PROMETHEUS_OWN)
    assert not unknown, f"not exported by keel: {unknown}"
    assert len(used) >= 10
