"""The milter listener: TCP ``host:port`` or ``unix:/path``, bounded, drained on stop.

Each accepted connection is one :class:`~gateway.milter.session.MilterSession`
(Postfix opens one per SMTP session and keeps it for every message of that
session). Past ``milter.max_connections`` a new connection is closed at once
and counted: the MTA applies its ``milter_default_action`` to that session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from pathlib import Path

from gateway import metrics
from gateway.config import parse_hostport
from gateway.milter.session import MilterBackend, MilterSession

__all__ = ["MilterListener", "parse_listen"]

log = logging.getLogger("gateway.milter")


def parse_listen(listen: str) -> tuple[str, int] | Path:
    """``"host:port"`` (port 0 = ephemeral) -> (host, port); ``"unix:/path"`` -> Path."""
    text = listen.strip()
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f'must be "unix:/absolute/path", got "{listen}"')
        return Path(path)
    if text.endswith(":0"):
        host, _ = parse_hostport(text[:-2] + ":1")
        return host, 0
    return parse_hostport(text)


class MilterListener:
    """Accepts MTA connections and runs a session for each."""

    def __init__(self, backend: MilterBackend, max_connections: int) -> None:
        self.backend = backend
        self.max_connections = max_connections
        self.server: asyncio.Server | None = None
        self.sessions: dict[asyncio.Task[None], MilterSession] = {}
        self.address = ""
        self.port: int | None = None
        self._path: Path | None = None

    async def start(self, listen: str, sock: socket.socket | None = None) -> None:
        """Bind and serve; OSError when the address cannot be bound.

        ``sock``: already bound by the supervisor (``server.workers`` > 1), who
        also removes a Unix socket at the end.
        """
        where = parse_listen(listen)
        if sock is not None:
            if sock.family == socket.AF_UNIX:
                self.server = await asyncio.start_unix_server(self._accept, sock=sock)
                self.address = listen
            else:
                self.server = await asyncio.start_server(self._accept, sock=sock, backlog=1024)
                self.port = int(self.server.sockets[0].getsockname()[1])
                self.address = listen
        elif isinstance(where, Path):
            _remove_stale_socket(where)
            self.server = await asyncio.start_unix_server(self._accept, path=str(where))
            # Access is the directory's business (Postfix connects as its own user).
            os.chmod(where, 0o666)  # noqa: S103
            self._path = where
            self.address = f"unix:{where}"
        else:
            host, port = where
            self.server = await asyncio.start_server(
                self._accept, host or None, port, reuse_address=True, backlog=1024
            )
            self.port = int(self.server.sockets[0].getsockname()[1])
            self.address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        if len(self.sessions) >= self.max_connections or self.backend.draining:
            reason = "draining" if self.backend.draining else "max_connections"
            metrics.MILTER_ERRORS.labels(reason=reason).inc()
            log.warning("milter_connection_refused", extra={"peer": peer, "reason": reason})
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        session = MilterSession(self.backend, reader, writer, peer)
        self.sessions[task] = session
        metrics.MILTER_CONNECTIONS.inc()
        try:
            await session.run()
        except Exception:  # never let one connection take the listener down
            metrics.MILTER_ERRORS.labels(reason="internal").inc()
            log.exception("milter_session_crashed", extra={"peer": peer})
        finally:
            metrics.MILTER_CONNECTIONS.dec()
            self.sessions.pop(task, None)

    async def stop(self, grace: float) -> None:
        """Stop accepting, close idle connections, let messages in flight finish for ``grace``."""
        if self.server is not None:
            self.server.close()
        # Closing the socket under a session ends its read; the MTA reconnects elsewhere
        # (or applies milter_default_action to that SMTP session).
        for session in list(self.sessions.values()):
            if session.idle:
                session.writer.transport.abort()
        pending = list(self.sessions)
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                self.sessions[task].writer.transport.abort()
            if late:
                await asyncio.wait(late, timeout=5.0)
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
        if self._path is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()


def _remove_stale_socket(path: Path) -> None:
    """A socket left by a previous run is removed; any other file there is an error."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(f"{path} exists and is not a socket")
        path.unlink()


def _peer(writer: asyncio.StreamWriter) -> str:
    name = writer.get_extra_info("peername")
    if isinstance(name, tuple) and len(name) >= 2:
        return f"{name[0]}:{name[1]}"
    return "unix"
