"""State shared by all gateway replicas through Redis — and what happens when Redis is not there.

What is shared:
* rate limits: GCRA theoretical arrival times, one Redis string per limit, reserved by one Lua
  script per attempt (``RESERVE``: all of a deployment's limits and its concurrency lease in
  one round trip, on Redis's clock so replicas' clocks do not matter);
* in-flight counts of deployments with ``max_concurrency``: a sorted set of leases of
  ``LEASE_TTL`` seconds that the holder's background task renews, so those of a replica that
  died free themselves within seconds (an LLM call can outlast any fixed TTL);
* health: breaker open-until, benched-until (quota/auth) and cooldown-until per deployment, in
  one hash each; every replica reads them all every ``sync_interval`` (``SYNC``, which is also
  the heartbeat that tells each replica how many of them there are).

What is not on a request's path: releases, token reconciliation, pauses and health events are
queued and written by one background task per process (woken when there is something to write,
coalesced over a few milliseconds), so a request pays at most its one ``RESERVE``.

Redis trouble never hangs or fails a request: each call is bounded by ``shared.timeout`` (25 ms
by default) with redis-py's own retries switched off (its default is ten retries with backoff),
a connection error (or two timeouts within a second) marks Redis *down* and is logged once,
requests then use local limits with 1/N of each budget, and the background task reconnects
and logs once when Redis is back. A timeout that fires much later than it was due is our own
event loop's lag, not Redis's: that call falls back, Redis is not declared down.

Budgets stay whole when only *some* replicas lose Redis: N (``expected``) is the largest number
of replicas heartbeating recently (or ``shared.replicas``), and replicas on Redis use only
``live / N`` of each shared budget, leaving 1/N for each replica that stopped heartbeating — it
is on its local fallback, or gone (forgotten after ``_FORGET`` seconds).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from keel.config._limits import SharedConfig

log = logging.getLogger("keel.shared")

RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local nb = tonumber(ARGV[1])
local max_wait = tonumber(ARGV[2])
local wait = 0
local tats = {}
for i = 1, nb do
  local o = 3 + (i - 1) * 3
  local iv, tol, cost = tonumber(ARGV[o]), tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2])
  local tat = tonumber(redis.call('GET', KEYS[i])) or 0
  tats[i] = tat
  local inc = cost * iv
  local w = math.max(tat, now) + inc - math.max(inc, iv + tol) - now
  if w > wait then wait = w end
end
local lo = 3 + nb * 3
local lease_max = tonumber(ARGV[lo])
local used = 0
if lease_max > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[nb + 1], '-inf', now)
  used = redis.call('ZCARD', KEYS[nb + 1])
  if used >= lease_max then return {2, tostring(wait), used} end
end
if wait > max_wait then return {0, tostring(wait), used} end
local send = now + wait
for i = 1, nb do
  local o = 3 + (i - 1) * 3
  local iv, tol, cost = tonumber(ARGV[o]), tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2])
  if iv > 0 then
    local tat = math.max(tats[i], send) + cost * iv
    redis.call('SET', KEYS[i], tostring(tat), 'PX', math.ceil(tat - now + tol) + 1000)
  end
end
if lease_max > 0 then
  local ttl = tonumber(ARGV[lo + 2])
  redis.call('ZADD', KEYS[nb + 1], now + ttl, ARGV[lo + 1])
  redis.call('PEXPIRE', KEYS[nb + 1], math.ceil(ttl) + 1000)
end
return {1, tostring(wait), used + 1}
"""

# Corrections after the fact: ARGV per key: milliseconds to add to the TAT (token
# reconciliation; negative = refund), milliseconds from now before which nothing conforms.
APPLY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
for i, key in ipairs(KEYS) do
  local adj, pause = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key)) or 0
  local new = tat + adj
  if pause > 0 then new = math.max(new, now + pause) end
  if new > now then
    redis.call('SET', key, tostring(new), 'PX', math.ceil(new - now) + 1000)
  elseif tat > now then
    redis.call('DEL', key)
  end
end
return 1
"""

# A health event: field = breaker | bench | cooldown | pause, for ARGV[2] ms from now (max wins).
PUBLISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local untl = now + tonumber(ARGV[2])
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1])) or 0
if untl > cur then
  redis.call('HSET', KEYS[1], ARGV[1], tostring(untl))
  if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], ARGV[1] .. '_reason', ARGV[3]) end
end
local ttl = redis.call('PTTL', KEYS[1])
local want = math.ceil(tonumber(ARGV[2])) + 60000
if ttl < want then redis.call('PEXPIRE', KEYS[1], want) end
return 1
"""

