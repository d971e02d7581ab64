"""Helpers for the virtual-key tests: plain HTTP (urllib: no client library in the way of
exact statuses and bodies), configs written next to their key database, a PostgreSQL database
of the test's own."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ADMIN = "adm-0123456789abcdef0123456789abcdef"
PG_ROOT = "postgresql://root@127.0.0.1:5432/postgres"


def http(
    method: str, url: str, body: Any = None, token: str | None = None, timeout: float = 10
) -> tuple[int, dict[str, str], Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("content-type", "application/json")
    if token is not None:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status, headers = resp.read(), resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raw, status, headers = exc.read(), exc.code, dict(exc.headers)
    headers = {k.lower(): v for k, v in headers.items()}
    if headers.get("content-type", "").startswith("application/json"):
        return status, headers, json.loads(raw)
    return status, headers, raw.decode()


def chat(
    gw_url: str, token: str | None, model: str = "chat", prompt: str = "hi", **kw: Any
) -> tuple[int, dict[str, str], Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], **kw}
    return http("POST", gw_url + "/v1/chat/completions", body, token)


def stream_chunks(gw_url: str, token: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """A stream's data events, parsed ([DONE] dropped)."""
    status, _, text = http("POST", gw_url + "/v1/chat/completions", {**body, "stream": True}, token)
    assert status == 200, text
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def write_config(directory: Path, cfg: dict[str, Any], name: str = "keel.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def keel_cli(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "keel", "keys", "--config", str(config), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.01) -> float:
    """Poll ``pred`` until it holds; the seconds it took (TimeoutError after ``timeout``)."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(step)
    return time.monotonic() - t0


def _psql(sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "psql",
            "-h",
            "127.0.0.1",
            "-U",
            "root",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _pg_up() -> bool:
    return shutil.which("psql") is not None and _psql("SELECT 1").returncode == 0


needs_pg = pytest.mark.skipif(not _pg_up(), reason="PostgreSQL on 127.0.0.1:5432 is not up")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A database of this test's own, dropped after it."""
    name = f"keel_test_{uuid.uuid4().hex[:12]}"
    out = _psql(f"CREATE DATABASE {name}")
    assert out.returncode == 0, out.stderr
    try:
        yield f"postgresql://root@127.0.0.1:5432/{name}"
    finally:
        _psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
