"""Recipient pages: what a digest's signed links open, under ``/r/`` (no login).

Filled in by the digest work: :func:`add_routes` is called by
:func:`gateway.web.app.build_app` and must add routes under
:data:`gateway.web.app.RECIPIENT_PREFIX` only. The admin session and CSRF
checks do not apply below that prefix (a signed link is the authority, see
:mod:`gateway.web.links`), so every state-changing route here must check
its link itself, and should answer a GET with a confirmation page whose
form POSTs (a mail scanner that follows links must not release mail).
"""

from __future__ import annotations

from aiohttp import web

from gateway.web.context import WebContext

__all__ = ["add_routes"]


def add_routes(app: web.Application, ctx: WebContext) -> None:
    """Add the recipient link pages to ``app`` (under ``/r/``)."""
