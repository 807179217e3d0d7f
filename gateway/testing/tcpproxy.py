"""A loopback TCP forwarder that can be taken down and brought back, for outage tests.

Shared servers (the machine's PostgreSQL and Redis) must not be stopped by one
test suite while others use them. Put this proxy in front instead::

    with TCPProxy("127.0.0.1", 5432) as proxy:      # proxy.port: where to connect
        ...
        proxy.down()     # refuse new connections and cut the open ones
        proxy.up()       # accept again on the same port

``delay`` (seconds) holds every chunk that long in each direction before it
is passed on, in order: a link with a round trip of ``2 * delay`` on
loopback (the PIPELINING benchmark, ``bench/pipelining.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["TCPProxy"]

T = TypeVar("T")


class TCPProxy:
    """Forwards ``127.0.0.1:port`` to ``host:target_port`` in its own thread and loop."""

    def __init__(self, host: str, target_port: int, *, delay: float = 0.0) -> None:
        self.target = (host, target_port)
        self.delay = delay
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.delay > 0:
            await self._delayed_pipe(reader, writer)
            return
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _delayed_pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Each chunk leaves ``delay`` after it arrived; reading goes on meanwhile."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(send())
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                queue.put_nowait((loop.time() + self.delay, data))
        queue.put_nowait((loop.time() + self.delay, b""))
        with contextlib.suppress(Exception):
            await sender
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except (OSError, TimeoutError):
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

    async def _up(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]

    async def _down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def up(self) -> TCPProxy:
        """Listen (on the same port as before, once one was chosen)."""
        self._call(self._up())
        return self

    def down(self) -> None:
        """Refuse new connections and cut every forwarded one."""
        self._call(self._down())

    def close(self) -> None:
        if self._thread.is_alive():
            self.down()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()

    def __enter__(self) -> TCPProxy:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.close()
