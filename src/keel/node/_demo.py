# ruff: noqa: RUF001 - the conversation is in Chinese
"""``keel node --demo``: the voice bot's chat node, on a broker, against a simulated Qwen with
the faults that crashed the original worker (hint-less 429 "Too many requests in route",
"Output data may contain inappropriate content" mid-answer) and a simulated TTS. A scripted
conversation, printed as a person would follow it, with the time from barge-in to silence.

Uses its own uniquely named queue and exchanges on the broker and deletes them at the end.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage

from keel.config import parse_config
from keel.node._bus import safe_url
from keel.node._node import Node
from keel.sim import Simulator, answer_text

SCRIPT: list[tuple[str, str | None]] = [
    # (what the child says, what happens)
    ("你可以教我九九乘法口诀表吗？", None),
    (
        "再说一遍好吗？[[sim:r429_ds*2]]",
        "the provider answers 429 'Too many requests in route' twice",
    ),
    ("给我讲个故事吧。[[sim:inspect_mid=8]]", "the provider's moderation stops the answer mid-way"),
    ("讲一个很长很长的故事。[[sim:len=300]]", "the child interrupts after the third sentence"),
    ("好的，谢谢你！", None),
]
BARGE_IN = 3  # the turn interrupted, after its third segment


def _p(text: str) -> None:
    print(text, flush=True)


async def run_demo(amqp_url: str) -> int:
    u = uuid.uuid4().hex[:8]
    names = {
        "requests_queue": f"keel.demo.{u}.requests",
        "events_exchange": f"keel.demo.{u}.events",
        "control_exchange": f"keel.demo.{u}.control",
        "tts_exchange": f"keel.demo.{u}.tts",
        "dead_letter_exchange": f"keel.demo.{u}.dead",
    }
    qwen = Simulator(
        name="qwen", dialect="dashscope", token_delay=0.02, faults="r429_ds=0.2", seed=7
    )
    tts = Simulator(name="tts", audio_chunk=960, audio_delay=0.02)
    await qwen.start()
    await tts.start()
    cfg = parse_config(
        {
            "retry": {"backoff_base": 0.05, "backoff_cap": 0.5},
            "models": {
                "chat": {
                    "deployments": [
                        {"name": "qwen-plus", "base_url": qwen.base_url, "dialect": "dashscope"}
                    ]
                },
                "tts": {"deployments": [{"name": "tts", "base_url": tts.base_url}]},
            },
            "node": {
                "amqp_url": amqp_url,
                "system": "You are a patient tutor for children.",
                "tts": {"model": "tts", "voice": "alloy", "format": "pcm"},
                "max_segment_chars": 40,
                **names,
            },
        }
    )
    _p(
        f"keel node demo: broker {safe_url(amqp_url)}, simulated Qwen (with 20 % hint-less 429s) and TTS"
    )
    ok = True
    try:
        conn = await aio_pika.connect(amqp_url)
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        _p(f"cannot reach RabbitMQ at {safe_url(amqp_url)}: {type(exc).__name__}")
        await qwen.stop()
        await tts.stop()
        return 2
    try:
        async with conn:
            async with Node(cfg) as node:
                ok = await _conversation(conn, names, qwen, tts)
            _p(
                f"\nnode: {node.stats['turns']} turns, {node.stats['lost']} lost; upstream "
                f"attempts: {len(qwen.log)} chat, {len(tts.log)} speech"
            )
            ch = await conn.channel()
            await ch.queue_delete(names["requests_queue"])
            await ch.queue_delete(names["dead_letter_exchange"])
            for key in (
                "events_exchange",
                "tts_exchange",
                "control_exchange",
                "dead_letter_exchange",
            ):
                await ch.exchange_delete(names[key])
    finally:
        await qwen.stop()
        await tts.stop()
    return 0 if ok else 1


async def _conversation(
    conn: aio_pika.abc.AbstractConnection, names: dict[str, str], qwen: Simulator, tts: Simulator
) -> bool:
    ch = await conn.channel()
    inbox: asyncio.Queue[tuple[str, dict[str, Any], float]] = asyncio.Queue()
    for key in ("events_exchange", "tts_exchange"):
        ex = await ch.declare_exchange(names[key], aio_pika.ExchangeType.TOPIC, durable=True)
        q = await ch.declare_queue(exclusive=True, auto_delete=True)
        await q.bind(ex, "kid-1")

        async def on(m: AbstractIncomingMessage, key: str = key) -> None:
            inbox.put_nowait((key, orjson.loads(m.body), time.monotonic()))

        await q.consume(on, no_ack=True)
    control = await ch.declare_exchange(
        names["control_exchange"], aio_pika.ExchangeType.TOPIC, durable=True
    )
    ok = True
    for i, (text, note) in enumerate(SCRIPT):
        turn = f"t{i + 1}"
        _p("")
        _p(f"👧  {text.split('[[')[0]}" + (f"   ({note})" if note else ""))
        body = orjson.dumps({"session": "kid-1", "turn": turn, "text": text})
        await ch.default_exchange.publish(
            aio_pika.Message(body), routing_key=names["requests_queue"]
        )
        t0 = time.monotonic()
        segments: list[str] = []
        audio = 0
        ends: dict[str, dict[str, Any]] = {}
        cancelled_at: float | None = None
        while len(ends) < 2:
            key, m, at = await asyncio.wait_for(inbox.get(), 30)
            if m.get("turn") != turn:
                continue
            if m["type"] == "segment":
                segments.append(m["text"])
                _p(f"🤖  {m['text']}   (+{(at - t0) * 1000:.0f} ms)")
                if i == BARGE_IN and len(segments) == 3:
                    _p("👧  (interrupts: 等一下！)")
                    cancelled_at = time.monotonic()
                    await control.publish(
                        aio_pika.Message(orjson.dumps({"type": "cancel", "session": "kid-1"})),
                        routing_key="kid-1",
                    )
            elif m["type"] == "audio":
                audio += len(base64.b64decode(m["data"]))
            elif m["type"] == "end":
                ends[key] = {**m, "at": at}
        chat, speech = ends["events_exchange"], ends["tts_exchange"]
        why = chat["finish_reason"]
        detail = f": {chat['error']['message']}" if chat.get("error") else ""
        tries = [e for e in qwen.log if e.prompt == text.split("[[")[0].strip()[:80]]
        faults = [e.fault for e in tries if e.fault]
        _p(
            f"    [end: {why}{detail}; {audio:,} bytes of audio, speech end: "
            f"{speech['finish_reason']}; {len(tries)} upstream attempt(s)"
            + (f", upstream faults: {', '.join(faults)}]" if faults else "]")
        )
        answer = answer_text(text, 300 if i == BARGE_IN else 24)
        said = "".join(segments)
        if why == "stop":
            ok = ok and said == answer
        elif why in ("content_filter", "cancelled"):
            ok = ok and answer.startswith(said)
        else:
            ok = False
        if cancelled_at is not None:
            closed = await _closed_after(qwen, tts, cancelled_at)
            _p(
                f"    barge-in → silence: end on the bus after {(chat['at'] - cancelled_at) * 1000:.1f} ms, "
                f"upstream LLM and TTS connections closed after {closed * 1000:.1f} ms"
            )
            ok = ok and why == "cancelled" and closed <= 0.1
    return ok


async def _closed_after(qwen: Simulator, tts: Simulator, since: float) -> float:
    """The last close, after ``since``, of an upstream connection that was open at ``since``."""

    def settled(log: list[Any]) -> bool:
        return all(e.t_close is not None for e in log)

    await qwen.wait_for(settled)
    await tts.wait_for(settled)
    closes = [e.t_close - since for e in (*qwen.log, *tts.log) if e.t_close and e.t_close > since]
    return max(closes, default=0.0)
