"""Pure pieces of the SMTP front door: queue ids, the Received field, addresses, proxies."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from gateway.api import TLSInfo
from gateway.config import ServerConfig
from gateway.smtp import (
    ListenerSettings,
    RecipientError,
    SessionLimits,
    _split_path,
    check_recipient,
    new_queue_id,
    received_field,
)

WHEN = datetime(2026, 11, 23, 5, 0, tzinfo=UTC)


def test_queue_ids_are_unique_and_safe_tokens() -> None:
    ids = {new_queue_id() for _ in range(5000)}
    assert len(ids) == 5000
    assert all(re.fullmatch(r"[A-Z2-7]{16}", i) for i in ids)


def test_received_field_for_tls_ipv6_and_hostile_helo() -> None:
    field = received_field(
        helo="evil (fake) ;by x",
        client_ip="2001:db8::1",
        client_name="",
        hostname="mx.example.org",
        protocol="ESMTPS",
        queue_id="ABC",
        tls=TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384"),
        recipient="x@example.org",
        when=WHEN,
    )
    assert field == (
        "Received: from evil??fake???by?x (unknown [IPv6:2001:db8::1])\r\n"
        "\tby mx.example.org (gateway) with ESMTPS\r\n"
        "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n"
        "\tid ABC\r\n"
        "\tfor <x@example.org>;\r\n"
        "\tMon, 23 Nov 2026 05:00:00 +0000"
    )


def test_received_field_never_names_a_recipient_with_spaces_or_controls() -> None:
    field = received_field(
        helo="h",
        client_ip=None,
        client_name="",
        hostname="mx",
        protocol="SMTP",
        queue_id="Q",
        tls=None,
        recipient='"a b"@example.org',
        when=WHEN,
    )
    assert "for <" not in field and "[unknown]" in field


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("<x@example.org>", ("x@example.org", "")),
        ("<x@example.org> NOTIFY=NEVER", ("x@example.org", "NOTIFY=NEVER")),
        ('<"a>b"@example.org>', ('"a>b"@example.org', "")),
        ("x@example.org", ("x@example.org", "")),
        ("<x@example.org", None),
        ("", None),
    ],
)
def test_rcpt_path_splitting(arg: str, expected: tuple[str, str] | None) -> None:
    assert _split_path(arg) == expected


def test_quoted_local_part_with_a_greater_than_sign_is_still_checked() -> None:
    assert check_recipient('"a>b"@example.org', ["example.org"]) is None
    assert check_recipient('"a>b@x"@example.org', ["example.org"]) is RecipientError.NOT_ACCEPTED


def test_trusted_proxy_networks() -> None:
    settings = ListenerSettings.from_config(
        ServerConfig(accepted_domains=("example.org",), proxy_trusted_networks=("10.0.0.0/8",)),
        verify_recipients=False,
    )
    assert settings.is_trusted_proxy("10.1.2.3")
    assert not settings.is_trusted_proxy("127.0.0.1")
    assert not settings.is_trusted_proxy(None)
    assert not settings.is_trusted_proxy("not-an-ip")


def test_session_limits_count_and_release() -> None:
    limits = SessionLimits()
    assert limits.acquire("192.0.2.1", 3, 2) is None
    assert limits.acquire("192.0.2.1", 3, 2) is None
    assert limits.acquire("192.0.2.1", 3, 2) == "max_sessions_per_ip"
    assert limits.acquire("192.0.2.2", 3, 2) is None
    assert limits.acquire("192.0.2.3", 3, 2) == "max_sessions"
    limits.release("192.0.2.1")
    assert limits.acquire("192.0.2.3", 3, 2) is None
    for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        limits.release(ip)
    assert limits.total == 0 and not limits.per_ip
