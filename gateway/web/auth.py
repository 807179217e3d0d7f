"""Who may use the admin UI and the API: sessions, CSRF tokens, the login limit, bearer tokens.

- Admins log in with the password whose scrypt hash is ``web.admin_password_hash``.
  A login makes a session: a random id in an ``HttpOnly; SameSite=Strict`` cookie
  (``Secure`` when served over HTTPS or ``web.base_url`` is https), held in this
  process's memory (one process serves the web, docs/web.md), ending after
  ``web.session_timeout`` or at logout.
- Every state-changing request of a session carries the session's CSRF token
  (form field ``csrf_token`` or header ``X-CSRF-Token``), compared in constant
  time; the login form carries a double-submit token of its own.
- Failed logins are limited per client address and in total (a sliding window);
  past the limit a login is refused before the password is even checked.
- Scripts send ``Authorization: Bearer <token>``; a token matches one of
  ``web.api_token_hashes``. scrypt costs ~40 ms, so a verified token is
  remembered (by its SHA-256) for a minute: a script's burst costs one hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import quote

from aiohttp import web

from gateway.config import WebConfig
from gateway.web.context import context_of
from gateway.web.hashes import MAX_SECRET, verify_secret
from gateway.web.paths import API_PREFIX, RECIPIENT_PREFIX

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

__all__ = [
    "AUTH",
    "SESSION",
    "AuthState",
    "LoginLimiter",
    "Session",
    "Sessions",
    "TokenChecker",
    "csrf_ok",
    "guard",
    "new_token",
]

SESSION_COOKIE = "gw_session"
LOGIN_COOKIE = "gw_login"  # the login form's double-submit CSRF token
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"

_MAX_SESSIONS = 1000  # live sessions kept; the oldest goes first (bounded memory)
_TOKEN_CACHE = 64
_TOKEN_TTL = 60.0  # seconds a verified bearer token is remembered


def new_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(expected: str, given: str | None) -> bool:
    """Constant-time; an absent or empty token never matches."""
    return bool(given) and bool(expected) and hmac.compare_digest(expected, given or "")


@dataclass(slots=True)
class Session:
    id: str
    csrf: str
    expires: float  # time.monotonic()


class Sessions:
    """Live admin sessions, in memory, bounded."""

    def __init__(self) -> None:
        self._live: OrderedDict[str, Session] = OrderedDict()

    def create(self, timeout: float) -> Session:
        while len(self._live) >= _MAX_SESSIONS:
            self._live.popitem(last=False)
        session = Session(new_token(), new_token(), time.monotonic() + timeout)
        self._live[session.id] = session
        return session

    def get(self, sid: str | None) -> Session | None:
        if not sid or len(sid) > 128:
            return None
        session = self._live.get(sid)
        if session is None:
            return None
        if time.monotonic() >= session.expires:
            del self._live[sid]
            return None
        return session

    def end(self, sid: str) -> None:
        self._live.pop(sid, None)


@dataclass(slots=True)
class LoginLimiter:
    """At most ``per_client`` failed logins per client and ``total`` overall per ``window``."""

    per_client: int = 5
    total: int = 50
    window: float = 900.0  # seconds
    _clients: dict[str, deque[float]] = field(default_factory=dict)
    _all: deque[float] = field(default_factory=deque)

    def _trim(self, q: deque[float], now: float) -> None:
        while q and q[0] <= now - self.window:
            q.popleft()

    def retry_after(self, client: str) -> float:
        """Seconds until ``client`` may try again; 0 when it may now."""
        now = time.monotonic()
        self._trim(self._all, now)
        q = self._clients.get(client)
        if q is not None:
            self._trim(q, now)
        waits = []
        if q is not None and len(q) >= self.per_client:
            waits.append(q[0] + self.window - now)
        if len(self._all) >= self.total:
            waits.append(self._all[0] + self.window - now)
        return max(waits, default=0.0)

    def failed(self, client: str) -> None:
        now = time.monotonic()
        if client not in self._clients and len(self._clients) >= 10_000:
            self._clients.clear()  # bounded memory; the total limit still holds
        self._clients.setdefault(client, deque()).append(now)
        self._all.append(now)

    def succeeded(self, client: str) -> None:
        self._clients.pop(client, None)


class TokenChecker:
    """Bearer tokens against ``web.api_token_hashes``."""

    def __init__(self) -> None:
        self._known: OrderedDict[bytes, float] = OrderedDict()

    async def check(self, config: WebConfig, token: str) -> bool:
        if not token or len(token) > MAX_SECRET or not config.api_token_hashes:
            return False
        key = hashlib.sha256(
            token.encode() + b"\0" + "\n".join(config.api_token_hashes).encode()
        ).digest()
        seen = self._known.get(key)
        if seen is not None and time.monotonic() < seen:
            return True
        for hashed in config.api_token_hashes:
            if await asyncio.to_thread(verify_secret, token, hashed):
                while len(self._known) >= _TOKEN_CACHE:
                    self._known.popitem(last=False)
                self._known[key] = time.monotonic() + _TOKEN_TTL
                return True
        return False


# --- the guard in front of every route ------------------------------------------

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_OPEN_PATHS = ("/login", "/static/")  # plus RECIPIENT_PREFIX: a signed link is the authority


@dataclass(slots=True)
class AuthState:
    """This app's sessions, login limit and token cache (one per app, one app per process)."""

    sessions: Sessions = field(default_factory=Sessions)
    limiter: LoginLimiter = field(default_factory=LoginLimiter)
    tokens: TokenChecker = field(default_factory=TokenChecker)


AUTH: web.AppKey[AuthState] = web.AppKey("gateway_web_auth", AuthState)
SESSION: web.RequestKey[Session] = web.RequestKey("gateway_web_session", Session)


def _refuse(request: web.Request, status: int, message: str) -> web.Response:
    if request.path.startswith(API_PREFIX):
        headers = {"WWW-Authenticate": 'Bearer realm="gateway"'} if status == 401 else None
        return web.json_response({"error": message}, status=status, headers=headers)
    if status == 401 and request.method in _SAFE_METHODS:
        raise web.HTTPSeeOther(f"/login?next={quote(request.path_qs, safe='')}")
    return web.Response(status=status, text=message)


async def _csrf_given(request: web.Request) -> str | None:
    given = request.headers.get(CSRF_HEADER)
    if given is None and request.content_type in (
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ):
        form = await request.post()  # cached: the handler reads the same form
        value = form.get(CSRF_FIELD)
        given = value if isinstance(value, str) else None
    return given


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Admin session (+ CSRF on state changes) or bearer token, except the open paths."""
    path = request.path
    if path.startswith(RECIPIENT_PREFIX) or path.startswith(_OPEN_PATHS):
        return await handler(request)
    state = request.app[AUTH]
    authz = request.headers.get("Authorization")
    if authz is not None:
        scheme, _, token = authz.partition(" ")
        config = context_of(request).config().web
        if scheme.lower() == "bearer" and await state.tokens.check(config, token.strip()):
            return await handler(request)  # no cookie involved: no CSRF to check
        return _refuse(
            request, 401, "bad bearer token: use one whose hash is in web.api_token_hashes"
        )
    session = state.sessions.get(request.cookies.get(SESSION_COOKIE))
    if session is None:
        return _refuse(request, 401, "log in first (or send Authorization: Bearer <token>)")
    if request.method not in _SAFE_METHODS and not csrf_ok(
        session.csrf, await _csrf_given(request)
    ):
        return _refuse(request, 403, "missing or wrong CSRF token: reload the page and try again")
    request[SESSION] = session
    return await handler(request)
