"""What the Responses tests share: the SDK client through either door, the event grammar every
stream keel sends obeys, and the simulators' attempts for a prompt."""

from __future__ import annotations

from typing import Any

import httpx
from openai import AsyncOpenAI
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from keel import Keel
from keel.sim import LogEntry
from keel.testing import SimProcess

EVENT = TypeAdapter(ResponseStreamEvent)
TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def sdk_client(door: str, base_url: str, library: Keel) -> AsyncOpenAI:
    """The openai SDK through ``keel serve`` at ``base_url`` (``door == "serve"``), or
    in-process through ``library.transport()``."""
    if door == "serve":
        return AsyncOpenAI(base_url=base_url, api_key="sk-c", max_retries=0, timeout=20)
    http = httpx.AsyncClient(transport=library.transport())
    return AsyncOpenAI(base_url="http://keel/v1", api_key="sk-c", max_retries=0, http_client=http)


def attempts(sims: tuple[SimProcess, SimProcess], prompt: str) -> list[LogEntry]:
    """Every upstream request for a ``unique()`` prompt, on either simulator, in order."""
    tag = prompt.rsplit("#", 1)[1].split()[0]
    return sorted((e for s in sims for e in s.log() if tag in e.prompt), key=lambda e: e.t_open)


def check_grammar(events: list[Any]) -> None:
    """The SDK's own types parse every event strictly; sequence numbers count from 0; the
    stream opens with response.created and ends with its one terminal event."""
    for e in events:
        EVENT.validate_python(e.to_dict(warnings=False))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[1].type == "response.in_progress"
    terminal = [e.type for e in events if e.type in TERMINAL]
    assert len(terminal) == 1 and events[-1].type == terminal[0]


def streamed_text(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")
