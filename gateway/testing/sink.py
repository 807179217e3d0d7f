"""A real recording downstream SMTP server for tests and the demo.

``SinkServer`` runs aiosmtpd on its own event loop in a background thread so
synchronous tests (smtplib, subprocess gateways) and async tests can both use
it. Every accepted message is recorded with the exact bytes received after
dot-unstuffing (``envelope.original_content``), so tests can assert that the
gateway relayed every byte unchanged.

Knobs, settable at any time from the test thread:

- ``data_reply``: ``None`` answers 250; a string such as ``"451 4.3.0 busy"``
  is sent as the reply to DATA and nothing is recorded.
- ``rcpt_replies``: address (lower case) -> reply string at RCPT.
- ``stop()`` / ``start()``: take the listener down and bring it back on the
  same port (the downstream is "down" in between).
- ``tls=True``: offer STARTTLS with a generated self-signed certificate.
- ``pipelining``: offer PIPELINING (default, as Postfix does); each
  ``Delivered.pipelined`` says whether the envelope came as one group.
- ``xforward``: ``None`` offers no XFORWARD; a string such as ``"NAME ADDR
  HELO"`` offers those attributes (Postfix XFORWARD_README) and records each
  transaction's XFORWARD arguments in ``Delivered.xforward``;
  ``xforward_reply`` (e.g. ``"550 5.7.0 no"``) refuses them instead.

``python -m gateway.testing.sink --listen 127.0.0.1:10026`` prints each
delivery; the README's demo uses it as the local downstream.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import socket
import ssl
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

__all__ = ["Delivered", "LongLineSMTP", "SinkServer", "main", "make_self_signed"]


@dataclass(frozen=True, slots=True)
class Delivered:
    """One message the sink accepted."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    xforward: tuple[str, ...] = ()  # the XFORWARD arguments sent before this MAIL
    # DATA had already arrived when the transaction's first command (XFORWARD or
    # MAIL) was read: the client sent the envelope as one pipelined group (RFC 2920).
    pipelined: bool = False


def make_self_signed(directory: Path, hostname: str = "localhost") -> tuple[Path, Path]:
    """Write a fresh self-signed certificate and key (PEM); return (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class _Envelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.xforward: list[str] = []
        self.pipelined = False


class _Handler:
    def __init__(self, sink: SinkServer) -> None:
        self.sink = sink

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.sink.xforward is not None:
            responses.insert(-1, "250-XFORWARD " + self.sink.xforward)
        if self.sink.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.sink.rcpt_replies.get(address.lower())
        if reply is not None and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)
        return reply or "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = self.sink.data_reply
        if reply is not None:
            return reply
        raw = envelope.original_content or b""
        mail_from = envelope.mail_from or ""
        item = Delivered(
            "" if mail_from == "<>" else mail_from,
            tuple(envelope.rcpt_tos),
            raw,
            tuple(envelope.xforward) if isinstance(envelope, _Envelope) else (),
            isinstance(envelope, _Envelope) and envelope.pipelined,
        )
        with self.sink._lock:
            self.sink.messages.append(item)
            self.sink._count += 1
            count = self.sink._count
        self.sink._arrived.set()
        if self.sink.echo:
            print(
                f"delivered #{count}: from=<{item.mail_from}> to={list(item.rcpt_tos)} "
                f"size={len(raw)}",
                flush=True,
            )
            head = raw.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
            print(head, flush=True)
            print(flush=True)
        return f"250 2.0.0 Ok: queued as SINK{count}"


class LongLineSMTP(SMTP):
    """aiosmtpd that takes DATA lines of any length up to 64 MiB, as Postfix does.

    aiosmtpd answers ``500 Line too long`` past 1,000 octets; the gateway relays
    long lines unchanged (real mail has them), so a downstream standing in for
    an MTA -- this sink, the benchmark's sink and baseline relay -- must not be
    stricter than the MTAs it stands in for. (A command line is bounded by the
    same limit here: these servers only ever talk to the gateway or the bench.)
    """

    line_length_limit = 64 * 1024 * 1024


class _TrackedSMTP(LongLineSMTP):
    """Remembers its transport so ``stop()`` can drop live sessions too."""

    def __init__(self, connections: set[asyncio.BaseTransport], *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self._tracked = connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None:
            self._tracked.add(transport)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._tracked.discard(self._original_transport or self.transport)
        super().connection_lost(error)

    def _create_envelope(self) -> Envelope:
        return _Envelope()

    def _note_group(self) -> None:
        """At a transaction's first command: is its DATA already buffered (pipelined)?"""
        envelope = self.envelope
        first = isinstance(envelope, _Envelope) and envelope.mail_from is None
        if first and isinstance(envelope, _Envelope) and not envelope.xforward:
            buffered = bytes(self._reader._buffer)  # type: ignore[attr-defined]
            envelope.pipelined = b"\r\nDATA\r\n" in b"\r\n" + buffered.upper()

    async def smtp_MAIL(self, arg: str) -> None:
        self._note_group()
        await super().smtp_MAIL(arg)

    async def smtp_XFORWARD(self, arg: str) -> None:
        """Record the arguments as Postfix would accept them (not between MAIL and DOT)."""
        sink: SinkServer = self.event_handler.sink
        if sink.xforward is None:
            await self.push('500 Error: command "XFORWARD" not recognized')
        elif sink.xforward_reply is not None:
            await self.push(sink.xforward_reply)
        elif not arg:
            await self.push("501 5.5.4 Syntax: XFORWARD attribute=value...")
        elif self.envelope is None or self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
        else:
            assert isinstance(self.envelope, _Envelope)
            self._note_group()
            self.envelope.xforward.append(arg)
            await self.push("250 2.0.0 Ok")