# Keep the leases a replica still holds alive: ARGV[1] = ttl ms, then per key: count, ids.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local ttl = tonumber(ARGV[1])
local i = 2
for k = 1, #KEYS do
  local n = tonumber(ARGV[i])
  i = i + 1
  for j = 1, n do
    redis.call('ZADD', KEYS[k], 'XX', now + ttl, ARGV[i])
    i = i + 1
  end
  redis.call('PEXPIRE', KEYS[k], math.ceil(ttl) + 1000)
end
return 1
"""

# Heartbeat + read every deployment's health: {now, replicas, [breaker, bench, bench_reason,
# cooldown, pause] per deployment}.
SYNC = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl) * 10)
local out = {tostring(now), redis.call('ZCARD', KEYS[1])}
for i = 2, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 'breaker', 'bench', 'bench_reason', 'cooldown', 'pause')
  for j = 1, 5 do out[#out + 1] = h[j] or '' end
end
return out
"""


class SharedDown(Exception):
    """Redis is not usable right now: use the local fallback."""


@dataclass(frozen=True, slots=True)
class Reservation:
    status: int  # 1 granted, 0 rate wait longer than allowed, 2 concurrency full
    wait: float  # seconds (granted: sleep this long first; denied: how long it would be)
    in_flight: int


@dataclass(frozen=True, slots=True)
class RemoteHealth:
    breaker: float  # seconds from now the breaker stays open (≤ 0: not open)
    bench: float
    bench_reason: str
    cooldown: float
    pause: float


Applier = Callable[[dict[str, RemoteHealth]], None]

_COALESCE = 0.001  # seconds: writes queued within this window share one round trip
_FORGET = 60.0  # seconds without a replica's heartbeat before its share is reclaimed
LEASE_TTL = 10.0  # seconds a concurrency lease lives unless its holder renews it


