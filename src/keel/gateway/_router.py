"""Router: a model name → its group's deployments, then its fallback groups'.

The order inside a group is the balancer's business; until the balancing layer lands this is
round-robin over available deployments (benched keys are skipped, cooling ones go last).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

from keel.config import GatewayConfig
from keel.gateway._deployment import Deployment


class Router:
    def __init__(self, config: GatewayConfig) -> None:
        self.groups: dict[str, list[Deployment]] = {}
        for name, group in config.models.items():
            self.groups[name] = [
                Deployment(
                    group=name,
                    index=i,
                    cfg=d,
                    timeouts=d.timeouts.apply(config.timeouts),
                )
                for i, d in enumerate(group.deployments)
            ]
        self._fallbacks = {name: group.fallbacks for name, group in config.models.items()}
        self._turn = itertools.count()

    def __contains__(self, model: str) -> bool:
        return model in self.groups

    def deployments(self) -> Iterator[Deployment]:
        for deps in self.groups.values():
            yield from deps

    def plan(self, model: str) -> list[str]:
        """The groups to try, in order: the model's own, then its fallbacks (transitively,
        each group once)."""
        order: list[str] = []
        todo = [model]
        while todo:
            name = todo.pop(0)
            if name in order:
                continue
            order.append(name)
            todo.extend(self._fallbacks.get(name, ()))
        return order

    def order(self, group: str) -> list[Deployment]:
        """Candidates of one group for one request, best first."""
        deps = self.groups[group]
        now = time.monotonic()
        start = next(self._turn) % len(deps)
        rotated = deps[start:] + deps[:start]
        ready = [d for d in rotated if d.available(now)]
        cooling = [d for d in rotated if now >= d.benched_until and not d.available(now)]
        return ready + cooling