class SinkServer:
    """A recording SMTP server on ``host``:``port`` (port 0 picks a free one)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: bool = False,
        hostname: str = "sink.test",
        echo: bool = False,
        data_size_limit: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.hostname = hostname
        self.echo = echo
        self.data_size_limit = data_size_limit
        self.messages: list[Delivered] = []
        self.data_reply: str | None = None
        self.rcpt_replies: dict[str, str] = {}
        self.xforward: str | None = None
        self.xforward_reply: str | None = None
        self.pipelining = True  # offer PIPELINING (RFC 2920) in EHLO, as Postfix does
        self._lock = threading.Lock()
        self._count = 0
        self._arrived = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tls_context: ssl.SSLContext | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._connections: set[asyncio.BaseTransport] = set()
        if tls:
            self._tmp = tempfile.TemporaryDirectory(prefix="sink-tls-")
            cert, key = make_self_signed(Path(self._tmp.name), hostname)
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(cert, key)
            self._tls_context = ctx
            self.cert_path = cert

    # -- lifecycle -----------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                loop.run_forever()

            self._thread = threading.Thread(target=run, name="sink-smtp", daemon=True)
            self._thread.start()
            started.wait(5)
            self._loop = loop
        return self._loop

    def _factory(self) -> SMTP:
        return _TrackedSMTP(
            self._connections,
            _Handler(self),
            hostname=self.hostname,
            enable_SMTPUTF8=True,
            data_size_limit=self.data_size_limit,
            tls_context=self._tls_context,
            timeout=30,
        )

    def start(self) -> SinkServer:
        """Listen (again); after ``stop()`` the same port is reused."""
        loop = self._ensure_loop()

        async def listen() -> asyncio.Server:
            return await loop.create_server(self._factory, self.host, self.port, reuse_address=True)

        server = asyncio.run_coroutine_threadsafe(listen(), loop).result(10)
        self._server = server
        sock: socket.socket = server.sockets[0]
        self.port = int(sock.getsockname()[1])
        return self

    def stop(self) -> None:
        """Stop listening and drop open sessions: the downstream is now down."""
        if self._loop is None or self._server is None:
            return
        server = self._server
        self._server = None

        async def close() -> None:
            server.close()
            for transport in list(self._connections):
                transport.close()
            self._connections.clear()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)

    def close(self) -> None:
        """Stop and end the thread."""
        self.stop()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(5)
            self._loop.close()
            self._loop = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> SinkServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers for tests ---------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()
            self._arrived.clear()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Delivered]:
        """Block until at least ``count`` messages arrived (or the timeout passes)."""
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                if len(self.messages) >= count:
                    return list(self.messages)
                self._arrived.clear()
            remaining = end - time.monotonic()
            if remaining <= 0:
                with self._lock:
                    return list(self.messages)
            self._arrived.wait(min(remaining, 0.1))


def main(argv: list[str] | None = None) -> int:
    """Run a sink that prints each delivery until interrupted."""
    from gateway.config import parse_hostport

    parser = argparse.ArgumentParser(prog="python -m gateway.testing.sink")
    parser.add_argument("--listen", default="127.0.0.1:10026", help="host:port to listen on")
    parser.add_argument("--tls", action="store_true", help="offer STARTTLS (self-signed)")
    args = parser.parse_args(argv)
    listen = args.listen.strip()
    if listen.endswith(":0"):
        host, port = parse_hostport(listen[:-2] + ":1")[0], 0
    else:
        host, port = parse_hostport(listen)
    sink = SinkServer(host, port, tls=args.tls, echo=True)
    sink.start()
    print(f"sink listening on {sink.address}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
