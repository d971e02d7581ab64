"""keel: a resilient, OpenAI-compatible LLM gateway and library."""

from __future__ import annotations

__version__ = "0.1.0"
