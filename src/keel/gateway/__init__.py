"""The gateway: an OpenAI-compatible server that survives upstream failures."""

from keel.gateway._app import Gateway, create_app
from keel.gateway._serve import run, serve, start_site

__all__ = ["Gateway", "create_app", "run", "serve", "start_site"]
