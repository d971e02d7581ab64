"""keel's log lines: text or JSON (``keel serve --log-format``), and the access log.

The access log is one line per request on the ``keel.access`` logger at info level: its id,
the client's name (never its key), the model group, the deployments tried, the attempts, the
status, the finish reason, time to first token, total time and tokens. Decisions worth an
operator's attention (a key benched, a breaker opened, a limit learned, a stream continued)
are logged where they are taken, with an ``event`` field for JSON consumers. Prompts appear
only when ``logging.log_bodies`` is set.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

from keel.engine._observe import Record

access_log = logging.getLogger("keel.access")

# Attributes every LogRecord has: anything else was passed as ``extra=`` and goes to JSON.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)
LEVELS = ("debug", "info", "warning", "error", "critical")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ms), level, logger, message, and the record's
    ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup(level: str, fmt: str) -> None:
    """Configure the root logger for ``keel serve``: ``level`` one of ``LEVELS``, ``fmt``
    text or json (ValueError otherwise), to stderr."""
    if level.lower() not in LEVELS:
        raise ValueError(f"--log-level must be one of {', '.join(LEVELS)}, not {level!r}")
    if fmt not in ("text", "json"):
        raise ValueError(f"--log-format must be text or json, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())


def _ms(start: int, end: int) -> float | None:
    return round((end - start) / 1e6, 1) if start and end else None


class AccessLog:
    """The access-log observer: one line per finished request."""

    def __init__(self, log_bodies: bool = False) -> None:
        self.log_bodies = log_bodies

    def finished(self, rec: Record) -> None:
        fields = access_fields(rec, self.log_bodies)
        deps = ",".join(fields["deployments"]) or "-"
        tokens = (
            f"{fields['input_tokens']}+{fields['output_tokens']}"
            if fields["output_tokens"] is not None
            else "-"
        )
        first = fields["first_token_ms"]
        text = (
            f"{rec.rid} {fields['principal'] or '-'} {fields['model'] or '-'} "
            f"{fields['status']} {fields['finish_reason'] or fields['error'] or '-'} "
            f"via {deps} attempts={fields['attempts']} "
            f"first_token_ms={'-' if first is None else first} total_ms={fields['total_ms']} "
            f"tokens={tokens}"
        )
        access_log.info(text, extra=fields)

    async def close(self) -> None:
        pass


def access_fields(rec: Record, log_bodies: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "event": "access",
        "request_id": rec.rid,
        "principal": rec.principal,
        "model": rec.model,
        "stream": rec.stream,
        "deployments": [a.deployment.name for a in rec.attempts],
        "attempts": len(rec.attempts),
        "status": rec.status,
        "finish_reason": rec.finish_reasons[0] if rec.finish_reasons else None,
        "error": rec.error_type,
        "first_token_ms": _ms(rec.start_ns, rec.first_token_ns),
        "total_ms": _ms(rec.start_ns, rec.end_ns) or 0.0,
        "input_tokens": rec.input_tokens,
        "output_tokens": rec.output_tokens,
    }
    if rec.attempts and any(a.kind != "first" for a in rec.attempts):
        out["attempt_kinds"] = [a.kind for a in rec.attempts]
    if log_bodies and rec.body is not None:
        out["messages"] = rec.body.get("messages")
    return out
