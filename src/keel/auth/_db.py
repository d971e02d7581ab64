"""Two homes for the key database behind one small interface: SQLite (a file, the default:
zero set-up) and PostgreSQL (``database_url: postgresql://…``: replicas share keys and spend,
and hear of changes at once through LISTEN/NOTIFY).

Statements are written once, with ``$1``-style parameters (SQLite understands them as
``?1``). Nothing here runs on a request's path: the key cache is fed in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

CHANNEL = "keel_keys"  # NOTIFY channel: "something changed, poll now"
_PARAM = re.compile(r"\$(\d+)")
_ADVISORY_LOCK = 0x6B65656C  # "keel": serialises writes that bump the change sequence


class Conn(Protocol):
    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]: ...

    async def execute(self, sql: str, *args: Any) -> None: ...

    async def next_seq(self) -> int:
        """The next change number, in commit order (the pollers' cursor)."""
        ...


class Database(Protocol):
    kind: str

    async def open(self, create: bool) -> bool:
        """Connect (creating the schema when ``create``). False: not there yet (a SQLite
        file nobody has written)."""
        ...

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Conn]: ...

    async def listen(self, wake: Callable[[], None]) -> bool:
        """Call ``wake`` on every change notification; False when this kind has none."""
        ...

    async def notify(self, conn: Conn) -> None: ...

    async def close(self) -> None: ...


def database(url: str) -> Database:
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        return SqliteDatabase(sqlite_path(url))
    if scheme in ("postgresql", "postgres"):
        return PostgresDatabase(url)
    raise ValueError(f"database_url must be sqlite:///… or postgresql://…, not {scheme}://…")


def sqlite_path(url: str) -> Path:
    """As SQLAlchemy spells it: ``sqlite:///keys.db`` is relative, ``sqlite:////var/keys.db``
    absolute."""
    if not url.startswith("sqlite:///"):
        raise ValueError("a SQLite database_url looks like sqlite:///keys.db or sqlite:////abs")
    return Path(unquote(url[len("sqlite:///") :]))


def safe_url(url: str) -> str:
    """The URL without credentials, for messages."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        return url
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS keel_meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keel_keys (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, digest TEXT NOT NULL UNIQUE, models TEXT,
  rpm BIGINT, tpm BIGINT, max_concurrency BIGINT, budget_usd DOUBLE PRECISION,
  budget_period TEXT, expires_at DOUBLE PRECISION, created_at DOUBLE PRECISION NOT NULL,
  revoked_at DOUBLE PRECISION, spend_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
  period_start DOUBLE PRECISION NOT NULL DEFAULT 0, seq BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS keel_keys_seq ON keel_keys (seq);
CREATE TABLE IF NOT EXISTS keel_families (
  id TEXT PRIMARY KEY, key_id TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
  revoked_at DOUBLE PRECISION, seq BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS keel_families_seq ON keel_families (seq);
CREATE TABLE IF NOT EXISTS keel_refresh (
  digest TEXT PRIMARY KEY, family TEXT NOT NULL, key_id TEXT NOT NULL,
  created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
  used_at DOUBLE PRECISION);
CREATE TABLE IF NOT EXISTS keel_signing (
  kid TEXT PRIMARY KEY, private_pem TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
  seq BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS keel_codes (
  digest TEXT PRIMARY KEY, key_id TEXT NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
  used_at DOUBLE PRECISION);
"""


# -- SQLite ------------------------------------------------------------------------------------


class _SqliteConn:
    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return await self._db.run(sql, args)

    async def execute(self, sql: str, *args: Any) -> None:
        await self._db.run(sql, args)

    async def next_seq(self) -> int:
        rows = await self.fetch(
            "UPDATE keel_meta SET v = CAST(CAST(v AS INTEGER) + 1 AS TEXT) WHERE k = 'seq' "
            "RETURNING CAST(v AS INTEGER) AS seq"
        )
        return int(rows[0]["seq"])


class SqliteDatabase:
    """One connection, used from a worker thread (sqlite3 blocks); WAL so that several
    processes (replicas on one host, the CLI) can share the file."""

    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()  # one transaction at a time on the shared connection
        self._thread_lock = threading.Lock()

    async def open(self, create: bool) -> bool:
        if self._conn is not None:
            return True
        if not create and not self.path.exists():
            return False
        await asyncio.to_thread(self._open_sync)
        return True

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(_SCHEMA)
        conn.execute("INSERT OR IGNORE INTO keel_meta (k, v) VALUES ('seq', '0')")
        self._conn = conn

    async def run(self, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        conn = self._conn
        assert conn is not None
        sql = _PARAM.sub(r"?\1", sql)

        def work() -> list[dict[str, Any]]:
            with self._thread_lock:
                return [dict(r) for r in conn.execute(sql, args).fetchall()]

        return await asyncio.to_thread(work)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        async with self._lock:
            c = _SqliteConn(self)
            # IMMEDIATE: take the write lock up front, so a read-then-write (a refresh
            # token's rotation) cannot interleave with another process's.
            await self.run("BEGIN IMMEDIATE", ())
            try:
                yield c
            except BaseException:
                await self.run("ROLLBACK", ())
                raise
            await self.run("COMMIT", ())

    async def listen(self, wake: Callable[[], None]) -> bool:
        return False

    async def notify(self, conn: Conn) -> None:
        return None

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.to_thread(conn.close)


# -- PostgreSQL --------------------------------------------------------------------------------


class _PgConn:
    def __init__(self, conn: Any) -> None:
        self._c = conn

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in await self._c.fetch(sql, *args)]

    async def execute(self, sql: str, *args: Any) -> None:
        await self._c.execute(sql, *args)

    async def next_seq(self) -> int:
        # Writers that bump the sequence take one lock, so sequence numbers commit in
        # order and a poller's "seq > last" never skips a change committed late.
        await self._c.execute(f"SELECT pg_advisory_xact_lock({_ADVISORY_LOCK})")
        return int(await self._c.fetchval("SELECT nextval('keel_seq')"))


class PostgresDatabase:
    kind = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: Any = None
        self._listener: Any = None

    async def open(self, create: bool) -> bool:
        if self._pool is not None:
            return True
        import asyncpg  # type: ignore[import-untyped]

        self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=4, timeout=5)
        async with self._pool.acquire() as c, c.transaction():
            await c.execute(f"SELECT pg_advisory_xact_lock({_ADVISORY_LOCK})")
            await c.execute("CREATE SEQUENCE IF NOT EXISTS keel_seq")
            await c.execute(_SCHEMA)
        return True

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        async with self._pool.acquire() as c, c.transaction():
            yield _PgConn(c)

    async def listen(self, wake: Callable[[], None]) -> bool:
        import asyncpg

        self._listener = await asyncpg.connect(self.url, timeout=5)
        await self._listener.add_listener(CHANNEL, lambda *_: wake())
        return True

    async def notify(self, conn: Conn) -> None:
        await conn.execute(f"NOTIFY {CHANNEL}")  # delivered at commit

    async def close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
