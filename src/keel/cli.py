"""The ``keel`` command line: serve, sim, demo, bench.

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


def main() -> None:
    _register()
    app()
