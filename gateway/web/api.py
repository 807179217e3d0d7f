"""The REST API under ``/api/v1/``: JSON over the quarantine, for scripts and the admin pages.

Routes (docs/web.md has each with its parameters and answers):

- ``GET  /api/v1/quarantine``             list: filters ``rcpt``, ``sender``, ``min_score``,
  ``max_score``, ``symbol``, ``q`` (words), ``since``, ``until``; paging ``limit``, ``cursor``
- ``GET  /api/v1/quarantine/{id}``        one message: symbols, header fields, text preview
- ``GET  /api/v1/quarantine/{id}/raw``    the stored bytes
- ``POST /api/v1/quarantine/{id}/release``  ``{"rcpt_tos": [...], "allow_sender": bool}``
- ``POST /api/v1/quarantine/{id}/delete``   ``{"as_spam": bool, "block_sender": bool}``

The list is the store's keyset search (:meth:`QuarantineStore.search`), the
query path ``bench/quarantine_list.py`` measures on a million rows.
"""

from __future__ import annotations

import asyncio
import json
import math
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.quarantine import QuarantineError, QuarantineFilter, QuarantineItem
from gateway.web.actions import ActionError, delete_message, held, release_message
from gateway.web.context import WebContext, context_of
from gateway.web.paths import API_PREFIX
from gateway.web.preview import preview

__all__ = ["add_routes", "filter_of", "item_json", "page_limit"]

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
_MAX_PARAM = 320  # characters of one query parameter (an address is at most 254)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _param(request: web.Request, name: str) -> str | None:
    value = request.query.get(name, "").strip()
    if len(value) > _MAX_PARAM:
        raise ActionError(400, f"{name}: at most {_MAX_PARAM} characters")
    return value or None


def _number(request: web.Request, name: str) -> float | None:
    text = _param(request, name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ActionError(400, f"{name}: must be a number, got {text[:40]!r}") from None
    if not math.isfinite(value):
        raise ActionError(400, f"{name}: must be a finite number")
    return value


def _time(request: web.Request, name: str) -> datetime | None:
    text = _param(request, name)
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ActionError(
            400, f'{name}: must be a date or time like "2026-03-01" or "2026-03-01T12:00Z"'
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def filter_of(request: web.Request) -> QuarantineFilter:
    """The listing filter from the query string; ActionError 400 says which one is wrong."""
    return QuarantineFilter(
        rcpt=_param(request, "rcpt"),
        sender=_param(request, "sender"),
        min_score=_number(request, "min_score"),
        max_score=_number(request, "max_score"),
        symbol=_param(request, "symbol"),
        text=_param(request, "q"),
        since=_time(request, "since"),
        until=_time(request, "until"),
    )


def page_limit(request: web.Request) -> int:
    text = _param(request, "limit")
    if text is None:
        return DEFAULT_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise ActionError(400, f"limit: must be 1..{MAX_LIMIT}, got {text[:20]!r}")
    return int(text)


def item_json(item: QuarantineItem) -> dict[str, Any]:
    """A listed message: the ``quarantine list --json`` shape."""
    return item.to_json()


async def _list(request: web.Request) -> web.Response:
    ctx = context_of(request)
    f, limit = filter_of(request), page_limit(request)
    try:
        page = await ctx.quarantine.search(f, limit=limit, cursor=_param(request, "cursor"))
    except ValueError as exc:  # a malformed cursor
        raise ActionError(400, f"cursor: {exc}") from None
    except QuarantineError as exc:
        raise ActionError(503, f"the quarantine is unavailable: {exc}") from None
    return web.json_response({"items": [item_json(i) for i in page.items], "next": page.next})


async def _show(request: web.Request) -> web.Response:
    ctx = context_of(request)
    item, raw = await held(ctx, request.match_info["id"])
    shown = await asyncio.to_thread(preview, raw)
    body = item_json(item)
    body["symbols"] = [s.to_json() for s in item.symbols]
    body["prepend_headers"] = list(item.headers)
    body.update(shown.to_json())
    return web.json_response(body)


async def _raw(request: web.Request) -> web.Response:
    item, raw = await held(context_of(request), request.match_info["id"])
    # octet-stream and attachment: a browser saves it, never renders the message's HTML.
    return web.Response(
        body=raw,
        content_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{item.id}.eml"'},
    )


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ActionError(400, "the body must be a JSON object (or empty)") from None
    if not isinstance(body, dict):
        raise ActionError(400, "the body must be a JSON object (or empty)")
    return body


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ActionError(400, f"{name}: must be true or false")
    return value


async def _release(request: web.Request) -> web.Response:
    body = await _json_body(request)
    rcpts = body.get("rcpt_tos")
    if rcpts is not None and (
        not isinstance(rcpts, list) or not all(isinstance(r, str) for r in rcpts)
    ):
        raise ActionError(400, 'rcpt_tos: must be a list of addresses, e.g. ["a@example.org"]')
    result, listed = await release_message(
        context_of(request),
        request.match_info["id"],
        rcpts,
        allow_sender=_flag(body, "allow_sender"),
    )
    code, text = result.reply
    return web.json_response(
        {
            "id": request.match_info["id"],
            "released": True,
            "accepted": list(result.accepted),
            "refused": list(result.refused),
            "remaining": list(result.remaining),
            "reply": f"{code} {text}",
            "warning": result.kept_error
            and f"delivered but still in quarantine ({result.kept_error}): delete it",
            "listed": listed or None,
        }
    )


async def _delete(request: web.Request) -> web.Response:
    body = await _json_body(request)
    done = await delete_message(
        context_of(request),
        request.match_info["id"],
        as_spam=_flag(body, "as_spam"),
        block_sender=_flag(body, "block_sender"),
    )
    return web.json_response(
        {"id": done.id, "deleted": True, "learned": done.learned, "listed": done.listed or None}
    )


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """ActionError and HTTP errors under the API prefix answer JSON ``{"error": ...}``."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ActionError as exc:
        return _error(exc.status, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason)


def add_routes(app: web.Application, ctx: WebContext) -> None:
    """The API, as a sub-application under ``/api/v1/`` (its own error middleware)."""
    api = web.Application(middlewares=[_errors])
    api.router.add_get("/quarantine", _list)
    api.router.add_get("/quarantine/{id}", _show)
    api.router.add_get("/quarantine/{id}/raw", _raw)
    api.router.add_post("/quarantine/{id}/release", _release)
    api.router.add_post("/quarantine/{id}/delete", _delete)
    app.add_subapp(API_PREFIX.rstrip("/"), api)
