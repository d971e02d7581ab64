"""``keel sim``: run the simulator as a process.

Prints exactly one line, ``keel-sim listening on http://HOST:PORT/v1``, once it accepts
connections (so a parent started with ``--port 0`` learns the port), then serves until SIGTERM
or SIGINT and exits cleanly.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Annotated

import typer

from keel.sim._answer import DEFAULT_LENGTH


async def _serve(sim_kwargs: dict[str, object], host: str, port: int) -> None:
    from keel.sim._server import Simulator

    sim = Simulator(**sim_kwargs)  # type: ignore[arg-type]
    url = await sim.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"keel-sim listening on {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await sim.stop()


def sim_command(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port; 0 picks a free one.")] = 9101,
    name: Annotated[
        # \[ : a literal bracket for rich, which would take [sim@NAME:...] for markup
        str, typer.Option(help="Name for \\[\\[sim@NAME:...]] targeting and logs.")
    ] = "sim",
    dialect: Annotated[
        str,
        typer.Option(
            help="Error dialect: openai, dashscope, anthropic, azure, deepseek, moonshot, vllm."
        ),
    ] = "openai",
    faults: Annotated[
        str, typer.Option(help='Random faults with probabilities, e.g. "r429=0.1,trunc=0.05".')
    ] = "",
    seed: Annotated[int, typer.Option(help="Seed of the random fault sequence.")] = 0,
    length: Annotated[int, typer.Option(help="Answer length in tokens.")] = DEFAULT_LENGTH,
    token_delay: Annotated[float, typer.Option(help="Seconds between content chunks.")] = 0.0,
    first_token_delay: Annotated[
        float, typer.Option(help="Extra seconds before the first content chunk.")
    ] = 0.0,
    max_concurrency: Annotated[
        int, typer.Option(help="Requests beyond this many in flight get a 429 (0 = no limit).")
    ] = 0,
    rate_limit: Annotated[
        int, typer.Option(help="Requests per --rate-window beyond which answers are 429 (0 = off).")
    ] = 0,
    rate_window: Annotated[float, typer.Option(help="Seconds of one --rate-limit window.")] = 60.0,
    rate_sliding: Annotated[
        bool,
        typer.Option(
            "--rate-sliding/--rate-fixed",
            help="--rate-limit over a sliding window (exact retry hints) instead of fixed ones.",
        ),
    ] = False,
    wall_wording: Annotated[
        str,
        typer.Option(
            help="How the --max-concurrency / --rate-limit 429s read: default (the simulator's "
            "own, naming the limit), openai (retry-after), dashscope (no hint), bare (a proxy's "
            "text '429 Too Many Requests')."
        ),
    ] = "default",
    latency: Annotated[
        float, typer.Option(help="Extra seconds before every successful answer.")
    ] = 0.0,
    key_faults: Annotated[
        str, typer.Option(help='Persistent faults per API key, e.g. "sk-dead=auth,sk-b=quota".')
    ] = "",
    keys: Annotated[
        str, typer.Option(help="Comma-separated allowed API keys (others get 401); empty = any.")
    ] = "",
    models: Annotated[
        str, typer.Option(help="Comma-separated model ids listed by /v1/models.")
    ] = "sim-model",
    audio_chunk: Annotated[
        int, typer.Option(help="/v1/audio/speech: bytes per audio chunk.")
    ] = 1024,
    audio_delay: Annotated[
        float, typer.Option(help="/v1/audio/speech: seconds before each chunk after the first.")
    ] = 0.0,
) -> None:
    """Run the OpenAI-compatible upstream simulator with fault injection."""
    kwargs: dict[str, object] = {
        "name": name,
        "dialect": dialect,
        "faults": faults,
        "seed": seed,
        "length": length,
        "token_delay": token_delay,
        "first_token_delay": first_token_delay,
        "max_concurrency": max_concurrency,
        "rate_limit": rate_limit,
        "rate_window": rate_window,
        "rate_sliding": rate_sliding,
        "wall_wording": wall_wording,
        "latency": latency,
        "key_faults": key_faults,
        "keys": keys,
        "models": [m.strip() for m in models.split(",") if m.strip()],
        "audio_chunk": audio_chunk,
        "audio_delay": audio_delay,
    }
    try:
        if sys.platform != "win32":
            import uvloop

            uvloop.run(_serve(kwargs, host, port))
        else:
            asyncio.run(_serve(kwargs, host, port))
    except ValueError as e:  # bad --faults / --dialect / --key-faults
        typer.echo(f"keel sim: {e}", err=True)
        raise typer.Exit(2) from None
