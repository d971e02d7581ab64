"""Deterministic answers: the text the simulator returns is a pure function of the prompt.

Tests compute the expected text with :func:`answer_text` and compare it byte for byte with what
came through the gateway, so retries, fail-over and continuation can be checked exactly.

The token stream is drawn from SHAKE-256 of the prompt, so a longer answer always starts with the
shorter one (``answer_for(p, 40)[:24] == answer_for(p, 24)``): ``max_tokens`` truncation and
continuation agree with the full answer. The vocabulary mixes ASCII, Latin-1, CJK and 4-byte
emoji so multi-byte UTF-8 characters regularly straddle chunk and read boundaries.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

DEFAULT_LENGTH = 24

#: keel puts this marker into its "please continue" instruction; the simulator recognises it.
CONTINUE_MARKER = "Your previous reply was cut off."

# 64 entries: ~40 % English words, ~45 % Chinese, a few punctuation marks and ~5 % emoji.
VOCAB: tuple[str, ...] = (
    " the", " model", " gateway", " answer", " stream", " token", " retry", " quick",
    " brown", " fox", " data", " keel", " river", " light", " and", " of",
    " to", " is", " simple", " robust", " hello", " world", " café", " naïve",
    ",", ".", " cloud", " signal",
    "你好", "世界", "模型", "网关", "，", "。", "数据", "流",  # noqa: RUF001
    "重试", "的", "是", "我们", "今天", "天气", "很好", "服务",
    "稳定", "回答", "北京", "上海", "语音", "设备", "句子", "！",  # noqa: RUF001
    "中文", "测试", "连接", "超时", "你", "好", "吗", "？",  # noqa: RUF001
    "🚀", "😀", "✨", "🌏",
)  # fmt: skip

_DIRECTIVE_RE = re.compile(r"\[\[sim(?:@[^:\]]*)?:[^\]]*\]\]")


def strip_directives(text: str) -> str:
    """The prompt without ``[[sim:...]]`` directives, whitespace-stripped: the answer's seed."""
    if "[[sim" not in text:
        return text.strip()
    return _DIRECTIVE_RE.sub("", text).strip()


@lru_cache(maxsize=8192)
def _tokens(prompt: str, length: int) -> tuple[str, ...]:
    if length <= 0:
        return ()
    digest = hashlib.shake_256(prompt.encode("utf-8", "surrogatepass")).digest(2 * length)
    n = len(VOCAB)
    toks = [VOCAB[int.from_bytes(digest[i : i + 2], "big") % n] for i in range(0, 2 * length, 2)]
    toks[0] = toks[0].lstrip() or toks[0]  # no leading space on the very first word
    return tuple(toks)


def tokens_for(prompt: str, length: int = DEFAULT_LENGTH) -> tuple[str, ...]:
    """Cached token tuple for an already directive-free prompt (the server's hot path)."""
    return _tokens(prompt, length)


def answer_for(prompt: str, length: int = DEFAULT_LENGTH) -> list[str]:
    """The answer's tokens for ``prompt`` (directives are stripped first)."""
    return list(_tokens(strip_directives(prompt), length))


def answer_text(prompt: str, length: int = DEFAULT_LENGTH) -> str:
    """The full answer text for ``prompt`` (directives are stripped first)."""
    return "".join(_tokens(strip_directives(prompt), length))


def pieces_from(tokens: Sequence[str], offset: int) -> list[str]:
    """The answer from character ``offset`` on, split at token boundaries; if ``offset`` falls
    inside a token, the first piece is the rest of that token."""
    pos = 0
    for i, tok in enumerate(tokens):
        end = pos + len(tok)
        if end > offset:
            return [tok[max(0, offset - pos) :], *tokens[i + 1 :]]
        pos = end
    return []


def default_overlap(tokens: Sequence[str], offset: int, n: int = 2) -> int:
    """Characters of the last ``n`` tokens (whole or partial) before ``offset``: how much of the
    already-sent text an instruct continuation repeats by default."""
    starts: list[int] = []
    pos = 0
    for tok in tokens:
        if pos >= offset:
            break
        starts.append(pos)
        pos += len(tok)
    if not starts:
        return 0
    return offset - starts[max(0, len(starts) - n)]


def content_text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
        )
    return ""


def prompt_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    """A deterministic prompt-size estimate: per message ceil(len(text)/4) + 4."""
    return sum(math.ceil(len(content_text(m.get("content"))) / 4) + 4 for m in messages)


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # the complete JSON string
    pieces: tuple[str, ...]  # how it is streamed: concatenation == arguments


@lru_cache(maxsize=1024)
def tool_call_for(prompt: str, name: str) -> ToolCall:
    """A deterministic tool call. The arguments are streamed in 5-character pieces, which puts a
    chunk boundary between the two characters of "北京" (the JSON is ASCII-free there)."""
    digest = hashlib.sha256(f"{name}\x00{prompt}".encode("utf-8", "surrogatepass")).hexdigest()
    args = orjson.dumps({"city": "北京", "unit": "celsius", "n": int(digest[:2], 16) % 10}).decode()
    pieces = tuple(args[i : i + 5] for i in range(0, len(args), 5))
    return ToolCall(id=f"call_{digest[:24]}", name=name, arguments=args, pieces=pieces)
