"""Recipient pages: what a digest's signed links open, under ``/r/`` (no login).

:func:`add_routes` is called by :func:`gateway.web.app.build_app` and adds
routes under :data:`gateway.web.paths.RECIPIENT_PREFIX` only. The admin
session and CSRF checks do not apply below that prefix (a signed link is
the authority, see :mod:`gateway.web.links`), so every route here checks its
link itself. A GET only shows what the link would do, with a form that
POSTs: a mail scanner or link preview that follows links must never
release or delete mail. The link acts for its own recipient only: a
release delivers to that recipient, a delete drops that recipient's copy
(the message stays held for the others).

Every refusal is a page that says what happened and what to do: a damaged
or forged link (403), an expired one (410), one used already or a message
no longer held (410).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway import metrics
from gateway.quarantine import QuarantineError, QuarantineItem
from gateway.web.actions import ActionError, delete_message, release_message
from gateway.web.context import WebContext, context_of
from gateway.web.links import Link, LinkError, LinkGone, authorize, mark_used, verify
from gateway.web.pages import render_page
from gateway.web.paths import RECIPIENT_PREFIX

__all__ = ["add_routes"]

log = logging.getLogger("gateway.web")


def _render(request: web.Request, status: int = 200, **values: Any) -> web.Response:
    values.setdefault("item", None)
    values.setdefault("link", None)
    values.setdefault("token", "")
    values.setdefault("done", "")
    return render_page(request, "recipient.html", status, recipient=True, **values)


def _refused(request: web.Request, exc: LinkError) -> web.Response:
    metrics.WEB_LINKS.labels(type(exc).__name__.removeprefix("Link").lower()).inc()
    problem = str(exc)
    if isinstance(exc, LinkGone) and exc.used:
        problem = f"This message was already {exc.used} through a digest link."
    return _render(request, exc.status, problem=problem)


async def _checked(request: web.Request) -> tuple[Link, QuarantineItem] | web.Response:
    """The link of the URL and the message it may act on, or the page refusing it."""
    ctx = context_of(request)
    try:
        link = verify(ctx.link_key, request.match_info["token"])
        item, _ = await authorize(ctx.quarantine, link)
    except LinkError as exc:
        return _refused(request, exc)
    except QuarantineError as exc:
        return _render(request, 503, problem=f"The quarantine is unavailable: {exc}. Try later.")
    return link, item


async def _confirm(request: web.Request) -> web.Response:
    checked = await _checked(request)
    if isinstance(checked, web.Response):
        return checked
    link, item = checked
    return _render(request, item=item, link=link, token=request.match_info["token"])


async def _act(request: web.Request) -> web.Response:
    ctx = context_of(request)
    checked = await _checked(request)
    if isinstance(checked, web.Response):
        return checked
    link, item = checked
    rcpt = next(r for r in item.rcpt_tos if r.lower() == link.rcpt.lower())
    when = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    try:
        if link.action == "release":
            await release_message(ctx, item.id, [rcpt])
            done = f"The message is on its way to {rcpt}."
            used = f"released at {when}"
        else:
            await delete_message(ctx, item.id, [rcpt])
            done = f"The message was deleted for {rcpt}."
            used = f"deleted at {when}"
    except ActionError as exc:
        return _render(request, exc.status, item=item, link=link, problem=str(exc))
    await mark_used(ctx.quarantine, link, used)
    metrics.WEB_LINKS.labels(link.action).inc()
    log.info(
        "quarantine_link_used",
        extra={"id": item.id, "rcpt": rcpt, "action": link.action, "via": "digest"},
    )
    return _render(request, item=item, done=done)


def add_routes(app: web.Application, ctx: WebContext) -> None:
    """Add the recipient link pages to ``app`` (under ``/r/``)."""
    app.router.add_get(RECIPIENT_PREFIX + "{token}", _confirm)
    app.router.add_post(RECIPIENT_PREFIX + "{token}", _act)
