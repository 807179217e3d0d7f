"""Sealing cost per message: ARCSealer.seal on a 4 KB message, against a no-op step.

Run: .venv/bin/python bench/arcseal.py [N]; prints ms per message (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import sys
import time
from decimal import Decimal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.api import Action, AuthResult
from gateway.arcseal import ARCSealer
from gateway.verdict import Verdict, authentication_results, fold_header


def main(n: int) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    sealer = ARCSealer("example.org", "seal", pem, "mx.example.org")
    auth = (AuthResult("spf", "pass"), AuthResult("dkim", "pass"), AuthResult("arc", "none"))
    verdict = Verdict(Action.RELAY, Decimal(0), Decimal(5), (), "", None, auth)
    above = [fold_header("Authentication-Results", authentication_results("mx.example.org", auth))]
    raw = (
        b"From: a@example.com\r\nTo: b@example.org\r\nSubject: bench\r\n"
        b"Date: Sun, 06 Dec 2026 19:00:00 +0000\r\nMessage-ID: <b@example.com>\r\n\r\n"
        + b"x" * 76 * 53
        + b"\r\n"
    )

    async def run() -> float:
        start = time.perf_counter()
        for _ in range(n):
            seal = await sealer.seal(verdict, above, raw)
            assert seal.result == "sealed"
        return time.perf_counter() - start

    async def baseline() -> float:
        start = time.perf_counter()
        for _ in range(n):
            await asyncio.to_thread(bytes, raw)
        return time.perf_counter() - start

    sealed, base = asyncio.run(run()), asyncio.run(baseline())
    print(
        f"arc seal: {sealed / n * 1000:.2f} ms/message ({n} x {len(raw)} B, RSA 2048); "
        f"thread hop alone {base / n * 1000:.3f} ms; ratio {sealed / base:.1f}x"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
