"""``keel node``: the voice-bot worker — requests from RabbitMQ, answers from keel's engine
in-process, sentences (and audio) back onto the bus.

What it promises (README, "The voice-bot worker"):

* every turn ends exactly once (``end``: stop, length, content_filter, cancelled or error);
* a malformed message is logged once and dead-lettered, never retried, never a crash;
* a turn is acked only after its end is on the broker, so a node that dies mid-turn loses
  nothing: the broker redelivers the turn to another node, which announces ``restart`` first;
* a cancel (barge-in) or a newer utterance of the session stops the running turn, and its
  upstream connections, at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from keel._voicewire import Malformed, Utterance, cancel_message, parse_control, parse_utterance
from keel.config import GatewayConfig
from keel.engine._keel import Keel
from keel.node._bus import Bus, safe_url, settle
from keel.node._done import FinishedTurns
from keel.node._turn import Session, Turn

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage

    from keel.config._node import NodeConfig

log = logging.getLogger("keel.node")


class Node:
    """One worker. ``async with Node(config) as node: await node.wait()`` — or ``start()`` /
    ``stop()``. ``gw``: an engine of the caller's (started and closed by the caller)."""

    def __init__(
        self, config: GatewayConfig, gw: Keel | None = None, node_id: str | None = None
    ) -> None:
        if config.node is None:
            raise ValueError("the config has no node: section")
        self.config = config
        self.cfg: NodeConfig = config.node
        self.node_id = node_id or f"{os.getpid():x}-{os.urandom(3).hex()}"
        self._own_gw = gw is None
        self.gw = gw or Keel(config)
        self.bus = Bus(self.cfg, self.node_id)
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.finished = FinishedTurns(config.redis_url, self.cfg)
        self.turns: set[asyncio.Task[None]] = set()
        self._turn_of: dict[asyncio.Task[Any], Turn] = {}  # the turn each task runs, once known
        self.stats: dict[str, int] = {"turns": 0, "malformed": 0, "duplicates": 0, "lost": 0}
        self._stopped = asyncio.Event()

    async def start(self, retry_for: float = 30.0) -> None:
        if self._own_gw:
            await self.gw.start()
        await self.finished.start()
        await self.bus.connect(retry_for)
        await self.bus.consume(self._on_request, self._on_control)
        log.info(
            "keel node %s consuming %s on %s",
            self.node_id,
            self.cfg.requests_queue,
            safe_url(self.bus.url),
        )

    async def stop(self) -> None:
        """Stop consuming; running turns stop without an ack (the broker hands them to
        another node, which answers them afresh), then the connections close. A turn whose
        chat end is already out is finished here instead (its TTS ends ``cancelled``, it is
        acked): answered again elsewhere, it would end twice."""
        await self.bus.stop_consuming()
        for task in list(self.turns):
            turn = self._turn_of.get(task)
            if turn is not None and turn.chat.ended:
                turn.cancel()
            else:
                task.cancel()
        for task in list(self.turns):
            try:
                await task
            except BaseException:  # cancelled on purpose
                log.debug("turn task ended on stop", exc_info=True)
        await self.bus.close()
        await self.finished.close()
        if self._own_gw:
            await self.gw.close()
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- deliveries ------------------------------------------------------------------------------

    async def _on_request(self, delivery: AbstractIncomingMessage) -> None:
        # Each turn in its own task: the consumer callback returns at once, prefetch bounds
        # how many run.
        task = asyncio.create_task(self._handle(delivery))
        self.turns.add(task)
        task.add_done_callback(self.turns.discard)

    async def _handle(self, delivery: AbstractIncomingMessage) -> None:
        try:
            utt = parse_utterance(delivery.body)
        except Malformed as exc:
            self.stats["malformed"] += 1
            log.warning("dead-lettering a malformed request (%s): %.120r", exc, delivery.body)
            await settle(delivery, ack=False)
            return
        try:
            await self._turn(utt, delivery)
        except asyncio.CancelledError:
            raise  # the node is stopping: no ack, the broker redelivers
        except Exception:
            # A bug of ours must not kill the consumer, nor loop the message forever.
            log.exception("turn %s/%s failed; dead-lettering it", utt.session, utt.turn)
            await settle(delivery, ack=False)

    async def _turn(self, utt: Utterance, delivery: AbstractIncomingMessage) -> None:
        redelivered = bool(delivery.redelivered)
        if await self.finished.seen(utt.session, utt.turn, check_shared=redelivered):
            # Its end went out before the node that ran it died (or this is a duplicate):
            # consumers must never see a second end.
            self.stats["duplicates"] += 1
            log.info("turn %s/%s already ended; acking the redelivery", utt.session, utt.turn)
            await settle(delivery, ack=True)
            return
        session = self._session(utt.session)
        session.seen.append(utt.turn)
        if session.latest is not None:
            session.latest.cancel()  # a newer utterance: the running turn stops first
        turn = Turn(self.gw, self.bus, self.cfg, utt, session, delivery, redelivered)
        session.latest = turn
        task = asyncio.current_task()
        if task is not None:
            self._turn_of[task] = turn
            task.add_done_callback(self._turn_of.pop)
        # Another node may be running this session's previous turn: tell it (it ignores the
        # message when this very turn is its own).
        await self._publish_control(cancel_message(utt.session, by_turn=utt.turn))
        async with session.lock:
            self.stats["turns"] += 1
            log.info(
                "turn %s/%s: answering%s",
                utt.session,
                utt.turn,
                " (redelivered)" if redelivered else "",
            )
            ended = await turn.run()
        if session.latest is turn:
            session.latest = None
        if ended:
            await self.finished.add(utt.session, utt.turn)
            await settle(delivery, ack=True)
        else:
            self.stats["lost"] += 1

    async def _publish_control(self, body: dict[str, Any]) -> None:
        try:
            await self.bus.publish(self.cfg.control_exchange, body["session"], body)
        except Exception as exc:  # best effort: the turn itself does not depend on it
            log.info("could not publish a cancel: %s", exc)

    async def _on_control(self, delivery: AbstractIncomingMessage) -> None:
        try:
            cancel = parse_control(delivery.body)
        except Malformed as exc:
            log.warning("ignoring a malformed control message (%s): %.120r", exc, delivery.body)
            return
        session = self.sessions.get(cancel.session)
        turn = session.latest if session is not None else None
        if turn is None or session is None:
            log.debug("cancel for session %s: no turn running here", cancel.session)
            return
        if cancel.by_turn is not None and cancel.by_turn in session.seen:
            return  # announces a turn this node took itself (maybe this one): not news
        log.info("cancelling turn %s/%s", cancel.session, turn.utt.turn)
        turn.cancel()

    def _session(self, sid: str) -> Session:
        s = self.sessions.get(sid)
        if s is None:
            s = self.sessions[sid] = Session(sid)
            while len(self.sessions) > self.cfg.max_sessions:  # forget the least recent
                old_id, old = next(iter(self.sessions.items()))
                if old.latest is not None or old.lock.locked():
                    break  # never forget a conversation that is running
                del self.sessions[old_id]
        else:
            self.sessions.move_to_end(sid)
        return s


async def run_node(config: GatewayConfig) -> None:
    """``keel node``: until SIGINT/SIGTERM."""
    from keel._signals import until_signalled

    node = Node(config)
    await node.start()
    print(f"keel node consuming {node.cfg.requests_queue} as {node.node_id}", flush=True)
    try:
        await until_signalled()
    finally:
        await node.stop()
