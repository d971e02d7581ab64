"""Nothing lost across a crash: a node SIGKILLed mid-turn (the other node answers the turn,
after a ``restart``, with exactly one end), and the broker connection dropped under a node
(it reconnects, the interrupted turn and one sent meanwhile are answered, once each)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from keel.config import parse_config
from keel.node import Node
from keel.sim import answer_text
from keel.testing import SimProcess, spawn_sim
from limits_helpers import RedisServer
from node_helpers import (
    AMQP_URL,
    Listener,
    Names,
    Proxy,
    after_restart,
    node_config,
    one_end,
    said,
    spawn_node,
)

LENGTH = 120  # tokens of each answer: ~1.2 s at 10 ms per token, a turn long enough to kill


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with spawn_sim("--name", "c", "--token-delay", "0.01", "--length", str(LENGTH)) as s:
        yield s


@pytest.fixture
async def names() -> AsyncIterator[tuple[Names, Listener]]:
    n = Names()
    lis = await Listener(n).open()
    try:
        yield n, lis
    finally:
        await lis.close()


async def test_sigkill_mid_turn_the_other_node_answers(
    names: tuple[Names, Listener], sim: SimProcess, tmp_path: Path
) -> None:
    n, lis = names
    cfg = node_config(n, [{"base_url": sim.base_url}])
    one, two = await asyncio.gather(
        asyncio.to_thread(spawn_node, cfg, str(tmp_path)),
        asyncio.to_thread(spawn_node, cfg, str(tmp_path)),
    )
    try:
        await lis.say("k", "t1", "a turn to crash in")
        await lis.until(
            lambda: len([m for m in lis.chat[("k", "t1")] if m["type"] == "segment"]) >= 2
        )
        running = next(p for p in (one, two) if "turn k/t1: answering" in p.output_tail())
        other = two if running is one else one
        running.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(running.proc.wait, 10)
        await lis.until(lambda: lis.ended("k", "t1"))
        assert "turn k/t1: answering (redelivered)" in other.output_tail()
        msgs = lis.chat[("k", "t1")]
        assert [m["type"] for m in msgs].count("restart") == 1
        assert one_end(msgs)["finish_reason"] == "stop"
        assert said(msgs) == answer_text("a turn to crash in", LENGTH)
        before = msgs[: msgs.index(next(m for m in msgs if m["type"] == "restart"))]
        assert before and all(m["type"] == "segment" for m in before)  # the dead node's part
        # The survivor goes on serving.
        await lis.say("k", "t2", "and another [[sim:len=8]]")
        await lis.until(lambda: lis.ended("k", "t2"))
        assert said(lis.chat[("k", "t2")]) == answer_text("and another", 8)
    finally:
        for p in (one, two):
            p.terminate()


async def test_broker_connection_lost_and_back(
    names: tuple[Names, Listener], sim: SimProcess
) -> None:
    n, lis = names
    proxy = await Proxy().start()
    cfg = node_config(n, [{"base_url": sim.base_url}], amqp_url=proxy.url)
    try:
        async with Node(parse_config(cfg)) as node:
            await lis.say("r", "t1", "interrupted by the broker")
            await lis.until(lambda: any(m["type"] == "segment" for m in lis.chat[("r", "t1")]))
            assert node.bus.connection is not None
            await proxy.cut()
            await asyncio.wait_for(node.bus.lost.wait(), 10)
            await lis.say("r2", "t1", "sent while the node was away [[sim:len=10]]")
            await proxy.restore()
            await asyncio.wait_for(node.bus.reconnected.wait(), 20)
            await lis.until(lambda: lis.ended("r", "t1") and lis.ended("r2", "t1"), 30)
            assert node.stats["lost"] >= 1
    finally:
        await proxy.close()
    msgs = lis.chat[("r", "t1")]
    assert one_end(msgs)["finish_reason"] == "stop"
    assert "restart" in [m["type"] for m in msgs]
    assert "".join(m["text"] for m in after_restart(msgs) if m["type"] == "segment") == answer_text(
        "interrupted by the broker", LENGTH
    )
    assert said(lis.chat[("r2", "t1")]) == answer_text("sent while the node was away", 10)
    assert one_end(lis.chat[("r2", "t1")])["finish_reason"] == "stop"


@pytest.mark.skipif(
    os.environ.get("KEEL_TEST_RESTART_BROKER") != "1",
    reason="restarts the machine's RabbitMQ (rabbitmqctl stop_app/start_app): set "
    "KEEL_TEST_RESTART_BROKER=1 where nothing else uses it",
)
async def test_real_broker_restart(sim: SimProcess) -> None:
    """The real thing: the broker itself stopped and started under a running node."""
    n = Names()
    cfg = node_config(n, [{"base_url": sim.base_url}])
    conn = await aio_pika.connect_robust(AMQP_URL, reconnect_interval=0.5)
    ch = await conn.channel()
    events = await ch.declare_exchange(n.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    # Durable, so it keeps what the node publishes while this listener is still reconnecting.
    q = await ch.declare_queue(f"{n.events_exchange}.listener", durable=True)
    await q.bind(events, "#")
    got: dict[tuple[str, str], list[dict[str, Any]]] = {}
    done = asyncio.Event()
    first = asyncio.Event()

    async def on(m: aio_pika.abc.AbstractIncomingMessage) -> None:
        d = orjson.loads(m.body)
        got.setdefault((d["session"], d["turn"]), []).append(d)
        first.set()
        await m.ack()
        if all(
            any(x["type"] == "end" for x in got.get(k, [])) for k in (("b", "t1"), ("b2", "t1"))
        ):
            done.set()

    await q.consume(on)
    try:
        async with Node(parse_config(cfg)) as node:
            await ch.default_exchange.publish(
                aio_pika.Message(orjson.dumps({"session": "b", "turn": "t1", "text": "across a restart"}),
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=n.requests_queue,
            )  # fmt: skip
            await asyncio.wait_for(first.wait(), 10)
            t0 = time.monotonic()
            await asyncio.to_thread(
                subprocess.run, ["rabbitmqctl", "stop_app"], check=True, capture_output=True
            )
            await asyncio.to_thread(
                subprocess.run, ["rabbitmqctl", "start_app"], check=True, capture_output=True
            )
            await asyncio.to_thread(
                subprocess.run, ["rabbitmqctl", "await_startup"], check=True, capture_output=True
            )
            await asyncio.wait_for(node.bus.reconnected.wait(), 30)
            print(f"broker back and node reconnected after {time.monotonic() - t0:.1f} s")
            await ch.default_exchange.publish(
                aio_pika.Message(orjson.dumps({"session": "b2", "turn": "t1", "text": "after it [[sim:len=6]]"}),
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=n.requests_queue,
            )  # fmt: skip
            await asyncio.wait_for(done.wait(), 30)
        t1 = got[("b", "t1")]
        assert one_end(t1)["finish_reason"] == "stop" and "restart" in [m["type"] for m in t1]
        assert said(t1) == answer_text("across a restart", LENGTH)
        assert said(got[("b2", "t1")]) == answer_text("after it", 6)
    finally:
        ch2 = await conn.channel()
        for name in (q.name, n.requests_queue, n.dead_letter_exchange):
            await ch2.queue_delete(name)
        for name in (n.events_exchange, n.tts_exchange, n.control_exchange, n.dead_letter_exchange):
            await ch2.exchange_delete(name)
        await conn.close()


async def test_finished_turns_remembered_across_nodes_with_redis(
    names: tuple[Names, Listener], sim: SimProcess
) -> None:
    """A turn whose end went out, redelivered to another node (as after a crash between the
    end and the ack): with redis_url the other node acks it without a second end."""
    n, lis = names
    server = RedisServer()
    server.start()
    try:
        cfg = node_config(n, [{"base_url": sim.base_url}])
        cfg["redis_url"] = server.url
        async with Node(parse_config(cfg)):
            await lis.say("d", "t1", "once only [[sim:len=5]]")
            await lis.until(lambda: lis.ended("d", "t1"))
        # The same turn again, taken by a consumer that dies without acking: the broker
        # redelivers it, flagged, to the next node.
        await lis.say("d", "t1", "once only [[sim:len=5]]")
        conn = await aio_pika.connect(AMQP_URL)
        ch = await conn.channel()
        q = await ch.get_queue(n.requests_queue)
        assert await q.get(no_ack=False, timeout=5) is not None
        await conn.close()  # unacked: requeued with redelivered=True
        async with Node(parse_config(cfg)) as other:
            async with asyncio.timeout(10):
                while other.stats["duplicates"] == 0:  # noqa: ASYNC110 - a counter, no event
                    await asyncio.sleep(0.01)
        assert len(server.command("KEYS", "keel:node:done:*")) == 1
    finally:
        server.kill()
    assert one_end(lis.chat[("d", "t1")])["finish_reason"] == "stop"
    assert "restart" not in [m["type"] for m in lis.chat[("d", "t1")]]
    assert (await lis.requests.declare()).message_count == 0


async def test_graceful_stop_hands_the_turn_over(
    names: tuple[Names, Listener], sim: SimProcess
) -> None:
    """SIGTERM (Node.stop) mid-answer: no end from the stopping node, no ack; the next node
    answers the turn after a restart, once."""
    n, lis = names
    cfg = parse_config(node_config(n, [{"base_url": sim.base_url}]))
    async with Node(cfg):
        await lis.say("g", "t1", "stopped half way")
        await lis.until(lambda: any(m["type"] == "segment" for m in lis.chat[("g", "t1")]))
    assert not lis.ended("g", "t1")
    async with Node(cfg) as other:
        await lis.until(lambda: lis.ended("g", "t1"))
        assert other.stats["turns"] == 1
    msgs = lis.chat[("g", "t1")]
    assert one_end(msgs)["finish_reason"] == "stop" and "restart" in [m["type"] for m in msgs]
    assert said(msgs) == answer_text("stopped half way", LENGTH)
