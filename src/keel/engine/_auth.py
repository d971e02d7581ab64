"""Who is asking: an authenticator turns a request's headers into a *principal*.

Every door (HTTP, the in-process transport, later WebSocket and the bus) authenticates the
same way, so a new kind of key (virtual keys, JWT) plugs in as another ``Authenticator``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from hmac import compare_digest
from typing import TYPE_CHECKING, Protocol

from keel._ratelimit import Gcra
from keel.config._limits import ClientConfig
from keel.engine._errors import KeelError

if TYPE_CHECKING:
    from keel.engine._keel import Call


class Meter(Protocol):
    """A principal's spend and budget (virtual keys, ``keel.auth``)."""

    def check(self) -> None:
        """Before a request: a 429 ``KeelError`` when the budget is spent."""
        ...

    def charge(self, call: Call) -> None:
        """After a request (streams too, also when the client left): count what it cost."""
        ...


@dataclass(slots=True, eq=False)
class Principal:
    """A client of keel: its name (for logs and metrics, never its key) and its limits."""

    name: str
    cfg: ClientConfig | None = None
    req: Gcra | None = None
    tok: Gcra | None = None
    in_flight: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    limited: bool = False  # any of rpm/tpm/max_concurrency (a field: read per request)
    models: frozenset[str] | None = None  # the model groups it may ask for (None: all)
    meter: Meter | None = None  # spend and budget (virtual keys)
    # What every request of it reads of ``cfg``, as fields: an attribute of a pydantic model
    # costs ~0.3k instructions more than a slot's.
    priority: str = "interactive"  # its default (``x-keel-priority`` overrides it)
    max_concurrency: int | None = None

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.limited = cfg is not None and bool(cfg.rpm or cfg.tpm or cfg.max_concurrency)
        if cfg is not None:
            self.priority, self.max_concurrency = cfg.priority, cfg.max_concurrency


class Authenticator(Protocol):
    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """The principal behind these request headers, or a 401 ``KeelError``."""
        ...


def bearer(headers: Mapping[str, str]) -> bytes:
    """The token of an ``Authorization: Bearer …`` header (b"" when there is none), as bytes
    for a constant-time comparison. Any byte sequence is a (wrong) token, never an error: a
    header that is not UTF-8 reaches us with surrogates in it."""
    header = headers.get("authorization")
    if header is None:
        return b""
    # The usual spelling first: a prefix test is cheaper than slicing and lowering.
    if header.startswith("Bearer ") or header[:7].lower() == "bearer ":
        return header[7:].encode("utf-8", "surrogatepass")
    return b""


def presents(headers: Mapping[str, str], key: str) -> bool:
    """The request carries ``key`` as its bearer token (constant time)."""
    return compare_digest(bearer(headers), key.encode())


class StaticKeys:
    """The keys of the config (``server.api_keys``, ``clients.*.key``). None configured: every
    request is the anonymous principal (local use).

    A token is compared with every key in constant time (``hmac.compare_digest``), and the
    loop does not stop at a match: how long the check takes says nothing about how much of a
    key a guess got right, nor which key matched. The config holds a handful of keys, so this
    costs less than hashing the token would (many keys are virtual keys' business: stored
    hashed, looked up by digest)."""

    __slots__ = ("_anonymous", "_keys")

    def __init__(self, by_key: Mapping[str, Principal], anonymous: Principal) -> None:
        self._keys = [(k.encode(), p) for k, p in by_key.items()]
        self._anonymous = anonymous

    @property
    def open(self) -> bool:
        return not self._keys

    def find(self, token: bytes) -> Principal | None:
        """The principal of one of the config's keys (``bearer(headers)``), or None."""
        found = None
        for key, p in self._keys:
            if compare_digest(key, token):
                found = p
        return found

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        if not self._keys:
            return self._anonymous
        found = self.find(bearer(headers))
        if found is None:
            raise KeelError(
                401, "Invalid or missing API key for this gateway.", code="invalid_api_key"
            )
        return found
