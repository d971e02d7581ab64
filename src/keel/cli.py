"""The ``keel`` command line: serve, sim, demo, bench, node.

Each subcommand lives with the code it drives; this module only wires them together so that
``keel --help`` is one place to read. Imports are lazy to keep start-up fast.
"""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])


def _register() -> None:
    from keel.sim._cli import sim_command

    app.command("sim", help="Run the OpenAI-compatible upstream simulator with fault injection.")(
        sim_command
    )
    from keel.bench._cli import bench_command

    app.command("bench", help="Measure keel against a bare proxy (and the peers).")(bench_command)
    from keel.bench._hedge import hedge_command

    app.command("bench-hedge", help="What hedging buys on a slow first-token tail.")(hedge_command)
    from keel.demo import demo_command

    app.command("demo", help="Simulators + gateway + a workload: direct vs through keel.")(
        demo_command
    )
    from keel.node._cli import node_command

    app.command("node", help="Run the RabbitMQ chat + TTS voice-bot worker.")(node_command)

    from keel.auth._cli import app as keys_app

    app.add_typer(keys_app, name="keys", help="Virtual keys: create, list, show, revoke, rotate.")


@app.command()
def serve(
    config: str = typer.Option(
        None, "--config", "-c", help="YAML config (default: built-in simulator)"
    ),
    host: str = typer.Option(None, help="Bind address (default from config: 127.0.0.1)"),
    port: int = typer.Option(None, help="Port (default from config: 4000; 0 = any free port)"),
    log_level: str = typer.Option("info", help="debug | info | warning | error"),
) -> None:
    """Run the gateway."""
    import logging

    from keel.config import ConfigError, load_config
    from keel.gateway import run

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = load_config(config) if config else None
    except ConfigError as exc:
        typer.echo(f"keel: {exc}", err=True)
        raise typer.Exit(2) from None
    run(cfg, host, port, config)


def main() -> None:
    _register()
    app()
