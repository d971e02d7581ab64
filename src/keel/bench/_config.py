"""The one place that says what "keel with a realistic config" means for the benchmark.

Two deployments of one model group (so the balancer chooses), per-deployment and per-client
limits set far above what the benchmark offers (their *bookkeeping* is measured, never their
effect), breaker and balancer sections, explicit timeouts and a retry policy. Metrics are
served at ``/metrics`` and cost nothing per request by design.

Sections and keys the running keel does not know yet are dropped (and listed in the report's
``meta.keel_config_dropped``), so the benchmark keeps working while policies land; when a policy
gains a switch, turn it on here.
"""

from __future__ import annotations

from typing import Any

MODEL = "bench"
UPSTREAM_MODEL = "sim-model"
CLIENT_KEY = "sk-bench"  # what the load generator sends as its bearer token

_LIMITS = {"rpm": 100_000_000, "tpm": 10_000_000_000, "max_concurrency": 100_000}


def _full(upstream: str) -> dict[str, Any]:
    def deployment(name: str, key: str) -> dict[str, Any]:
        return {
            "name": name,
            "base_url": upstream,
            "api_key": key,
            "model": UPSTREAM_MODEL,
            **_LIMITS,
        }

    return {
        "server": {"host": "127.0.0.1", "max_body_bytes": 1024 * 1024},
        "timeouts": {"connect": 5.0, "first_token": 120.0, "idle": 60.0, "total": 600.0},
        "retry": {"max_attempts": 4, "max_retries_per_deployment": 1},
        "clients": {"bench": {"key": CLIENT_KEY, **_LIMITS}},
        "breaker": {},  # defaults: on
        "balancer": {},  # defaults: health, load and latency aware
        "models": {
            MODEL: {
                "deployments": [
                    deployment("sim-a", "sk-bench-a"),
                    deployment("sim-b", "sk-bench-b"),
                ]
            }
        },
    }


def keel_config(upstream: str) -> tuple[dict[str, Any], list[str]]:
    """(config, dropped keys): the realistic config, trimmed to what this keel accepts."""
    from keel.config import DeploymentConfig, GatewayConfig

    cfg = _full(upstream)
    dropped = [k for k in cfg if k not in GatewayConfig.model_fields]
    for k in dropped:
        del cfg[k]
    for group in cfg["models"].values():
        for dep in group["deployments"]:
            for k in [k for k in dep if k not in DeploymentConfig.model_fields]:
                del dep[k]
                dropped.append(f"deployments.{k}")
    return cfg, sorted(set(dropped))
