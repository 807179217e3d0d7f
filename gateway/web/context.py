"""What the web handlers need from the running gateway, in one small object.

The web app never reaches into the SMTP side: ``gateway run`` builds a
:class:`WebContext` from its live objects and hands it to
:func:`gateway.web.app.build_app`; tests build one over a bare store. The
config and the learner are callables because a SIGHUP reload swaps them:
a handler reads them per request and so sees the current generation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway import release as _release
from gateway.config import Config
from gateway.learning import Learner
from gateway.quarantine import QuarantineItem, QuarantineStore

__all__ = ["CONTEXT", "ReleaseFn", "WebContext", "context_of"]

ReleaseFn = Callable[
    [Config, QuarantineStore, QuarantineItem, bytes, Sequence[str] | None],
    Coroutine[Any, Any, _release.Released],
]


async def _no_reload() -> None:
    """Tests without a running gateway: nothing to reload."""


@dataclass(slots=True)
class WebContext:
    """The running gateway as the web app sees it.

    ``config`` and ``learner`` return the current generation's (they change on
    reload); ``quarantine`` is the store every front end writes to; ``release``
    is :func:`gateway.release.release` (the one release path: claim, relay,
    remove); ``link_key`` signs and checks recipient links
    (:mod:`gateway.web.links`); ``reload`` re-reads the config everywhere
    (after a list file changed: every worker, not only this process).
    """

    config: Callable[[], Config]
    quarantine: QuarantineStore
    link_key: bytes
    learner: Callable[[], Learner | None] = lambda: None
    release: ReleaseFn = field(default=_release.release)
    reload: Callable[[], Awaitable[object]] = field(default=_no_reload)

    @property
    def learn_enabled(self) -> bool:
        return self.config().quarantine.learn_on_release


CONTEXT: web.AppKey[WebContext] = web.AppKey("gateway_web_context", WebContext)


def context_of(request: web.Request) -> WebContext:
    """The context of the app ``request`` came to (set by ``build_app``)."""
    return request.config_dict[CONTEXT]
