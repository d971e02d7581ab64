"""Virtual keys on the hot path: an in-memory cache fed in the background.

A request is authenticated against dicts only — a keyed BLAKE2b of the bearer token looked up
in ``by_digest``, or a JWT whose verification is cached until it expires. The database is read
by a background loop: every ``auth.sync_interval``, and at once when Postgres NOTIFY or Redis
pub/sub says something changed (revocations reach every replica in well under a second).
Spend is added to the key in memory when a request ends (``Meter.charge``) and written in
batches every ``auth.spend_flush_interval``; the same loop reads back the totals every
replica wrote, so a budget holds across replicas to within one flush interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from hashlib import blake2b
from typing import TYPE_CHECKING, Any

import jwt
import orjson
from pydantic import SecretStr

from keel._ratelimit import per_minute
from keel.auth._jwt import InvalidToken, TokenKeys, generate_key
from keel.auth._oidc import Oidc
from keel.auth._store import KeyStore
from keel.auth._terms import KEY_PREFIX, Rates, budget_message, cost, period_start
from keel.config import GatewayConfig
from keel.config._limits import ClientConfig
from keel.engine._auth import Principal, StaticKeys, bearer
from keel.engine._errors import KeelError

if TYPE_CHECKING:
    from keel.engine._keel import Call

log = logging.getLogger("keel.auth")

_JWT_CACHE_MAX = 50_000  # verified tokens kept (cleared when full: a miss only re-verifies)
_REDIS_CHANNEL = "keys"
_KEY_PREFIX = KEY_PREFIX.encode()
_NEVER = float("inf")  # a key's expires_at when it has none


def _invalid(message: str = "Invalid or missing API key for this gateway.") -> KeelError:
    return KeelError(401, message, code="invalid_api_key")


class VirtualKey:
    """A key of the database as the hot path sees it; also its principal's ``meter``."""

    __slots__ = (
        "budget",
        "db_period",
        "db_spend",
        "digest",
        "expires_at",
        "flushing",
        "id",
        "models",
        "name",
        "pending",
        "period",
        "principal",
        "revoked",
        "service",
    )

    def __init__(self, service: KeyService, row: Mapping[str, Any]) -> None:
        self.service = service
        self.id: str = row["id"]
        self.name: str = row["name"]
        self.pending = 0.0  # spend counted here, not yet written
        self.flushing = 0.0  # spend being written right now
        cfg = ClientConfig(
            key=SecretStr("virtual"),  # unused: a virtual key is looked up by digest
            rpm=row["rpm"],
            tpm=row["tpm"],
            max_concurrency=row["max_concurrency"],
            burst=60.0,  # a minute's worth at once, as for the config's clients
        )
        p = Principal(self.name, cfg)
        if cfg.rpm:
            p.req = per_minute(cfg.rpm, cfg.burst)
        if cfg.tpm:
            p.tok = per_minute(cfg.tpm, cfg.burst)
        models = orjson.loads(row["models"]) if row["models"] is not None else None
        self.models = frozenset(models) if models is not None else None
        p.models = self.models
        p.meter = self
        self.principal = p
        self.update(row)

    def update(self, row: Mapping[str, Any]) -> None:
        """A newer row of the same key (rotated, revoked): limits and state stay."""
        self.digest = bytes.fromhex(row["digest"])
        self.budget: float | None = row["budget_usd"]
        self.period: str = row["budget_period"] or "total"
        self.expires_at: float = row["expires_at"] or float("inf")
        self.revoked = row["revoked_at"] is not None
        self.db_spend: float = row["spend_usd"]
        self.db_period: float = row["period_start"]

    def spent(self) -> float:
        """This period's spend: the database's total plus what this replica has not written."""
        current = self.service.period_starts.get(self.period, 0.0)
        base = self.db_spend if self.db_period == current else 0.0
        return base + self.pending + self.flushing

    # -- the Meter protocol (keel.engine._auth) -----------------------------------------------

    def check(self) -> None:
        """Before a request: refuse it when the budget is spent. A stream already running
        when the budget runs out finishes (it is charged at its end)."""
        budget = self.budget
        if budget is not None and self.spent() >= budget:
            raise KeelError(
                429,
                budget_message(self.name, budget, self.period),
                type="insufficient_quota",
                code="insufficient_quota",
                headers={"x-should-retry": "false"},
            )

    def charge(self, call: Call) -> None:
        service = self.service
        rates = service.rates.get(call.model)
        if rates is None:
            return
        usage = spent_usage(call)
        if usage is None:
            return
        usd = cost(usage, rates)
        if usd:
            self.pending += usd
            service.dirty.add(self)


