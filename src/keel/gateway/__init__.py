"""The gateway: keel's HTTP door — an OpenAI-compatible server on the engine."""

from keel.gateway._app import create_app
from keel.gateway._serve import run, serve, start_site

__all__ = ["create_app", "run", "serve", "start_site"]
