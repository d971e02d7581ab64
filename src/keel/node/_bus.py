"""The worker's side of RabbitMQ (aio-pika): one robust connection, the topology, publishing.

The topology, declared idempotently by every node (names from ``node:``):

* the requests queue (durable) whose rejected messages go to the dead-letter exchange and
  its queue of the same name — malformed requests are parked there, never redelivered;
* the topic exchanges the worker publishes to (chat events, TTS events) and listens on
  (control), routing key = session;
* a queue of this node's own on the control exchange (exclusive, deleted with the node), so
  every node hears every cancel.

Publishing waits for the broker's confirm: a turn is acked only after its ``end`` is known to
be on the broker. A connection lost mid-turn shows as ``BusLost`` (the turn stops without an
ack; the broker redelivers it) — aio-pika's robust connection reconnects and re-declares the
topology and the consumers by itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import orjson
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from keel.config._node import NodeConfig

log = logging.getLogger("keel.node")

Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]


class BusLost(Exception):
    """The broker connection this delivery came on is gone: stop the turn, do not ack."""


def safe_url(url: str) -> str:
    """host:port/vhost of an AMQP URL, without the credentials, for log lines."""
    p = urlsplit(url)
    return f"{p.scheme}://{p.hostname or ''}:{p.port or 5672}{p.path or '/'}"


class Bus:
    def __init__(self, cfg: NodeConfig, node_id: str) -> None:
        self.cfg = cfg
        self.node_id = node_id
        self.url = cfg.amqp_url.get_secret_value()
        self.connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self.requests: AbstractQueue | None = None
        self.control: AbstractQueue | None = None
        self.exchanges: dict[str, AbstractExchange] = {}
        self._tags: list[tuple[AbstractQueue, str]] = []
        self.reconnected = asyncio.Event()  # set at every reconnect (tests, logs)
        self.lost = asyncio.Event()  # set while the connection is down
        self._closing = False

    async def connect(self, retry_for: float = 0.0) -> None:
        """Connect and declare the topology; while the broker does not answer, retry (logged
        once) for up to ``retry_for`` seconds (0: fail at once)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + retry_for
        warned = False
        while True:
            try:
                self.connection = await aio_pika.connect_robust(
                    self.url,
                    reconnect_interval=0.5,
                    client_properties={"connection_name": f"keel-node-{self.node_id}"},
                )
                break
            except (OSError, aio_pika.exceptions.AMQPError) as exc:
                if loop.time() >= until:
                    raise
                if not warned:
                    log.warning(
                        "RabbitMQ at %s not reachable (%s); retrying",
                        safe_url(self.url),
                        type(exc).__name__,
                    )
                    warned = True
                await asyncio.sleep(0.5)
        self.connection.reconnect_callbacks.add(self._on_reconnect)
        self.connection.close_callbacks.add(self._on_close)
        channel = await self.connection.channel(publisher_confirms=True)
        assert isinstance(channel, aio_pika.RobustChannel)
        self._channel = channel
        # The bound on unacked requests is the bound on turns this node runs at once.
        await channel.set_qos(prefetch_count=self.cfg.prefetch)
        cfg = self.cfg
        dlx = await channel.declare_exchange(
            cfg.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        dlq = await channel.declare_queue(cfg.dead_letter_exchange, durable=True)
        await dlq.bind(dlx)
        self.requests = await channel.declare_queue(
            cfg.requests_queue,
            durable=True,
            arguments={"x-dead-letter-exchange": cfg.dead_letter_exchange},
        )
        for name in (cfg.events_exchange, cfg.control_exchange, cfg.tts_exchange):
            self.exchanges[name] = await channel.declare_exchange(
                name, aio_pika.ExchangeType.TOPIC, durable=True
            )
        self.control = await channel.declare_queue(
            f"{cfg.control_exchange}.node.{self.node_id}", exclusive=True, auto_delete=True
        )
        await self.control.bind(self.exchanges[cfg.control_exchange], routing_key="#")

    async def consume(self, on_request: Handler, on_control: Handler) -> None:
        assert self.requests is not None and self.control is not None
        self._tags.append((self.control, await self.control.consume(on_control, no_ack=True)))
        self._tags.append((self.requests, await self.requests.consume(on_request)))

    async def stop_consuming(self) -> None:
        for queue, tag in self._tags:
            try:
                await queue.cancel(tag)
            except Exception:  # the connection may be gone already: nothing to stop
                log.debug("cancelling consumer %s failed", tag, exc_info=True)
        self._tags.clear()

    async def publish(
        self,
        exchange: str,
        key: str,
        body: Mapping[str, Any],
        delivery: AbstractIncomingMessage | None = None,
    ) -> None:
        """Publish and wait for the broker's confirm. With ``delivery``: only while the
        connection that delivered it is alive (after a reconnect the broker has already
        requeued it, and another run of the turn owns its messages)."""
        if delivery is not None and _closed(delivery):
            raise BusLost("the delivery's channel is closed")
        message = aio_pika.Message(
            orjson.dumps(body),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await self.exchanges[exchange].publish(message, routing_key=key, timeout=10)
        except (aio_pika.exceptions.AMQPError, OSError, RuntimeError, TimeoutError) as exc:
            raise BusLost(f"publish failed: {type(exc).__name__}") from None

    async def close(self) -> None:
        self._closing = True
        if self.connection is not None:
            await self.connection.close()
            self.connection = None

    def _on_reconnect(self, *args: Any) -> None:
        log.warning("reconnected to RabbitMQ at %s; consuming again", safe_url(self.url))
        self.lost.clear()
        self.reconnected.set()

    def _on_close(self, *args: Any) -> None:
        exc = args[1] if len(args) > 1 else None
        if exc is not None and not self._closing:
            self.reconnected.clear()
            self.lost.set()
            log.warning("lost the RabbitMQ connection (%s); reconnecting", type(exc).__name__)


def _closed(delivery: AbstractIncomingMessage) -> bool:
    try:
        channel = delivery.channel  # raises once the channel that delivered it is gone
    except aio_pika.exceptions.ChannelInvalidStateError:
        return True
    return bool(getattr(channel, "is_closed", False))


async def settle(delivery: AbstractIncomingMessage, *, ack: bool) -> None:
    """Ack, or reject without requeue (dead-letter); nothing when the channel is gone (the
    broker requeued the message when it went)."""
    if _closed(delivery):
        return
    try:
        if ack:
            await delivery.ack()
        else:
            await delivery.reject(requeue=False)
    except (aio_pika.exceptions.AMQPError, OSError, RuntimeError) as exc:
        log.info("could not settle a delivery: %s", type(exc).__name__)
