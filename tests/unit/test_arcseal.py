"""ARC sealing (gateway/arcseal.py), checked with dkimpy's own ARC verifier.

Pure unit tests: dkimpy reads the test public keys through a ``dnsfunc``; the
end-to-end test over real SMTP and a real DNS server is in
tests/integration/test_arc_seal_e2e.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import dkim
import pytest

from gateway import headers, metrics
from gateway.api import Action, AuthResult
from gateway.arcseal import ARCSealer, load_sealer
from gateway.config import Config, ConfigError, config_from_mapping
from gateway.verdict import ScoredSymbol, Verdict, authentication_results, fold_header

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "policies"))
from auth_helpers import arc_seal, key_records, message, rsa_key, sign

HOST = "mx.gateway.test"
MESSAGE = message(
    from_="Alice <alice@sender.test>", body="Hello Bob,\r\n  the numbers   are in.\r\n"
)
ZONE = key_records(
    ("gateway.test", "arc", rsa_key()),
    ("forwarder.test", "arc", rsa_key()),
    ("sender.test", "s1", rsa_key()),
)


def dnsfunc(name: bytes | str, timeout: float = 5.0) -> bytes | None:
    """dkimpy's key lookup, answered from ZONE (what tests/integration serves over DNS)."""
    text = name.decode() if isinstance(name, bytes) else name
    records = ZONE.get(text.lower().rstrip("."))
    return records[0][1].encode() if records else None


def _verdict(*auth: AuthResult, symbols: tuple[str, ...] = ()) -> Verdict:
    return Verdict(
        action=Action.RELAY,
        score=Decimal("0.0"),
        required=Decimal("5.0"),
        symbols=tuple(ScoredSymbol(s, Decimal("0"), "dmarc", "", "") for s in symbols),
        reason="",
        forced_by=None,
        auth=auth,
    )


def _ours(verdict: Verdict) -> list[str]:
    """What the hand-off prepends (Received, then the verdict's fields)."""
    return [
        "Received: from sender.test by mx.gateway.test; Sun, 06 Dec 2026 19:00:01 +0000",
        fold_header("Authentication-Results", authentication_results(HOST, verdict.auth)),
        "X-Spam-Status: No, score=0.0 required=5.0 tests=none",
    ]


def _seal(verdict: Verdict, clean: bytes) -> tuple[bytes, tuple[str, ...]]:
    sealer = ARCSealer("gateway.test", "arc", rsa_key().private, HOST)
    above = _ours(verdict)
    seal = asyncio.run(sealer.seal(verdict, above, clean))
    return headers.prepend(clean, [*seal.fields, *above]), seal.fields


def _prior_hop(raw: bytes) -> bytes:
    """A valid ARC set i=1 by forwarder.test, as a prior hop would add it."""
    return arc_seal(raw, "forwarder.test", "forwarder.test", "spf=pass smtp.mailfrom=sender.test")


def _seal_tags(fields: tuple[str, ...]) -> str:
    seal = next(f for f in fields if f.startswith("ARC-Seal:"))
    return "".join(seal.split())


def test_a_message_without_a_chain_is_sealed_as_a_chain_of_one() -> None:
    verdict = _verdict(AuthResult("spf", "pass", properties=(("smtp.mailfrom", "sender.test"),)))
    sealed, fields = _seal(verdict, MESSAGE)
    assert [f.split(":")[0] for f in fields] == [
        "ARC-Seal",
        "ARC-Message-Signature",
        "ARC-Authentication-Results",
    ]
    assert "i=1;" in _seal_tags(fields) and "cv=none;" in _seal_tags(fields)
    aar = next(f for f in fields if f.startswith("ARC-Authentication-Results:"))
    assert f"i=1; {HOST};" in aar and "spf=pass" in aar
    cv, results, reason = dkim.arc_verify(sealed, dnsfunc=dnsfunc)
    assert cv == dkim.CV_Pass, reason
    assert len(results) == 1 and results[0]["as-domain"] == b"gateway.test"


def test_the_next_hop_of_a_valid_chain_is_sealed_with_cv_pass_and_verifies() -> None:
    incoming = _prior_hop(MESSAGE)
    cv, _, reason = dkim.arc_verify(incoming, dnsfunc=dnsfunc)
    assert cv == dkim.CV_Pass, reason
    verdict = _verdict(
        AuthResult("arc", "pass", reason="1 ARC set(s), latest sealer forwarder.test")
    )
    sealed, fields = _seal(verdict, incoming)
    tags = _seal_tags(fields)
    assert "i=2;" in tags and "cv=pass;" in tags
    cv, results, reason = dkim.arc_verify(sealed, dnsfunc=dnsfunc)
    assert cv == dkim.CV_Pass, reason
    assert [r["instance"] for r in results] == [2, 1]


