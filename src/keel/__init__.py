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


def compiled() -> tuple[str, ...]:
    """The modules of keel that are native (the opt-in mypyc build, ``KEEL_MYPYC=1 pip install
    .``; see setup.py): empty for pure Python. An extension module next to a ``.py`` is the
    one Python imports, so the files say it."""
    import os
    from importlib.machinery import EXTENSION_SUFFIXES

    root = os.path.dirname(__file__)
    found = []
    for where, _, files in os.walk(root):
        package = os.path.relpath(where, os.path.dirname(root)).replace(os.sep, ".")
        for name in files:
            for suffix in EXTENSION_SUFFIXES:  # the most specific first (".cpython-311-….so")
                if name.endswith(suffix):
                    found.append(f"{package}.{name[: -len(suffix)]}")
                    break
    return tuple(sorted(found))

__all__ = [
    "ConfigError",
    "GatewayConfig",
    "Keel",
    "KeelError",
    "__version__",
    "compiled",
    "load_config",
    "parse_config",
]
