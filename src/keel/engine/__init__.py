"""The request engine: admission, router, plan, driver, transcript, sinks — no web framework.

Doors (the HTTP gateway, the in-process transport, the library calls) turn their input into a
body and a principal, and hand them to ``Keel``; see ARCHITECTURE.md.
"""

from keel.engine._errors import KeelError
from keel.engine._keel import Keel

__all__ = ["Keel", "KeelError"]
