"""The web application: one aiohttp app for the admin UI, the REST API and recipient pages.

URL space, one owner each:

- ``/api/v1/...``   JSON REST API (``gateway/web/api.py``): admin session or bearer token.
- ``/r/...``        recipient pages opened from digest links (``gateway/web/recipient.py``):
  a signed link is the authority, no login.
- ``/static/...``   the UI's CSS, shipped in the package (no build step, nothing fetched).
- everything else   server-rendered admin pages and the login (``gateway/web/pages.py``).

Other modules add routes with an ``add_routes(app, ctx)`` function called
from :func:`build_app`, each under its own prefix. Every response carries a
strict Content-Security-Policy and ``nosniff``: even a bug that let message
text through unescaped could not run script.
"""

from __future__ import annotations

from aiohttp import web

from gateway.web import api, pages, recipient
from gateway.web.auth import AUTH, AuthState, guard
from gateway.web.context import CONTEXT, WebContext
from gateway.web.paths import API_PREFIX, RECIPIENT_PREFIX

__all__ = ["API_PREFIX", "RECIPIENT_PREFIX", "build_app"]

_MAX_BODY = 1024 * 1024  # bytes of a request body: forms and JSON are small (hostile input)

# No inline script, no third-party anything; frames only from ourselves (the sandboxed
# message preview is a srcdoc-less same-origin frame with its own stricter policy).
_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-src 'self'; frame-ancestors 'self'; base-uri 'none'; script-src 'self'"
)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response, error pages included (``on_response_prepare``)."""
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "SAMEORIGIN")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("Cache-Control", "no-store")


def build_app(ctx: WebContext) -> web.Application:
    """The whole web app over ``ctx``; served by :mod:`gateway.web.server`, or by tests."""
    app = web.Application(middlewares=[guard], client_max_size=_MAX_BODY)
    app.on_response_prepare.append(_security_headers)
    app[CONTEXT] = ctx
    app[AUTH] = AuthState()
    api.add_routes(app, ctx)
    pages.add_routes(app, ctx)
    recipient.add_routes(app, ctx)
    return app
