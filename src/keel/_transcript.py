"""The transcript of a stream: what its client has been shown, across attempts. Sans-IO.

Frames of each attempt come in (``Take.chunk``, one validated ``Frame`` at a time); out come
the chunk payloads to send (the JSON of each ``chat.completion.chunk``, framed by the sink), the
moment of the *commit*, and the ending. The rules it keeps:

* **commit** — nothing reaches the client before the first content token (or the group's
  commit buffer): until then a failed attempt is retried invisibly. Exactly one attempt
  commits; a hedged rival that gets there second has lost (``Lost``).
* **splice** — after the commit a failed attempt is followed by one that *continues* the
  answer; its chunks are rewritten with the committed stream's id/created/model, without a
  second role chunk, with any overlap it repeats trimmed (``instruct`` continuations).
* **one ending** — the terminal chunk is held until the attempt proves complete, so that a
  failure after it is continued and the client still sees exactly one; usage chunks are held
  and summed, and the client gets one, after the terminal chunk, when it asked for usage.
* **say how it was repaired** — the terminal chunk of a continued stream carries
  ``"keel": {"attempts": N, "continued": [{"at_char", "deployment", "mode"}]}`` (SDKs ignore
  unknown fields), so a best-effort ``instruct`` continuation is never passed off as exact.

The first attempt's chunks go out as the upstream's own bytes: no re-serialisation on the
happy path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from keel._assembly import Frame, StreamAssembler
from keel._splice import Mode, OverlapTrimmer

Meta = tuple[str | None, int | None, str | None]  # id, created, model of the client's stream


class Lost(Exception):
    """A hedged attempt reached the commit after its rival: it must stop."""


class Transcript:
    """One stream's client-facing state. ``commit_tokens``/``commit_ms``: the group's commit
    buffer (0/0: commit at the first content token)."""

    __slots__ = (
        "attempts", "chunk_object", "clock", "commit_ms", "commit_tokens", "committed",
        "completion_tokens", "continued", "current", "finish_choice", "meta", "owner",
        "prompt_tokens", "sent", "tool_calls", "usage_payload", "wants_usage",
    )  # fmt: skip

    def __init__(
        self,
        wants_usage: bool = False,
        commit_tokens: int = 0,
        commit_ms: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        chunk_object: str = "chat.completion.chunk",
        finish_choice: Callable[[str], dict[str, Any] | None] | None = None,
    ) -> None:
        self.wants_usage = wants_usage
        # The chunks keel writes itself, shaped like the endpoint's own (a legacy completion's
        # choices carry "text", a chat completion's a "delta").
        self.chunk_object = chunk_object
        self.finish_choice = finish_choice
        self.commit_tokens = commit_tokens
        self.commit_ms = commit_ms
        self.clock = clock
        self.committed = False
        self.owner: Take | None = None  # the attempt that committed the stream
        self.current: Take | None = None  # the latest attempt
        self.sent: list[str] = []  # content deltas the client has (or will have) seen
        self.tool_calls = False  # the client has seen (part of) a tool call
        self.meta: Meta = (None, None, None)
        self.continued: list[dict[str, Any]] = []  # the repairs, for the terminal chunk
        self.attempts = 0  # upstream attempts so far (the driver keeps it current)
        # usage across attempts
        self.usage_payload: bytes | None = None  # the last upstream usage chunk
        self.prompt_tokens = 0
        self.completion_tokens = 0

    @property
    def text(self) -> str:
        return "".join(self.sent)

    @property
    def tokens(self) -> int:
        """Content chunks the client has (or will have) seen."""
        return len(self.sent)

    def take(self, asm: StreamAssembler, deployment: str, mode: Mode | None = None) -> Take:
        """A new attempt's part. ``mode``: it continues the committed answer that way."""
        take = self.current = Take(self, asm, mode)
        if self.committed:  # one attempt at a time after the commit: it owns the stream now
            self.owner = take
        if mode is not None:
            self.continued.append(
                {"at_char": len(self.text), "deployment": deployment, "mode": mode}
            )
        return take

    def flush(self, out: list[bytes]) -> bool:
        """Before a keel-written ending: what the latest attempt holds is shown (into
        ``out``). True when this commits the stream (the caller commits the sink first)."""
        take = self.owner if self.committed else self.current
        if take is not None:
            return take.commit(out)
        committing = not self.committed
        self.committed = True
        return committing

    # -- the ending ---------------------------------------------------------------------------

    def finish_chunk(self, reason: str) -> bytes:
        """A terminal chunk keel writes itself (``content_filter``, ``length``)."""
        shape = self.finish_choice
        choice = None if shape is None else shape(reason)
        if choice is None:
            choice = {"index": 0, "delta": {}, "finish_reason": reason}
        return self._chunk([choice], repaired=True)

    def ending(self, terminal: bytes | None) -> list[bytes]:
        """The payloads that end the stream: the terminal chunk (when there is one), then the
        single usage chunk when the client asked for usage."""
        out = [terminal] if terminal is not None else []
        if self.wants_usage:
            if self.usage_payload is not None and not self.continued:
                out.append(self.usage_payload)  # one attempt: the upstream's own report
            else:
                p, c = self.prompt_tokens, self.completion_tokens
                usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
                out.append(self._chunk([], usage=usage))
        return out

    def repair(self) -> dict[str, Any] | None:
        """How the answer was repaired, for the terminal chunk (None: it was not)."""
        if not self.continued:
            return None
        return {"attempts": self.attempts, "continued": self.continued}

    def _chunk(
        self, choices: list[Any], usage: dict[str, int] | None = None, repaired: bool = False
    ) -> bytes:
        chunk_id, created, model = self.meta
        chunk: dict[str, Any] = {
            "id": chunk_id or "chatcmpl-keel",
            "object": self.chunk_object,
            "created": created or int(time.time()),
            "model": model or "",
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = usage
        if repaired and (how := self.repair()) is not None:
            chunk["keel"] = how
        return orjson.dumps(chunk)


class Take:
    """One attempt's part of the transcript: its chunks before the commit (nobody has seen
    them), what it relayed, its usage, its held terminal chunk."""

    __slots__ = (
        "_assembler",
        "_hot",
        "_t",
        "_trimmer",
        "finish",
        "first_at",
        "mode",
        "pending",
        "relayed",
        "reported",
        "texts",
    )  # fmt: skip

    def __init__(self, transcript: Transcript, asm: StreamAssembler, mode: Mode | None) -> None:
        self._t = transcript
        self._assembler = asm
        self.mode = mode
        self._trimmer = OverlapTrimmer(transcript.text) if mode == "instruct" else None
        self.pending: list[bytes] = []  # payloads held until the commit
        self.texts: list[str] = []  # their content
        self.first_at = 0.0  # when the first held content arrived (for commit_ms)
        self.relayed = 0  # content chunks of this attempt the client has (or will have) seen
        self.reported = False  # this attempt's usage chunk arrived
        # The terminal chunk, held until the stream proves complete: (payload, its content).
        self.finish: tuple[bytes, str] | None = None
        # This attempt owns the committed stream and relays the upstream's own chunks: the
        # per-frame fast path (one test instead of four).
        self._hot = False

    def chunk(self, f: Frame, out: list[bytes]) -> bool:
        """One CHUNK frame: payloads for the client go to ``out``. True when this frame made
        the attempt commit the stream — the caller commits the sink before sending ``out``.
        Raises ``Lost`` when a rival attempt committed first."""
        t = self._t
        content = f.content
        # A usage-only chunk (no choices, so no content): held, not relayed.
        obj = f.obj
        if not content and obj is not None and not obj.get("choices") and obj.get("usage"):
            self._usage(obj["usage"], f.raw if f.raw is not None else f.data.encode())
            return False
        if self._hot and f.finish_reason is None:  # a token of the committed stream
            raw = f.raw
            out.append(raw if raw is not None else f.data.encode())
            if content:
                self.relayed += 1
                t.sent.append(content)
            if not t.tool_calls and self._assembler.has_tool_calls:
                t.tool_calls = True
            return False
        if self.mode is not None:
            data = self._splice(f)
            if data is None:
                return False
            content = f.content  # what is left after trimming the overlap
        else:
            data = f.raw if f.raw is not None else f.data.encode()
        if f.finish_reason is None and t.committed and not self.pending:
            # A continuation's token (spliced above) goes straight out.
            if t.owner is not self:
                raise Lost
            out.append(data)
            if content:
                self.relayed += 1
                t.sent.append(content)
            if not t.tool_calls and self._assembler.has_tool_calls:
                t.tool_calls = True
            return False
        if content:
            self.relayed += 1
        if f.finish_reason is not None:
            committing = self.commit(out)  # what is held goes out; the terminal chunk waits
            self.finish = (data, content)
            return committing
        if content and not self.texts:
            self.first_at = t.clock()
        self.pending.append(data)
        if content:
            self.texts.append(content)
        if self._ready(f):
            return self.commit(out)
        return False

    def commit(self, out: list[bytes]) -> bool:
        """Show the client this attempt's held chunks (into ``out``); True when this is the
        moment the stream commits (the caller commits the sink first)."""
        t = self._t
        committing = t.owner is None
        if committing:
            t.owner = self  # before any await: exactly one winner
            t.committed = True
            asm = self._assembler
            t.meta = (asm.id, asm.created, asm.model)
        elif t.owner is not self:
            raise Lost
        self._hot = self.mode is None
        t.sent.extend(self.texts)
        t.tool_calls = t.tool_calls or self._assembler.has_tool_calls
        out.extend(self.pending)
        self.pending = []
        self.texts = []
        return committing

    def complete(self) -> bytes | None:
        """The attempt ended complete: its usage is counted and its terminal chunk (if any) is
        now shown. Returns that chunk's payload."""
        t = self._t
        if not self.reported:
            t.completion_tokens += self.relayed
        if self.finish is None:
            return None
        data, content = self.finish
        if content:
            t.sent.append(content)
        if not t.tool_calls and self._assembler.has_tool_calls:
            t.tool_calls = True
        return data

    def failed(self) -> None:
        """The attempt failed: what it generated still counts toward usage."""
        t = self._t
        if t.owner is self and not self.pending and not self.reported:
            # Unreported, but generated (and shown, but for a held terminal chunk).
            self._t.completion_tokens += self.relayed - (1 if self.finish and self.finish[1] else 0)

    @property
    def finish_reasons(self) -> dict[int, str]:
        """The terminal finish_reason of each choice this attempt saw (observers read it)."""
        return self._assembler.finish_reasons

    def usage(self) -> dict[str, Any]:
        """The attempt's usage, for the limiter (token reconciliation, latency per token)."""
        return self._assembler.usage or {"completion_tokens": self.relayed}

    # -- pieces -----------------------------------------------------------------------------------

    def _ready(self, f: Frame) -> bool:
        """Enough is held to commit (the role chunk alone is not worth committing for)."""
        if not (f.content or self._assembler.has_tool_calls):
            return False
        t = self._t
        if t.committed or (not t.commit_tokens and not t.commit_ms):
            return True
        if t.commit_tokens and len(self.texts) >= t.commit_tokens:
            return True
        return bool(t.commit_ms) and (t.clock() - self.first_at) * 1000 >= t.commit_ms

    def _usage(self, usage: dict[str, Any], data: bytes) -> None:
        """Usage chunks are held back: the client gets exactly one, at the end."""
        t = self._t
        t.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        t.completion_tokens += int(usage.get("completion_tokens") or 0)
        t.usage_payload = data
        self.reported = True

    def _splice(self, f: Frame) -> bytes | None:
        """A continuation's chunk as part of the committed stream, or None to drop it."""
        obj = f.obj
        assert obj is not None
        choices = obj.get("choices") or [{}]
        choice = dict(choices[0])
        delta = dict(choice.get("delta") or {})
        content = f.content
        trimmer = self._trimmer
        if trimmer is not None:
            content = trimmer.feed(content)
            if f.finish_reason:
                content += trimmer.flush()
        if not content and not f.finish_reason and not delta.get("tool_calls"):
            return None  # the continuation's role chunk, or text that repeated ours
        delta.pop("role", None)
        if content or "content" in delta:
            delta["content"] = content
        choice["delta"] = delta
        f.content = content
        chunk_id, created, model = self._t.meta
        spliced = {**obj, "id": chunk_id, "created": created, "model": model, "choices": [choice]}
        if f.finish_reason and (how := self._t.repair()) is not None:
            spliced["keel"] = how
        return orjson.dumps(spliced)
