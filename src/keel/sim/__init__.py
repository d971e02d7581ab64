"""``keel sim``: an OpenAI-compatible upstream simulator with deterministic answers and fault
injection, used by every test and benchmark of keel.

Answers: the text is :func:`answer_text` of the last user message with ``[[sim:...]]``
directives removed (24 tokens by default; ``len=N`` or ``--length``). An assistant message
that is a prefix of the answer is continued (prefill); ``[..., user U, assistant A, user M]``
with :data:`CONTINUE_MARKER` (``[[continue]]``) in M is continued too, repeating the last
``overlap`` characters of A first (instruct).

How to ask for a fault:

* directive in the last user message: ``[[sim:trunc=3,len=40]]``; ``[[sim@a:e500*2]]`` only on
  the simulator named ``a``; ``*K``: only the first K attempts of this prompt on this simulator;
* header ``x-sim-fault: trunc=3`` (or ``@a:trunc=3``), same syntax;
* per API key: ``--key-faults "sk-dead=auth,sk-broke=quota"``; ``--keys`` allow-list;
* random: ``--faults "r429=0.1,trunc=0.05" --seed 7`` (at most one per request, reproducible).

Errors before any byte: ``r429[=S]`` ``r429_ds`` ``r429_long[=S]`` ``quota`` ``quota_ds``
``free_quota_ds`` ``too_large`` ``auth`` ``arrearage`` ``balance`` ``ctx`` ``inspect``
``content_filter_az`` ``e500`` ``e503`` ``e529`` ``e502_html`` ``e504_html`` ``moonshot``;
``reset`` drops the TCP connection. In the stream (N = content chunks sent first):
``trunc=N`` ``trunc_mid=N`` ``stall=N`` ``stall_ka=N`` ``err_mid=N`` ``inspect_mid=N``
``anth_err_mid=N`` ``garbage_fatal=N`` ``no_finish`` ``null_finish`` ``empty_finish``
``no_done`` ``garbage`` ``crlf`` ``cr`` ``frag`` ``keepalive`` ``slow_first=S``
``slow_token=S``. Settings: ``len=N`` ``delay=S`` ``overlap=N`` ``tool``.

Text-to-speech: ``POST /v1/audio/speech`` streams :func:`audio_bytes` of the input in
``--audio-chunk`` byte chunks, ``--audio-delay`` seconds apart (``keel.sim._speech``).

Embeddings: ``POST /v1/embeddings`` answers :func:`embedding_for` of each input and its
``dimensions`` (1536 by default), as floats or base64 (``keel.sim._embeddings``). Legacy
completions: ``POST /v1/completions``, stream and non-stream, answers the chat answer's text
of the prompt (``keel.sim._completions``). Both take the same faults as chat.
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
from keel.sim._embeddings import DIMENSIONS, embedding_base64, embedding_for
from keel.sim._errors import go_duration, key_fingerprint, mask_key
from keel.sim._faults import FAULTS, SETTINGS, DirectiveError, Fault
from keel.sim._log import LogEntry
from keel.sim._server import DIALECTS, Simulator
from keel.sim._speech import audio_bytes

__all__ = [
    "CONTINUE_MARKER",
    "DEFAULT_LENGTH",
    "DIALECTS",
    "DIMENSIONS",
    "FAULTS",
    "SETTINGS",
    "DirectiveError",
    "Fault",
    "LogEntry",
    "Simulator",
    "answer_for",
    "answer_text",
    "audio_bytes",
    "embedding_base64",
    "embedding_for",
    "go_duration",
    "key_fingerprint",
    "mask_key",
    "prompt_tokens",
    "strip_directives",
    "tool_call_for",
]
