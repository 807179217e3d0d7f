"""The web app for tests and benches: served on loopback over a real store and downstream.

    async with served_web(store, sink, workdir) as w:
        async with w.client() as http:          # aiohttp session with the bearer token
            await http.get(w.url("/api/v1/quarantine"))

Fast scrypt parameters (N=2^10) for the test password and token: the
hashes are real, only cheaper to check.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from gateway.config import Config, load_config
from gateway.learning import Learner
from gateway.quarantine import QuarantineStore
from gateway.testing.harness import write_config
from gateway.testing.sink import SinkServer
from gateway.web.context import WebContext
from gateway.web.hashes import hash_secret
from gateway.web.server import start_web, tls_context

__all__ = ["PASSWORD", "TOKEN", "ServedWeb", "login", "served_web", "web_overrides"]

PASSWORD = "correct horse battery staple"  # noqa: S105 -- the test admin's, by design
TOKEN = "test-token-0123456789abcdef"  # noqa: S105 -- the test script's
_FAST = {"n": 2**10, "r": 8, "p": 1}


def web_overrides(
    sink: SinkServer | None, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Config keys for a web test: relay to ``sink``, the test password and token, no policies."""
    relay = {"relay.host": sink.host, "relay.port": sink.port} if sink is not None else {}
    return {
        **relay,
        "relay.timeout": 5.0,
        "policies": {},
        "scores": {},
        "web.listen": "127.0.0.1:0",
        "web.admin_password_hash": hash_secret(PASSWORD, **_FAST),
        "web.api_token_hashes": [hash_secret(TOKEN, **_FAST)],
        **(extra or {}),
    }


class ServedWeb:
    def __init__(self, ctx: WebContext, port: int, config_path: Path) -> None:
        self.ctx = ctx
        self.port = port
        self.config_path = config_path
        self.reloads = 0

    def url(self, path: str) -> str:
        scheme = "https" if self.ctx.config().web.tls_cert else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def client(self, token: str | None = TOKEN) -> aiohttp.ClientSession:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(ssl=False),  # the tests' self-signed certificate
            timeout=aiohttp.ClientTimeout(total=30),
            cookie_jar=aiohttp.CookieJar(unsafe=True),  # cookies for 127.0.0.1
        )


@contextlib.asynccontextmanager
async def served_web(
    store: QuarantineStore,
    sink: SinkServer | None,
    workdir: Path,
    overrides: Mapping[str, Any] | None = None,
    learner: Learner | None = None,
) -> AsyncIterator[ServedWeb]:
    """The app over ``store`` on a loopback port; releases go to ``sink`` (None: nowhere)."""
    path = write_config(web_overrides(sink, overrides), workdir)
    holder: dict[str, Config] = {"config": load_config(path)}
    served: ServedWeb | None = None

    async def reload() -> None:
        holder["config"] = load_config(path)
        if served is not None:
            served.reloads += 1

    ctx = WebContext(
        config=lambda: holder["config"],
        quarantine=store,
        link_key=b"k" * 32,
        learner=lambda: learner,
        reload=reload,
    )
    server = await start_web(ctx, "127.0.0.1", 0, tls_context(holder["config"]))
    served = ServedWeb(ctx, server.port, path)
    try:
        yield served
    finally:
        await server.close()


async def login(http: aiohttp.ClientSession, web: ServedWeb, password: str = PASSWORD) -> str:
    """Log ``http`` in through the form; returns the session's CSRF token."""
    async with http.get(web.url("/login")) as r:
        page = await r.text()
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found is not None, page[:500]
    async with http.post(
        web.url("/login"),
        data={"password": password, "csrf_token": found.group(1)},
        allow_redirects=False,
    ) as r:
        assert r.status == 303, await r.text()
    async with http.get(web.url("/")) as r:
        page = await r.text()
    token = re.search(r'name="csrf-token" content="([^"]+)"', page)
    assert token is not None, page[:500]
    return token.group(1)
