"""A small asyncio client for clamd's ``zINSTREAM`` and ``zPING`` (clamd(8), "COMMANDS").

Our own rather than a registry package: the protocol is four lines (command,
length-prefixed chunks, a zero-length terminator, one NUL-terminated reply),
and the packages on offer are synchronous (``clamd``, ``pyclamd``) or lack
unix sockets, reply bounds and per-phase deadlines, which hostile input and a
hung daemon both need. One connection per scan: clamd closes a connection
after INSTREAM unless an IDSESSION is held open, and a fresh connection never
inherits a half-read reply from a scan that timed out.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ClamdAddress",
    "ClamdClient",
    "ClamdError",
    "ClamdTimeoutError",
    "ScanReply",
    "Verdict",
    "parse_address",
]

CHUNK_SIZE = 64 * 1024
_STREAM_HINT = " during the stream: over its StreamMaxLength? keep max_stream_size at or below it"
_MAX_REPLY = 4096  # a reply is "stream: <signature> FOUND"; anything longer is not clamd


class ClamdError(Exception):
    """clamd could not be reached or answered something we do not understand."""


class ClamdTimeoutError(ClamdError):
    """clamd did not connect or answer within its deadline."""


@dataclass(frozen=True, slots=True)
class ClamdAddress:
    """``host:port`` (TCP) or ``unix:/path`` (a local socket)."""

    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(text: str) -> ClamdAddress:
    """``"127.0.0.1:3310"``, ``"[::1]:3310"`` or ``"unix:/run/clamav/clamd.ctl"``."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise ValueError(f'unix socket path must be absolute, got "{path}"')
        return ClamdAddress(path=path)
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f'expected "host:port" or "unix:/path", got "{text}"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'port must be 1..65535, got "{port}"')
    return ClamdAddress(host=host, port=int(port))


class Verdict(enum.Enum):
    CLEAN = "clean"
    FOUND = "found"
    TOO_LARGE = "too_large"  # over clamd's StreamMaxLength


@dataclass(frozen=True, slots=True)
class ScanReply:
    verdict: Verdict
    signature: str = ""


def parse_reply(reply: bytes) -> ScanReply:
    """``stream: OK``, ``stream: <name> FOUND``, ``INSTREAM size limit exceeded. ERROR``."""
    text = reply.rstrip(b"\0").decode("utf-8", "replace").strip()
    if text.endswith("size limit exceeded. ERROR"):
        return ScanReply(Verdict.TOO_LARGE)
    _, _, body = text.partition(": ")
    if body == "OK":
        return ScanReply(Verdict.CLEAN)
    if body.endswith(" FOUND"):
        signature = body[: -len(" FOUND")].strip()
        if signature:
            return ScanReply(Verdict.FOUND, signature)
    raise ClamdError(f"unexpected clamd reply: {text[:200]!r}")


class ClamdClient:
    """Scans byte strings with one connection each; ``limit`` connections at once."""

    def __init__(
        self,
        address: ClamdAddress,
        *,
        connect_timeout: float,
        read_timeout: float,
        limit: int,
    ) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._limit = limit
        self._slots = asyncio.Semaphore(limit)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.address.path:
                    return await asyncio.open_unix_connection(self.address.path, limit=_MAX_REPLY)
                return await asyncio.open_connection(
                    self.address.host, self.address.port, limit=_MAX_REPLY
                )
        except TimeoutError:
            raise ClamdTimeoutError(
                f"no connection to clamd at {self.address} within {self.connect_timeout:g}s"
            ) from None
        except OSError as exc:
            raise ClamdError(
                f"cannot connect to clamd at {self.address}: {exc.strerror or exc}"
            ) from None

    async def _exchange(self, command: bytes, chunks: Iterable[memoryview] = ()) -> bytes:
        """Send ``command`` (and chunks, for INSTREAM); the NUL-terminated reply.

        A scan waits for one of ``limit`` slots, at most ``read_timeout``; a PING
        does not wait, so readiness does not flap while every slot is busy.
        """
        if not command.startswith(b"zINSTREAM"):
            return await self._connected(command, chunks)
        try:
            async with asyncio.timeout(self.read_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise ClamdTimeoutError(
                f"all {self._limit} connections to clamd at {self.address} stayed busy "
                f"for {self.read_timeout:g}s"
            ) from None
        try:
            return await self._connected(command, chunks)
        finally:
            self._slots.release()

    async def _connected(self, command: bytes, chunks: Iterable[memoryview]) -> bytes:
        reader, writer = await self._open()
        try:
            async with asyncio.timeout(self.read_timeout):
                writer.write(command)
                try:
                    for chunk in chunks:
                        writer.write(struct.pack(">I", len(chunk)))
                        writer.write(chunk)
                        await writer.drain()
                    if command.startswith(b"zINSTREAM"):
                        writer.write(b"\0\0\0\0")
                    await writer.drain()
                except (ConnectionResetError, BrokenPipeError):
                    pass  # clamd stops reading past StreamMaxLength; its reply says why
                return await _read_reply(reader)
        except (ConnectionResetError, BrokenPipeError):
            # Past StreamMaxLength clamd replies and closes with our data unread: the
            # kernel's reset may beat its reply to us, so both mean the same.
            raise ClamdError(
                f"clamd at {self.address} reset the connection"
                + (_STREAM_HINT if command.startswith(b"zINSTREAM") else "")
            ) from None
        except TimeoutError:
            raise ClamdTimeoutError(
                f"clamd at {self.address} did not answer within {self.read_timeout:g}s"
            ) from None
        except OSError as exc:
            raise ClamdError(f"clamd at {self.address}: {exc.strerror or exc}") from None
        finally:
            # Abort, not close: close() would wait to flush what a hung clamd never reads.
            writer.transport.abort()

    async def scan(self, data: bytes) -> ScanReply:
        """One ``zINSTREAM`` of ``data`` in 64 KiB chunks (memoryview slices: no copies)."""
        view = memoryview(data)
        chunks = (view[i : i + CHUNK_SIZE] for i in range(0, len(view), CHUNK_SIZE))
        return parse_reply(await self._exchange(b"zINSTREAM\0", chunks))

    async def ping(self) -> None:
        """``zPING``; raises ClamdError unless clamd answers PONG."""
        reply = await self._exchange(b"zPING\0")
        if reply.rstrip(b"\0").strip() != b"PONG":
            raise ClamdError(f"unexpected answer to PING: {reply[:100]!r}")


async def _read_reply(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\0")
    except asyncio.LimitOverrunError:
        raise ClamdError("clamd reply too long") from None
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            return exc.partial  # a reply without its NUL before close is still a reply
        raise ConnectionResetError("closed without a reply") from None
