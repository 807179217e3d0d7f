"""A seeded, realistic message mix for the throughput benchmark.

Kinds: plain text (2-5 KB), HTML newsletters (~30 KB), a 200 KB PDF
attachment, and a few 2 MB attachments; a share is DKIM-signed by domains
whose SPF, DKIM and DMARC records the benchmark's DNS server publishes.
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass
from email.utils import formatdate, make_msgid

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = ["MIX", "BenchMessage", "SenderDomain", "big_message", "build_mix"]

WORDS = (  # noqa: SIM905 - a word list reads better as one string
    "meeting project report quarterly update schedule invoice budget review team "
    "customer release notes please find attached thanks regards agenda next week "
    "server deploy change window ticket approve draft proposal contract delivery"
).split()

# (kind, share of messages)
MIX = (("plain", 0.55), ("html", 0.30), ("pdf200k", 0.13), ("att2m", 0.02))


@dataclass(frozen=True, slots=True)
class BenchMessage:
    kind: str
    mail_from: str
    rcpt_to: str
    data: bytes


@dataclass(frozen=True, slots=True)
class SenderDomain:
    domain: str
    selector: str
    private_pem: bytes
    public_b64: str

    def dns_records(self, client_ip: str) -> dict[str, list[tuple[str, str]]]:
        return {
            self.domain: [("TXT", f"v=spf1 ip4:{client_ip} -all"), ("A", client_ip)],
            f"{self.selector}._domainkey.{self.domain}": [
                ("TXT", f"v=DKIM1; k=rsa; p={self.public_b64}")
            ],
            f"_dmarc.{self.domain}": [("TXT", "v=DMARC1; p=reject")],
        }


def make_domain(name: str) -> SenderDomain:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return SenderDomain(name, "bench", pem, base64.b64encode(pub).decode())


def _words(rng: random.Random, n: int) -> str:
    lines, line = [], []
    for _ in range(n):
        line.append(rng.choice(WORDS))
        if len(line) == 12:
            lines.append(" ".join(line))
            line = []
    lines.append(" ".join(line))
    return "\r\n".join(lines)


def _headers(rng: random.Random, sender: str, rcpt: str, subject: str) -> str:
    return (
        f"Received: from relay{rng.randint(1, 9)}.sender.example (relay.sender.example "
        f"[198.51.100.{rng.randint(1, 254)}]) by mx.sender.example; {formatdate()}\r\n"
        f"From: Sender Person <{sender}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n"
        f"Date: {formatdate()}\r\nMessage-ID: {make_msgid(domain=sender.split('@')[1])}\r\n"
        "MIME-Version: 1.0\r\n"
    )


def _attachment(rng: random.Random, size: int, name: str, ctype: str) -> str:
    if ctype == "application/pdf":
        blob = b"%PDF-1.4\n" + rng.randbytes(size - 9)
    else:
        blob = rng.randbytes(size)
    b64 = base64.encodebytes(blob).decode().replace("\n", "\r\n")
    return (
        f'Content-Type: {ctype}; name="{name}"\r\n'
        f'Content-Disposition: attachment; filename="{name}"\r\n'
        f"Content-Transfer-Encoding: base64\r\n\r\n{b64}"
    )


def _build(rng: random.Random, kind: str, sender: str, rcpt: str) -> bytes:
    subject = " ".join(rng.choice(WORDS) for _ in range(5)).capitalize()
    head = _headers(rng, sender, rcpt, subject)
    if kind == "plain":
        body = _words(rng, rng.randint(300, 750))
        msg = head + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body + "\r\n"
    elif kind == "html":
        paras = "".join(
            f'<p style="font-family:Arial">{_words(rng, 40)} '
            f'<a href="https://news.sender.example/a/{rng.randint(1, 10**6)}">read more</a></p>\r\n'
            for _ in range(60)
        )
        html = f"<html><body><table><tr><td>{paras}</td></tr></table></body></html>"
        text = _words(rng, 400)
        msg = (
            head + 'Content-Type: multipart/alternative; boundary="alt"\r\n\r\n'
            "--alt\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text + "\r\n"
            "--alt\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html + "\r\n--alt--\r\n"
        )
    else:
        size, name, ctype = (
            (200_000, "report.pdf", "application/pdf")
            if kind == "pdf200k"
            else (2_000_000, "archive.bin", "application/octet-stream")
        )
        msg = (
            head + 'Content-Type: multipart/mixed; boundary="mix"\r\n\r\n'
            "--mix\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + _words(rng, 80) + "\r\n"
            "--mix\r\n" + _attachment(rng, size, name, ctype) + "--mix--\r\n"
        )
    return msg.encode()


def big_message(size: int, sender: str, rcpt: str, seed: int = 2) -> BenchMessage:
    """One message of about ``size`` bytes: a base64 attachment (for the memory check)."""
    rng = random.Random(seed)
    head = _headers(rng, sender, rcpt, "Big attachment")
    blob = int(size / 1.37)  # base64 with CRLF every 76 chars: 4/3 + 2.6 %
    msg = (
        head + 'Content-Type: multipart/mixed; boundary="mix"\r\n\r\n'
        "--mix\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + _words(rng, 80) + "\r\n"
        "--mix\r\n" + _attachment(rng, blob, "big.bin", "application/octet-stream") + "--mix--\r\n"
    )
    return BenchMessage("big", sender, rcpt, msg.encode())


def build_mix(
    count: int, domains: list[SenderDomain], seed: int = 1, signed_share: float = 0.4
) -> list[BenchMessage]:
    """``count`` messages drawn from MIX; ``signed_share`` of them DKIM-signed."""
    rng = random.Random(seed)
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    out: list[BenchMessage] = []
    for i in range(count):
        kind = rng.choices(kinds, weights)[0]
        dom = domains[i % len(domains)]
        sender = f"user{rng.randint(1, 50)}@{dom.domain}"
        rcpt = f"staff{rng.randint(1, 20)}@example.org"
        data = _build(rng, kind, sender, rcpt)
        if rng.random() < signed_share:
            sig = dkim.sign(
                data,
                dom.selector.encode(),
                dom.domain.encode(),
                dom.private_pem,
                include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
            )
            data = sig + data
        out.append(BenchMessage(kind, sender, rcpt, data))
    return out
