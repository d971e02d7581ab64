"""keel with its client's limits but no authentication: the baseline of ``keel bench --auth``.

Every request is the config's one limited client (``clients.bench``), whatever token it
carries: the same rpm/tpm/concurrency bookkeeping as with its key, without looking at the key.
Paired against this, ``static``, ``virtual`` and ``jwt`` show what authenticating costs; paired
against keel-off (no client at all) they also carry the client's limits, which are not
authentication (and which keel-off lacks).

``python -m keel.bench._unauthenticated serve --config …`` is ``keel serve`` with that one
change (applied to the app ``serve`` builds); nothing else differs from the other targets.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from keel.engine._auth import Principal


class OneClient:
    """An authenticator that does not authenticate: every request is ``principal``."""

    __slots__ = ("principal",)

    def __init__(self, principal: Principal) -> None:
        self.principal = principal

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        return self.principal


def unauthenticated(app: web.Application) -> web.Application:
    """``app`` (``create_app``'s), its requests all made by the config's one limited client."""
    from keel.gateway._app import KEEL_KEY

    keel = app[KEEL_KEY]
    (client,) = [p for p in keel.admission.principals() if p.limited]
    keel.authenticator = OneClient(client)
    return app


def main() -> None:
    from keel.cli import main as keel_main
    from keel.gateway import _serve

    create_app = _serve.create_app
    _serve.create_app = lambda config: unauthenticated(create_app(config))  # type: ignore[assignment]
    keel_main()


if __name__ == "__main__":
    main()
