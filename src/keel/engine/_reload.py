"""Applying a new config to a running engine (``POST /admin/reload``, SIGHUP).

What a request reads from the engine it reads once, when it starts (its plan holds the
deployments it may use), so swapping the router, the retry policies and the hedge
policies never disturbs a request in flight: it finishes on the deployments it started with,
and the next request sees the new ones. A deployment whose settings did not change is carried
over as it is — its health, learned limits and requests in flight (``Router(keep=…)``).

Reloaded: ``models``, ``timeouts``, ``retry``, ``breaker``, ``balancer``,
``adaptive_concurrency``, ``queue``. The other sections (the listening socket, client keys
and limits, Redis, the key database, …) hold live state of their own: a change there is
reported as needing a restart and the running values stay.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from keel._backoff import RetryBudget
from keel.config import GatewayConfig, load_config
from keel.engine._keel import RequestSettings, hedge_policy, policies
from keel.engine._limits import apply_remote_health
from keel.engine._router import Router

if TYPE_CHECKING:
    from keel._hedge import HedgePolicy
    from keel.engine._keel import Keel

log = logging.getLogger("keel.admin")

RELOADED = (
    "models",
    "timeouts",
    "retry",
    "breaker",
    "balancer",
    "adaptive_concurrency",
    "queue",
)
# What ``keel.engine._limits.wire`` builds a deployment's limiter and breaker from: when one of
# these changes, every deployment is built afresh.
_WIRED = ("breaker", "balancer", "adaptive_concurrency")


class NoConfigFile(Exception):
    """The engine was not started from a file (``keel serve`` without ``--config``)."""


def reload(keel: Keel, new: GatewayConfig | None = None) -> dict[str, Any]:
    """Swap in ``new`` (default: the file ``keel.config_path``, re-read; ``ConfigError`` when
    it is not valid — the running config stays). Returns what changed."""
    if new is None:
        if keel.config_path is None:
            raise NoConfigFile("this gateway was not started from a config file (--config)")
        new = load_config(keel.config_path)
    old = keel.config
    restart = [s for s in GatewayConfig.model_fields if s not in RELOADED and _differs(old, new, s)]
    # The running values of what a reload does not change, the new ones of the rest.
    config = new.model_copy(
        update={s: getattr(old, s) for s in GatewayConfig.model_fields if s not in RELOADED}
    )
    rewire = any(_differs(old, config, s) for s in _WIRED)
    before = {d.name: d for d in keel.router.deployments()}
    router = Router(config, keel.shared, keep=None if rewire else before)
    after = {d.name: d for d in router.deployments()}
    kept = sorted(n for n, d in after.items() if before.get(n) is d)

    r = config.retry
    hedges: dict[str, HedgePolicy] = {}
    for name, g in config.models.items():
        if not g.hedge.enabled:
            continue
        was = old.models.get(name)
        same = was is not None and was.hedge == g.hedge and name in keel.hedges
        hedges[name] = keel.hedges[name] if same else hedge_policy(g)  # its history stays
    if (r.budget_ratio, r.budget_floor_per_s) != (
        old.retry.budget_ratio,
        old.retry.budget_floor_per_s,
    ):
        keel.budget = RetryBudget(
            ratio=r.budget_ratio, floor_per_s=r.budget_floor_per_s, clock=keel.budget.clock
        )
    # One assignment each, no await between them: a request starting now sees all or none.
    keel.config, keel.router, keel.hedges = config, router, hedges
    keel.settings = RequestSettings.of(config)
    keel.policies = policies(config)
    shared = keel.shared
    if shared is not None:  # other replicas' health decisions for the new set of deployments
        deps = list(router.deployments())
        shared._health_keys = [d.limiter.health_key for d in deps]
        shared._applier = lambda h: apply_remote_health(deps, h)
    result = {
        "added": sorted(set(after) - set(before)),
        "removed": sorted(set(before) - set(after)),
        "changed": sorted(n for n in after if n in before and before[n] is not after[n]),
        "kept": kept,
        "restart_needed": restart,
    }
    if restart:
        log.warning("reload: changes to %s need a restart; running on the old", ", ".join(restart))
    return result


def _differs(a: GatewayConfig, b: GatewayConfig, section: str) -> bool:
    return bool(getattr(a, section) != getattr(b, section))
