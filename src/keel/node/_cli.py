"""``keel node``: run the voice-bot worker (or ``--demo``: a scripted conversation against a
simulated provider with the original worker's faults)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any

import typer


def node_command(
    config: str = typer.Option(None, "--config", "-c", help="YAML config with a node: section"),
    demo: bool = typer.Option(False, "--demo", help="A scripted conversation on simulators"),
    amqp_url: str = typer.Option(
        "amqp://guest:guest@127.0.0.1:5672/", help="--demo: the broker to use"
    ),
    log_level: str = typer.Option("info", help="debug | info | warning | error"),
) -> None:
    """Run the RabbitMQ chat + TTS voice-bot worker on keel's engine."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if demo:
        from keel.node._demo import run_demo

        raise typer.Exit(_run(run_demo(amqp_url)))
    from keel.config import ConfigError, load_config
    from keel.node._node import run_node

    if not config:
        typer.echo("keel node: --config is required (or --demo)", err=True)
        raise typer.Exit(2)
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        typer.echo(f"keel: {exc}", err=True)
        raise typer.Exit(2) from None
    if cfg.node is None:
        typer.echo(f"keel node: {config} has no node: section", err=True)
        raise typer.Exit(2)
    _run(run_node(cfg))


def _run(coro: Coroutine[Any, Any, int | None]) -> int:
    if sys.platform != "win32":
        import uvloop

        result = uvloop.run(coro)
    else:
        result = asyncio.run(coro)
    return int(result or 0)
