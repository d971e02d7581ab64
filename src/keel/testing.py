"""Helpers for tests, the demo and benchmarks that run keel's own processes for real.

``spawn_listening(cmd, pattern)`` starts any command that announces its address with a line like
``... listening on http://HOST:PORT`` and waits for it; ``spawn_sim(*args)`` does that for
``keel sim --port 0`` and adds a small synchronous client for the simulator's ``/_sim`` API.
Only the standard library is used for I/O here (urllib), so the helpers work from sync and async
tests alike without sharing an event loop with the code under test.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

from keel.sim._log import LogEntry

LISTENING_RE = r"listening on (\S+)"


class ListeningProcess:
    """A child process that printed its URL. Its output keeps being drained in background
    threads (so it can never block on a full pipe) and the last lines are kept for diagnostics."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        url: str,
        tail: collections.deque[str],
        threads: Sequence[threading.Thread] = (),
    ) -> None:
        self.proc = proc
        self.url = url
        self._tail = tail
        self._threads = threads

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output_tail(self) -> str:
        return "".join(self._tail)

    def terminate(self, timeout: float = 5.0) -> int:
        """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        for t in self._threads:
            t.join(timeout)  # they close the pipes at EOF
        return self.proc.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.terminate()


def _drain(stream: Any, lines: queue.Queue[str | None], tail: collections.deque[str]) -> None:
    try:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace")
            tail.append(line)
            lines.put(line)
    finally:
        stream.close()
        lines.put(None)


def _start(
    cmd: Sequence[str], pattern: str, timeout: float, env: Mapping[str, str] | None
) -> tuple[subprocess.Popen[bytes], str, collections.deque[str], list[threading.Thread]]:
    regex = re.compile(pattern)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env)
    tail: collections.deque[str] = collections.deque(maxlen=200)
    lines: queue.Queue[str | None] = queue.Queue()
    threads = [
        threading.Thread(target=_drain, args=(stream, lines, tail), daemon=True)
        for stream in (proc.stdout, proc.stderr)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    open_streams = 2
    while open_streams:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            open_streams -= 1
            continue
        if m := regex.search(line):
            return proc, m.group(1), tail, threads
    proc.kill()
    proc.wait()
    for t in threads:
        t.join(5)
    out = "".join(tail)
    raise RuntimeError(f"{cmd!r} did not print /{pattern}/ within {timeout}s; output:\n{out}")


def spawn_listening(
    cmd: Sequence[str],
    pattern: str = LISTENING_RE,
    timeout: float = 15.0,
    env: Mapping[str, str] | None = None,
) -> ListeningProcess:
    """Start ``cmd`` and wait for a stdout/stderr line matching ``pattern`` whose first group is
    the URL (default: ``listening on (\\S+)``). Raises RuntimeError with the output on failure."""
    return ListeningProcess(*_start(cmd, pattern, timeout, env))


class SimProcess(ListeningProcess):
    """``keel sim`` in a subprocess, with a synchronous client for its ``/_sim`` API."""

    @property
    def base_url(self) -> str:
        return self.url

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.root + path, data=data, method=method)
        req.add_header("content-type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def log(self, since: int = 0) -> list[LogEntry]:
        return [LogEntry(**d) for d in self._call("GET", f"/_sim/log?since={since}")]

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/_sim/stats")
        return result

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Same keywords as :meth:`keel.sim.Simulator.configure`."""
        result: dict[str, Any] = self._call("POST", "/_sim/config", settings)
        return result

    def clear_log(self) -> None:
        self._call("DELETE", "/_sim/log")

    def reset(self) -> None:
        self._call("POST", "/_sim/reset", {})

    def wait_for(
        self, predicate: Callable[[list[LogEntry]], bool], timeout: float = 5.0
    ) -> list[LogEntry]:
        """Poll the log until ``predicate(log)`` holds; TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if predicate(log):
                return log
            if time.monotonic() > deadline:
                raise TimeoutError(f"sim log condition not met within {timeout}s")
            time.sleep(0.01)


def spawn_sim(
    *args: str, timeout: float = 15.0, env: Mapping[str, str] | None = None
) -> SimProcess:
    """Start ``python -m keel sim --port 0 *args`` and wait until it listens."""
    cmd = [sys.executable, "-m", "keel", "sim", "--port", "0", *args]
    return SimProcess(*_start(cmd, r"keel-sim listening on (\S+)", timeout, env))


class GatewayProcess(ListeningProcess):
    """``keel serve`` in a subprocess."""

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


def spawn_gateway(
    config: Mapping[str, Any] | str,
    *args: str,
    workdir: str | None = None,
    timeout: float = 15.0,
    env: Mapping[str, str] | None = None,
) -> GatewayProcess:
    """Start ``python -m keel serve --port 0`` with ``config`` (a mapping, written to a YAML file
    in ``workdir`` or a temp dir, or a path) and wait until it listens."""
    import tempfile

    import yaml

    if isinstance(config, str):
        path = config
    else:
        fd, path = tempfile.mkstemp(suffix=".yaml", prefix="keel-", dir=workdir)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(dict(config), f)
    cmd = [sys.executable, "-m", "keel", "serve", "--config", path, "--port", "0", *args]
    return GatewayProcess(*_start(cmd, r"keel listening on (\S+)", timeout, env))
