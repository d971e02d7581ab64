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


def _version(value: bool) -> None:
    if value:
        from keel import __version__

        typer.echo(f"keel {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_version, help="Print keel's version."
    ),
) -> None:
    """A resilient, OpenAI-compatible LLM gateway and library."""


def _fail(message: str) -> typer.Exit:
    """A start-up mistake: one line on stderr, exit code 2, no traceback."""
    typer.echo(f"keel: {message}", err=True)
    return typer.Exit(2)


@app.command()
def serve(
    config: str = typer.Option(
        None, "--config", "-c", help="YAML config (default: built-in simulator)"
    ),
    host: str = typer.Option(None, help="Bind address (default from config: 127.0.0.1)"),
    port: int = typer.Option(None, help="Port (default from config: 4000; 0 = any free port)"),
    log_level: str = typer.Option("info", help="debug | info | warning | error"),
    log_format: str = typer.Option(
        None, help="text | json: one JSON object per line (default from config: text)"
    ),
) -> None:
    """Run the gateway."""
    from keel.config import ConfigError, load_config
    from keel.gateway import run
    from keel.gateway._serve import StartupError
    from keel.telemetry import missing, wanted
    from keel.telemetry._logs import setup

    try:
        cfg = load_config(config) if config else None
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    try:
        setup(log_level, log_format or (cfg.logging.format if cfg is not None else "text"))
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if cfg is not None and wanted(cfg.telemetry) and (why := missing()):
        raise _fail(why)
    try:
        run(cfg, host, port, config)
    except StartupError as exc:
        raise _fail(str(exc)) from None


def main() -> None:
    _register()
    app()
