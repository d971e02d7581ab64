"""Continuation splicing: the pure part of mid-stream failover.

When a stream fails after text reached the client, another attempt is asked to *continue* the
answer, and only new text is relayed. Providers differ in how they continue (see
docs/continuation.md):

* ``prefill``  — the request ends with an assistant message holding the text so far and the
  provider generates its continuation (DashScope ``partial: true``, DeepSeek ``prefix: true``,
  Moonshot ``partial: true``, vLLM ``continue_final_message``, Anthropic-style prefill,
  llama.cpp/Ollama). Exact by construction.
* ``instruct`` — no prefill (OpenAI, Azure): keel sends the partial answer plus an instruction
  to continue it, and trims any overlap the continuation repeats (``OverlapTrimmer``).
* ``none``     — cannot continue; only restart while nothing reached the client.

No I/O here: request bodies in, request bodies out; text in, text out.
"""

from __future__ import annotations

from typing import Any, Literal

from keel._classify import Dialect

Mode = Literal["prefill", "instruct", "none"]

#: The instruction for ``instruct`` continuations. Its first sentence is what the simulator
#: recognises (keel.sim ``CONTINUE_MARKER``).
CONTINUE_INSTRUCTION = (
    "Your previous reply was cut off. Continue it from exactly where it stopped - mid-word or "
    "mid-sentence if needed - without repeating anything and without any preamble."
)

# Overlap shorter than this is not trimmed (unless it is all of the text so far): a real
# continuation may legitimately begin with the character the text so far ended with
# ("hel" + "lo"). Repeats are usually a few words; two CJK characters are already specific.
MIN_OVERLAP = 2
# How far back a repeat may start.
MAX_OVERLAP = 200


def continuation_body(
    body: dict[str, Any], sent: str, mode: Mode, dialect: Dialect | str, tokens_sent: int
) -> dict[str, Any] | None:
    """The request that asks a deployment to continue ``sent``; None when the answer already
    used up the client's token limit (the caller then ends with ``finish_reason: length``)."""
    out = dict(body)
    for key in ("max_tokens", "max_completion_tokens"):
        limit = body.get(key)
        if isinstance(limit, int):
            if limit - tokens_sent <= 0:
                return None
            out[key] = limit - tokens_sent
    messages = list(body["messages"])
    assistant: dict[str, Any] = {"role": "assistant", "content": sent}
    if mode == "prefill":
        d = Dialect(dialect) if dialect in Dialect.__members__.values() else None
        if d in (Dialect.DASHSCOPE, Dialect.MOONSHOT):
            assistant["partial"] = True
        elif d is Dialect.DEEPSEEK:
            assistant["prefix"] = True
        elif d is Dialect.VLLM:
            out["continue_final_message"] = True
            out["add_generation_prompt"] = False
        messages.append(assistant)
    else:
        messages.append(assistant)
        messages.append({"role": "user", "content": CONTINUE_INSTRUCTION})
    out["messages"] = messages
    return out


class OverlapTrimmer:
    """Removes the part of a continuation that repeats the end of the text already sent.

    The overlap is the longest ``k >= MIN_OVERLAP`` such that ``sent`` ends with the
    continuation's first ``k`` characters. Text is held back only while the continuation so
    far could still be the start of a longer repeat; then everything flows through untouched.
    """

    __slots__ = ("_buf", "_decided", "_tail")

    def __init__(self, sent: str) -> None:
        self._tail = sent[-MAX_OVERLAP:]
        self._buf = ""
        self._decided = not self._tail

    def feed(self, delta: str) -> str:
        if self._decided:
            return delta
        self._buf += delta
        # Still ambiguous while the buffer occurs inside the tail with room to spare, i.e. the
        # repeat could be longer than what we have seen.
        if self._tail.find(self._buf, 0, len(self._tail) - 1) != -1:
            return ""
        return self._decide()

    def flush(self) -> str:
        """The continuation ended while ambiguous: decide with what we have."""
        return "" if self._decided else self._decide()

    def _decide(self) -> str:
        self._decided = True
        buf, self._buf = self._buf, ""
        shortest = min(MIN_OVERLAP, len(self._tail))
        for k in range(min(len(buf), len(self._tail)), shortest - 1, -1):
            if self._tail.endswith(buf[:k]):
                return buf[k:]
        return buf
