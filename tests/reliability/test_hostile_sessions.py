"""Hostile sessions running side by side with honest senders change nothing for the latter.

One gateway subprocess (STARTTLS on) faces, at the same time: smuggling
attempts of every variant, NUL and 8-bit garbage commands, overlong command
lines and header lines, 5000 RCPTs, a pipelined flood of 3000 commands,
commands out of order, TLS handshake garbage after STARTTLS and PROXY
headers from an untrusted address. Every hostile session gets definite
replies or a clean close, and meanwhile an honest sender's 60 numbered
messages are all delivered exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from rel_support import RCPT, SENDER, GatewayFactory, overrides

from gateway.testing.dnsserver import DNSServer
from gateway.testing.faults import Ledger, numbered_message, send_with_retries
from gateway.testing.sink import SinkServer, make_self_signed

HEAD = (
    b"EHLO hostile.sender.test\r\nMAIL FROM:<h@sender.test>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n"
)
SMUGGLED = b"MAIL FROM:<evil@sender.test>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nsmuggled\r\n"
FAKE_ENDS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\n", b"\n.\r", b"\r.\r\n"]


def _scripts() -> dict[str, bytes]:
    out = {
        f"smuggle_{i}": HEAD + b"Subject: s\r\n\r\nhi" + end + SMUGGLED + b".\r\nQUIT\r\n"
        for i, end in enumerate(FAKE_ENDS)
    }
    out["nul_and_8bit"] = b"EHLO a\r\n\x00\x00\r\nMA\x00IL FROM:<a@b>\r\n\xff\xfe\xfd\r\nQUIT\r\n"
    out["overlong_command"] = b"EHLO " + b"a" * 100_000 + b"\r\nQUIT\r\n"
    out["overlong_header_line"] = (
        HEAD + b"X-Long: " + b"b" * 2_000_000 + b"\r\n\r\nx\r\n.\r\nQUIT\r\n"
    )
    out["5000_rcpts"] = (
        b"EHLO a.test\r\nMAIL FROM:<a@sender.test>\r\n"
        + b"".join(b"RCPT TO:<u%d@example.org>\r\n" % i for i in range(5000))
        + b"QUIT\r\n"
    )
    out["pipelined_flood"] = b"EHLO a.test\r\n" + b"NOOP\r\nRSET\r\nVRFY x\r\n" * 1000 + b"QUIT\r\n"
    out["out_of_order"] = (
        b"DATA\r\nRCPT TO:<x@example.org>\r\nEHLO a\r\nDATA\r\n"
        b"MAIL FROM:<a@b.c>\r\nMAIL FROM:<a@b.c>\r\nQUIT\r\n"
    )
    out["untrusted_proxy"] = b"PROXY TCP4 198.51.100.7 127.0.0.1 4444 25\r\nEHLO a\r\nQUIT\r\n"
    out["tls_garbage"] = b"EHLO a.test\r\nSTARTTLS\r\n" + bytes(range(256)) * 40
    return out


async def _hostile(port: int, script: bytes) -> tuple[bytes, bool]:
    """Send the script in pieces; (everything the gateway answered, closed by the gateway)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = bytearray()

    async def collect() -> None:
        while chunk := await reader.read(65536):
            answers.extend(chunk)

    collector = asyncio.create_task(collect())
    with contextlib.suppress(ConnectionError):
        for i in range(0, len(script), 8192):
            writer.write(script[i : i + 8192])
            await writer.drain()
    try:
        async with asyncio.timeout(30):
            await collector
        closed = True
    except TimeoutError:
        closed = False
    except ConnectionError:
        closed = True
    writer.close()
    return bytes(answers), closed


@pytest.mark.slow
async def test_hostile_sessions_get_definite_answers_and_honest_mail_flows(
    make_gateway: GatewayFactory, dns: DNSServer, tmp_path: Path
) -> None:
    cert, key = make_self_signed(tmp_path)
    with SinkServer() as sink:
        gw = make_gateway(
            overrides(sink.port, dns, {"server.tls_cert": str(cert), "server.tls_key": str(key)})
        )
        scripts = _scripts()
        ledger = Ledger()
        honest = [
            (f"h{n:02d}", numbered_message(f"h{n:02d}", sender=SENDER, rcpt=RCPT))
            for n in range(60)
        ]
        results = await asyncio.gather(
            *(_hostile(gw.smtp_port, s) for s in scripts.values()),
            send_with_retries(ledger, gw.smtp_port, honest, sender=SENDER, rcpt=RCPT),
        )
        for name, (answers, closed) in zip(scripts, results[:-1], strict=True):
            assert closed, f"{name}: the session neither finished nor was closed"
            codes = [line[:3] for line in answers.split(b"\r\n") if line[:3].isdigit()]
            assert codes and codes[0] in (b"220", b"554"), (name, answers[:200])
            assert b"Traceback" not in answers and b"Exception" not in answers, name
        # The smuggled "second message" never exists anywhere.
        assert not any(m.mail_from.encode() == b"evil@sender.test" for m in sink.messages)
        audit = ledger.audit([m for m in sink.messages if m.mail_from == SENDER])
        print(audit.summary())
        assert audit.acknowledged == 60 and audit.lost == [] and audit.duplicates == {}
        assert gw.proc is not None and gw.proc.poll() is None
