"""Real RabbitMQ for the voice-bot worker's tests: uniquely named queues and exchanges per test
(deleted afterwards), a listener that records every message the worker publishes, and the
checks every turn must pass. No mocks: the broker on 127.0.0.1:5672 (``KEEL_TEST_AMQP_URL``
to point elsewhere), the simulators as upstreams. Without a broker the tests fail — loudly."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import sys
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import orjson
import pytest
import yaml

from keel.sim import answer_text, audio_bytes
from keel.testing import ListeningProcess, spawn_listening

AMQP_URL = os.environ.get("KEEL_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def require_broker(url: str = AMQP_URL) -> None:
    p = urlsplit(url)
    try:
        socket.create_connection((p.hostname or "127.0.0.1", p.port or 5672), timeout=2).close()
    except OSError as exc:
        pytest.fail(
            f"RabbitMQ is not reachable at {p.hostname}:{p.port or 5672} ({exc}); the node tests "
            "need a real broker (.ci/run starts one when none answers)",
            pytrace=False,
        )


class Names:
    """The bus names of one test: unique, so tests never touch a real deployment's."""

    def __init__(self) -> None:
        u = f"keeltest.{uuid.uuid4().hex[:10]}"
        self.requests_queue = f"{u}.requests"
        self.events_exchange = f"{u}.events"
        self.control_exchange = f"{u}.control"
        self.tts_exchange = f"{u}.tts"
        self.dead_letter_exchange = f"{u}.dead"

    def node(self) -> dict[str, str]:
        return dict(vars(self))


def node_config(
    names: Names,
    llm: list[dict[str, Any]],
    tts: list[dict[str, Any]] | None = None,
    amqp_url: str = AMQP_URL,
    **node: Any,
) -> dict[str, Any]:
    models: dict[str, Any] = {"chat": {"deployments": llm}}
    section: dict[str, Any] = {"amqp_url": amqp_url, "model": "chat", **names.node()}
    if tts is not None:
        models["tts"] = {"deployments": tts}
        section["tts"] = {"model": "tts", "voice": "alloy", "format": "pcm"}
    section.update(node)
    return {
        "retry": {"backoff_base": 0.01, "backoff_cap": 0.05},
        "timeouts": {"first_token": 5, "idle": 2},
        "models": models,
        "node": section,
    }


