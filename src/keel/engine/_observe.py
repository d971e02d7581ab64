"""What a request did, for those who watch: the access log and OpenTelemetry.

The engine knows nothing of either. When one or more observers are installed
(``Keel.observers``), every ``Call`` carries a ``Record``: the driver writes plain facts into
it as they happen — an attempt starts, settles, the first token arrives — and ``Keel.done``
hands the finished record to each observer, which turns it into a log line or spans with the
record's own timestamps. With no observer installed ``Call.record`` is None and the driver's
hooks are one ``is not None`` test each: nothing is imported, allocated or timed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from keel._classify import UpstreamError
    from keel.engine._deployment import Deployment
    from keel.engine._errors import KeelError
    from keel.engine._keel import Call
    from keel.engine._limits import Permit

_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]*)"')
_FINISH = re.compile(rb'"finish_reason"\s*:\s*"([^"\\]*)"')
# gen_ai.operation.name of keel's operations (``keel.engine._operation``), by endpoint.
GENAI_OPERATION = {
    "chat.completions": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
}
# Attempt kinds, as spans and logs name them.
FIRST, RETRY, FAILOVER, CONTINUATION, HEDGE = "first", "retry", "failover", "continuation", "hedge"


class Observer(Protocol):
    def finished(self, record: Record) -> None:
        """The request is over: ``record`` is complete (called once, from ``Keel.done``)."""

    async def close(self) -> None:
        """The engine stops: flush what is buffered."""


@dataclass(slots=True, eq=False)
class Attempt:
    """One upstream attempt. Times are wall-clock nanoseconds (what spans carry)."""

    deployment: Deployment
    n: int  # 1-based, across the request
    kind: str
    start_ns: int
    permit: Permit
    continuation: str | None = None  # the mode, when it continues the committed answer
    end_ns: int = 0
    ok: bool = False
    error: UpstreamError | None = None
    usage: Mapping[str, Any] | None = None
    first_token_ns: int = 0

    @property
    def outcome(self) -> str:
        if self.ok:
            return "ok"
        if self.error is not None:
            return "failed"
        return "cancelled"  # the client left, or a hedge lost its race


@dataclass(slots=True, eq=False)
class Record:
    """One request, as its observers see it."""

    rid: str
    model: str  # the model group the client asked for
    principal: str
    stream: bool
    start_ns: int
    operation: str = "chat"  # gen_ai.operation.name
    traceparent: str | None = None
    tracestate: str | None = None
    body: Mapping[str, Any] | None = None  # kept only when bodies are logged
    attempts: list[Attempt] = field(default_factory=list)
    first_token_ns: int = 0
    end_ns: int = 0
    completed: bool = False  # the client got a complete answer
    gone: bool = False  # the client went away
    error: KeelError | None = None
    finish_reasons: list[str] = field(default_factory=list)
    response_model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None

    # -- written by the driver --------------------------------------------------------------

    def attempt(
        self, dep: Deployment, permit: Permit, n: int, continuation: bool = False,
        hedge: bool = False,
    ) -> None:  # fmt: skip
        """An attempt was let through (``permit``)."""
        if hedge:
            kind = HEDGE
        elif continuation:
            kind = CONTINUATION
        elif not self.attempts:
            kind = FIRST
        else:
            kind = RETRY if self.attempts[-1].deployment is dep else FAILOVER
        mode = dep.continuation if continuation else None
        self.attempts.append(Attempt(dep, n, kind, time.time_ns(), permit, mode))

    def settled(
        self,
        permit: Permit,
        error: UpstreamError | None,
        ok: bool,
        usage: Mapping[str, Any] | None,
    ) -> None:
        for a in reversed(self.attempts):
            if a.permit is permit:
                a.end_ns = time.time_ns()
                a.ok, a.error, a.usage = ok, error, usage
                if ok:
                    self.completed = True
                return

    def first_token(self, dep: Deployment) -> None:
        """The stream committed: its first token goes to the client now."""
        now = time.time_ns()
        self.first_token_ns = now
        for a in reversed(self.attempts):
            if a.deployment is dep and not a.end_ns:
                a.first_token_ns = now
                return

    def answered(self, raw: bytes) -> None:
        """A non-stream answer: its model and finish reasons, found in its bytes (the
        operation validated them and keeps nothing; a second parse would cost more than
        everything else recorded about the request). Strings inside the answer cannot hold
        an unescaped quote, so these patterns see only the answer's own keys."""
        m = _MODEL.search(raw)
        self.response_model = m.group(1).decode() if m is not None else None
        self.finish_reasons = [r.decode() for r in _FINISH.findall(raw)]

    def finished_with(self, reason: str) -> None:
        """keel ended the answer itself (``content_filter``, ``length``)."""
        self.completed = True
        self.finish_reasons = [reason]

    def failed(self, err: KeelError) -> None:
        self.error = err

    # -- read by observers ------------------------------------------------------------------

    def close(self, call: Call) -> None:
        """Called by ``Keel.done``: what is known only at the end."""
        self.end_ns = time.time_ns()
        t = call.transcript
        if t is not None:  # a stream: the transcript has what the client saw
            if t.meta[2] is not None:
                self.response_model = t.meta[2]
            if not self.finish_reasons and t.owner is not None:
                reasons = t.owner.finish_reasons
                self.finish_reasons = [reasons[i] for i in sorted(reasons)]
            if t.usage_payload is not None:  # the upstream reported usage
                self.input_tokens = t.prompt_tokens
            if t.usage_payload is not None or t.completion_tokens:
                self.output_tokens = t.completion_tokens
        usage = call.usage
        if self.output_tokens is None and usage is not None:
            p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
            self.input_tokens = p if type(p) is int else None
            self.output_tokens = c if type(c) is int else None

    @property
    def status(self) -> int:
        """The HTTP status the client got (499: it left before the answer was complete)."""
        if self.error is not None:
            return self.error.status
        if self.completed:
            return 200
        return 499

    @property
    def error_type(self) -> str | None:
        """``error.type`` of the OpenTelemetry conventions: the error code, else the kind of
        the last attempt's failure, else the status."""
        err = self.error
        if err is not None:
            if err.code:
                return err.code
            last = next((a.error for a in reversed(self.attempts) if a.error), None)
            return last.kind.value if last is not None else str(err.status)
        if not self.completed:
            return "cancelled"
        return None


def new_record(call: Call, headers: Mapping[str, str], keep_body: bool) -> Record:
    return Record(
        rid=call.rid,
        model=call.model,
        principal=call.principal.name,
        stream=call.stream,
        start_ns=time.time_ns(),
        operation=GENAI_OPERATION.get(call.op.name, call.op.name),
        traceparent=(tp := headers.get("traceparent")),
        tracestate=headers.get("tracestate") if tp is not None else None,
        body=call.body if keep_body else None,
    )


def refused_record(rid: str, err: KeelError, headers: Mapping[str, str]) -> Record:
    """A request refused before the engine took it (no key, a bad body, over its limits)."""
    now = time.time_ns()
    return Record(
        rid=rid,
        model="",
        principal="",
        stream=False,
        start_ns=now,
        traceparent=headers.get("traceparent"),
        tracestate=headers.get("tracestate"),
        end_ns=now,
        error=err,
    )
