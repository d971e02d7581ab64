"""``keel sim``: an OpenAI-compatible upstream simulator with deterministic answers and fault
injection, used by every test and benchmark of keel.

Quick reference (also in the README): directives go in the last user message as
``[[sim:trunc=3,len=40]]`` or ``[[sim@name:e500*2]]``, or in the ``x-sim-fault`` header; the
answer text is :func:`answer_text` of the directive-free prompt.
"""

from __future__ import annotations

from keel.sim._answer import (
    CONTINUE_MARKER,
    DEFAULT_LENGTH,
    answer_for,
    answer_text,
    prompt_tokens,
    strip_directives,
    tool_call_for,
)
from keel.sim._errors import go_duration, key_fingerprint, mask_key
from keel.sim._faults import FAULTS, SETTINGS, DirectiveError, Fault
from keel.sim._log import LogEntry
from keel.sim._server import DIALECTS, Simulator

__all__ = [
    "CONTINUE_MARKER",
    "DEFAULT_LENGTH",
    "DIALECTS",
    "FAULTS",
    "SETTINGS",
    "DirectiveError",
    "Fault",
    "LogEntry",
    "Simulator",
    "answer_for",
    "answer_text",
    "go_duration",
    "key_fingerprint",
    "mask_key",
    "prompt_tokens",
    "strip_directives",
    "tool_call_for",
]
