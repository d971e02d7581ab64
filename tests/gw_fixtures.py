"""Real processes for gateway tests: two simulators and a gateway, over loopback."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from keel.sim import LogEntry
from keel.testing import GatewayProcess, SimProcess, spawn_gateway, spawn_sim

UPSTREAM_KEY_A = "sk-upstream-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
UPSTREAM_KEY_B = "sk-upstream-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
KEY_FAULTS = ("auth", "quota", "arrearage", "balance", "free_quota_ds")

_counter = itertools.count()


def unique(text: str = "hello") -> str:
    """A prompt no other test uses, so the simulators' ``*K`` counters start at zero."""
    return f"{text} #{next(_counter)}-{uuid.uuid4().hex[:8]}"


def entries_for(sim: SimProcess, prompt_fragment: str) -> list[LogEntry]:
    return [e for e in sim.log() if prompt_fragment in e.prompt]


def log_of(sims: tuple[SimProcess, ...], prompt: str) -> list[LogEntry]:
    """The attempts every simulator saw for a prompt starting with ``prompt``, in order."""
    entries = (e for s in sims for e in s.log() if e.prompt.startswith(prompt))
    return sorted(entries, key=lambda e: e.t_open)


def gateway_config(a: str, b: str, **server: Any) -> dict[str, Any]:
    def dep(url: str, key: str, **kw: Any) -> dict[str, Any]:
        return {"base_url": url, "api_key": key, **kw}

    fast = {"first_token": 2.0, "idle": 1.0}
    models: dict[str, Any] = {
        # retries on one deployment
        "solo": {"deployments": [dep(a, UPSTREAM_KEY_A, model="gpt-4o-mini", timeouts=fast)]},
        # failover inside a group (a then b: no rotation surprises with a single request)
        "pair": {
            "deployments": [dep(a, UPSTREAM_KEY_A), dep(b, UPSTREAM_KEY_B, dialect="dashscope")]
        },
        # fallback groups
        "primary": {"deployments": [dep(a, UPSTREAM_KEY_A)], "fallbacks": ["backup"]},
        "backup": {"deployments": [dep(b, UPSTREAM_KEY_B, dialect="dashscope")]},
        "filtering": {
            "deployments": [dep(a, UPSTREAM_KEY_A, dialect="dashscope")],
            "on_content_filter": "failover",
            "fallbacks": ["backup"],
        },
    }
    # one group per key fault, since benching is sticky per deployment
    for f in KEY_FAULTS:
        models[f"key-{f}"] = {"deployments": [dep(a, UPSTREAM_KEY_A)], "fallbacks": ["backup"]}
    return {
        "server": {"max_body_bytes": 65536, **server},
        "retry": {"backoff_base": 0.01, "backoff_cap": 0.05, "max_retries_per_deployment": 2},
        # These tests inject persistent faults into one deployment after another on purpose;
        # a breaker would (rightly) take it out. Breakers have their own tests (test_limits).
        "breaker": {"enabled": False},
        "models": models,
    }


@pytest.fixture(scope="session")
def sims() -> Iterator[tuple[SimProcess, SimProcess]]:
    with spawn_sim("--name", "a") as a, spawn_sim("--name", "b", "--dialect", "dashscope") as b:
        yield a, b


@pytest.fixture(scope="session")
def gateway(
    sims: tuple[SimProcess, SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    a, b = sims
    cfg = gateway_config(a.base_url, b.base_url)
    with spawn_gateway(cfg, workdir=str(tmp_path_factory.mktemp("gw"))) as gw:
        yield gw
