"""Fault injection for reliability tests: a misbehaving network, downstream and sender.

- :class:`FaultyProxy`: a loopback TCP forwarder (a :class:`TCPProxy`) that
  can cut a connection after a random number of client bytes (mid-DATA when
  the message is large enough), stall every new connection, or go down.
- :class:`FlakySink`: the recording downstream (:class:`SinkServer`) that
  answers DATA with a random 4xx, drops the connection before recording the
  message, or records it and drops the connection before replying (the one
  case where SMTP itself allows a duplicate, RFC 5321 §4.5.4.1 / RFC 1047).
- :class:`Ledger` and :func:`send_with_retries`: senders that keep a record of
  every attempt and retry 4xx and lost connections the way a real MTA does;
  :meth:`Ledger.audit` compares the record with what arrived downstream.

DNS outages use :class:`gateway.testing.dnsserver.DNSServer` (``outage``,
``servfail``, ``drop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.testing.sink import Delivered, SinkServer, _Handler, _TrackedSMTP
from gateway.testing.tcpproxy import TCPProxy

__all__ = [
    "Attempt",
    "Audit",
    "FaultyProxy",
    "FlakySink",
    "Ledger",
    "SinkProcess",
    "ledger_ids",
    "numbered_message",
    "send_with_retries",
]


# --- network ------------------------------------------------------------------


class FaultyProxy(TCPProxy):
    """A TCPProxy that cuts or stalls connections on demand.

    ``cut_probability``: chance that a new connection is cut after a random
    number of client->server bytes in ``cut_after`` (both directions aborted).
    ``stall``: new connections are accepted and then never forwarded.
    """

    def __init__(
        self,
        host: str,
        target_port: int,
        *,
        cut_probability: float = 0.0,
        cut_after: tuple[int, int] = (200, 4000),
        seed: int = 0,
    ) -> None:
        super().__init__(host, target_port)
        self.cut_probability = cut_probability
        self.cut_after = cut_after
        self.stall = False
        self.cuts = 0
        self.cuts_after_end_of_data = 0
        self._random = random.Random(seed)

    async def _forward(
        self,
        reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        writer: asyncio.StreamWriter,
        budget: int | None,
    ) -> None:
        """Client -> server, cutting both sides once ``budget`` bytes went through."""
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                if budget is not None and len(data) >= budget:
                    up_writer.write(data[:budget])
                    self.cuts += 1
                    if b"\r\n.\r\n" in data[:budget]:
                        # The whole message went through: the downstream may take it
                        # and its 250 is lost (SMTP's duplicate case).
                        self.cuts_after_end_of_data += 1
                    up_writer.transport.abort()
                    writer.transport.abort()
                    return
                if budget is not None:
                    budget -= len(data)
                up_writer.write(data)
                await up_writer.drain()
        up_writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.stall:
            self._writers.add(writer)
            with contextlib.suppress(Exception):
                while await reader.read(65536):
                    pass
            self._writers.discard(writer)
            writer.close()
            return
        try:
            async with asyncio.timeout(5):
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except (OSError, TimeoutError):
            writer.close()
            return
        budget = None
        if self._random.random() < self.cut_probability:
            budget = self._random.randint(*self.cut_after)
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._forward(reader, up_writer, writer, budget), self._pipe(up_reader, writer)
        )
        self._writers.difference_update((writer, up_writer))


# --- downstream -----------------------------------------------------------------


class _FlakyHandler(_Handler):
    def __init__(self, sink: FlakySink) -> None:
        super().__init__(sink)
        self.flaky = sink

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        fault = self.flaky.pick_fault()
        transport: Any = server.transport  # a live asyncio transport (abort() exists)
        if fault == "tempfail":
            return "451 4.3.0 flaky downstream says try again"
        if fault == "drop_before":
            if transport is not None:
                transport.abort()
            return "451 4.3.0 (never sent: connection dropped)"
        reply = await super().handle_DATA(server, session, envelope)
        if isinstance(server, _FlakySMTP):
            server.last_ids = ledger_ids(envelope.original_content or b"")
        if fault == "drop_after" and reply.startswith("250") and transport is not None:
            # Accepted and recorded, but the sender never hears it: SMTP's duplicate case.
            transport.abort()
        return reply


class _FlakySMTP(_TrackedSMTP):
    """Notices a 250 to DATA written to a connection that is already closing."""

    def __init__(self, sink: FlakySink, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.flaky = sink
        self.last_ids: list[str] = []  # ledger ids of the message whose reply is due

    async def push(self, status: Any) -> None:
        text = status.decode() if isinstance(status, bytes) else str(status)
        closing = self.transport is None or self.transport.is_closing()
        if closing and text.startswith("250 2.0.0 Ok: queued"):
            # The message is recorded but its 250 goes nowhere (dropped, or the
            # sink was stopped with the message already buffered): SMTP's duplicate case.
            self.flaky.unacknowledged.extend(self.last_ids)
        await super().push(status)


class FlakySink(SinkServer):
    """A recording downstream that misbehaves at random at the end of DATA.

    ``tempfail``, ``drop_before`` and ``drop_after`` are probabilities;
    ``faults`` counts what was injected. ``unacknowledged`` lists the ledger
    ids of every message recorded whose 250 went to a closed connection
    (``drop_after``, or ``stop()`` while the message was already buffered):
    the only messages a correct gateway may deliver twice.
    """

    def __init__(
        self,
        *,
        tempfail: float = 0.0,
        drop_before: float = 0.0,
        drop_after: float = 0.0,
        seed: int = 0,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.tempfail = tempfail
        self.drop_before = drop_before
        self.drop_after = drop_after
        self.faults: Counter[str] = Counter()
        self.unacknowledged: list[str] = []  # ledger ids taken whose 250 was never sent
        self._random = random.Random(seed)
        self._fault_lock = threading.Lock()

    def pick_fault(self) -> str | None:
        with self._fault_lock:
            r = self._random.random()
            for name, p in (
                ("tempfail", self.tempfail),
                ("drop_before", self.drop_before),
                ("drop_after", self.drop_after),
            ):
                if r < p:
                    self.faults[name] += 1
                    return name
                r -= p
            return None

    def _factory(self) -> SMTP:
        return _FlakySMTP(
            self,
            self._connections,
            _FlakyHandler(self),
            hostname=self.hostname,
            enable_SMTPUTF8=True,
            data_size_limit=self.data_size_limit,
            tls_context=self._tls_context,
            timeout=30,
        )


class SinkProcess:
    """``python -m gateway.testing.sink`` in a subprocess (keeps its CPU out of the test's GIL).

    ``port`` is where it listens; ``deliveries`` counts the messages it took.
    """

    def __init__(self) -> None:
        self.port = 0
        self.deliveries = 0
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> SinkProcess:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.testing.sink", "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
        assert self._proc.stdout is not None
        first = self._proc.stdout.readline()
        match = re.search(r":(\d+)\s*$", first)
        if match is None:
            self._proc.kill()
            raise RuntimeError(f"sink did not start: {first!r}")
        self.port = int(match.group(1))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith("delivered #"):
                self.deliveries += 1

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)


# --- senders and the ledger -------------------------------------------------------

_LEDGER_ID = re.compile(rb"^X-Ledger-Id: (\S+)\r?$", re.M)


def numbered_message(ident: str, *, sender: str, rcpt: str, body: bytes = b"") -> bytes:
    """A small message carrying ``X-Ledger-Id: ident`` (CRLF line ends)."""
    head = (
        f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: ledger {ident}\r\n"
        f"Message-ID: <{ident}@ledger.test>\r\nX-Ledger-Id: {ident}\r\n"
        f"Date: Mon, 23 Nov 2026 05:00:00 +0000\r\n\r\n"
    ).encode()
    return head + (body or f"message {ident}\r\n".encode())


def ledger_ids(data: bytes) -> list[str]:
    """Every ``X-Ledger-Id`` in the header block of ``data``."""
    header = data.split(b"\r\n\r\n", 1)[0]
    return [m.group(1).decode() for m in _LEDGER_ID.finditer(header)]


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try: the reply code to DATA, or None when no reply arrived (connection lost)."""

    code: int | None
    text: str


@dataclass(slots=True)
class Ledger:
    """What every sender was told, message by message."""

    attempts: dict[str, list[Attempt]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, ident: str, code: int | None, text: str) -> None:
        with self.lock:
            self.attempts.setdefault(ident, []).append(Attempt(code, text[:200]))

    def final(self, ident: str) -> Attempt | None:
        tries = self.attempts.get(ident)
        return tries[-1] if tries else None

    def acknowledged(self) -> set[str]:
        return {i for i, tries in self.attempts.items() if any(_ok(a) for a in tries)}

    def audit(self, delivered: Iterable[Delivered], quarantined: Iterable[str] = ()) -> Audit:
        """Compare the ledger with the downstream's record and the quarantine's ids."""
        copies: Counter[str] = Counter()
        for d in delivered:
            for ident in ledger_ids(d.data):
                copies[ident] += 1
        held: Counter[str] = Counter(quarantined)
        acked = self.acknowledged()
        lost = sorted(i for i in acked if copies[i] + held[i] == 0)
        duplicates = {i: copies[i] + held[i] for i in copies | held if copies[i] + held[i] > 1}
        # Arrived downstream but no attempt ever saw a 2xx: allowed only when some
        # attempt lost its connection before the reply (the sender still retries).
        unacked_arrivals = sorted(
            i
            for i in (copies | held)
            if i not in acked and all(a.code is not None for a in self.attempts.get(i, []))
        )
        codes: Counter[str] = Counter()
        for tries in self.attempts.values():
            for a in tries:
                codes[str(a.code) if a.code is not None else "no_reply"] += 1
        return Audit(
            sent=len(self.attempts),
            acknowledged=len(acked),
            lost=lost,
            duplicates=duplicates,
            arrived_without_any_ack=unacked_arrivals,
            never_acknowledged=sorted(set(self.attempts) - acked),
            attempt_codes=dict(codes),
        )


@dataclass(frozen=True, slots=True)
class Audit:
    """The ledger's verdict; ``lost`` must be empty."""

    sent: int
    acknowledged: int
    lost: list[str]
    duplicates: dict[str, int]
    arrived_without_any_ack: list[str]
    never_acknowledged: list[str]
    attempt_codes: dict[str, int]

    def summary(self) -> str:
        return (
            f"sent={self.sent} acknowledged={self.acknowledged} lost={len(self.lost)} "
            f"duplicates={len(self.duplicates)} "
            f"arrived_without_any_ack={len(self.arrived_without_any_ack)} "
            f"never_acknowledged={len(self.never_acknowledged)} codes={self.attempt_codes}"
        )


def _ok(a: Attempt) -> bool:
    return a.code is not None and 200 <= a.code < 300


async def send_with_retries(
    ledger: Ledger,
    port: int,
    messages: Sequence[tuple[str, bytes]],
    *,
    sender: str,
    rcpt: str,
    host: str = "127.0.0.1",
    max_attempts: int = 30,
    retry_delay: tuple[float, float] = (0.02, 0.2),
    reply_timeout: float = 20.0,
    deadline: float | None = None,
    stop: asyncio.Event | None = None,
    seed: int = 0,
) -> None:
    """One sending MTA: a session reused for many messages, retrying 4xx and lost replies.

    Every attempt is in ``ledger``: the DATA reply code, or None when the
    connection was lost or timed out before a reply (the message may or may
    not have been taken: a real MTA retries, which is where SMTP allows
    duplicates). A 5xx is final. Stops at ``deadline`` (loop time) or once
    ``stop`` is set; messages not tried by then are not in the ledger.
    """
    rnd = random.Random(seed)
    loop = asyncio.get_running_loop()
    client: aiosmtplib.SMTP | None = None

    async def drop() -> None:
        nonlocal client
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        client = None

    for ident, data in messages:
        if stop is not None and stop.is_set():
            break
        for _ in range(max_attempts):
            if deadline is not None and loop.time() > deadline:
                break
            try:
                if client is None or not client.is_connected:
                    client = aiosmtplib.SMTP(
                        hostname=host,
                        port=port,
                        timeout=reply_timeout,
                        local_hostname="ledger.sender.test",
                        start_tls=False,
                    )
                    await client.connect()
                _, _ = await client.sendmail(sender, [rcpt], data)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                r = exc.recipients[0]
                ledger.record(ident, r.code, r.message)
                if r.code >= 500:
                    break
            except aiosmtplib.SMTPResponseException as exc:
                ledger.record(ident, exc.code, exc.message)
                if exc.code == 421:
                    await drop()
                if exc.code >= 500:
                    break
                with contextlib.suppress(Exception):
                    if client is not None and client.is_connected:
                        await client.rset()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                ledger.record(ident, None, "connection lost before the reply")
                await drop()
            else:
                ledger.record(ident, 250, "accepted")
                break
            await asyncio.sleep(rnd.uniform(*retry_delay))
    if client is not None:
        with contextlib.suppress(Exception):
            await client.quit()
        await drop()