def test_a_broken_incoming_chain_is_sealed_cv_fail() -> None:
    incoming = _prior_hop(MESSAGE).replace(b"numbers   are", b"numbers were")
    cv, _, _ = dkim.arc_verify(incoming, dnsfunc=dnsfunc)
    assert cv == dkim.CV_Fail
    verdict = _verdict(AuthResult("arc", "fail", reason="body hash mismatch"))
    sealed, fields = _seal(verdict, incoming)
    tags = _seal_tags(fields)
    assert "i=2;" in tags and "cv=fail;" in tags
    cv, _, _ = dkim.arc_verify(sealed, dnsfunc=dnsfunc)
    # A cv=fail chain has ended for everyone after us (dkimpy: fail, or None for "ended").
    assert cv in (dkim.CV_Fail, None)


def test_an_unvalidated_chain_is_never_sealed_pass() -> None:
    """A chain the dmarc policy did not validate (arc = false) is sealed cv=fail, never pass."""
    incoming = _prior_hop(MESSAGE)
    verdict = _verdict(AuthResult("spf", "pass"))
    sealer = ARCSealer("gateway.test", "arc", rsa_key().private, HOST)
    seal = asyncio.run(sealer.seal(verdict, _ours(verdict), incoming))
    assert seal.fields == () and seal.result == "skipped"


def test_sealing_never_changes_the_body_and_an_earlier_dkim_signature_still_verifies() -> None:
    signed = sign(MESSAGE, "sender.test", "s1")
    verdict = _verdict(AuthResult("dkim", "pass", properties=(("header.d", "sender.test"),)))
    sealed, _ = _seal(verdict, signed)
    assert sealed.endswith(signed)  # everything received, byte for byte, below our fields
    body = MESSAGE[MESSAGE.index(b"\r\n\r\n") + 4 :]
    assert sealed[sealed.index(b"\r\n\r\n") + 4 :] == body
    assert dkim.verify(sealed, dnsfunc=dnsfunc)
    cv, _, reason = dkim.arc_verify(sealed, dnsfunc=dnsfunc)
    assert cv == dkim.CV_Pass, reason


def test_a_temporary_key_failure_of_the_chain_is_not_sealed_and_is_counted() -> None:
    before = metrics.REGISTRY.get_sample_value(
        "gateway_arc_sealed_total", {"result": "skipped", "cv": "temperror"}
    )
    verdict = _verdict(AuthResult("arc", "fail"), symbols=("ARC_TEMPERROR",))
    sealer = ARCSealer("gateway.test", "arc", rsa_key().private, HOST)
    seal = asyncio.run(sealer.seal(verdict, _ours(verdict), _prior_hop(MESSAGE)))
    assert seal.fields == () and (seal.result, seal.cv) == ("skipped", "temperror")
    after = metrics.REGISTRY.get_sample_value(
        "gateway_arc_sealed_total", {"result": "skipped", "cv": "temperror"}
    )
    assert before is not None and after == before + 1


def test_counters_start_at_zero() -> None:
    for result in ("sealed", "skipped", "failed"):
        for cv in ("none", "pass", "fail"):
            labels = {"result": result, "cv": cv}
            assert metrics.REGISTRY.get_sample_value("gateway_arc_sealed_total", labels) is not None


def _config(tmp_path: Path, **seal: object) -> Config:
    data = {
        "server": {"accepted_domains": ["example.org"], "hostname": HOST},
        "arc_seal": {"enabled": True, **seal},
    }
    return config_from_mapping(data, tmp_path / "gateway.toml")


def test_config_needs_domain_selector_and_key_when_enabled(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, selector="arc", private_key="arc.key")
    assert any("arc_seal.domain" in p and "required" in p for p in err.value.problems)
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, domain="gateway.test", selector="arc", private_key="k", algorithm="x")
    assert any("arc_seal.algorithm" in p for p in err.value.problems)
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, domain="gateway.test", selector="bad selector", private_key="k")
    assert any("arc_seal.selector" in p for p in err.value.problems)


def test_an_unreadable_or_invalid_key_is_a_clear_config_error(tmp_path: Path) -> None:
    config = _config(tmp_path, domain="gateway.test", selector="arc", private_key="missing.key")
    with pytest.raises(ConfigError) as err:
        load_sealer(config)
    assert "arc_seal.private_key: cannot read" in err.value.problems[0]
    (tmp_path / "bad.key").write_text("not a key\n")
    config = _config(tmp_path, domain="gateway.test", selector="arc", private_key="bad.key")
    with pytest.raises(ConfigError) as err:
        load_sealer(config)
    assert "not a PEM RSA private key" in err.value.problems[0]
    assert "openssl genrsa" in err.value.problems[0]
    (tmp_path / "good.key").write_bytes(rsa_key().private)
    config = _config(tmp_path, domain="gateway.test", selector="arc", private_key="good.key")
    sealer = load_sealer(config)
    assert sealer is not None and sealer.authserv_id == HOST


def test_check_config_reads_the_key_and_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "arc.key").write_text("-----BEGIN RSA PRIVATE KEY-----\nnope\n")
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[server]\nlisten = "127.0.0.1:0"\nhostname = "mx.gateway.test"\n'
        'accepted_domains = ["example.org"]\n\n'
        '[arc_seal]\nenabled = true\ndomain = "gateway.test"\nselector = "arc"\n'
        'private_key = "arc.key"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    text = out.stdout.decode()
    assert text.startswith("arc_seal.private_key:") and "arc.key is not a PEM RSA" in text