def spent_usage(call: Call) -> Mapping[str, Any] | None:
    """The tokens a request cost. A stream's from its transcript, summed over its attempts —
    also when the client left early (what was generated until then counts; with no usage
    report from the upstream the prompt is keel's own estimate)."""
    t = call.transcript
    if t is None:
        return call.usage
    if not t.prompt_tokens and not t.completion_tokens:
        return None  # nothing was generated (every attempt failed before its first token)
    usage: dict[str, Any] = {
        "prompt_tokens": t.prompt_tokens or call.tokens()[0],
        "completion_tokens": t.completion_tokens,
    }
    last = call.usage
    if last is not None and not t.continued and "prompt_tokens_details" in last:
        usage["prompt_tokens_details"] = last["prompt_tokens_details"]
    return usage


class KeyService:
    """The cache of virtual keys, token sessions and spend of one replica."""

    def __init__(self, config: GatewayConfig) -> None:
        assert config.database_url is not None
        self.config = config
        self.auth = config.auth
        self.store = KeyStore(config.database_url)
        self.by_digest: dict[bytes, VirtualKey] = {}  # the stored digest, as bytes
        self.by_id: dict[str, VirtualKey] = {}
        self.revoked_families: set[str] = set()
        self.tokens = TokenKeys(config.auth.jwt)
        # Verified access JWTs by their whole Authorization header: (exp, family, key).
        self.jwt_cache: dict[str, tuple[float, str, VirtualKey]] = {}
        self.rates = {
            name: Rates(
                g.price.input,
                g.price.output,
                g.price.cached_input if g.price.cached_input is not None else g.price.input,
            )
            for name, g in config.models.items()
            if g.price is not None
        }
        self.period_starts: dict[str, float] = {}
        self.dirty: set[VirtualKey] = set()
        self.seq = 0
        self.opened = False
        self.pepper = b""
        self._hasher = blake2b(digest_size=32)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._redis: Any = None
        self._sync_lock = asyncio.Lock()
        self._open_lock = asyncio.Lock()
        self._last_flush = 0.0
        self.by_name: dict[str, VirtualKey] = {}  # active keys (OIDC claims name them)
        self.oidc: Oidc | None = Oidc(config.auth.oidc) if config.auth.oidc else None
        self._tick_periods(time.time())

    # -- the hot path ----------------------------------------------------------------------------

    @property
    def has_keys(self) -> bool:
        return bool(self.by_id)

    def find(self, token: bytes, header: str) -> Principal | None:
        """The principal of a virtual key or an access JWT (``bearer(headers)``: bytes; its
        ``Authorization`` header, the JWT cache's key); None when the token is neither kind; a
        401 KeelError when it is one of them but not valid (now)."""
        if not self.by_id:
            return None  # no virtual keys (yet): nothing to find
        if token.startswith(_KEY_PREFIX):
            h = self._hasher.copy()  # the keyed state, set up once (half the hash's cost)
            h.update(token)
            vk = self.by_digest.get(h.digest())
            if vk is None or vk.revoked:
                raise _invalid()
            if vk.expires_at < _NEVER and vk.expires_at <= time.time():
                raise _invalid("This API key has expired.")
            return vk.principal
        if token.count(b".") == 2:
            return self._jwt(token, header)
        return None

    def cached(self, header: str, hit: tuple[float, str, VirtualKey]) -> Principal:
        """The principal of an access JWT verified before: ``hit`` is ``jwt_cache[header]``
        (``header``: the whole ``Authorization`` header it came in).

        The exact header is the cache's key, so any change to it is a miss and a full
        verification. What can change while it lives (its key revoked or expired, its
        session revoked) is checked on every use, against state the sync loop keeps current
        (within a second on every replica)."""
        exp, family, vk = hit
        now = time.time()
        if exp + self.auth.jwt.leeway <= now:
            self.jwt_cache.pop(header, None)
            raise _invalid("Invalid access token: token expired.")
        if vk.revoked:
            raise _invalid("Invalid access token: its key was revoked.")
        if family in self.revoked_families:
            raise _invalid("Invalid access token: the session was revoked.")
        if vk.expires_at <= now:
            raise _invalid("This API key has expired.")
        return vk.principal

    def _jwt(self, token: bytes, header: str) -> Principal:
        """A token not in the cache: verified in full (signature, algorithm, times, audience,
        issuer), then cached under its header with its expiry."""
        # Not UTF-8 (surrogates from the header): not a JWT, and it fails as one.
        text = token.decode("utf-8", "replace")
        try:
            vk, exp, family = self._verify(text, time.time())
        except InvalidToken as exc:
            raise _invalid(f"Invalid access token: {exc}.") from None
        if header[7:].encode("utf-8", "surrogatepass") != token:
            raise _invalid()  # not the header it came in: nothing to cache it under
        cache = self.jwt_cache
        if len(cache) >= _JWT_CACHE_MAX:
            cache.clear()  # never rebound: KeyChain holds it
        hit = cache[header] = (exp, family, vk)
        return self.cached(header, hit)

    def _verify(self, token: str, now: float) -> tuple[VirtualKey, float, str]:
        """A JWT of this gateway's, or of the OIDC provider's: the key it acts as."""
        oidc = self.oidc
        if oidc is not None:
            kid = None
            with contextlib.suppress(jwt.PyJWTError):
                kid = jwt.get_unverified_header(token).get("kid")
            if not self.tokens.has(kid, now):  # not one of ours: the provider's, or nobody's
                name, exp = oidc.verify(token, now)
                vk = self.by_name.get(name) or self.by_id.get(name)
                if vk is None or vk.revoked:
                    raise InvalidToken(f"no active key for its {oidc.cfg.claim[:40]!r} claim")
                return vk, exp, ""
        claims = self.tokens.verify(token, now)
        vk = self.by_id.get(claims.key_id)
        if vk is None:
            raise InvalidToken("unknown key")
        return vk, claims.exp, claims.family

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        with contextlib.suppress(Exception):
            await self._open()
        self._tasks.append(asyncio.create_task(self._loop(), name="keel-keys-sync"))
        if self.oidc is not None:
            await self.oidc.start()
        if self.config.redis_url:
            self._tasks.append(asyncio.create_task(self._subscribe(), name="keel-keys-redis"))

    async def _open(self, create: bool = False) -> bool:
        if self.opened:
            return True
        async with self._open_lock:  # the sync loop and an admin request may race here
            return self.opened or await self._open_once(create)

    async def _open_once(self, create: bool) -> bool:
        # SQLite: a file nobody has created yet is simply no keys (zero set-up); Postgres is
        # created on first connect.
        if not await self.store.open(create=create or self.store.db.kind != "sqlite"):
            return False
        self.pepper = self.store.pepper
        self._hasher = blake2b(key=self.pepper, digest_size=32)  # = keel.auth._terms.digest
        self.opened = True
        with contextlib.suppress(Exception):
            await self.store.db.listen(self._wake.set)
        await self.sync()
        return True

    async def close(self) -> None:
        if self.oidc is not None:
            await self.oidc.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self.opened:
            with contextlib.suppress(Exception):
                await self.flush()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
        await self.store.close()

    async def _loop(self) -> None:
        failing = False
        last_sync = time.monotonic()
        tick = min(self.auth.sync_interval, self.auth.spend_flush_interval)
        while True:
            woken = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), tick)
                woken = True
            self._wake.clear()
            try:
                if not self.opened and not await self._open():
                    continue
                if woken or time.monotonic() - last_sync >= self.auth.sync_interval:
                    last_sync = time.monotonic()
                    await self.sync()
                now = time.time()
                if now - self._last_flush >= self.auth.spend_flush_interval:
                    self._last_flush = now
                    await self.flush()
                    await self._read_spends()
                if failing:
                    log.warning("key database reachable again")
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:  # once per outage; the cache keeps serving meanwhile
                    log.error(
                        "key database unavailable (%s); serving from the cache", type(exc).__name__
                    )
                failing = True

    async def _subscribe(self) -> None:
        """Redis pub/sub: another process changed a key (replicas on SQLite files behind one
        Redis, or a faster path next to Postgres NOTIFY)."""
        import redis.asyncio as redis

        channel = f"{self.config.shared.prefix}:{_REDIS_CHANNEL}"
        while True:
            try:
                self._redis = redis.Redis.from_url(self.config.redis_url or "")
                pubsub = self._redis.pubsub()
                await pubsub.subscribe(channel)
                async for msg in pubsub.listen():
                    if msg.get("type") == "message":
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(self.config.shared.reconnect_interval)

    async def announce(self) -> None:
        """After a write: this replica's cache now, the others through Redis (Postgres NOTIFY
        was sent with the write)."""
        await self.sync()
        await publish(self.config)

    # -- what the loop does ------------------------------------------------------------------

    def _tick_periods(self, now: float) -> None:
        self.period_starts = {p: period_start(p, now) for p in ("day", "week", "month", "total")}

    async def sync(self) -> None:
        async with self._sync_lock:
            self._tick_periods(time.time())
            ch = await self.store.changes(self.seq)
            for row in ch.keys:
                vk = self.by_id.get(row["id"])
                if vk is None:
                    vk = self.by_id[row["id"]] = VirtualKey(self, row)
                else:
                    self.by_digest.pop(vk.digest, None)
                    vk.update(row)
                if not vk.revoked:
                    self.by_digest[vk.digest] = vk
                    self.by_name[vk.name] = vk
                elif self.by_name.get(vk.name) is vk:
                    del self.by_name[vk.name]
            self.revoked_families.update(ch.revoked_families)
            for r in ch.signing:
                self.tokens.add(r["kid"], r["private_pem"], r["created_at"])
            self.tokens.prune(time.time())
            self.seq = ch.seq

    async def flush(self) -> None:
        if not self.dirty:
            return
        batch = {}
        keys = list(self.dirty)
        self.dirty.clear()
        for vk in keys:
            vk.flushing += vk.pending
            vk.pending = 0.0
            batch[vk.id] = vk.flushing
        try:
            totals = await self.store.add_spend(batch, time.time())
        except BaseException:
            for vk in keys:  # written next time
                vk.pending += vk.flushing
                vk.flushing = 0.0
                self.dirty.add(vk)
            raise
        for vk in keys:
            vk.flushing = 0.0
            if vk.id in totals:
                vk.db_spend = totals[vk.id]
                vk.db_period = self.period_starts.get(vk.period, 0.0)

    async def _read_spends(self) -> None:
        for row in await self.store.spends():
            vk = self.by_id.get(row["id"])
            if vk is not None and not vk.flushing:
                vk.db_spend, vk.db_period = row["spend_usd"], row["period_start"]

    # -- token sessions ------------------------------------------------------------------------

    async def signing_ready(self) -> None:
        """A signing key exists (created on the first session, then every rotate_every)."""
        now = time.time()
        if self.tokens.needs_rotation(now):
            kid, pem = await asyncio.to_thread(generate_key)
            await self.store.add_signing_key(kid, pem)
            await self.announce()

    async def rotate_signing_key(self) -> str:
        kid, pem = await asyncio.to_thread(generate_key)
        await self.store.add_signing_key(kid, pem)
        await self.announce()
        return kid


