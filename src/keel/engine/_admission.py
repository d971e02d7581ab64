"""Admission: who is asking (the principal), may they ask now, and how urgent it is.

Client keys come from ``server.api_keys`` (no limits) and ``clients`` (named principals with
``rpm``/``tpm``/``max_concurrency``). Over a limit the request is refused at once with 429, a
``retry-after`` and OpenAI-style ``x-ratelimit-*`` headers, so the client's SDK backs off the
way it does for OpenAI itself. Client limits are GCRA buckets with a minute's burst by default
(clients expect "60 per minute" to allow 60 at once), local or shared through Redis like the
deployments'.

Priority (``x-keel-priority: interactive | batch``, default the client's, else interactive)
orders the deployment wait queues, and picks how long a request may wait there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from keel._ratelimit import Gcra, go_duration, per_minute
from keel.config import GatewayConfig
from keel.engine._auth import Principal, StaticKeys
from keel.engine._errors import KeelError
from keel.engine._limits import PRIORITIES, Costed
from keel.engine._shared import SharedDown, SharedState

# What ``admit`` booked, to give back in ``done``: (tokens booked against the client's TPM,
# its shared concurrency lease or None). A tuple, not an object: it is made per request, and
# a Python object costs ~2k instructions to make where a tuple costs a few hundred.
Ticket = tuple[int, str | None]


class Admission:
    def __init__(self, config: GatewayConfig, shared: SharedState | None) -> None:
        self.shared = shared
        self.by_key: dict[str, Principal] = {}
        for i, k in enumerate(config.server.api_keys):
            self.by_key[k.get_secret_value()] = Principal(f"key-{i}")
        for name, c in config.clients.items():
            p = Principal(name, c)
            if c.rpm:
                p.req = per_minute(c.rpm, c.burst)
            if c.tpm:
                p.tok = per_minute(c.tpm, c.burst)
            self.by_key[c.key.get_secret_value()] = p
        self.anonymous = Principal("anonymous")
        self.authenticator = StaticKeys(self.by_key, self.anonymous)
        self._seq = 0

    def principals(self) -> list[Principal]:
        return list(self.by_key.values())

    @staticmethod
    def priority(headers: Mapping[str, str], principal: Principal) -> str:
        value = headers.get("x-keel-priority")
        if value is None:
            return principal.priority
        value = value.strip().lower()
        if value not in PRIORITIES:
            raise KeelError(
                400,
                f"x-keel-priority must be one of {', '.join(PRIORITIES)}, not {value!r}.",
                param="x-keel-priority",
                code="invalid_priority",
            )
        return value

    # -- limits --------------------------------------------------------------------------------

    async def admit(self, p: Principal, req: Costed) -> Ticket | None:
        """Book the client's limits or raise a 429 KeelError. None: nothing to give back."""
        shared = self.shared
        if shared is None or not p.limited:
            return self.admit_local(p, req)
        cost = self._cost_within_concurrency(p, req)
        lease = None
        if shared.up:
            try:
                lease = await self._book_shared(shared, p, cost)
            except SharedDown:
                self._book_local(p, cost, shared.peers)
        else:
            self._book_local(p, cost, shared.peers)
        p.in_flight += 1
        return cost, lease

    def admit_local(self, p: Principal, req: Costed) -> Ticket | None:
        """``admit`` when no Redis is configured: nothing to await (the handler calls this
        directly; a coroutine per request costs more than the booking itself)."""
        if not p.limited:
            return None
        cost = self._cost_within_concurrency(p, req)
        self._book_local(p, cost, 1)
        p.in_flight += 1
        return cost, None

    def _cost_within_concurrency(self, p: Principal, req: Costed) -> int:
        """Tokens to book against the client's TPM; a 429 when it is at its concurrency cap."""
        most = p.max_concurrency
        if most and p.in_flight >= most:
            raise self._refuse(p, "concurrency", 1.0)
        if p.tok is None:
            return 0
        prompt, most = req.tokens()
        return prompt + (most or 0)

    def _book_local(self, p: Principal, cost: int, share: int) -> None:
        now = time.monotonic()
        rq, tok = p.req, p.tok
        if (rq is None or rq.tat <= now) and (tok is None or tok.tat <= now):
            # The common case: every bucket rested, so any request conforms; just book it.
            if rq is not None:
                rq.book(now, share)
            if tok is not None and cost:
                tok.book(now, cost * share)
            return
        checks = [("requests", p.req, 1.0), ("tokens", p.tok, float(cost))]
        waits = []
        for what, g, c in checks:
            if g is None or not c:
                continue
            scaled = g if share == 1 else Gcra(g.interval * share, g.tolerance, g.tat)
            waits.append((scaled.wait(now, c), what))
        if waits and (worst := max(waits))[0] > 0:
            raise self._refuse(p, worst[1], worst[0])
        for _, g, c in checks:
            if g is not None and c:
                g.book(now, c * share)

    async def _book_shared(self, shared: SharedState, p: Principal, cost: int) -> str | None:
        keys: list[str] = []
        args: list[float | str] = []
        what = []
        scale = shared.scale  # > 1 while some replicas are on their local fallback
        for name, g, c in (("rpm", p.req, 1.0), ("tpm", p.tok if cost else None, float(cost))):
            if g is not None:
                keys.append(shared.key("client", p.name, name))
                args += [g.interval * scale * 1000.0, g.tolerance * 1000.0, c]
                what.append("requests" if name == "rpm" else "tokens")
        n = len(keys)
        lease = None
        cfg = p.cfg
        assert cfg is not None
        if cfg.max_concurrency:
            self._seq += 1
            keys.append(shared.key("client-leases", p.name))
            most = max(1, int(cfg.max_concurrency / scale))
            lease = (most, f"{shared.replica_id}:{self._seq}")
        if not keys:
            return None
        r = await shared.reserve(keys, args, n, 0.0, lease)
        if r.status == 2:
            raise self._refuse(p, "concurrency", 1.0)
        if r.status == 0:
            # Which limit: the shared script reports the wait only; name the tighter one.
            raise self._refuse(p, what[0] if len(what) == 1 else "requests", r.wait)
        return lease[1] if lease else None

    def done(self, p: Principal, ticket: Ticket | None, usage: Mapping[str, Any] | None) -> None:
        """``p``'s request is over: free its concurrency, reconcile its tokens."""
        if ticket is None:
            return
        cost, lease = ticket
        p.in_flight -= 1
        shared = self.shared
        if lease is not None and shared is not None:
            shared.release(shared.key("client-leases", p.name), lease)
        if p.tok is None or usage is None:
            return
        total = usage.get("total_tokens")
        if not isinstance(total, int) or not cost:
            return
        delta = total - cost
        if shared is not None and shared.up:
            shared.adjust(shared.key("client", p.name, "tpm"), delta * p.tok.interval * 1000.0)
        else:
            p.tok.adjust(delta)

    # -- the refusal -----------------------------------------------------------------------------

    def _refuse(self, p: Principal, what: str, wait: float) -> KeelError:
        p.refused[what] += 1
        cfg = p.cfg
        assert cfg is not None
        wait = max(wait, 0.001)
        headers = {
            "retry-after": str(max(1, math.ceil(wait))),
            "retry-after-ms": str(math.ceil(wait * 1000)),
            "x-should-retry": "true",
        }
        now = time.monotonic()
        for dim, limit, g in (("requests", cfg.rpm, p.req), ("tokens", cfg.tpm, p.tok)):
            if not limit or g is None:
                continue
            headers[f"x-ratelimit-limit-{dim}"] = str(limit)
            exhausted = dim == what
            remaining = 0 if exhausted else g.remaining(now) if g.interval else limit
            reset = wait if exhausted else g.reset(now)
            headers[f"x-ratelimit-remaining-{dim}"] = str(min(limit, remaining))
            headers[f"x-ratelimit-reset-{dim}"] = go_duration(reset)
        if what == "concurrency":
            message = (
                f"Too many concurrent requests for client '{p.name}': limit "
                f"{cfg.max_concurrency}. Please try again when one of them has finished."
            )
            kind = "requests"
        else:
            unit = "requests per min (RPM)" if what == "requests" else "tokens per min (TPM)"
            limit = cfg.rpm if what == "requests" else cfg.tpm
            message = (
                f"Rate limit reached for client '{p.name}' on {unit}: Limit {limit}. "
                f"Please try again in {go_duration(wait)}."
            )
            kind = what
        return KeelError(429, message, type=kind, code="rate_limit_exceeded", headers=headers)
