"""Keys, signing and DNS zones shared by the SPF/DKIM/DMARC/ARC tests.

Keys are generated once per test session (RSA 2048, RSA 512 which must fail,
Ed25519); messages are signed and ARC-sealed with dkimpy, as a real sender
or mailing list would.
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa


@dataclass(frozen=True)
class Key:
    algorithm: bytes  # b"rsa-sha256" or b"ed25519-sha256"
    private: bytes  # what dkimpy's sign() takes
    record: str  # the TXT record at <selector>._domainkey.<domain>


@functools.cache
def rsa_key(bits: int = 2048) -> Key:
    # The 512-bit key exists to prove it is refused (RFC 8301); cryptography
    # will not generate keys that small, so it is built from its primes.
    if bits < 1024:
        return _small_rsa_key(bits)
    priv = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = priv.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    pub = priv.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Key(b"rsa-sha256", pem, f"v=DKIM1; k=rsa; p={base64.b64encode(pub).decode()}")


def _small_rsa_key(bits: int) -> Key:
    import random

    from cryptography.hazmat.primitives.asymmetric.rsa import (
        RSAPrivateNumbers,
        RSAPublicNumbers,
        rsa_crt_dmp1,
        rsa_crt_dmq1,
        rsa_crt_iqmp,
    )

    rng = random.Random(bits)

    def prime(nbits: int) -> int:
        while True:
            c = rng.getrandbits(nbits) | (1 << (nbits - 1)) | 1
            if all(pow(a, c - 1, c) == 1 for a in (2, 3, 5, 7, 11, 13, 17, 19, 23)):
                return c

    e = 65537
    while True:
        p, q = prime(bits // 2), prime(bits // 2)
        phi = (p - 1) * (q - 1)
        if p != q and phi % e and (p * q).bit_length() == bits:
            break
    n = p * q
    d = pow(e, -1, phi)
    numbers = RSAPrivateNumbers(
        p,
        q,
        d,
        rsa_crt_dmp1(d, p),
        rsa_crt_dmq1(d, q),
        rsa_crt_iqmp(p, q),
        RSAPublicNumbers(e, n),
    )
    priv = numbers.private_key(unsafe_skip_rsa_key_validation=True)
    pem = priv.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    pub = priv.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Key(b"rsa-sha256", pem, f"v=DKIM1; k=rsa; p={base64.b64encode(pub).decode()}")


@functools.cache
def ed25519_key() -> Key:
    priv = ed25519.Ed25519PrivateKey.generate()
    seed = priv.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    pub = priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return Key(
        b"ed25519-sha256",
        base64.b64encode(seed),
        f"v=DKIM1; k=ed25519; p={base64.b64encode(pub).decode()}",
    )


def message(
    from_: str = "Alice <alice@example.com>",
    subject: str = "hello",
    body: str = "Hello there.\r\nSee you.\r\n",
    extra: str = "",
) -> bytes:
    head = (
        f"From: {from_}\r\nTo: bob@example.org\r\nSubject: {subject}\r\n"
        "Date: Mon, 23 Nov 2026 05:00:00 +0000\r\nMessage-ID: <m1@example.com>\r\n" + extra
    )
    return (head + "\r\n" + body).encode()


def sign(
    raw: bytes,
    domain: str,
    selector: str = "s1",
    key: Key | None = None,
    *,
    length: bool = False,
    identity: str | None = None,
    algorithm: bytes | None = None,
) -> bytes:
    key = key or rsa_key()
    header = dkim.sign(
        raw,
        selector.encode(),
        domain.encode(),
        key.private,
        identity=identity.encode() if identity else None,
        canonicalize=(b"relaxed", b"relaxed"),
        signature_algorithm=algorithm or key.algorithm,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        length=length,
    )
    return header + raw


def arc_seal(raw: bytes, sealer: str, srv_id: str, results: str, selector: str = "arc") -> bytes:
    """What a mailing list at ``sealer`` does: record its results, then seal (RFC 8617 §5.1)."""
    with_ar = f"Authentication-Results: {srv_id}; {results}\r\n".encode() + raw
    fields = dkim.arc_sign(
        with_ar, selector.encode(), sealer.encode(), rsa_key().private, srv_id.encode()
    )
    return b"".join(fields) + with_ar


def key_records(*entries: tuple[str, str, Key]) -> dict[str, list[tuple[str, str]]]:
    """{"<s>._domainkey.<d>": [("TXT", record)]} for (domain, selector, key) triples."""
    return {f"{s}._domainkey.{d}": [("TXT", k.record)] for d, s, k in entries}
