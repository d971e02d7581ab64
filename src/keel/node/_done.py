"""Finished turns: which (session, turn) already had its end published.

A node can die after publishing a turn's end and before its ack reaches the broker; the
redelivery must then be acked, not answered again (consumers never see two ends). In memory
always (bounded); with ``redis_url`` also in Redis, so every node knows — each key expires
after ``node.finished_ttl``. Redis trouble never holds a turn up: short timeouts, then the
local memory alone (logged once).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keel.config._node import NodeConfig

log = logging.getLogger("keel.node")
_LOCAL = 100_000
# Seconds per Redis call. Both calls sit off the answer's path — the write comes after the end
# is published (it delays only the ack), the read only on a redelivery — so a busy Redis is
# waited for a little rather than risk a second end.
_TIMEOUT = 1.0


class FinishedTurns:
    def __init__(self, redis_url: str | None, cfg: NodeConfig) -> None:
        self._url = redis_url
        self._ttl = int(cfg.finished_ttl)
        self._prefix = f"keel:node:done:{cfg.requests_queue}:"
        self._local: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._redis: Any = None
        self._warned = False

    async def start(self) -> None:
        if self._url:
            import redis.asyncio as aioredis

            self._redis = aioredis.from_url(
                self._url,
                socket_timeout=_TIMEOUT,
                socket_connect_timeout=_TIMEOUT,
                retry_on_timeout=False,
            )

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def _key(self, session: str, turn: str) -> str:
        return f"{self._prefix}{len(session)}:{session}:{turn}"  # length: no ambiguity on ':'

    async def seen(self, session: str, turn: str, check_shared: bool) -> bool:
        if (session, turn) in self._local:
            return True
        if not check_shared or self._redis is None:
            return False
        try:
            return bool(await self._redis.exists(self._key(session, turn)))
        except Exception as exc:
            self._trouble(exc)
            return False

    async def add(self, session: str, turn: str) -> None:
        self._local[(session, turn)] = None
        while len(self._local) > _LOCAL:
            self._local.popitem(last=False)
        if self._redis is not None:
            try:
                await self._redis.set(self._key(session, turn), b"1", ex=self._ttl)
            except Exception as exc:
                self._trouble(exc)

    def _trouble(self, exc: BaseException) -> None:
        if not self._warned:
            log.warning(
                "finished turns: Redis unavailable (%s); remembering locally", type(exc).__name__
            )
            self._warned = True
