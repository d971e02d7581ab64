"""The upstream simulator, observed over real loopback sockets."""

from __future__ import annotations

import openai

from keel.sim import Simulator, answer_text


def client(sim: Simulator, key: str = "sk-test") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.base_url, api_key=key, max_retries=0)


async def test_non_stream_and_stream_exact_text(sim: Simulator) -> None:
    c = client(sim)
    msgs = [{"role": "user", "content": "hello"}]
    r = await c.chat.completions.create(model="m", messages=msgs)  # type: ignore[arg-type]
    assert r.choices[0].message.content == answer_text("hello")
    stream = await c.chat.completions.create(model="m", messages=msgs, stream=True)  # type: ignore[arg-type]
    text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert text == answer_text("hello")
