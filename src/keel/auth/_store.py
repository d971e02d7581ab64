"""The key database's operations: virtual keys, refresh-token families, signing keys,
one-time codes, spend. Used by the admin API, the CLI and the cache's background sync —
never by a request on its way to a model.

Tokens are stored as keyed digests only (``keel.auth._terms.digest``); the pepper is a row of
``keel_meta`` created with the schema. Every change an authenticator must hear of (a key
created, revoked or rotated, a refresh family revoked, a signing key added) takes the next
number of one sequence, so a replica catches up with ``seq > last seen``.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from keel.auth._db import Conn, Database, database
from keel.auth._terms import (
    CODE_PREFIX,
    KEY_PREFIX,
    PERIODS,
    REFRESH_PREFIX,
    digest,
    new_id,
    new_secret,
    parse_duration,
    period_start,
)


class StoreError(Exception):
    """A request the store refuses: ``status`` and ``code`` for the admin API's answer."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


@dataclass(frozen=True, slots=True)
class KeySpec:
    """What ``keel keys create`` and ``POST /admin/keys`` take."""

    name: str
    models: tuple[str, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    budget_usd: float | None = None
    budget_period: str = "month"
    expires: float | None = None  # seconds from now

    @classmethod
    def from_json(cls, body: Any) -> KeySpec:
        """From the admin API's JSON body; StoreError 400 naming the field otherwise."""
        if not isinstance(body, dict):
            raise StoreError(400, "The body must be a JSON object.", "invalid_request")
        known = {
            "name",
            "models",
            "rpm",
            "tpm",
            "max_concurrency",
            "budget_usd",
            "budget_period",
            "expires",
        }
        for k in body:
            if k not in known:
                raise StoreError(400, f"Unknown field {k!r}.", "unknown_parameter", k)
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise StoreError(400, "'name' must be a non-empty string.", "invalid_value", "name")
        models = body.get("models")
        if isinstance(models, str):
            models = [m.strip() for m in models.split(",") if m.strip()]
        if models is not None and (
            not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)
        ):
            raise StoreError(
                400, "'models' must be a list of model names.", "invalid_value", "models"
            )
        ints: dict[str, int | None] = {}
        for k in ("rpm", "tpm", "max_concurrency"):
            v = body.get(k)
            if v is not None and (type(v) is not int or v <= 0):
                raise StoreError(400, f"'{k}' must be a positive integer.", "invalid_value", k)
            ints[k] = v
        budget = body.get("budget_usd")
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0
        ):
            raise StoreError(
                400, "'budget_usd' must be a positive number.", "invalid_value", "budget_usd"
            )
        period = body.get("budget_period", "month")
        if period not in PERIODS:
            raise StoreError(
                400,
                f"'budget_period' must be one of {', '.join(PERIODS)}.",
                "invalid_value",
                "budget_period",
            )
        expires = body.get("expires")
        seconds = None
        if expires is not None:
            try:
                seconds = parse_duration(expires)
            except ValueError as exc:
                raise StoreError(400, f"'expires': {exc}.", "invalid_value", "expires") from None
        return cls(
            name=name.strip(),
            models=tuple(models) if models is not None else None,
            rpm=ints["rpm"],
            tpm=ints["tpm"],
            max_concurrency=ints["max_concurrency"],
            budget_usd=float(budget) if budget is not None else None,
            budget_period=period,
            expires=seconds,
        )


