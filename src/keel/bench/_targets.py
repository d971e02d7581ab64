"""The processes under test: the simulator, the bare proxy, keel, and (optionally) the peers.

Every target is a real subprocess started the same way the tests start keel (``keel.testing``):
a gateway prints its address, we pin it (and its descendants) to the gateway core, and we stop
it in ``finally`` whatever happened.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from keel.bench._config import CLIENT_KEY, MODEL, UPSTREAM_MODEL, keel_config
from keel.testing import (
    GatewayProcess,
    ListeningProcess,
    SimProcess,
    spawn_gateway,
    spawn_listening,
)


@dataclass
class Target:
    name: str
    base_url: str  # ends in /v1
    proc: ListeningProcess | None  # None: not ours to stop (the simulator hit directly)
    model: str = MODEL
    headers: Mapping[str, str] = field(default_factory=dict)
    measure_pid: int | None = None  # whose /proc CPU and RSS count

    @property
    def chat_url(self) -> str:
        return self.base_url + "/chat/completions"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()


def start_sim() -> SimProcess:
    """The simulator (``_simproc``: keel's simulator with a deeper accept queue)."""
    from keel.testing import _start

    cmd = [sys.executable, "-m", "keel.bench._simproc"]
    return SimProcess(*_start(cmd, r"keel-sim listening on (\S+)", 15.0, None))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_http(url: str, timeout: float) -> None:
    """Until ``url`` answers with any HTTP status (RuntimeError after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # an HTTP answer of any kind: the server is up
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout}s") from None
            time.sleep(0.2)


def start_bare(upstream: str) -> Target:
    cmd = [sys.executable, "-m", "keel.bench._bare", "--upstream", upstream, "--port", "0"]
    proc = spawn_listening(cmd, r"bare listening on (\S+)")
    return Target("bare", proc.url + "/v1", proc, model=UPSTREAM_MODEL, measure_pid=proc.pid)


_KEEL_AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}


AUTH_MODES = ("off", "limits", "static", "virtual", "jwt")


def keel_name(auth: str) -> str:
    """The target's name: ``keel`` with the config's static client key (the default), else
    ``keel-<auth>``."""
    return "keel" if auth == "static" else f"keel-{auth}"


def start_keel(
    upstream: str, workdir: str, auth: str = "static", collector: str | None = None
) -> Target:
    """keel with the benchmark's config. Its client is, by ``auth``: the config's static key
    (``static``), nobody (``off``: no client key, so no client limits either), the config's
    client with its limits but no authentication (``limits``: ``_unauthenticated``), a virtual key
    with the same limits, a budget and a price (``virtual``: a SQLite key database), or that
    key's access JWT (``jwt``). ``collector``: as ``keel-otel``, with OpenTelemetry on, every
    request sampled, exporting there (the SDK's default batching)."""
    config, _ = keel_config(upstream)
    env = None
    if collector is not None:
        config["telemetry"] = {"enabled": True, "endpoint": collector}
        env = {"OTEL_TRACES_SAMPLER": "always_on"}
    headers: dict[str, str] = dict(_KEEL_AUTH)  # limits: the same bytes, never looked at
    if auth not in ("static", "limits"):
        client = config.pop("clients")["bench"]
        headers = {}
        if auth != "off":
            import asyncio

            from keel.bench._inproc import key_database

            url, key = asyncio.run(key_database(client, workdir))
            config["database_url"] = url
            # The hot path alone: no background poll or spend write while measuring; access
            # tokens that outlast the run.
            config["auth"] = {"sync_interval": 3600, "spend_flush_interval": 3600,
                              "jwt": {"access_ttl": 86400}}  # fmt: skip
            config["models"][MODEL]["price"] = {"input": 0.15, "output": 0.6}
            headers = {"authorization": f"Bearer {key}"}
    if auth == "limits":
        proc = _spawn_unauthenticated(config, workdir)
    else:
        proc = spawn_gateway(config, "--log-level", "warning", workdir=workdir, env=env)
    if auth == "jwt":
        headers = {"authorization": f"Bearer {_access_token(proc.base_url, headers)}"}
    return Target(
        "keel-otel" if collector is not None else keel_name(auth),
        proc.base_url,
        proc,
        model=MODEL,
        headers=headers,
        measure_pid=proc.pid,
    )


def _spawn_unauthenticated(config: Mapping[str, Any], workdir: str) -> GatewayProcess:
    """``keel serve`` as ``spawn_gateway`` starts it, through ``keel.bench._unauthenticated``."""
    from keel.testing import _start

    fd, path = tempfile.mkstemp(suffix=".yaml", prefix="keel-", dir=workdir)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(dict(config), f)
    cmd = [sys.executable, "-m", "keel.bench._unauthenticated", "serve", "--config", path,
           "--port", "0", "--log-level", "warning"]  # fmt: skip
    return GatewayProcess(*_start(cmd, r"keel listening on (\S+)", 15.0, None))


def _access_token(base_url: str, headers: Mapping[str, str]) -> str:
    """An access JWT for the virtual key (``POST /v1/auth/token``)."""
    import json

    req = urllib.request.Request(base_url + "/auth/token", data=b"", headers=dict(headers))
    with urllib.request.urlopen(req, timeout=10) as r:
        token: str = json.loads(r.read())["access_token"]
    return token


def start_collector() -> ListeningProcess:
    """The OTLP/HTTP collector ``keel-otel`` exports to (``_collector``: decodes nothing)."""
    return spawn_listening([sys.executable, "-m", "keel.bench._collector"])


# -- peers (never in CI; only when installed) ------------------------------------------------


def litellm_command() -> str | None:
    """``$KEEL_BENCH_LITELLM``, else ``litellm`` on PATH, else the documented side venv."""
    for cand in (os.environ.get("KEEL_BENCH_LITELLM"), shutil.which("litellm")):
        if cand and Path(cand).exists():
            return cand
    side = Path("/tmp/peers-venv/bin/litellm")
    return str(side) if side.exists() else None


def portkey_script() -> str | None:
    """``$KEEL_BENCH_PORTKEY`` (path to ``start-server.js``), else the documented side install."""
    for cand in (
        os.environ.get("KEEL_BENCH_PORTKEY"),
        "/tmp/portkey/node_modules/@portkey-ai/gateway/build/start-server.js",
    ):
        if cand and Path(cand).exists() and shutil.which("node"):
            return cand
    return None


def start_litellm(upstream: str, workdir: str) -> Target:
    cmd_path = litellm_command()
    if cmd_path is None:
        raise RuntimeError("litellm is not installed (see docs/performance.md)")
    cfg = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": f"openai/{UPSTREAM_MODEL}",
                    "api_base": upstream,
                    "api_key": "sk-bench-a",
                },
            }
        ],
        "litellm_settings": {"telemetry": False, "drop_params": True},
        # The bench's bearer token doubles as the proxy's master key (it refuses to start
        # without one).
        "general_settings": {"master_key": CLIENT_KEY},
    }
    fd, path = tempfile.mkstemp(suffix=".yaml", prefix="litellm-", dir=workdir)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(cfg, f)
    port = _free_port()
    cmd = [cmd_path, "--config", path, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--num_workers", "1"]
    # LiteLLM fetches a model price list from the internet at start unless told not to.
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    # Its "Uvicorn running on" line is silenced by LITELLM_LOG; wait for the config line,
    # then for the port to answer.
    proc = spawn_listening(cmd, r"(Set models)", timeout=120.0, env=env)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health/liveliness", 60.0)
    except BaseException:
        proc.terminate()
        raise
    return Target("litellm", f"http://127.0.0.1:{port}/v1", proc, model=MODEL, measure_pid=proc.pid)


def start_portkey(upstream: str) -> Target:
    script = portkey_script()
    if script is None:
        raise RuntimeError("the Portkey gateway is not installed (see docs/performance.md)")
    port = _free_port()
    node = shutil.which("node") or "node"
    cmd = [node, script, f"--port={port}", "--headless"]
    proc = spawn_listening(cmd, r"(Ready) for connections", timeout=60.0)
    headers = {
        "x-portkey-provider": "openai",
        "x-portkey-custom-host": upstream,
        "authorization": "Bearer sk-bench-a",
    }
    return Target(
        "portkey",
        f"http://127.0.0.1:{port}/v1",
        proc,
        model=UPSTREAM_MODEL,
        headers=headers,
        measure_pid=proc.pid,
    )
