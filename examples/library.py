"""keel as a library, runnable as is: a simulated provider in-process, no API key needed.

python examples/library.py
"""

import asyncio

import httpx
import openai

import keel
from keel.sim import Simulator


async def main() -> None:
    sim = Simulator(name="sim")  # stands in for OpenAI, Qwen, ...: deterministic answers
    url = await sim.start("127.0.0.1", 0)
    config = {  # the same keys as keel.yaml (or: keel.Keel.from_config("keel.yaml"))
        "models": {
            "chat": {
                "deployments": [
                    {
                        "name": "primary",
                        "base_url": url,
                        "api_key": "sk-sim",
                        "dialect": "dashscope",
                    }
                ]
            }
        }
    }
    async with keel.Keel.from_config(config) as gw:
        # The directive makes the simulator fail the first attempt with a 500: keel retries.
        done = await gw.chat(
            {"model": "chat", "messages": [{"role": "user", "content": "Hello [[sim:e500*1]]"}]}
        )
        print("chat:  ", done["choices"][0]["message"]["content"])

        # The stream is cut after 5 chunks: keel continues it, the text stays exact, and the
        # terminal chunk says how it was repaired.
        body = {
            "model": "chat",
            "messages": [{"role": "user", "content": "Story [[sim:trunc=5*1]]"}],
        }
        text = ""
        async for chunk in gw.stream(body):
            if chunk["choices"]:
                text += chunk["choices"][0]["delta"].get("content") or ""
                if chunk["choices"][0]["finish_reason"]:
                    print("stream:", text, chunk["choices"][0]["finish_reason"], chunk.get("keel"))

        # The official SDK, in-process: no socket, the same answers as through `keel serve`.
        client = openai.AsyncOpenAI(
            base_url="http://keel/v1",
            api_key="unused",
            http_client=httpx.AsyncClient(transport=gw.transport()),
        )
        try:
            await client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "Hi"}]
            )
        except openai.NotFoundError as exc:
            print("sdk:   ", exc.status_code, exc.code)
        await client.close()

        try:  # every failure is a keel.KeelError with the OpenAI-shaped body
            await gw.chat(
                {"model": "chat", "messages": [{"role": "user", "content": "[[sim:ctx]]"}]}
            )
        except keel.KeelError as exc:
            print("error: ", exc.status, exc.body["error"]["code"])
    await sim.stop()


asyncio.run(main())
