"""The admin UI: server-rendered pages over the same actions as the REST API.

Pages: ``/login``, ``/`` (the list with search and bulk actions), ``/m/{id}``
(one message, why it was held, what to do). jinja2 renders them with
autoescaping on, so a subject, a name or a body with HTML or script shows as
text; the body is the text :mod:`gateway.web.preview` makes, and the CSP
forbids inline script anyway. The message's own HTML is only ever shown in a
sandboxed frame (``/m/{id}/html``, see ``_SANDBOX_CSP``).
Forms post back with the session's CSRF token (checked by
:func:`gateway.web.auth.guard`); no JavaScript is needed, nothing is built.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from gateway import metrics
from gateway.quarantine import QuarantineError
from gateway.web.actions import ActionError, delete_message, held, release_message
from gateway.web.api import filter_of, page_limit
from gateway.web.auth import (
    AUTH,
    CSRF_FIELD,
    LOGIN_COOKIE,
    SESSION,
    SESSION_COOKIE,
    new_token,
)
from gateway.web.context import WebContext, context_of
from gateway.web.hashes import verify_secret
from gateway.web.paths import STATIC_PREFIX
from gateway.web.preview import preview

__all__ = ["add_routes", "render_page"]

log = logging.getLogger("gateway.web")
_HERE = Path(__file__).parent
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(_HERE / "templates"),
    autoescape=True,  # every page is HTML: escape everything not marked safe (nothing is)
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_QUERY_KEYS = ("q", "rcpt", "sender", "symbol", "min_score", "max_score", "since", "until")
_MAX_BULK = 200  # messages one bulk action touches
_NOTICE = 300  # characters of a notice carried in the URL


def render_page(request: web.Request, name: str, status: int = 200, **values: Any) -> web.Response:
    session = request.get(SESSION)
    values.setdefault("notice", request.query.get("notice", "")[:_NOTICE])
    values.setdefault("problem", "")
    html = _ENV.get_template(name).render(
        csrf=session.csrf if session is not None else "",
        hostname=context_of(request).config().server.hostname,
        **values,
    )
    return web.Response(text=html, content_type="text/html", charset="utf-8", status=status)


def _cookie_secure(request: web.Request) -> bool:
    return request.secure or context_of(request).config().web.base_url.startswith("https:")


def _safe_next(target: str) -> str:
    """Only a path of ours: never an open redirect to another site."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target[:2000]
    return "/"


def _see_other(location: str) -> web.Response:
    """A 303 that carries cookies (a raised HTTPSeeOther would drop what we set)."""
    return web.Response(status=303, headers={"Location": location})


# --- login ---------------------------------------------------------------------


async def _login_form(request: web.Request, problem: str = "", status: int = 200) -> web.Response:
    # Keep the token a browser has: a second login page (a favicon request redirected
    # here, another tab) must not invalidate the form already shown.
    token = request.cookies.get(LOGIN_COOKIE, "")
    if not 20 <= len(token) <= 64:
        token = new_token()
    response = render_page(
        request,
        "login.html",
        status=status,
        login_token=token,
        next=_safe_next(request.query.get("next", "/")),
        configured=bool(context_of(request).config().web.admin_password_hash),
        problem=problem,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        httponly=True,
        samesite="Strict",
        secure=_cookie_secure(request),
        max_age=3600,
    )
    return response


async def _login(request: web.Request) -> web.StreamResponse:
    ctx = context_of(request)
    state = request.app[AUTH]
    form = await request.post()
    given, expected = form.get(CSRF_FIELD), request.cookies.get(LOGIN_COOKIE, "")
    if not isinstance(given, str) or not expected or given != expected:
        metrics.WEB_LOGINS.labels("expired").inc()
        return await _login_form(request, "The login form expired; please try again.", 403)
    client = request.remote or "?"
    wait = state.limiter.retry_after(client)
    if wait > 0:
        metrics.WEB_LOGINS.labels("limited").inc()
        response = await _login_form(
            request, f"Too many failed logins; try again in {int(wait) + 1} seconds.", 429
        )
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    config = ctx.config().web
    password = form.get("password")
    ok = (
        bool(config.admin_password_hash)
        and isinstance(password, str)
        and await asyncio.to_thread(verify_secret, password, config.admin_password_hash)
    )
    if not ok:
        metrics.WEB_LOGINS.labels("wrong").inc()
        log.warning("web_login_failed", extra={"client": client})
        state.limiter.failed(client)
        return await _login_form(request, "Wrong password.", 401)
    metrics.WEB_LOGINS.labels("ok").inc()
    log.info("web_login", extra={"client": client})
    state.limiter.succeeded(client)
    session = state.sessions.create(config.session_timeout)
    target = form.get("next")
    response = _see_other(_safe_next(target if isinstance(target, str) else "/"))
    response.set_cookie(
        SESSION_COOKIE,
        session.id,
        httponly=True,
        samesite="Strict",
        secure=_cookie_secure(request),
        max_age=int(config.session_timeout),
    )
    response.del_cookie(LOGIN_COOKIE)
    return response


async def _logout(request: web.Request) -> web.StreamResponse:
    session = request.get(SESSION)
    if session is not None:
        request.app[AUTH].sessions.end(session.id)
    response = _see_other("/login")
    response.del_cookie(SESSION_COOKIE)
    return response


# --- the list ------------------------------------------------------------------


