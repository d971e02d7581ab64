"""The one place that says what "keel with a realistic config" means for the benchmark.

Two deployments of one model group (round-robin / balancer), per-deployment limits set high
enough never to throttle the benchmark (so their *bookkeeping* is measured, not their effect),
explicit timeouts and a retry policy. When breakers, the balancer and metrics gain config keys,
switch them on here: every cell picks this up, and the JSON records it under ``meta.keel_config``.
"""

from __future__ import annotations

from typing import Any

MODEL = "bench"
UPSTREAM_MODEL = "sim-model"

# Limits far above what the benchmark offers: measured as overhead, never as 429s.
_LIMITS = {"rpm": 100_000_000, "tpm": 10_000_000_000, "max_concurrency": 100_000}


def keel_config(upstream: str) -> dict[str, Any]:
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
        "models": {
            MODEL: {
                "deployments": [
                    deployment("sim-a", "sk-bench-a"),
                    deployment("sim-b", "sk-bench-b"),
                ]
            }
        },
    }