class Listener:
    """Everything published on the worker's exchanges, per (session, turn), in order."""

    def __init__(self, names: Names) -> None:
        self.names = names
        self.chat: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        self.tts: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        self.seq: dict[str, list[dict[str, Any]]] = defaultdict(list)  # protocol seq, by session
        self.times: dict[int, float] = {}  # id(message) → loop time it arrived
        self._changed = asyncio.Condition()
        self.conn: aio_pika.abc.AbstractConnection | None = None

    async def open(self, url: str = AMQP_URL) -> Listener:
        require_broker(url)
        self.conn = await aio_pika.connect(url)
        self.ch = await self.conn.channel()
        n = self.names
        # Declared here too (idempotent, the worker's shapes), so the listener's queues are
        # bound before the worker publishes anything.
        for name in (n.events_exchange, n.tts_exchange, n.control_exchange):
            ex = await self.ch.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
            if name == n.control_exchange:
                self.control = ex
                continue
            q = await self.ch.declare_queue(exclusive=True, auto_delete=True)
            await q.bind(ex, "#")
            await q.consume(self._on_tts if name == n.tts_exchange else self._on_chat, no_ack=True)
        dlx = await self.ch.declare_exchange(
            n.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        self.dead = await self.ch.declare_queue(n.dead_letter_exchange, durable=True)
        await self.dead.bind(dlx)
        self.requests = await self.ch.declare_queue(
            n.requests_queue, durable=True, arguments={"x-dead-letter-exchange": dlx.name}
        )
        return self

    async def _note(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _on_chat(self, m: aio_pika.abc.AbstractIncomingMessage) -> None:
        d = orjson.loads(m.body)
        self.times[id(d)] = asyncio.get_running_loop().time()
        if "type" in d:
            self.chat[(d["session"], d["turn"])].append(d)
        else:
            self.seq[d["session"]].append(d)
        await self._note()

    async def _on_tts(self, m: aio_pika.abc.AbstractIncomingMessage) -> None:
        d = orjson.loads(m.body)
        self.times[id(d)] = asyncio.get_running_loop().time()
        self.tts[(d["session"], d["turn"])].append(d)
        await self._note()

    async def until(self, pred: Callable[[], bool], timeout: float = 20.0) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(pred)

    def ended(self, session: str, turn: str, tts: bool = False) -> bool:
        chat = any(m["type"] == "end" for m in self.chat[(session, turn)])
        return chat and (not tts or any(m["type"] == "end" for m in self.tts[(session, turn)]))

    async def say(self, session: str, turn: str, text: str) -> None:
        await self.raw(orjson.dumps({"session": session, "turn": turn, "text": text}))

    async def raw(self, body: bytes) -> None:
        await self.ch.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=self.names.requests_queue,
        )

    async def cancel(self, session: str) -> None:
        body = orjson.dumps({"type": "cancel", "session": session})
        await self.control.publish(aio_pika.Message(body), routing_key=session)

    async def close(self) -> None:
        if self.conn is None:
            return
        n = self.names
        ch = await self.conn.channel()
        for q in (n.requests_queue, n.dead_letter_exchange):
            await ch.queue_delete(q)
        for ex in (n.events_exchange, n.tts_exchange, n.control_exchange, n.dead_letter_exchange):
            await ch.exchange_delete(ex)
        await self.conn.close()
        self.conn = None


def after_restart(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a consumer keeps: the messages after the last ``restart``."""
    last = max((i for i, m in enumerate(msgs) if m["type"] == "restart"), default=-1)
    return msgs[last + 1 :]


def one_end(msgs: list[dict[str, Any]]) -> dict[str, Any]:
    ends = [m for m in msgs if m["type"] == "end"]
    assert len(ends) == 1, f"{len(ends)} ends: {ends}"
    assert msgs[-1] is ends[0], "the end is the turn's last message"
    return ends[0]


def said(msgs: list[dict[str, Any]]) -> str:
    segs = [m for m in after_restart(msgs) if m["type"] == "segment"]
    assert [m["seq"] for m in segs] == list(range(len(segs)))
    return "".join(m["text"] for m in segs)


def check_turn(
    lis: Listener, session: str, turn: str, text: str, tts: bool = False, length: int = 24
) -> str:
    """One end; the segments concatenate to exactly the answer (a prefix of it when output
    moderation stopped it); with TTS: one TTS end with the chat's reason and every segment's
    audio byte-exact. Returns the finish_reason."""
    msgs = lis.chat[(session, turn)]
    end = one_end(msgs)
    answer = answer_text(text, length)
    got = said(msgs)
    reason = end["finish_reason"]
    if reason == "stop":
        assert got == answer
    elif reason == "content_filter":
        assert answer.startswith(got) and got != answer
    else:
        raise AssertionError(f"turn {session}/{turn} ended {reason}: {end['error']}")
    if tts:
        tmsgs = lis.tts[(session, turn)]
        tend = one_end(tmsgs)
        assert tend["finish_reason"] == reason, tend
        segs = [m["text"] for m in after_restart(msgs) if m["type"] == "segment"]
        audio: dict[int, bytes] = defaultdict(bytes)
        kept = after_restart(tmsgs)
        assert [m["seq"] for m in kept] == list(range(len(kept)))
        for m in kept[:-1]:
            audio[m["segment"]] += base64.b64decode(m["data"])
        assert set(audio) == {k for k, s in enumerate(segs) if s.strip()}
        for k, data in audio.items():
            assert data == audio_bytes(segs[k]), f"segment {k} audio differs"
        order = [m["segment"] for m in kept[:-1]]
        assert order == sorted(order), "audio in segment order"
    return str(reason)


def spawn_node(config: dict[str, Any], workdir: str) -> ListeningProcess:
    """``keel node`` in a subprocess (for killing it)."""
    path = os.path.join(workdir, f"node-{uuid.uuid4().hex[:6]}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    cmd = [sys.executable, "-m", "keel", "node", "--config", path]
    return spawn_listening(cmd, r"keel node consuming \S+ as (\S+)")


class Proxy:
    """A TCP proxy in front of the broker that can be cut (every connection dropped, no new
    ones) and restored on the same port: the node sees exactly what a broker restart looks
    like from its side — the connection gone, then a broker that answers again."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5672)) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, uw}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))
        self._writers -= {writer, uw}

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()
        self._server = None

    async def restore(self) -> None:
        await self.start()

    async def close(self) -> None:
        if self._server is not None:
            await self.cut()
