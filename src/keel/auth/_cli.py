"""``keel keys``: virtual keys from the command line, straight on the key database (the
config's ``database_url``, or the SQLite file next to the config). Running gateways hear of
every change (Postgres NOTIFY, Redis pub/sub when ``redis_url`` is set, and their poll)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import typer

from keel.auth._store import KeySpec, KeyStore, StoreError, public

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])

_state: dict[str, Any] = {}


@app.callback()
def keys(
    config: Annotated[str, typer.Option("--config", "-c", help="The gateway's YAML config.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")] = False,
) -> None:
    """Create, list, show, revoke and rotate virtual keys."""
    _state["config"] = config
    _state["json"] = as_json


def _run(work: Callable[[KeyStore], Awaitable[Any]], write: bool = False) -> Any:
    from keel.auth._service import publish
    from keel.config import ConfigError, load_config

    try:
        cfg = load_config(_state["config"])
    except ConfigError as exc:
        typer.echo(f"keel: {exc}", err=True)
        raise typer.Exit(2) from None
    assert cfg.database_url is not None

    async def main() -> Any:
        store = KeyStore(cfg.database_url or "")
        try:
            if not await store.open(create=True):
                return None
            result = await work(store)
            if write:
                await publish(cfg)
            return result
        finally:
            await store.close()

    try:
        return asyncio.run(main())
    except StoreError as exc:
        typer.echo(f"keel: {exc}", err=True)
        raise typer.Exit(1) from None


def _show(row: dict[str, Any], key: str | None = None) -> None:
    data = public(row)
    if _state["json"]:
        typer.echo(json.dumps({**data, "key": key} if key else data))
        return
    if key:
        typer.echo(key)
        typer.echo("  (shown once: keel stores only a hash of it)", err=True)
    budget = (
        f"${data['budget_usd']:g}/{data['budget_period']}, spent ${data['spend_usd']:.6f}"
        if data["budget_usd"] is not None
        else "no budget"
    )
    limits = ", ".join(f"{k} {data[k]}" for k in ("rpm", "tpm", "max_concurrency") if data[k])
    typer.echo(
        f"{data['id']}  {data['name']}  {data['status']}  "
        f"models: {','.join(data['models']) if data['models'] else 'all'}  "
        f"{limits or 'no limits'}  {budget}"
    )


@app.command()
def create(
    name: Annotated[str, typer.Option(help="Who the key is for (logs, metrics, errors).")],
    models: Annotated[str, typer.Option(help="Comma-separated model groups (default: all).")] = "",
    rpm: Annotated[int | None, typer.Option(help="Requests per minute.", min=1)] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute.", min=1)] = None,
    max_concurrency: Annotated[int | None, typer.Option(help="Requests at once.", min=1)] = None,
    budget_usd: Annotated[float | None, typer.Option(help="Spend cap in USD.", min=0)] = None,
    budget_period: Annotated[str, typer.Option(help="day | week | month | total")] = "month",
    expires: Annotated[str, typer.Option(help="Lifetime: 90d, 12h, 30m, …")] = "",
) -> None:
    """Create a key and print it, once."""
    body: dict[str, Any] = {"name": name, "budget_period": budget_period}
    if models:
        body["models"] = models
    for k, v in (
        ("rpm", rpm),
        ("tpm", tpm),
        ("max_concurrency", max_concurrency),
        ("budget_usd", budget_usd),
        ("expires", expires),
    ):
        if v is not None and v != "":
            body[k] = v
    try:
        spec = KeySpec.from_json(body)
    except StoreError as exc:
        typer.echo(f"keel: {exc}", err=True)
        raise typer.Exit(2) from None

    from keel.config import load_config

    cfg = load_config(_state["config"])
    unknown = [m for m in spec.models or () if m not in cfg.models]
    if unknown:
        typer.echo(f"keel: unknown model group(s): {', '.join(unknown)}", err=True)
        raise typer.Exit(2)
    row, key = _run(lambda s: s.create_key(spec, reserved=list(cfg.clients)), write=True)
    _show(row, key)


@app.command("list")
def list_keys() -> None:
    """Every key (never the key itself)."""
    rows = _run(lambda s: s.list_keys()) or []
    if _state["json"]:
        typer.echo(json.dumps([public(r) for r in rows]))
        return
    for r in rows:
        _show(r)


@app.command()
def show(key_id: Annotated[str, typer.Argument(help="The key's id (key_…).")]) -> None:
    """One key, with its spend."""
    _show(_run(lambda s: s.get_key(key_id)))


@app.command()
def revoke(key_id: Annotated[str, typer.Argument(help="The key's id (key_…).")]) -> None:
    """Revoke a key: refused by every gateway within a second."""
    _show(_run(lambda s: s.revoke_key(key_id), write=True))


@app.command()
def rotate(key_id: Annotated[str, typer.Argument(help="The key's id (key_…).")]) -> None:
    """A new secret for the key (same limits and spend); the old one stops working."""
    row, key = _run(lambda s: s.rotate_key(key_id), write=True)
    _show(row, key)
