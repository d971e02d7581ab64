"""What keel tells its operators: OpenTelemetry traces and GenAI metrics (``_otel``), the
access log and JSON log lines (``_logs``).

Importing this package imports no OpenTelemetry: ``wanted`` decides from the config and the
environment, and only then does the engine import ``keel.telemetry._otel``.
"""

from __future__ import annotations

import os

from keel.config._observe import TelemetryConfig


def wanted(cfg: TelemetryConfig) -> bool:
    """Telemetry is on: ``telemetry.enabled: true``, or (unset) an OTLP endpoint in the
    environment. ``OTEL_SDK_DISABLED=true`` turns it off, as the SDKs do."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if cfg.enabled is not None:
        return cfg.enabled
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def missing() -> str | None:
    """Why telemetry cannot start here (the packages are not installed), or None."""
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        return (
            f"telemetry is on but OpenTelemetry is not installed ({exc.name}): "
            "pip install 'keel[telemetry]'"
        )
    return None
