"""Build a policy Context from raw bytes, for pure policy tests."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from gateway.api import Context, DNSAnswer, DNSTemporaryError, Resolver, Result, TLSInfo
from gateway.engine import parse_message

__all__ = ["NoDNS", "load_eml", "make_context"]


class NoDNS:
    """A resolver for policies that must not touch DNS: every lookup is a temporary error."""

    async def query(self, name: str, rdtype: str) -> DNSAnswer:
        raise DNSTemporaryError(f"no DNS in this test ({name}/{rdtype})")


def load_eml(path: str | Path) -> bytes:
    """A message file's bytes with CRLF line endings, as they arrive over SMTP."""
    data = Path(path).read_bytes()
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def make_context(
    raw: bytes | str,
    *,
    resolver: Resolver | None = None,
    client_ip: str | None = "192.0.2.10",
    helo: str = "mail.example.net",
    mail_from: str = "sender@example.net",
    rcpt_to: tuple[str, ...] = ("user@example.org",),
    hostname: str = "mx.example.org",
    results: Mapping[str, Result] | None = None,
    tls: TLSInfo | None = None,
) -> Context:
    """A Context as the gateway would build it; ``str`` input gets CRLF line endings."""
    if isinstance(raw, str):
        raw = raw.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")
    return Context(
        client_ip=client_ip,
        helo=helo,
        mail_from=mail_from,
        rcpt_to=rcpt_to,
        raw=raw,
        message=parse_message(raw),
        resolver=resolver or NoDNS(),
        hostname=hostname,
        queue_id="TESTQUEUEID",
        tls=tls,
        received_at=datetime.now(UTC),
        results=results,
    )
