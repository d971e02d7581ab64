"""keel: a resilient, OpenAI-compatible LLM gateway and library.

    async with keel.Keel.from_config("keel.yaml") as gw:
        done = await gw.chat({"model": "chat", "messages": [...]})
        async for chunk in gw.stream({"model": "chat", "messages": [...]}):
            ...
"""

from __future__ import annotations

__version__ = "0.1.0"

from keel.config import ConfigError, GatewayConfig, load_config, parse_config
from keel.engine import Keel, KeelError

__all__ = [
    "ConfigError",
    "GatewayConfig",
    "Keel",
    "KeelError",
    "__version__",
    "load_config",
    "parse_config",
]
