"""Password and API-token hashes: scrypt from the standard library, one string each.

Format: ``scrypt$N$r$p$<salt>$<hash>`` (salt and hash base64, no padding).
scrypt (RFC 7914) is memory-hard, so a stolen config does not give the
password away cheaply; hashlib has it (OpenSSL), so no dependency is needed.
``gateway web hash-password`` makes the hashes; the config check parses them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

__all__ = ["HashError", "check_hash", "hash_secret", "verify_secret"]

_N, _R, _P = 2**14, 8, 1  # 16 MiB, ~40 ms on one core: fine for a login, costly to guess
_MAXMEM = 64 * 1024 * 1024
_DKLEN = 32
MAX_SECRET = 1024  # bytes of a password or token considered (a bound for hostile input)


class HashError(ValueError):
    """Not a hash made by ``gateway web hash-password``."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_secret(secret: str, *, n: int = _N, r: int = _R, p: int = _P) -> str:
    """The config string for ``secret`` (a password or a bearer token)."""
    salt = os.urandom(16)
    key = hashlib.scrypt(
        secret.encode()[:MAX_SECRET], salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=_DKLEN
    )
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(key)}"


def check_hash(text: str) -> tuple[int, int, int, bytes, bytes]:
    """Parse a hash; HashError says what is wrong with it."""
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise HashError('must be a hash from `gateway web hash-password` ("scrypt$...")')
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, key = _unb64(parts[4]), _unb64(parts[5])
    except ValueError:
        raise HashError("is not a valid scrypt hash (damaged when copied?)") from None
    if n < 2**10 or n > 2**20 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise HashError(f"has unusable scrypt parameters N={n} r={r} p={p}")
    if len(salt) < 8 or len(key) < 16:
        raise HashError("is not a valid scrypt hash (salt or key too short)")
    return n, r, p, salt, key


def verify_secret(secret: str, hashed: str) -> bool:
    """True when ``secret`` matches; constant-time comparison. CPU-heavy: call in a thread."""
    try:
        n, r, p, salt, key = check_hash(hashed)
    except HashError:
        return False
    got = hashlib.scrypt(
        secret.encode()[:MAX_SECRET], salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=len(key)
    )
    return hmac.compare_digest(got, key)
