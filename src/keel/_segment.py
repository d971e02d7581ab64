# ruff: noqa: RUF001, RUF002 - full-width CJK punctuation is the point of this module
"""Sentence segmentation for text-to-speech: a streamed answer in, sentence-sized pieces out.

Pure and incremental: ``feed`` the answer's text as it arrives, take the segments that are
complete, ``flush`` at the end. The segments concatenated are always exactly the text fed —
nothing is dropped, trimmed or normalised — because a voice bot's consumers (TTS, the device,
the transcript) must agree on what was said.

Where a cut goes:

* after sentence punctuation — Chinese ``。！？；…`` and Western ``. ! ? ;`` — together with
  the rest of its run (``?!``, ``……``, ``。”``, ``."``), and after a newline. A cut waits
  for the character after the run: only then is it known that the run has ended.
* Western ``.!?;`` cut only when what follows is not an ASCII letter or digit, so ``3.14``,
  ``keel.yaml`` and ``a;b`` stay whole (``e.g. this`` still cuts: a TTS pause is harmless).
* a run longer than ``max_chars`` without such punctuation is cut at its last soft break
  (comma, colon, space …) in the second two thirds of the window, else hard at ``max_chars``:
  TTS latency stays bounded on answers that never end a sentence.
* a sentence shorter than ``min_chars`` is not cut off alone (it joins the next one).
"""

from __future__ import annotations

# Sentence enders: the CJK full-width forms and their Western counterparts.
_CJK_ENDERS = frozenset("。！？；…")
_ASCII_ENDERS = frozenset(".!?;")
_ENDERS = _CJK_ENDERS | _ASCII_ENDERS | {"\n"}
# What may trail an ender and still belong to its sentence: closing quotes and brackets,
# more newlines.
_CLOSERS = frozenset("\"')]}”’」』）》】\n")
# Where a too-long run may be cut: after a comma, colon, dash or space.
_SOFT = frozenset("，,、：:—-　 \t）)")

DEFAULT_MAX_CHARS = 100


def _ascii_alnum(c: str) -> bool:
    return c.isascii() and c.isalnum()


class Segmenter:
    """Incremental sentence segmentation (see the module's docstring)."""

    __slots__ = ("_buf", "max_chars", "min_chars")

    def __init__(self, max_chars: int = DEFAULT_MAX_CHARS, min_chars: int = 0) -> None:
        if max_chars < 1:
            raise ValueError("max_chars must be at least 1")
        if not 0 <= min_chars <= max_chars:
            raise ValueError("min_chars must be between 0 and max_chars")
        self.max_chars = max_chars
        self.min_chars = min_chars
        self._buf = ""

    @property
    def pending(self) -> str:
        """Text fed but not yet part of a segment."""
        return self._buf

    def feed(self, text: str) -> list[str]:
        """Add ``text``; the segments it completed (possibly none)."""
        self._buf += text
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """The end of the answer: the remaining text as segments (the last may be short)."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[str]:
        out: list[str] = []
        while self._buf:
            cut = self._cut(final)
            if cut is None:
                break
            out.append(self._buf[:cut])
            self._buf = self._buf[cut:]
        return out

    def _cut(self, final: bool) -> int | None:
        """Where the first segment of the buffer ends, or None when that is not known yet."""
        buf, n, cap = self._buf, len(self._buf), self.max_chars
        i = 0
        while i < min(n, cap):
            c = buf[i]
            if c not in _ENDERS:
                i += 1
                continue
            j = i + 1
            while j < n and j < cap and (buf[j] in _ENDERS or buf[j] in _CLOSERS):
                j += 1
            if j == n and not final:
                return None  # the run may go on in the next piece of text
            if j < n and j < cap and _ascii_alnum(buf[j]) and _western(buf[i:j]):
                i = j  # 3.14, keel.yaml: not the end of a sentence
                continue
            if j >= self.min_chars or j == cap:
                return j
            i = j
        if n >= cap:
            return _soft_cut(buf, cap)
        return n if final else None


def _western(run: str) -> bool:
    """A run of Western punctuation only (quotes aside): those need a non-word after them."""
    return all(c in _ASCII_ENDERS or c in "\"')]}" for c in run)


def _soft_cut(buf: str, cap: int) -> int:
    """A cut for a run of ``cap`` characters without a sentence end: after its last soft
    break past the first third, else at ``cap``."""
    for k in range(cap - 1, cap // 3 - 1, -1):
        if buf[k] in _SOFT:
            return k + 1
    return cap


def segments(text: str, max_chars: int = DEFAULT_MAX_CHARS, min_chars: int = 0) -> list[str]:
    """All segments of a complete text (what feeding it in any pieces yields)."""
    s = Segmenter(max_chars, min_chars)
    return s.feed(text) + s.flush()
