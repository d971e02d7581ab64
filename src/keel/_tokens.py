"""Token estimates for TPM reservations, before the upstream has counted anything. Pure.

No tokenizer is loaded: tiktoken needs to download its BPE files at run time, which a gateway
must not depend on, and the providers keel fronts (Qwen, DeepSeek, ...) use other vocabularies
anyway. Instead a calibrated estimate:

* ASCII text: ~4 characters per token (OpenAI's rule of thumb for English; code is denser,
  which the calibration below absorbs);
* CJK ideographs, kana and hangul: ~1 token per character (cl100k ~1.1, o200k ~0.8, Qwen
  ~0.7 per Han character — one is the safe middle, and 4 characters per token would
  under-reserve Chinese text four-fold);
* anything else non-ASCII (accented Latin, emoji): ~1 token per 2 characters;
* per message 4 tokens of framing, 3 for priming the reply (OpenAI's cookbook count);
  an image part 765 (a 1024² high-detail image).

``Calibration`` then learns, per deployment, the ratio of the upstream's reported
``prompt_tokens`` to our estimate, so a deployment whose tokenizer differs converges on its
own numbers after a few requests.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_CJK = re.compile(
    "[\u1100-\u11ff\u2e80-\u2fdf\u3000-\u303f\u3040-\u30ff\u3100-\u31ff\u3400-\u4dbf"
    "\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\U00020000-\U0003134f]"
)
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
PER_MESSAGE = 4
REPLY_PRIMING = 3
IMAGE_TOKENS = 765
DEFAULT_COMPLETION = 256  # before a deployment has told us what its answers cost


def text_tokens(text: str) -> int:
    if text.isascii():
        return math.ceil(len(text) / 4)
    cjk = len(_CJK.findall(text))
    other = len(_NON_ASCII.findall(text)) - cjk
    ascii_chars = len(text) - cjk - other
    return cjk + math.ceil(other / 2) + math.ceil(ascii_chars / 4)


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return text_tokens(content)
    if isinstance(content, list):
        n = 0
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                n += text_tokens(part["text"])
            elif part.get("type") in ("image_url", "input_image", "image"):
                n += IMAGE_TOKENS
        return n
    return 0


def prompt_tokens(messages: Sequence[Any], tools: Any = None) -> int:
    """Estimated prompt tokens of a chat request."""
    n = REPLY_PRIMING
    for m in messages:
        if not isinstance(m, dict):  # parsed JSON: a dict (an ABC check costs ~4x more)
            continue
        c = m.get("content")
        # A string (the common message) counted here: no frame of ``_content_tokens`` for it.
        n += PER_MESSAGE + (text_tokens(c) if type(c) is str else _content_tokens(c))
        calls = m.get("tool_calls")
        if calls:
            n += text_tokens(str(calls))
    if tools:
        n += text_tokens(str(tools))
    return n


def input_tokens(value: Any) -> int:
    """Estimated tokens of an embeddings ``input`` or a legacy completion's ``prompt``: a
    string, an array of strings, an array of token ids (counted exactly) or an array of such
    arrays."""
    if isinstance(value, str):
        return text_tokens(value)
    if not isinstance(value, list):
        return 0
    n = 0
    for item in value:
        if isinstance(item, str):
            n += text_tokens(item)
        elif isinstance(item, list):
            n += len(item)
        else:
            n += 1  # one token id of a single token array
    return n


def completion_budget(body: Mapping[str, Any]) -> int | None:
    """The client's own cap on output tokens, if it set one (``max_completion_tokens`` first).
    Written out rather than looped over the two keys: this runs for every request."""
    v = body.get("max_completion_tokens")
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    v = body.get("max_tokens")
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    return None


@dataclass(slots=True)
class Calibration:
    """Per deployment: how far off our estimates are, learned from reported usage."""

    alpha: float = 0.2
    prompt_ratio: float = 1.0
    typical_completion: float = float(DEFAULT_COMPLETION)
    samples: int = 0

    def cost(self, estimated_prompt: int, max_completion: int | None) -> int:
        """Tokens to reserve before the call."""
        # The client's max_tokens is the honest upper bound (the upstream's TPM counts it the
        # same way); the excess is refunded when the usage comes back.
        completion = self.typical_completion if max_completion is None else max_completion
        return max(1, math.ceil(estimated_prompt * self.prompt_ratio + completion))

    def learn(self, estimated_prompt: int, prompt: int | None, completion: int | None) -> None:
        a = self.alpha if self.samples else 1.0
        if prompt is not None and estimated_prompt > 0:
            ratio = prompt / estimated_prompt  # clamped to [0.25, 4]: one odd answer is noise
            ratio = 4.0 if ratio > 4.0 else 0.25 if ratio < 0.25 else ratio
            self.prompt_ratio += a * (ratio - self.prompt_ratio)
        if completion is not None:
            self.typical_completion += a * (completion - self.typical_completion)
        self.samples += 1
