"""One turn of a conversation: the answer streamed from the engine, cut into sentences,
published, synthesised, and ended — exactly once — whatever happens.

Three tasks per turn, watched by ``Turn.run`` (which alone publishes the ends, so that a
cancel can never cut an end in half or send a second one):

* chat: ``Keel.stream`` → ``Segmenter`` → segment messages, each handed to TTS;
* speak (with ``tts``): synthesis of the segments in order, ``lookahead`` ahead of the one
  whose audio is being published; audio messages in segment order;
* the cancel event (barge-in, or a newer utterance of the session).

A cancel cancels the running tasks: leaving the engine's stream and the ``Speech`` closes the
upstream LLM and TTS connections at once, in their own ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keel._segment import Segmenter
from keel._voicewire import ChatWire, TTSWire, Utterance, error_of
from keel.engine._errors import KeelError
from keel.node._bus import Bus, BusLost

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage

    from keel.config._node import NodeConfig
    from keel.engine._keel import Keel
    from keel.engine._speech import Speech

log = logging.getLogger("keel.node")

_END = object()  # the end of a segment's audio / of the turn's segments
_REASONS = {"stop": "stop", "length": "length", "content_filter": "content_filter"}
_INTERNAL = {"message": "keel node hit an internal error; it has been logged.",
             "type": "server_error", "code": "internal_error"}  # fmt: skip


@dataclass(eq=False)
class Session:
    """A conversation: its last turns (for the model) and the newest turn it was asked."""

    id: str
    history: deque[dict[str, str]] = field(default_factory=deque)
    latest: Turn | None = None
    seen: deque[str] = field(default_factory=lambda: deque(maxlen=32))  # turn ids taken here
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def remember(self, user: str, assistant: str, turns: int) -> None:
        if turns <= 0 or not assistant:
            return  # a turn without an answer is not part of the conversation
        self.history.append({"role": "user", "content": user})
        self.history.append({"role": "assistant", "content": assistant})
        while len(self.history) > 2 * turns:
            self.history.popleft()


class Turn:
    def __init__(
        self,
        gw: Keel,
        bus: Bus,
        cfg: NodeConfig,
        utt: Utterance,
        session: Session,
        delivery: AbstractIncomingMessage | None,
        redelivered: bool,
    ) -> None:
        self.gw, self.bus, self.cfg, self.utt = gw, bus, cfg, utt
        self.session = session
        self.delivery = delivery
        self.redelivered = redelivered
        self.cancelled = asyncio.Event()
        self.chat = ChatWire(cfg.protocol, utt.session, utt.turn)
        self.tts = TTSWire(utt.session, utt.turn) if cfg.tts is not None else None
        self.said: list[str] = []
        self._segments: asyncio.Queue[object] = asyncio.Queue()

    def cancel(self) -> None:
        self.cancelled.set()

    async def _pub(self, exchange: str, body: dict[str, Any]) -> None:
        await self.bus.publish(exchange, self.utt.session, body, self.delivery)

    # -- the turn ------------------------------------------------------------------------------

    async def run(self) -> bool:
        """Answer the turn; True when its ends were published (ack it), False when the bus
        connection was lost on the way (the broker redelivers it)."""
        cfg = self.cfg
        tasks: dict[asyncio.Task[Any], str] = {}
        try:
            if self.redelivered:  # another run may have published part of it: discard that
                await self._pub(cfg.events_exchange, self.chat.restart())
                if self.tts is not None:
                    await self._pub(cfg.tts_exchange, self.tts.restart())
            if not self.cancelled.is_set():
                tasks[asyncio.create_task(self._answer())] = "chat"
                if self.tts is not None:
                    tasks[asyncio.create_task(self._speak())] = "tts"
            cancel = asyncio.create_task(self.cancelled.wait())
            try:
                chat_end: tuple[str, dict[str, Any] | None] = ("cancelled", None)
                while tasks and not self.cancelled.is_set():
                    done, _ = await asyncio.wait(
                        {*tasks, cancel}, return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in done:
                        if task is cancel:
                            continue
                        what = tasks.pop(task)
                        result = self._result(task, what)
                        if what == "chat":
                            chat_end = result
                            for m in self.chat.end(*result):
                                await self._pub(cfg.events_exchange, m)
                            self._segments.put_nowait(_END)
                        else:
                            reason, error = result
                            if reason == "stop":  # every segment spoken: the chat's reason
                                reason, error = chat_end
                            assert self.tts is not None
                            await self._pub(cfg.tts_exchange, self.tts.end(reason, error))
            finally:
                cancel.cancel()
            # Cancelled (or cancelled before it began): stop what runs, end what is open.
            await _stop(tasks)
            if not self.chat.ended:
                for m in self.chat.end("cancelled"):
                    await self._pub(cfg.events_exchange, m)
            if self.tts is not None and not self.tts.ended:
                await self._pub(cfg.tts_exchange, self.tts.end("cancelled"))
            self.session.remember(self.utt.text, "".join(self.said), cfg.history_turns)
            return True
        except BusLost as exc:
            log.warning(
                "turn %s/%s stopped: %s (the broker redelivers it)",
                self.utt.session,
                self.utt.turn,
                exc,
            )
            return False
        finally:
            await _stop(tasks)

    def _result(self, task: asyncio.Task[Any], what: str) -> tuple[str, dict[str, Any] | None]:
        exc = task.exception()
        if exc is None:
            result: tuple[str, dict[str, Any] | None] = task.result()
            return result
        if isinstance(exc, BusLost):
            raise exc
        # A bug of ours: the turn still ends, well-formed, and the node goes on.
        log.error("turn %s/%s: %s task failed", self.utt.session, self.utt.turn, what, exc_info=exc)
        return "error", dict(_INTERNAL)

    # -- chat ------------------------------------------------------------------------------------

    def _body(self) -> dict[str, Any]:
        messages: list[dict[str, str]] = []
        if self.cfg.system:
            messages.append({"role": "system", "content": self.cfg.system})
        messages.extend(self.session.history)
        messages.append({"role": "user", "content": self.utt.text})
        body: dict[str, Any] = {"model": self.cfg.model, "messages": messages}
        if self.cfg.max_tokens is not None:
            body["max_tokens"] = self.cfg.max_tokens
        return body

    async def _answer(self) -> tuple[str, dict[str, Any] | None]:
        seg = Segmenter(self.cfg.max_segment_chars, self.cfg.min_segment_chars)
        finish: str | None = None
        stream = self.gw.stream(self._body())
        try:
            async for chunk in stream:
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        for s in seg.feed(text):
                            await self._segment(s)
                    finish = choice.get("finish_reason") or finish
            for s in seg.flush():
                await self._segment(s)
            return _REASONS.get(finish or "stop", "stop"), None
        except KeelError as exc:
            # Never a crash: what was said stays said, the turn ends with the error.
            for s in seg.flush():
                await self._segment(s)
            return "error", error_of(exc.body)
        finally:
            await stream.aclose()

    async def _segment(self, text: str) -> None:
        k = len(self.said)
        for m in self.chat.segment(text):
            await self._pub(self.cfg.events_exchange, m)
        self.said.append(text)
        if self.tts is not None:
            self._segments.put_nowait((k, text))

    # -- speech ----------------------------------------------------------------------------------

    async def _speak(self) -> tuple[str, dict[str, Any] | None]:
        """Synthesise the segments in order, up to ``lookahead`` ahead of the one being
        published; ("stop", None) when all were spoken, ("error", …) at the first that could
        not be."""
        tts = self.cfg.tts
        assert tts is not None and self.tts is not None
        slots = asyncio.Semaphore(1 + tts.lookahead)
        jobs: asyncio.Queue[tuple[int, asyncio.Queue[object], asyncio.Task[None]] | None] = (
            asyncio.Queue()
        )
        started: list[asyncio.Task[None]] = []

        async def starter() -> None:
            while (item := await self._segments.get()) is not _END:
                assert isinstance(item, tuple)
                k: int = item[0]
                text: str = item[1]
                if not text.strip():
                    continue  # nothing to say
                await slots.acquire()
                out: asyncio.Queue[object] = asyncio.Queue()
                task = asyncio.create_task(self._synth(text, out))
                started.append(task)
                jobs.put_nowait((k, out, task))
            jobs.put_nowait(None)

        feeder = asyncio.create_task(starter())
        try:
            while (job := await jobs.get()) is not None:
                k, out, _ = job
                try:
                    while (data := await out.get()) is not _END:
                        if isinstance(data, KeelError):
                            return "error", error_of(data.body)
                        assert isinstance(data, bytes)
                        await self._pub(self.cfg.tts_exchange, self.tts.audio(k, data))
                finally:
                    slots.release()
            return "stop", None
        finally:
            feeder.cancel()
            await _stop(dict.fromkeys([feeder, *started], ""))

    async def _synth(self, text: str, out: asyncio.Queue[object]) -> None:
        tts = self.cfg.tts
        assert tts is not None
        body = {
            "model": tts.model,
            "input": text,
            "voice": tts.voice,
            "response_format": tts.format,
        }
        sp: Speech | None = None
        try:
            sp = await self.gw.speech(body)
            async for data in sp:
                out.put_nowait(data)
            out.put_nowait(_END)
        except KeelError as exc:
            out.put_nowait(exc)
        finally:
            if sp is not None:
                await sp.aclose()  # also when cancelled: the TTS connection closes now


async def _stop(tasks: dict[asyncio.Task[Any], str]) -> None:
    """Cancel ``tasks`` and wait for them (their ``finally`` closes the upstreams)."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task
    tasks.clear()