def _list_problem(
    request: web.Request, status: int, problem: str, query: dict[str, str] | None = None
) -> web.Response:
    """The list page with nothing listed and ``problem`` said."""
    return render_page(
        request,
        "list.html",
        status,
        items=[],
        query=query or dict.fromkeys(_QUERY_KEYS, ""),
        problem=problem,
        searching=query is not None,
        next_url="",
    )


async def _list(request: web.Request) -> web.Response:
    ctx = context_of(request)
    query = {k: request.query.get(k, "")[:320] for k in _QUERY_KEYS}
    try:
        f, limit = filter_of(request), page_limit(request)
        page = await ctx.quarantine.search(
            f, limit=limit, cursor=request.query.get("cursor") or None
        )
    except (ActionError, ValueError) as exc:  # a bad filter, a malformed cursor
        return _list_problem(request, 400, str(exc), query)
    except QuarantineError as exc:
        return _list_problem(request, 503, f"The quarantine is unavailable: {exc}", query)
    kept = {k: v for k, v in query.items() if v}
    next_url = "/?" + urlencode({**kept, "cursor": page.next}) if page.next else ""
    return render_page(
        request,
        "list.html",
        items=page.items,
        query=query,
        searching=bool(kept),
        next_url=next_url,
    )


async def _bulk(request: web.Request) -> web.StreamResponse:
    ctx = context_of(request)
    form = await request.post()
    ids = [i for i in form.getall("id", []) if isinstance(i, str)][:_MAX_BULK]
    action = form.get("action")
    if action not in ("release", "delete", "delete_spam") or not ids:
        raise web.HTTPSeeOther("/?" + urlencode({"notice": "Select messages and an action."}))
    done, problems = 0, []
    for ident in ids:
        try:
            if action == "release":
                await release_message(ctx, ident)
            else:
                await delete_message(ctx, ident, as_spam=action == "delete_spam")
            done += 1
        except ActionError as exc:
            problems.append(str(exc))
    verb = {"release": "Released", "delete": "Deleted", "delete_spam": "Deleted as spam"}[action]
    notice = f"{verb} {done} of {len(ids)}." + (f" {problems[0]}" if problems else "")
    raise web.HTTPSeeOther("/?" + urlencode({"notice": notice[:_NOTICE]}))


# --- one message ---------------------------------------------------------------


async def _message(request: web.Request) -> web.Response:
    ctx = context_of(request)
    try:
        item, raw = await held(ctx, request.match_info["id"])
    except ActionError as exc:
        return _list_problem(request, exc.status, str(exc))
    shown = await asyncio.to_thread(preview, raw)
    return render_page(request, "message.html", item=item, symbols=item.symbols, preview=shown)


# The message's own HTML, for the sandboxed frame only: a unique origin (no cookies,
# no access to the UI), no script, no plugins, no forms, nothing fetched from anywhere
# (remote images would tell the sender the message was opened). Opened directly it is
# just as sandboxed: the policy travels with the response, not with the <iframe>.
_SANDBOX_CSP = (
    "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "font-src data:; form-action 'none'; frame-ancestors 'self'; base-uri 'none'"
)


async def _html(request: web.Request) -> web.Response:
    try:
        _, raw = await held(context_of(request), request.match_info["id"])
    except ActionError as exc:
        return web.Response(status=exc.status, text=str(exc))
    shown = await asyncio.to_thread(preview, raw)
    return web.Response(
        text=shown.html or "<p>(no HTML part)</p>",
        content_type="text/html",
        charset="utf-8",
        headers={"Content-Security-Policy": _SANDBOX_CSP},
    )


async def _act(request: web.Request) -> web.StreamResponse:
    ctx = context_of(request)
    ident = request.match_info["id"]
    form = await request.post()
    action = form.get("action")
    rcpts = [r for r in form.getall("rcpt", []) if isinstance(r, str)] or None
    try:
        if action in ("release", "release_allow"):
            result, listed = await release_message(
                ctx, ident, rcpts, allow_sender=action == "release_allow"
            )
            notice = f"Released {ident} to {', '.join(result.accepted)}."
            if result.remaining:
                notice += f" Still held for {', '.join(result.remaining)}."
            if listed:
                notice += f" {listed} is on the allow list now."
        elif action in ("delete", "delete_spam", "delete_block"):
            done = await delete_message(
                ctx, ident, as_spam=action == "delete_spam", block_sender=action == "delete_block"
            )
            notice = f"Deleted {ident}" + (" as spam." if action == "delete_spam" else ".")
            if done.listed:
                notice += f" {done.listed} is on the block list now."
        else:
            raise ActionError(400, "unknown action")
    except ActionError as exc:
        try:
            item, raw = await held(ctx, ident)
        except ActionError:
            raise web.HTTPSeeOther("/?" + urlencode({"notice": str(exc)[:_NOTICE]})) from None
        shown = await asyncio.to_thread(preview, raw)
        return render_page(
            request,
            "message.html",
            exc.status,
            item=item,
            symbols=item.symbols,
            preview=shown,
            problem=str(exc),
        )
    raise web.HTTPSeeOther("/?" + urlencode({"notice": notice[:_NOTICE]}))


def add_routes(app: web.Application, ctx: WebContext) -> None:
    app.router.add_get("/login", _login_form)
    app.router.add_post("/login", _login)
    app.router.add_post("/logout", _logout)
    app.router.add_get("/", _list)
    app.router.add_post("/bulk", _bulk)
    app.router.add_get("/m/{id}", _message)
    app.router.add_get("/m/{id}/html", _html)
    app.router.add_post("/m/{id}/act", _act)
    app.router.add_static(STATIC_PREFIX.rstrip("/"), _HERE / "static", append_version=False)
