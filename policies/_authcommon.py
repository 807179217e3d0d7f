"""Helpers shared by the authentication policies (SPF, DKIM, DMARC, ARC).

Key records for DKIM and ARC are fetched *before* verification, concurrently,
through the gateway's one async resolver; dkimpy then verifies with a DNS
function that only reads those answers. So verification (CPU-bound) never
waits on the network, and a SERVFAIL stays a ``temperror`` instead of being
folded into dkimpy's "no key" (which would read as a failure).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.api import DNSError, DNSTemporaryError, Resolver

__all__ = [
    "KeyAnswer",
    "ascii_domain",
    "auth_fields",
    "fetch_keys",
    "header_block",
    "key_dnsfunc",
    "key_name",
    "org_aligned",
    "printable",
    "same_field",
    "valid_domain",
]


MAX_HEADER_BYTES = 256_000  # a header section past this is hostile; fields beyond are ignored


def header_block(raw: bytes) -> bytes:
    """The header section only (with its terminating empty line), at most
    MAX_HEADER_BYTES: parsing the body (or a hostile endless header) to find a few
    header fields would cost time proportional to the message size on the loop."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = raw.find(sep, 0, MAX_HEADER_BYTES + len(sep))
        if end >= 0:
            return raw[: end + len(sep)]
    head = raw[:MAX_HEADER_BYTES]
    cut = head.rfind(b"\n")
    return head[: cut + 1] + b"\r\n" if cut >= 0 else b"\r\n"


def ascii_domain(name: str) -> str:
    """Lower-case A-label form of a domain (IDNA, RFC 5890); '' when it cannot be one."""
    name = name.strip().lower().rstrip(".")
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return ""


_AUTH_FIELD = re.compile(
    rb"^(dkim-signature|arc-seal|arc-message-signature|arc-authentication-results)[ \t]*:"
    rb"([^\n]*(?:\n[ \t][^\n]*)*)",
    re.IGNORECASE | re.MULTILINE,
)


def auth_fields(raw: bytes) -> list[tuple[bytes, bytes]]:
    """(lower-case name, value) of the DKIM and ARC header fields, top first.

    A regular-expression scan of the header section (C speed), used to know which
    keys to fetch; dkimpy parses the message itself when it verifies, and results
    are cross-checked against what it saw.
    """
    return [(m.group(1).lower(), m.group(2)) for m in _AUTH_FIELD.finditer(header_block(raw))]


def same_field(a: bytes, b: bytes) -> bool:
    """Two renderings of one field value are the same once whitespace is ignored."""
    return re.sub(rb"\s+", b"", a) == re.sub(rb"\s+", b"", b)


def printable(text: str | bytes, limit: int = 200) -> str:
    """Printable ASCII on one line: details come from hostile input and end up in logs."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:limit]


def valid_domain(name: str, *, multi_label: bool = True) -> bool:
    """A syntactically usable DNS name (RFC 1035 §2.3.4 lengths; RFC 7208 §4.3)."""
    name = name.rstrip(".")
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    if multi_label and len(labels) < 2:
        return False
    for label in labels:
        if not label or len(label) > 63:
            return False
        if any(c.isspace() or c in '()<>[]:;@\\,"' for c in label):
            return False
    return True


def org_aligned(a: str, b: str) -> bool:
    """Either name is the other or a subdomain of it (used for operator lists)."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    return a == b or a.endswith("." + b)


@dataclass(frozen=True, slots=True)
class KeyAnswer:
    """The TXT record at a key name; ``temperror`` is set when DNS failed temporarily."""

    name: str
    record: bytes | None
    temperror: str = ""


async def _fetch_one(resolver: Resolver, name: str) -> KeyAnswer:
    try:
        answer = await resolver.query(name, "TXT")
    except DNSTemporaryError as exc:
        return KeyAnswer(name, None, temperror=printable(str(exc)) or "DNS temporary failure")
    except DNSError:
        return KeyAnswer(name, None)
    if not answer.records:
        return KeyAnswer(name, None)
    # RFC 6376 §3.6.2.2: one key record per name; if there are several, prefer one with p=.
    records = sorted(answer.records, key=lambda r: "p=" not in r)
    return KeyAnswer(name, records[0].encode("utf-8", "surrogateescape"))


async def fetch_keys(resolver: Resolver, names: Iterable[str]) -> dict[str, KeyAnswer]:
    """Look up every key name concurrently (names lower-cased, without trailing dot)."""
    unique = sorted({n.lower().rstrip(".") for n in names})
    answers = await asyncio.gather(*(_fetch_one(resolver, n) for n in unique))
    return {a.name: a for a in answers}


def key_dnsfunc(keys: dict[str, KeyAnswer]) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` answering only from prefetched records."""

    def dnsfunc(name: bytes | str, timeout: float = 5.0) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        answer = keys.get(text.lower().rstrip("."))
        return answer.record if answer is not None else None

    return dnsfunc


def key_name(selector: bytes, domain: bytes) -> str | None:
    """``<s>._domainkey.<d>`` (RFC 6376 §3.6.2.1), or None when it cannot be a DNS name."""
    try:
        name = f"{selector.decode('ascii')}._domainkey.{domain.decode('ascii')}"
    except UnicodeDecodeError:
        return None
    name = name.lower().rstrip(".")
    return name if valid_domain(name) else None