async def publish(config: GatewayConfig) -> None:
    """Tell every replica listening on Redis that keys changed (best effort: the poll is the
    safety net)."""
    if not config.redis_url:
        return
    import redis.asyncio as redis

    r = redis.Redis.from_url(config.redis_url, socket_timeout=1, socket_connect_timeout=1)
    try:
        await r.publish(f"{config.shared.prefix}:{_REDIS_CHANNEL}", "changed")
    except Exception:
        log.warning("could not announce a key change on Redis; replicas see it on their next poll")
    finally:
        await r.aclose()


class KeyChain:
    """The authenticator of a gateway with virtual keys: the config's keys first, then virtual
    keys, then access JWTs. Open (any token is the anonymous principal) only while there is no
    key of any kind and no admin key: local use, as without virtual keys."""

    __slots__ = ("_admin", "_jwts", "_static", "anonymous", "keys")

    def __init__(self, static: StaticKeys, keys: KeyService, anonymous: Principal) -> None:
        self._static = None if static.open else static  # None: the config has no keys
        self.keys = keys
        self._jwts = keys.jwt_cache  # the dict itself: one lookup per request, no call
        self.anonymous = anonymous
        self._admin = keys.config.server.admin_key is not None

    @property
    def open(self) -> bool:
        return self._static is None and not self._admin and not self.keys.has_keys

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        header = headers.get("authorization")
        # An access JWT seen before first: it skips the parsing and copying of ~600 bytes
        # below (it was no static key then, and the config's keys do not change).
        if header is not None:
            hit = self._jwts.get(header)
            if hit is not None:
                return self.keys.cached(header, hit)
        token = bearer(headers)
        static = self._static
        if static is not None:
            p = static.find(token)
            if p is not None:
                return p
        p = self.keys.find(token, header or "")
        if p is not None:
            return p
        if self.open:
            return self.anonymous
        raise _invalid()
