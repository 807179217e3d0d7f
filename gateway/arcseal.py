"""ARC sealing (RFC 8617 §5.1) of mail the gateway passes on, with dkimpy's signer.

The gateway adds one ARC set (ARC-Authentication-Results, ARC-Message-Signature,
ARC-Seal) on top of what it relays, so a mailbox provider behind it (Microsoft
365, Google) can trust the authentication results it recorded before any
forwarding or list rewriting. ``cv=`` comes from the chain validation the
``dmarc`` policy already did (``arc=`` in our Authentication-Results): no
second validation, no second round of DNS queries.

Only rsa-sha256 is offered: dkimpy's ARC signer (1.1.x) signs with RSA only, and
RFC 8617 §4.1.1 requires verifiers to support it. Signing is CPU work, so it
runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import dkim
from dkim.crypto import UnparsableKeyError, parse_pem_private_key

from gateway import headers, metrics
from gateway.api import AuthResult
from gateway.config import ArcSealConfig, Config, ConfigError
from gateway.verdict import Verdict, authentication_results, fold_header

__all__ = ["CV_VALUES", "SEAL_RESULTS", "ARCSealer", "Seal", "chain_status", "load_sealer"]

log = logging.getLogger("gateway.arcseal")

SEAL_RESULTS = ("sealed", "skipped", "failed")
CV_VALUES = ("none", "pass", "fail", "temperror")


@dataclass(frozen=True, slots=True)
class Seal:
    """The ARC set to put on top (folded fields, no trailing CRLF), or why there is none."""

    fields: tuple[str, ...]
    result: str  # one of SEAL_RESULTS
    cv: str  # one of CV_VALUES
    reason: str = ""


def chain_status(verdict: Verdict, has_chain: bool) -> str:
    """``cv`` for our seal from the validation the dmarc policy recorded.

    ``temperror`` when the chain's keys could not be fetched (RFC 8617 has no
    cv for it, so we do not seal); ``""`` when nobody validated an existing chain.
    """
    if any(s.name == "ARC_TEMPERROR" for s in verdict.symbols):
        return "temperror"
    results = [a.result for a in verdict.auth if a.method == "arc"]
    if not results:
        return "none" if not has_chain else ""
    result = results[0].lower()
    if result == "pass":
        return "pass"
    if result == "none" and not has_chain:
        return "none"
    return "fail"


class ARCSealer:
    """Seals with one key; built once per config generation (see :func:`load_sealer`)."""

    def __init__(self, domain: str, selector: str, key_pem: bytes, authserv_id: str) -> None:
        self.domain = domain.encode("ascii")
        self.selector = selector.encode("ascii")
        self.key_pem = key_pem
        self.authserv_id = authserv_id

    def _sign(self, message: bytes) -> list[bytes]:
        """CPU-bound dkimpy signing (worker thread)."""
        fields: list[bytes] = dkim.arc_sign(
            message,
            self.selector,
            self.domain,
            self.key_pem,
            self.authserv_id.encode("utf-8"),
            logger=log,
        )
        return fields

    async def seal(self, verdict: Verdict, above: list[str], clean: bytes) -> Seal:
        """The ARC set for ``above`` (our fields, top first) on ``clean``; never raises.

        ``above`` must hold our Authentication-Results (the source of the
        ARC-Authentication-Results); the signed message is exactly what goes on.
        """
        has_chain = _has_chain(clean)
        cv = chain_status(verdict, has_chain)
        if cv == "temperror":
            return self._count(Seal((), "skipped", cv, "chain keys failed temporarily"))
        if not cv:
            return self._count(Seal((), "skipped", "fail", "chain present, not validated"))
        ar = fold_header("Authentication-Results", _with_arc(verdict, self.authserv_id, cv))
        # dkimpy reads cv= and the AAR from the one Authentication-Results of our
        # authserv-id: give it a copy whose arc= is exactly the cv we mean.
        mine = [f for f in above if not f.lower().startswith("authentication-results:")]
        message = headers.prepend(clean, [ar, *mine])
        try:
            signed = await asyncio.to_thread(self._sign, message)
        except Exception as exc:  # DKIMException on hostile headers, key trouble
            log.warning("arc_seal_failed", extra={"error": f"{type(exc).__name__}: {exc}"})
            return self._count(Seal((), "failed", cv, str(exc)))
        if not signed:
            return self._count(Seal((), "failed", cv, "dkimpy produced no ARC set"))
        fields = tuple(f.decode("utf-8").rstrip("\r\n") for f in signed)
        return self._count(Seal(fields, "sealed", cv))

    @staticmethod
    def _count(seal: Seal) -> Seal:
        metrics.ARC_SEALED.labels(result=seal.result, cv=seal.cv).inc()
        if seal.result != "sealed":
            why = {"result": seal.result, "cv": seal.cv, "why": seal.reason}
            log.info("arc_not_sealed", extra=why)
        return seal


def _has_chain(raw: bytes) -> bool:
    return any(name.lower() == b"arc-seal" for _, _, name in headers.iter_fields(raw))


def _with_arc(verdict: Verdict, hostname: str, cv: str) -> str:
    """Our Authentication-Results value with exactly one ``arc=`` result, ``cv``."""
    auth = tuple(a for a in verdict.auth if a.method != "arc")
    arc = next((a for a in verdict.auth if a.method == "arc"), None)
    arc = replace(arc, result=cv) if arc is not None else AuthResult("arc", cv)
    return authentication_results(hostname, (*auth, arc))


def load_key(config: Config, seal: ArcSealConfig) -> bytes:
    """The PEM private key of ``[arc_seal]``; ConfigError says what is wrong with it."""
    path = config.resolve_path(seal.private_key)
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            [f"arc_seal.private_key: cannot read {path}: {exc.strerror or exc}"]
        ) from None
    try:
        parse_pem_private_key(pem)
    except (UnparsableKeyError, ValueError, TypeError) as exc:
        raise ConfigError(
            [
                f"arc_seal.private_key: {path} is not a PEM RSA private key ({exc}); "
                "make one with: openssl genrsa -out arc.key 2048"
            ]
        ) from None
    return pem


def load_sealer(config: Config) -> ARCSealer | None:
    """The sealer of this config, None when ``[arc_seal]`` is off; raises ConfigError."""
    seal = config.arc_seal
    if not seal.enabled:
        return None
    pem = load_key(config, seal)
    return ARCSealer(seal.domain, seal.selector, pem, config.server.hostname)
