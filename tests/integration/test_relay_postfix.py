"""The relay against a real Postfix smtpd: STARTTLS, session reuse, refusals, SMTPUTF8.

Postfix runs from a throwaway config on a loopback port (needs root and the
``postfix`` binary; skipped locally without them, failed under CI=true).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Iterator

import pytest

from gateway.config import RelayConfig
from gateway.relay import FailureReason, Relay, RelayError
from gateway.testing.postfix import PostfixInstance, free_port
from gateway.testing.require import require_root, require_tool
from gateway.testing.sink import make_self_signed

BODY = (
    b"Caf\xc3\xa9, 8-bit.\r\n"
    b".leading dot\r\n"
    b".\r\n"
    b"..two dots\r\n" + b"x" * 998 + b"\r\n"
    b"last line\r\n"
)


def message(n: int) -> bytes:
    return (
        b"From: a@sender.test\r\nTo: b@example.org\r\n"
        b"Subject: relay %d\r\nMessage-ID: <relay-%d@sender.test>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" % (n, n)
    ) + BODY


@pytest.fixture(scope="module")
def postfix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostfixInstance]:
    require_tool("postfix", "apt-get install postfix")
    require_root("starting a Postfix master needs root (it drops to the postfix user)")
    tls_dir = tmp_path_factory.mktemp("postfix-tls")
    os.chmod(tls_dir, 0o755)  # noqa: S103 -- smtpd (mail_owner) must reach the test cert
    cert, key = make_self_signed(tls_dir, "postfix.test")
    for path in (cert, key):
        os.chmod(path, 0o644)  # a throwaway test key; smtpd must read it
    port = free_port()
    with PostfixInstance(
        main_cf=(
            f"smtpd_tls_cert_file = {cert}\n"
            f"smtpd_tls_key_file = {key}\n"
            "smtpd_tls_security_level = may\n"
            "smtpd_tls_loglevel = 1\n"
            # loopback may not relay here, so other domains are refused at RCPT
            "smtpd_relay_restrictions = reject_unauth_destination\n"
        ),
        master_cf=f"127.0.0.1:{port} inet n - n - - smtpd\n",
    ) as instance:
        instance.port = port  # type: ignore[attr-defined]
        yield instance


@pytest.fixture
async def relay(postfix: PostfixInstance) -> AsyncIterator[Relay]:
    config = RelayConfig(
        host="127.0.0.1",
        port=postfix.port,  # type: ignore[attr-defined]
        timeout=10.0,
        tls="required",
        tls_verify=False,
    )
    r = Relay(config, "gateway.test")
    yield r
    await r.close()


def sessions(postfix: PostfixInstance) -> int:
    return len(re.findall(r"smtpd\[\d+\]: connect from", postfix.log()))


async def test_relay_hands_postfix_messages_over_one_tls_session(
    postfix: PostfixInstance, relay: Relay
) -> None:
    before_sessions, before_mail = sessions(postfix), len(postfix.mailbox())
    for n in range(3):
        result = await relay.send("a@sender.test", ["b@example.org"], message(n))
        assert result.reply[0] == 250 and "queued as" in result.reply[1]
    stored = await asyncio.to_thread(postfix.wait_for_mail, before_mail + 3)
    assert sessions(postfix) == before_sessions + 1  # one session for three messages
    # Postfix offers PIPELINING: each envelope went as one group (RFC 2920), accepted.
    assert relay._idle and relay._idle[-1].supports("pipelining")
    assert "improper command pipelining" not in postfix.log()
    assert re.search(r"TLS connection established from \S+: TLSv1\.[23]", postfix.log())
    for item in stored[before_mail:]:
        # Postfix's Maildir stores LF line ends; every byte is otherwise ours.
        assert item.endswith(BODY.replace(b"\r\n", b"\n"))


async def test_postfix_refusing_one_recipient_delivers_to_nobody(
    postfix: PostfixInstance, relay: Relay
) -> None:
    before = len(postfix.mailbox())
    with pytest.raises(RelayError) as info:
        await relay.send("a@sender.test", ["b@example.org", "x@elsewhere.test"], message(9))
    assert (info.value.code, info.value.permanent) == (451, False)
    assert "x@elsewhere.test: 554 5.7.1" in info.value.text
    with pytest.raises(RelayError) as all_refused:
        await relay.send("a@sender.test", ["x@elsewhere.test"], message(10))
    assert all_refused.value.code == 554 and all_refused.value.permanent
    assert all_refused.value.reason is FailureReason.PERMFAIL
    await asyncio.sleep(0.5)
    assert len(postfix.mailbox()) == before
    # Pipelined, DATA got its 354 before the refusal was read: the connection was
    # dropped inside DATA, which Postfix discards, rather than sending an empty message.
    assert re.search(r"lost connection after DATA", postfix.log())


async def test_verify_recipient_asks_postfix(postfix: PostfixInstance, relay: Relay) -> None:
    assert (await relay.verify_recipient("a@sender.test", "b@example.org"))[0] == 250
    code, text = await relay.verify_recipient("a@sender.test", "x@elsewhere.test")
    assert code == 554 and "Relay access denied" in text


async def test_utf8_envelope_reaches_postfix_with_smtputf8(
    postfix: PostfixInstance, relay: Relay
) -> None:
    before = len(postfix.mailbox())
    await relay.send("j\u00f6rg@sender.test", ["b\u00fc@example.org"], message(11))
    await asyncio.to_thread(postfix.wait_for_mail, before + 1)
    assert re.search(r"from=<j\u00f6rg@sender\.test>", postfix.log())


async def test_postfix_size_limit_refuses_at_mail_from(
    postfix: PostfixInstance, relay: Relay
) -> None:
    """We announce SIZE (RFC 1870), so an oversized message is refused before DATA."""
    big = message(12) + (b"y" * 76 + b"\r\n") * 200_000  # ~15 MB > Postfix's 10 MB default
    with pytest.raises(RelayError) as info:
        await relay.send("a@sender.test", ["b@example.org"], big)
    assert info.value.code == 552 and info.value.permanent
