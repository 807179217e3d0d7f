"""Serving the web app on ``web.listen`` in the gateway's own event loop.

``gateway run`` starts it in one process: the only one, or worker 0 when
``server.workers`` > 1 (like ``/metrics``). Admin traffic is a handful of
people; one process keeps sessions, CSRF secrets and the login rate limit
in one place without a shared store, and the SMTP workers never pay for it.
What the handlers do that blocks (scrypt, SQLite) runs in threads; the
quarantine is shared, so a release from the UI acts on every worker's mail.
"""

from __future__ import annotations

import ssl

from aiohttp import web

from gateway.config import Config
from gateway.web.app import build_app
from gateway.web.context import WebContext

__all__ = ["WebServer", "start_web", "tls_context"]

_SHUTDOWN = 5.0  # seconds open requests get when the gateway stops


class WebServer:
    """A running web app; ``port`` is the bound port (``web.listen`` may say port 0)."""

    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self._runner = runner
        self.port = port

    async def close(self) -> None:
        await self._runner.cleanup()


def tls_context(config: Config) -> ssl.SSLContext | None:
    """HTTPS from ``web.tls_cert``/``tls_key``, or None (plain HTTP: loopback or a proxy)."""
    web_config = config.web
    if not web_config.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(
        config.resolve_path(web_config.tls_cert),
        config.resolve_path(web_config.tls_key or web_config.tls_cert),
    )
    return ctx


async def start_web(
    ctx: WebContext, host: str, port: int, tls: ssl.SSLContext | None = None
) -> WebServer:
    """Serve :func:`build_app` on ``host:port`` (port 0 picks one); OSError when it cannot."""
    runner = web.AppRunner(build_app(ctx), access_log=None, shutdown_timeout=_SHUTDOWN)
    await runner.setup()
    site = web.TCPSite(runner, host or None, port, ssl_context=tls)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1] if runner.addresses else port
    return WebServer(runner, int(bound))
