"""Running the gateway: the aiohttp runner, signals, and the built-in simulated model."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from keel._signals import Signals
from keel.config import GatewayConfig, ServerConfig, parse_config
from keel.engine._keel import Keel
from keel.gateway._admin import reload_now
from keel.gateway._app import KEEL_KEY, create_app
from keel.gateway._http import SHUTDOWN_KEY, ConnectionPolicy, KeelProtocol, KeelSite, Shutdown

log = logging.getLogger("keel")


async def start_site(
    app: web.Application, host: str, port: int, settings: ServerConfig | None = None
) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host:port`` (0: a free port, returned) with the connection limits of
    ``settings`` (default: the gateway config's ``server``)."""
    if settings is None:
        keel = app.get(KEEL_KEY)
        settings = keel.config.server if keel is not None else ServerConfig()
    policy = ConnectionPolicy(
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        keepalive_timeout=settings.keepalive_timeout,
        max_connections=settings.max_connections or default_max_connections(),
    )
    if SHUTDOWN_KEY not in app:  # before setup(): a started app is frozen
        app[SHUTDOWN_KEY] = Shutdown()
    # handler_cancellation: a client that leaves cancels its handler, which closes the
    # upstream connection in the handler's `finally` within a loop iteration. The shutdown
    # timeout is only the last grace: drain() has done the waiting by then.
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=DRAIN_GRACE
    )
    await runner.setup()
    site = KeelSite(
        runner,
        host,
        port,
        policy=policy,
        handler_kwargs={"access_log": None},
        backlog=4096,
        reuse_address=True,
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()  # the engine's session closes: nothing is left unclosed
        raise StartupError(f"cannot listen on {_shown(host)}:{port}: {_why(exc)}") from None
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site.port


class StartupError(RuntimeError):
    """A mistake at start-up (a port in use, a host that does not resolve): ``keel serve``
    prints it as one line and exits with code 2."""


def _shown(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _why(exc: OSError) -> str:
    """The reason of a bind failure in words (gaierror's strerror names the resolver's)."""
    import errno
    import socket

    if isinstance(exc, socket.gaierror):
        return f"the host does not resolve ({exc.strerror})"
    if exc.errno == errno.EADDRINUSE:
        return "the address is already in use (another process listens there)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "the address is not one of this machine's"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    return exc.strerror or str(exc)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit (a server's connections are
    descriptors; distributions default the soft limit to 1024); returns (soft, hard)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return -1, -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # e.g. macOS caps it below the hard limit
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft, hard


def default_max_connections() -> int:
    """Half the open-file limit: each client connection being proxied holds an upstream
    connection too, and the process needs a few descriptors of its own."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 4096
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(16, (soft - 64) // 2)


# After drain_timeout, how long the requests still running have to end (cancelled, they write
# their error frame and close upstream) before their connections are closed regardless.
DRAIN_GRACE = 1.0
_POLL = 0.05  # seconds between two looks at the requests in flight while draining


def _connections(runner: web.AppRunner) -> list[KeelProtocol]:
    server = runner.server
    return [c for c in (server.connections if server else []) if isinstance(c, KeelProtocol)]


async def _until_idle(runner: web.AppRunner, deadline: float) -> int:
    """Wait until no request is in flight or ``deadline``; returns how many still are.
    (Polling, only while shutting down, keeps a hook off every request's path.)"""
    loop = asyncio.get_running_loop()
    while True:
        busy = sum(1 for c in _connections(runner) if c.busy)
        if not busy or loop.time() >= deadline:
            return busy
        await asyncio.sleep(min(_POLL, max(0.0, deadline - loop.time())))


async def drain(runner: web.AppRunner, drain_timeout: float) -> None:
    """Stop gracefully: no new connections, idle ones closed, requests in flight get
    ``drain_timeout`` seconds to finish; then the rest are cancelled with ``Shutdown.expired`` set
    (so that their streams end with an error frame and [DONE]) and get DRAIN_GRACE to end."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    app = runner.app
    shutdown = app.get(SHUTDOWN_KEY) or Shutdown()
    shutdown.draining = True
    for site in list(runner.sites):
        await site.stop()  # stop listening: new connections are refused by the kernel
    server = runner.server
    for conn in server.connections if server is not None else []:
        # Idle keep-alive connections close now, busy ones after their request; WebSockets
        # keep reading until their requests are done (KeelProtocol.drain).
        if isinstance(conn, KeelProtocol):
            conn.drain()
        else:
            conn.close()
    busy = sum(1 for c in _connections(runner) if c.busy)
    log.warning(
        "shutting down: %d request%s in flight, waiting up to %gs (server.drain_timeout); "
        "signal again to stop at once",
        busy,
        "" if busy == 1 else "s",
        drain_timeout,
    )
    left = await _until_idle(runner, started + drain_timeout)
    if left:
        log.warning(
            "drain timeout: ending %d request%s still in flight", left, "" if left == 1 else "s"
        )
        shutdown.expired = True
        for c in _connections(runner):
            if c.busy:
                c.cancel_handler()
        left = await _until_idle(runner, loop.time() + DRAIN_GRACE)
    await runner.cleanup()
    log.warning(
        "drained in %.1fs%s",
        loop.time() - started,
        f" ({left} request{'' if left == 1 else 's'} cut off)" if left else "",
    )


async def stop_now(runner: web.AppRunner) -> None:
    """Stop without waiting: every connection closes, handlers are cancelled."""
    shutdown = runner.app.get(SHUTDOWN_KEY)
    if shutdown is not None:
        shutdown.draining = shutdown.expired = True
    for c in _connections(runner):
        c.force_close()
    await runner.cleanup()


# Young objects allowed before a generation-0 collection (CPython's default: 700).
GC_GEN0_THRESHOLD = 10_000


def tune_gc() -> None:
    """Collector settings for a long-running server, applied once it is up.

    * ``gc.freeze()``: the ~60k objects of start-up (modules, config models, the app) move to
      the permanent generation, so a full collection no longer walks them: each took ~35 ms
      (a latency spike for every request in flight) and they were half of keel's GC time.
    * A generation-0 threshold of 10,000 instead of 700: almost everything a request allocates
      is freed by reference counting before a collection sees it; what a collection walks is
      mostly the objects of the requests still in flight, whatever the threshold. Fewer
      collections, same work each: GC went from ~8 % to ~1 % of keel's CPU under load.
      Reference cycles are still collected, just in larger batches.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


async def builtin_config() -> tuple[GatewayConfig, list[Any]]:
    """No config given: serve model ``chat`` from two in-process simulators, so that a
    newcomer's first curl works without any API key."""
    from keel.sim import Simulator

    sims = [Simulator(name="sim-a"), Simulator(name="sim-b")]
    urls = [await s.start("127.0.0.1", 0) for s in sims]
    # An admin key, so that the status page and the admin actions work here too (a fault a
    # prompt provokes — [[sim:quota]] — benches a simulator's key; /admin/…/reset undoes it).
    admin_key = os.environ.get(ADMIN_KEY_ENV) or secrets.token_urlsafe(18)
    config = parse_config(
        {
            "server": {"admin_key": admin_key},
            "models": {
                "chat": {
                    "deployments": [
                        {"base_url": url, "api_key": "sk-sim", "model": "sim", "name": s.name}
                        for url, s in zip(urls, sims, strict=True)
                    ]
                }
            }
        }
    )
    return config, sims


ADMIN_KEY_ENV = "KEEL_ADMIN_KEY"  # the built-in config's admin key (else one per run)


@contextlib.contextmanager
def reload_on_sighup(keel: Keel) -> Iterator[None]:
    """SIGHUP re-reads the config file (``POST /admin/reload``), streams in flight untouched."""
    loop = asyncio.get_running_loop()
    hup = getattr(signal, "SIGHUP", None)
    try:
        if hup is not None:
            loop.add_signal_handler(hup, reload_now, keel)
    except NotImplementedError:  # pragma: no cover - Windows
        hup = None
    try:
        yield
    finally:
        if hup is not None:
            loop.remove_signal_handler(hup)


async def serve(
    config: GatewayConfig | None,
    host: str | None,
    port: int | None,
    config_path: str | Path | None = None,
) -> None:
    sims: list[Any] = []
    soft, hard = raise_open_file_limit()
    if config is None:
        config, sims = await builtin_config()
        log.warning("no --config given: serving model 'chat' from two built-in simulators")
    host = host or config.server.host
    port = config.server.port if port is None else port
    app = create_app(config)
    keel = app[KEEL_KEY]
    keel.config_path = Path(config_path) if config_path is not None else None
    with Signals() as signals, reload_on_sighup(keel):
        try:
            runner, bound = await start_site(app, host, port, config.server)
        except BaseException:
            for s in sims:
                await s.stop()
            raise
        tune_gc()
        shown = _shown(host)
        cap = config.server.max_connections or default_max_connections()
        log.info("open-file limit %d (hard %d); at most %d client connections", soft, hard, cap)
        if soft > 0 and cap > default_max_connections():
            log.warning(
                "server.max_connections %d is more than half the open-file limit %d: proxied "
                "requests need a descriptor each way, so new ones may fail before the cap "
                "refuses them",
                cap,
                soft,
            )
        print(f"keel listening on http://{shown}:{bound}", flush=True)
        if sims:  # the admin key of this run (the fragment never reaches a server or a log)
            key = config.server.admin_key
            assert key is not None
            shown_key = (
                f" (admin key: ${ADMIN_KEY_ENV})"
                if os.environ.get(ADMIN_KEY_ENV)
                else f"#key={key.get_secret_value()}"
            )
            print(f"status page: http://{shown}:{bound}/status{shown_key}", flush=True)
        try:
            sig = await signals.next()
            log.warning("%s received", sig.name)
            draining = asyncio.ensure_future(drain(runner, config.server.drain_timeout))
            again = asyncio.ensure_future(signals.next())
            await asyncio.wait({draining, again}, return_when=asyncio.FIRST_COMPLETED)
            if not draining.done():
                log.warning("%s received again: stopping now", again.result().name)
                draining.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await draining
                await stop_now(runner)
            else:
                again.cancel()
                draining.result()
        finally:
            if runner.server is not None:  # an error above: still close what is open
                await stop_now(runner)
            for s in sims:
                await s.stop()


def run(
    config: GatewayConfig | None,
    host: str | None,
    port: int | None,
    config_path: str | Path | None = None,
) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        pass
    asyncio.run(serve(config, host, port, config_path))
