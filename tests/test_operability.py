"""What a new operator meets first: start-up mistakes as one line (exit code 2, no traceback),
``keel --version``, the LICENSE, an example config that loads, ``keel sim --help`` intact, and
an ``x-request-id`` on every error keel answers."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from keel import __version__
from keel.config import ConfigError, load_config, parse_config
from keel.sim import DIALECTS
from keel.testing import GatewayProcess, SimProcess, spawn_gateway

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "keel.yaml"
EXAMPLE_ENV = {"OPENAI_API_KEY": "sk-example-openai", "DASHSCOPE_API_KEY": "sk-example-ds"}


def keel(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keel", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def test_version() -> None:
    out = keel("--version")
    assert out.returncode == 0 and out.stdout == f"keel {__version__}\n"


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _one_line_failure(out: subprocess.CompletedProcess[str], message: str) -> None:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "Unclosed" not in out.stderr, out.stderr
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("keel: ")]
    assert errors == [message], out.stderr
    assert out.stderr.rstrip("\n").endswith(message)
    assert "keel listening on" not in out.stdout


def test_port_in_use(busy_port: int) -> None:
    out = keel("serve", "-c", str(EXAMPLE), "--port", str(busy_port), env=EXAMPLE_ENV)
    _one_line_failure(
        out,
        f"keel: cannot listen on 127.0.0.1:{busy_port}: the address is already in use "
        "(another process listens there)",
    )


def test_port_in_use_with_the_builtin_simulators(busy_port: int) -> None:
    out = keel("serve", "--port", str(busy_port))
    _one_line_failure(
        out,
        f"keel: cannot listen on 127.0.0.1:{busy_port}: the address is already in use "
        "(another process listens there)",
    )


def test_unresolvable_host() -> None:
    out = keel("serve", "-c", str(EXAMPLE), "--host", "no-such-host.invalid", env=EXAMPLE_ENV)
    assert out.returncode == 2
    line = out.stderr.splitlines()[-1]
    assert line.startswith(
        "keel: cannot listen on no-such-host.invalid:4000: the host does not resolve"
    )
    _one_line_failure(out, line)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--log-level", "bogus"),
            "keel: --log-level must be one of debug, info, warning, error, critical, not 'bogus'",
        ),
        (("--log-format", "xml"), "keel: --log-format must be text or json, not 'xml'"),
    ],
)
def test_bad_options(args: tuple[str, ...], message: str) -> None:
    _one_line_failure(keel("serve", *args), message)


def test_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  chat:\n    deployments:\n      - base_url: not-a-url\n")
    out = keel("serve", "-c", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr == (
        "keel: invalid configuration:\n"
        "  models.chat.deployments.0: base_url must be an http:// or https:// URL with a host\n"
    )


@pytest.mark.parametrize("url", ["not-a-url", "localhost:8000/v1", "ftp://host/v1", "http://"])
def test_base_url_is_validated_at_load(url: str) -> None:
    with pytest.raises(ConfigError, match="base_url must be an http:// or https:// URL"):
        parse_config({"models": {"m": {"deployments": [{"base_url": url}]}}})


def test_license() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()


def test_the_example_config_loads_and_serves(tmp_path: Path, monkeypatch) -> None:
    for k, v in EXAMPLE_ENV.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(EXAMPLE)
    dialects = {name: [d.dialect.value for d in g.deployments] for name, g in cfg.models.items()}
    assert dialects == {"chat": ["openai"], "qwen-plus": ["dashscope"], "local": ["vllm"]}
    assert cfg.models["chat"].fallbacks == ["qwen-plus"]
    with spawn_gateway(str(EXAMPLE), env=EXAMPLE_ENV) as gw:
        import json
        import urllib.request

        with urllib.request.urlopen(gw.base_url + "/models", timeout=10) as r:
            models = [m["id"] for m in json.loads(r.read())["data"]]
    assert models == ["chat", "qwen-plus", "local"]
    assert "sk-example" not in gw.output_tail()


def test_sim_help_is_intact() -> None:
    out = keel("sim", "--help")
    assert out.returncode == 0
    assert "Name for [[sim@NAME:...]] targeting and logs." in out.stdout
    line = next(ln for ln in out.stdout.splitlines() if "--dialect" in ln)
    assert f"Error dialect: {', '.join(DIALECTS)}." in line
    assert len(DIALECTS) == 7


# -- every error answer has an x-request-id -----------------------------------------------------

ADMIN, METRICS, CLIENT = "sk-admin-opera", "sk-metrics-opera", "sk-client-opera"


@pytest.fixture(scope="module")
def keyed(
    sims: tuple[SimProcess, SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    cfg = {
        "server": {
            "api_keys": [CLIENT],
            "admin_key": ADMIN,
            "metrics_key": METRICS,
            "max_body_bytes": 4096,
        },
        "models": {"chat": {"deployments": [{"base_url": sims[0].base_url, "api_key": "sk-up"}]}},
    }
    with spawn_gateway(cfg, workdir=str(tmp_path_factory.mktemp("keyed"))) as gw:
        yield gw


AUTH = {"authorization": f"Bearer {CLIENT}"}
CASES = [
    ("GET", "/v1/chat/completions", AUTH, None, 405, "method_not_allowed"),
    ("DELETE", "/v1/models", AUTH, None, 405, "method_not_allowed"),
    ("GET", "/nowhere", AUTH, None, 404, "unknown_url"),
    (
        "POST",
        "/v1/chat/completions",
        {"authorization": "Bearer nope"},
        b"{}",
        401,
        "invalid_api_key",
    ),
    ("POST", "/v1/chat/completions", AUTH, b"{not json", 400, "invalid_json"),
    (
        "POST",
        "/v1/chat/completions",
        AUTH,
        b'{"model": "x", "messages": [{"role": "user", "content": "hi"}]}',
        404,
        "model_not_found",
    ),
    ("POST", "/v1/chat/completions", AUTH, b"x" * 5000, 413, "too_large"),
    ("GET", "/v1/models", {"authorization": "Bearer nope"}, None, 401, "invalid_api_key"),
    ("GET", "/metrics", AUTH, None, 401, "invalid_api_key"),
    ("GET", "/admin/keys", AUTH, None, 401, None),
    ("POST", "/v1/audio/speech", {"authorization": "Bearer nope"}, b"{}", 401, "invalid_api_key"),
]


@pytest.mark.parametrize(("method", "path", "headers", "body", "status", "code"), CASES)
async def test_every_error_has_a_request_id(
    keyed, method, path, headers, body, status, code
) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, keyed.url + path, headers=headers, data=body) as r,
    ):
        payload = await r.json()
        assert r.status == status, payload
        assert r.headers["x-request-id"].startswith("keel-")
        if code is not None:
            assert payload["error"]["code"] == code


async def test_request_ids_are_unique(keyed) -> None:
    async with aiohttp.ClientSession() as s:
        ids = set()
        for _ in range(3):
            async with s.get(keyed.url + "/nowhere") as r:
                ids.add(r.headers["x-request-id"])
    assert len(ids) == 3


async def test_malformed_http_has_a_request_id(keyed) -> None:
    host, port = keyed.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head = raw.split(b"\r\n\r\n")[0].decode().lower()
    assert head.startswith("http/1.0 400 ")  # aiohttp answers a request it could not parse in 1.0
    assert "\r\nx-request-id: keel-" in head