class SharedState:
    def __init__(self, url: str, cfg: SharedConfig) -> None:
        self.cfg = cfg
        self.prefix = cfg.prefix
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self._redis = Redis.from_url(
            url,
            socket_timeout=cfg.timeout,
            socket_connect_timeout=cfg.timeout,
            retry=Retry(NoBackoff(), 0),  # our own fallback is the retry
            retry_on_timeout=False,
            health_check_interval=0,
            # A new pooled connection costs only its TCP connect: RESP2 needs no HELLO, and
            # no CLIENT SETINFO round trips.
            protocol=2,
            driver_info=None,
        )
        self._reserve = self._redis.register_script(RESERVE)
        self._apply = self._redis.register_script(APPLY)
        self._publish = self._redis.register_script(PUBLISH)
        self._renew = self._redis.register_script(RENEW)
        self._sync = self._redis.register_script(SYNC)
        self.up = False  # until the first successful call
        self.live = 1  # replicas heartbeating now (incl. us)
        self._most = cfg.replicas or 1  # the most seen recently ...
        self._most_at = 0.0  # ... and when
        self._down_logged = False
        self._next_reconnect = 0.0
        self._last_timeout = -1e9
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._health_keys: list[str] = []
        self._applier: Applier | None = None
        # queued writes
        self._adjust: dict[str, list[float]] = {}  # key → [adj_ms, pause_ms]
        self._releases: defaultdict[str, list[str]] = defaultdict(list)
        self._held: defaultdict[str, set[str]] = defaultdict(set)  # leases we renew
        self._events: list[tuple[str, str, float, str]] = []
        self._forgotten: dict[str, float] = {}  # health key → when an operator reset it
        self.calls = 0
        self.failures = 0
        self.slowest = 0.0  # seconds: the longest a request waited on Redis, failures included

    @property
    def peers(self) -> int:
        """N: the replicas the budgets are split between (the local fallback takes 1/N)."""
        return max(self.cfg.replicas or 1, self._most, self.live)

    @property
    def scale(self) -> float:
        """How much slower than the full budget the replicas on Redis go together: N / live."""
        return self.peers / max(1, min(self.live, self.peers))

    def _saw(self, live: int) -> None:
        now = time.monotonic()
        self.live = live
        if live >= self._most or now - self._most_at > _FORGET:
            self._most, self._most_at = live, now

    # -- keys ----------------------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, health_keys: Sequence[str], applier: Applier) -> None:
        """Connect and start the background task. Not on any request's path (the gateway
        listens after this), so the first connection may take up to a second: a replica that
        starts on its local fallback has seen no peers and would take a whole budget."""
        self._health_keys = list(health_keys)
        self._applier = applier
        try:
            await self._sync_now(limit=max(1.0, self.cfg.timeout))
        except SharedDown:
            self._down_logged = True
            self._next_reconnect = time.monotonic() + self.cfg.reconnect_interval
            log.warning(
                "redis unreachable at start: using local limits (1/%d of each budget) until "
                "it is reachable",
                self.peers,
            )
        self._task = asyncio.get_running_loop().create_task(self._run(), name="keel-shared")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            await self._redis.aclose()
        except (RedisError, OSError):
            pass

    # -- the request path -----------------------------------------------------------------------

    async def reserve(
        self,
        keys: list[str],
        args: list[float | str],
        n_buckets: int,
        max_wait: float,
        lease: tuple[int, str] | None,
    ) -> Reservation:
        """One round trip: book the buckets (``args`` = interval_ms, tolerance_ms, cost per
        bucket) and a concurrency lease ``(max, id)`` (the last key) if given."""
        if not self.up:
            raise SharedDown
        lease_args: list[float | str] = (
            [lease[0], lease[1], LEASE_TTL * 1000.0] if lease else [0, "", 0]
        )
        argv = [n_buckets, max_wait * 1000.0, *args, *lease_args]
        t0 = time.monotonic()
        try:
            out = await self._call(self._reserve(keys=keys, args=argv))
        finally:
            self.slowest = max(self.slowest, time.monotonic() - t0)
        if lease is not None and int(out[0]) == 1:
            self._held[keys[-1]].add(lease[1])
        return Reservation(int(out[0]), float(out[1]) / 1000.0, int(out[2]))

    # -- queued writes (no round trip on the request's path) ------------------------------------

    def adjust(self, key: str, ms: float) -> None:
        """Move a limit's TAT by ``ms`` (token reconciliation; negative = refund)."""
        if self.up:  # while down, the local fallback took the booking
            entry = self._adjust.setdefault(key, [0.0, 0.0])
            entry[0] += ms
            self._wake.set()

    def release(self, lease_key: str, lease_id: str) -> None:
        held = self._held.get(lease_key)
        if held is not None:
            held.discard(lease_id)
        if self.up:  # a lease from before an outage expires on its own
            self._releases[lease_key].append(lease_id)
            self._wake.set()

    def forget(self, health_key: str) -> None:
        """An operator put the deployment back (``Deployment.reset``): the health published
        for it (bench, breaker, cool-down, pause) is deleted, so that no sync applies it
        again — not the one in flight now, nor any before the deletion is written."""
        self._forgotten[health_key] = time.monotonic()
        self._events.append((health_key, "", math.inf, ""))
        self._wake.set()

    def publish(self, health_key: str, field: str, seconds: float, reason: str = "") -> None:
        """Tell the other replicas (kept while Redis is down: still true when it is back)."""
        if len(self._events) < 1000:
            self._events.append((health_key, field, time.monotonic() + seconds, reason))
        self._wake.set()

    # -- plumbing -------------------------------------------------------------------------------

    async def _call(self, aw: Any, limit: float | None = None) -> Any:
        self.calls += 1
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(limit or self.cfg.timeout):
                return await aw
        except (TimeoutError, RedisTimeoutError) as exc:
            # One slow reply is this call's fallback; two within a second is an outage (a
            # dead Redis fails with connection errors right away anyway). A timeout that fired
            # long after it was due measured our own starved event loop, not Redis.
            self.failures += 1
            now = time.monotonic()
            if now - t0 <= 2 * self.cfg.timeout:
                if now - self._last_timeout < 1.0:
                    self._mark_down(exc)
                self._last_timeout = now
            raise SharedDown from None
        except (RedisError, OSError) as exc:
            self.failures += 1
            self._mark_down(exc)
            raise SharedDown from None

    def _mark_down(self, exc: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        self._next_reconnect = time.monotonic() + self.cfg.reconnect_interval
        # Queued writes are dropped: the state they correct is rebuilt when Redis is back.
        self._adjust.clear()
        self._releases.clear()
        if not self._down_logged:
            self._down_logged = True
            log.warning(
                "redis unreachable (%s): using local limits (1/%d of each budget) until it is back",
                type(exc).__name__,
                self.peers,
            )

    def _mark_up(self) -> None:
        if self.up:
            return
        self.up = True
        if self._down_logged:
            self._down_logged = False
            log.warning("redis reachable again: shared limits and health resume")
        else:
            log.info("shared state in redis (replica %s)", self.replica_id)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_sync = loop.time() + self.cfg.sync_interval
        while True:
            timeout = max(0.0, next_sync - loop.time()) if self.up else 0.1
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
                await asyncio.sleep(_COALESCE)  # let a burst of writes share one round trip
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                if not self.up:
                    if time.monotonic() < self._next_reconnect:
                        continue
                    self._next_reconnect = time.monotonic() + self.cfg.reconnect_interval
                    await self._sync_now()  # the heartbeat doubles as the reconnect probe
                    next_sync = loop.time() + self.cfg.sync_interval
                    continue
                await self._flush()
                if loop.time() >= next_sync:
                    await self._sync_now()
                    next_sync = loop.time() + self.cfg.sync_interval
            except SharedDown:
                pass
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not kill the loop for good
                log.exception("shared state sync failed")
                await asyncio.sleep(self.cfg.sync_interval)

    async def _flush(self) -> None:
        if self._adjust:
            batch, self._adjust = self._adjust, {}
            keys = list(batch)
            argv = [v for k in keys for v in batch[k]]
            await self._call(self._apply(keys=keys, args=argv))
        if self._releases:
            releases, self._releases = self._releases, defaultdict(list)
            pipe = self._redis.pipeline(transaction=False)
            for key, ids in releases.items():
                pipe.zrem(key, *ids)
            await self._call(pipe.execute())
        while self._events:
            key, field, until, reason = self._events[0]
            ms = (until - time.monotonic()) * 1000.0
            if not field:  # forget()
                await self._call(self._redis.delete(key))
            elif ms > 0:
                await self._call(self._publish(keys=[key], args=[field, ms, reason]))
            self._events.pop(0)  # only once written: an outage keeps it for later

    async def _sync_now(self, limit: float | None = None) -> None:
        if not self.up:  # (re)connecting: a restarted Redis has forgotten our scripts,
            # and pooled connections to the old process would each fail once (flapping)
            await self._redis.connection_pool.disconnect()
            pipe = self._redis.pipeline(transaction=False)
            for script in (RESERVE, APPLY, PUBLISH, RENEW, SYNC):
                pipe.script_load(script)
            await self._call(pipe.execute(), limit)
        if any(self._held.values()):
            held = [(k, ids) for k, ids in self._held.items() if ids]
            argv: list[float | str] = [LEASE_TTL * 1000.0]
            for _, ids in held:
                argv += [len(ids), *ids]
            await self._call(self._renew(keys=[k for k, _ in held], args=argv), limit)
        started = time.monotonic()
        keys = [self.key("replicas"), *self._health_keys]
        ttl_ms = max(1000.0, self.cfg.sync_interval * 5000.0)
        raw = await self._call(self._sync(keys=keys, args=[self.replica_id, ttl_ms]), limit)
        self._mark_up()
        now_ms = float(raw[0])
        self._saw(max(1, int(raw[1])))
        health: dict[str, RemoteHealth] = {}

        def rel(v: bytes) -> float:
            return (float(v) - now_ms) / 1000.0 if v else 0.0

        # Reset by an operator since this sync began, or not yet deleted: not applied again.
        pending = {k for k, f, _, _ in self._events if not f}
        skip = pending | {k for k, t in self._forgotten.items() if t >= started}
        self._forgotten = {k: t for k, t in self._forgotten.items() if k in skip}
        for i, key in enumerate(self._health_keys):
            if key in skip:
                continue
            b, bench, reason, cool, pause = raw[2 + 5 * i : 7 + 5 * i]
            health[key] = RemoteHealth(
                rel(b), rel(bench), (reason or b"").decode(), rel(cool), rel(pause)
            )
        if self._applier is not None:
            self._applier(health)
