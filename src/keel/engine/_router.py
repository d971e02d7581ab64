"""Router: a model name → its group's deployments, then its fallback groups'.

The order inside a group is the balancer's business (``keel.engine._balancer``: weighted
power-of-two-choices on peak-EWMA latency and load; benched keys and open breakers are
skipped, full deployments come after free ones, cooling ones go last).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Mapping

from keel.config import GatewayConfig
from keel.engine import _balancer
from keel.engine._deployment import Deployment
from keel.engine._limits import link_siblings, wire
from keel.engine._shared import SharedState


class Router:
    def __init__(
        self,
        config: GatewayConfig,
        shared: SharedState | None = None,
        keep: Mapping[str, Deployment] | None = None,
    ) -> None:
        """``keep``: deployments of a config being reloaded, by name; one whose settings did
        not change is carried over as it is (health, limits, requests in flight)."""
        self.groups: dict[str, list[Deployment]] = {}
        kept: set[int] = set()
        for name, group in config.models.items():
            deps = self.groups[name] = []
            for i, d in enumerate(group.deployments):
                dep = Deployment(
                    group=name, index=i, cfg=d, timeouts=d.timeouts.apply(config.timeouts)
                )
                old = keep.get(dep.name) if keep is not None else None
                if old is not None and (old.group, old.cfg, old.timeouts) == (
                    name,
                    d,
                    dep.timeouts,
                ):
                    old.index = i
                    old.limiter.config = config
                    kept.add(id(old))
                    dep = old
                deps.append(dep)
        for dep in self.deployments():
            if id(dep) not in kept:
                wire(dep, config, shared)
        for deps in self.groups.values():  # health relative to the group's other deployments
            link_siblings(deps)
        self._fallbacks = {name: group.fallbacks for name, group in config.models.items()}
        self._plans: dict[str, list[str]] = {}
        self._rng = random.Random()

    def __contains__(self, model: str) -> bool:
        return model in self.groups

    def deployments(self) -> Iterator[Deployment]:
        for deps in self.groups.values():
            yield from deps

    def all_open(self, model: str, now: float) -> bool:
        """True when no deployment of the plan would be admitted by its breaker (benched
        keys aside): the panic case, where breakers stop protecting and attempts go anyway."""
        return not any(
            d.breaker.would_admit(now)
            for group in self.plan(model)
            for d in self.groups.get(group, ())
            if now >= d.benched_until
        )

    def unavailable(self, model: str) -> tuple[str, float | None]:
        """Why no deployment of the plan took an attempt, and in how many seconds the first
        of them should be back (for retry-after)."""
        now = time.monotonic()
        why: list[str] = []
        back: list[float] = []
        for group in self.plan(model):
            for d in self.groups.get(group, ()):  # (a group a reload removed: none)
                if d.drained:
                    why.append(f"{d.name}: drained by an operator")
                elif now < d.benched_until:
                    why.append(f"{d.name}: key out of rotation ({d.bench_reason})")
                    back.append(d.benched_until - now)
                elif not d.breaker.would_admit(now):
                    why.append(f"{d.name}: circuit breaker open")
                    back.append(max(0.0, d.breaker.open_until - now))
        reason = "no upstream deployment is available"
        return (f"{reason} ({'; '.join(why)})" if why else reason), min(back, default=None)

    def plan(self, model: str) -> list[str]:
        """The groups to try, in order: the model's own, then its fallbacks (transitively,
        each group once)."""
        cached = self._plans.get(model)
        if cached is not None:  # fallbacks are fixed at start: one walk per model
            return cached
        order: list[str] = []
        todo = [model]
        while todo:
            name = todo.pop(0)
            if name in order:
                continue
            order.append(name)
            todo.extend(self._fallbacks.get(name, ()))
        self._plans[model] = order
        return order

    def order(self, group: str) -> list[Deployment]:
        """Candidates of one group for one request, best first."""
        return _balancer.order(self.groups[group], time.monotonic(), self._rng)