def public(row: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """A key as the admin API and the CLI show it: everything but the key itself."""
    now = time.time() if now is None else now
    spend = row["spend_usd"]
    if row["budget_period"] and row["period_start"] != period_start(row["budget_period"], now):
        spend = 0.0  # a new period began; the next write resets the row
    status = "active"
    if row["revoked_at"] is not None:
        status = "revoked"
    elif row["expires_at"] is not None and row["expires_at"] <= now:
        status = "expired"
    return {
        "id": row["id"],
        "object": "keel.key",
        "name": row["name"],
        "status": status,
        "models": json.loads(row["models"]) if row["models"] is not None else None,
        "rpm": row["rpm"],
        "tpm": row["tpm"],
        "max_concurrency": row["max_concurrency"],
        "budget_usd": row["budget_usd"],
        "budget_period": row["budget_period"] if row["budget_usd"] is not None else None,
        "spend_usd": round(spend, 9),
        "created_at": int(row["created_at"]),
        "expires_at": int(row["expires_at"]) if row["expires_at"] is not None else None,
        "revoked_at": int(row["revoked_at"]) if row["revoked_at"] is not None else None,
    }


@dataclass(slots=True)
class Changes:
    seq: int
    keys: list[dict[str, Any]]
    revoked_families: list[str]
    signing: list[dict[str, Any]]


_KEY_COLUMNS = (
    "id, name, digest, models, rpm, tpm, max_concurrency, budget_usd, budget_period, "
    "expires_at, created_at, revoked_at, spend_usd, period_start, seq"
)


class KeyStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.db: Database = database(url)
        self.pepper = b""

    async def open(self, create: bool = True) -> bool:
        if not await self.db.open(create):
            return False
        async with self.db.transaction() as c:
            rows = await c.fetch("SELECT v FROM keel_meta WHERE k = 'pepper'")
            if not rows:
                await c.execute(
                    "INSERT INTO keel_meta (k, v) VALUES ('pepper', $1)", secrets.token_hex(32)
                )
                rows = await c.fetch("SELECT v FROM keel_meta WHERE k = 'pepper'")
        self.pepper = bytes.fromhex(rows[0]["v"])
        return True

    async def close(self) -> None:
        await self.db.close()

    def digest(self, token: str) -> str:
        return digest(self.pepper, token)

    # -- keys ----------------------------------------------------------------------------------

    async def create_key(
        self, spec: KeySpec, reserved: Sequence[str] = ()
    ) -> tuple[dict[str, Any], str]:
        """A new key: its row and the plaintext (shown once, never stored)."""
        if spec.name in reserved:
            raise StoreError(
                409, f"A client named {spec.name!r} is in the config already.", "name_taken", "name"
            )
        token = new_secret(KEY_PREFIX)
        now = time.time()
        async with self.db.transaction() as c:
            taken = await c.fetch(
                "SELECT id FROM keel_keys WHERE name = $1 AND revoked_at IS NULL", spec.name
            )
            if taken:
                raise StoreError(
                    409, f"An active key named {spec.name!r} exists already.", "name_taken", "name"
                )
            seq = await c.next_seq()
            kid = new_id("key")
            await c.execute(
                f"INSERT INTO keel_keys ({_KEY_COLUMNS}) VALUES "
                "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, NULL, 0, $12, $13)",
                kid,
                spec.name,
                self.digest(token),
                json.dumps(list(spec.models)) if spec.models is not None else None,
                spec.rpm,
                spec.tpm,
                spec.max_concurrency,
                spec.budget_usd,
                spec.budget_period,
                now + spec.expires if spec.expires else None,
                now,
                period_start(spec.budget_period, now),
                seq,
            )
            await self.db.notify(c)
            rows = await c.fetch(f"SELECT {_KEY_COLUMNS} FROM keel_keys WHERE id = $1", kid)
        return rows[0], token

    async def list_keys(self) -> list[dict[str, Any]]:
        async with self.db.transaction() as c:
            return await c.fetch(f"SELECT {_KEY_COLUMNS} FROM keel_keys ORDER BY created_at, id")

    async def get_key(self, key_id: str) -> dict[str, Any]:
        async with self.db.transaction() as c:
            return await self._get(c, key_id)

    async def _get(self, c: Conn, key_id: str) -> dict[str, Any]:
        rows = await c.fetch(f"SELECT {_KEY_COLUMNS} FROM keel_keys WHERE id = $1", key_id)
        if not rows:
            raise StoreError(404, f"No key with id {key_id!r}.", "key_not_found")
        return rows[0]

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        async with self.db.transaction() as c:
            row = await self._get(c, key_id)
            if row["revoked_at"] is None:
                seq = await c.next_seq()
                await c.execute(
                    "UPDATE keel_keys SET revoked_at = $1, seq = $2 WHERE id = $3",
                    time.time(),
                    seq,
                    key_id,
                )
                await self.db.notify(c)
                row = await self._get(c, key_id)
        return row

    async def rotate_key(self, key_id: str) -> tuple[dict[str, Any], str]:
        """A new secret for the same key (limits, spend, id kept); the old one stops working
        on every replica as a revocation does."""
        token = new_secret(KEY_PREFIX)
        async with self.db.transaction() as c:
            row = await self._get(c, key_id)
            if row["revoked_at"] is not None:
                raise StoreError(409, f"Key {key_id!r} is revoked.", "key_revoked")
            seq = await c.next_seq()
            await c.execute(
                "UPDATE keel_keys SET digest = $1, seq = $2 WHERE id = $3",
                self.digest(token),
                seq,
                key_id,
            )
            await self.db.notify(c)
            row = await self._get(c, key_id)
        return row, token

    async def find_key(self, token: str) -> dict[str, Any] | None:
        """The row of a key by its plaintext (the token endpoint; not the hot path)."""
        async with self.db.transaction() as c:
            rows = await c.fetch(
                f"SELECT {_KEY_COLUMNS} FROM keel_keys WHERE digest = $1", self.digest(token)
            )
        return rows[0] if rows else None

    # -- what replicas follow ----------------------------------------------------------------

    async def changes(self, since: int) -> Changes:
        async with self.db.transaction() as c:
            keys = await c.fetch(
                f"SELECT {_KEY_COLUMNS} FROM keel_keys WHERE seq > $1 ORDER BY seq", since
            )
            fams = await c.fetch(
                "SELECT id, seq FROM keel_families WHERE seq > $1 AND revoked_at IS NOT NULL",
                since,
            )
            signing = await c.fetch(
                "SELECT kid, private_pem, created_at, seq FROM keel_signing WHERE seq > $1",
                since,
            )
        seq = max(
            [
                since,
                *(r["seq"] for r in keys),
                *(r["seq"] for r in fams),
                *(r["seq"] for r in signing),
            ]
        )
        return Changes(seq, keys, [r["id"] for r in fams], signing)

    async def spends(self) -> list[dict[str, Any]]:
        async with self.db.transaction() as c:
            return await c.fetch(
                "SELECT id, spend_usd, period_start FROM keel_keys "
                "WHERE budget_usd IS NOT NULL AND revoked_at IS NULL"
            )

    async def add_spend(self, batch: dict[str, float], now: float) -> dict[str, float]:
        """Add each key's spend in one transaction (a new period starts from zero); returns the
        keys' totals after it."""
        totals: dict[str, float] = {}
        async with self.db.transaction() as c:
            for key_id, usd in batch.items():
                rows = await c.fetch(
                    "SELECT budget_period, period_start FROM keel_keys WHERE id = $1", key_id
                )
                if not rows:
                    continue
                start = period_start(rows[0]["budget_period"] or "total", now)
                out = await c.fetch(
                    "UPDATE keel_keys SET spend_usd = CASE WHEN period_start = $1 "
                    "THEN spend_usd + $2 ELSE $2 END, period_start = $1 WHERE id = $3 "
                    "RETURNING spend_usd",
                    start,
                    usd,
                    key_id,
                )
                totals[key_id] = float(out[0]["spend_usd"])
        return totals

    # -- sessions: refresh tokens, one-time codes, signing keys --------------------------------

    async def issue_refresh(self, key_id: str, family: str | None, ttl: float) -> tuple[str, str]:
        """A refresh token (and its family: a new one for a new session)."""
        token = new_secret(REFRESH_PREFIX)
        now = time.time()
        async with self.db.transaction() as c:
            if family is None:
                family = new_id("fam")
                await c.execute(
                    "INSERT INTO keel_families (id, key_id, created_at, seq) "
                    "VALUES ($1, $2, $3, 0)",
                    family,
                    key_id,
                    now,
                )
            await c.execute(
                "INSERT INTO keel_refresh (digest, family, key_id, created_at, expires_at) "
                "VALUES ($1, $2, $3, $4, $5)",
                self.digest(token),
                family,
                key_id,
                now,
                now + ttl,
            )
        return token, family

    async def use_refresh(self, token: str, ttl: float) -> tuple[str, str, str]:
        """Spend a refresh token once: (key id, family, the next refresh token). Reuse of a
        spent one revokes its family (StoreError "refresh_token_reused")."""
        now = time.time()
        async with self.db.transaction() as c:
            rows = await c.fetch(
                "SELECT r.family, r.key_id, r.expires_at, r.used_at, f.revoked_at "
                "FROM keel_refresh r JOIN keel_families f ON f.id = r.family "
                "WHERE r.digest = $1",
                self.digest(token),
            )
            if not rows:
                raise StoreError(401, "Invalid refresh token.", "invalid_refresh_token")
            r = rows[0]
            if r["revoked_at"] is not None:
                raise StoreError(401, "This session was revoked.", "session_revoked")
            if r["used_at"] is not None:
                seq = await c.next_seq()
                await c.execute(
                    "UPDATE keel_families SET revoked_at = $1, seq = $2 WHERE id = $3",
                    now,
                    seq,
                    r["family"],
                )
                await self.db.notify(c)
                # Committed below: the reuse is answered after the family is gone.
                reused = StoreError(
                    401,
                    "This refresh token was used before; the session is revoked.",
                    "refresh_token_reused",
                )
                reused.family = r["family"]  # type: ignore[attr-defined]
                reused.key_id = r["key_id"]  # type: ignore[attr-defined]
            elif r["expires_at"] <= now:
                raise StoreError(401, "The refresh token has expired.", "refresh_token_expired")
            else:
                reused = None
                await c.execute(
                    "UPDATE keel_refresh SET used_at = $1 WHERE digest = $2",
                    now,
                    self.digest(token),
                )
                nxt = new_secret(REFRESH_PREFIX)
                await c.execute(
                    "INSERT INTO keel_refresh (digest, family, key_id, created_at, expires_at) "
                    "VALUES ($1, $2, $3, $4, $5)",
                    self.digest(nxt),
                    r["family"],
                    r["key_id"],
                    now,
                    now + ttl,
                )
        if reused is not None:
            raise reused
        return r["key_id"], r["family"], nxt

    async def family_size(self, family: str) -> int:
        async with self.db.transaction() as c:
            rows = await c.fetch("SELECT COUNT(*) AS n FROM keel_refresh WHERE family = $1", family)
        return int(rows[0]["n"])

    async def create_code(self, key_id: str, ttl: float) -> str:
        code = new_secret(CODE_PREFIX)
        async with self.db.transaction() as c:
            row = await self._get(c, key_id)
            if row["revoked_at"] is not None:
                raise StoreError(409, f"Key {key_id!r} is revoked.", "key_revoked")
            await c.execute(
                "INSERT INTO keel_codes (digest, key_id, expires_at) VALUES ($1, $2, $3)",
                self.digest(code),
                key_id,
                time.time() + ttl,
            )
        return code

    async def use_code(self, code: str) -> str | None:
        """The key a one-time code was issued for, once; None when unknown, used or old."""
        now = time.time()
        async with self.db.transaction() as c:
            rows = await c.fetch(
                "UPDATE keel_codes SET used_at = $1 WHERE digest = $2 AND used_at IS NULL "
                "AND expires_at > $1 RETURNING key_id",
                now,
                self.digest(code),
            )
        return rows[0]["key_id"] if rows else None

    async def add_signing_key(self, kid: str, private_pem: str) -> None:
        async with self.db.transaction() as c:
            seq = await c.next_seq()
            await c.execute(
                "INSERT INTO keel_signing (kid, private_pem, created_at, seq) "
                "VALUES ($1, $2, $3, $4)",
                kid,
                private_pem,
                time.time(),
                seq,
            )
            await self.db.notify(c)
