"""Stream assembly for legacy text completions (``POST /v1/completions``). Pure, no I/O.

A text completion stream is a chat stream with another choice shape: each choice carries its
``text`` where a chat chunk has ``delta.content``, and there is no role and no tool call::

    data: {"id":"cmpl-…","object":"text_completion","created":…,"model":"…",
           "choices":[{"text":"Hi","index":0,"logprobs":null,"finish_reason":null}]}
    …
    data: {…"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"stop"}]}
    data: [DONE]

Everything else — error frames, noise, ``[DONE]``, usage chunks, what makes a stream
complete — is the chat assembler's (``keel._assembly``), which this one extends.
"""

from __future__ import annotations

from typing import Any

from keel._assembly import Frame, FrameKind, StreamAssembler

_CHUNK = FrameKind.CHUNK


class TextCompletionAssembler(StreamAssembler):
    """``StreamAssembler`` for ``text_completion`` chunks: ``frame.content`` and ``text``
    come from each choice's ``text``."""

    __slots__ = ()

    def _chunk(
        self, data: str, obj: dict[str, Any], choices: list[Any], raw: bytes | None = None
    ) -> Frame:
        # A text choice has no "delta": the chat assembler's fast path never takes it, and
        # its chunk handling validates everything but the text (index, finish_reason, usage).
        frame = super()._chunk(data, obj, choices, raw)
        if frame.kind is not _CHUNK:
            return frame
        for choice in choices:
            piece = choice.get("text")  # a dict with an int index: checked above
            if not piece:
                continue
            if type(piece) is not str:
                return self._invalid(data, "choice text is not a string")
            index = choice.get("index", 0)
            if index == 0:
                self._parts.append(piece)
                frame.content = piece
            else:
                self._other_parts.setdefault(index, []).append(piece)
        return frame
