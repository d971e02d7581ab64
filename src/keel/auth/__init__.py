"""Who may use keel, and how much: virtual keys, budgets, JWT sessions (see README, "Keys,
budgets and sessions"). ``TokenSession`` is the client side of a session."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keel.auth._session import TokenSession

__all__ = ["TokenSession"]


def __getattr__(name: str) -> Any:
    # Lazy: the gateway imports keel.auth for its routes; the client helper needs httpx.
    if name == "TokenSession":
        from keel.auth._session import TokenSession

        return TokenSession
    raise AttributeError(name)
