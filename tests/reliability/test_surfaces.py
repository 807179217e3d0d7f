"""The exposed surfaces: metrics leak nothing personal, privileges drop, TLS is modern.

- The metrics endpoint listens on loopback by default, and after mail with a
  distinctive sender, recipient, subject, HELO and client address none of
  them appears in /metrics.
- ``server.user`` / ``server.group``: the gateway binds its sockets, then runs
  as that user (checked in /proc/PID/status) and still writes its quarantine;
  it refuses to start when the account does not exist or its directories are
  not writable by that user.
- STARTTLS accepts TLS 1.2 and later only: a TLS 1.1-only client is refused.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import smtplib
import ssl
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from rel_support import RCPT, SENDER, GatewayFactory, overrides, quarantine_policy

from gateway.config import ConfigError, MetricsConfig, WebConfig, load_config, parse_hostport
from gateway.testing.dnsserver import DNSServer
from gateway.testing.faults import numbered_message
from gateway.testing.harness import GatewayFailed, example_config_path, write_config
from gateway.testing.require import require_root
from gateway.testing.sink import SinkServer, make_self_signed


def test_metrics_listen_on_loopback_by_default() -> None:
    example = example_config_path()
    assert example is not None
    for listen in (MetricsConfig().listen, load_config(example).metrics.listen):
        host, _ = parse_hostport(listen)
        assert ipaddress.ip_address(host).is_loopback, listen


def test_metrics_expose_no_addresses_subjects_or_client_details(
    make_gateway: GatewayFactory, dns: DNSServer
) -> None:
    sender, rcpt = "zq-secret-sender@sender.test", "zq-secret-rcpt@example.org"
    subject = "ZQ-SECRET-SUBJECT-4711"
    with SinkServer() as sink:
        gw = make_gateway(overrides(sink.port, dns))
        with smtplib.SMTP(
            "127.0.0.1", gw.smtp_port, timeout=10, source_address=("127.0.7.77", 0)
        ) as client:
            client.ehlo("zq-secret-helo.test")
            msg = numbered_message("m1", sender=sender, rcpt=rcpt).replace(
                b"Subject: ledger m1", f"Subject: {subject}".encode()
            )
            client.sendmail(sender, [rcpt], msg)
            client.docmd("RCPT TO:<zq-refused@elsewhere.test>")  # a refused address too
        assert sink.wait_for(1)
        assert gw.metrics_port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics") as resp:
            text = resp.read().decode()
    assert "gateway_messages_total" in text
    for secret in ("zq-secret", "zq-refused", "ZQ-SECRET", "127.0.7.77", "sender.test", "@"):
        assert secret not in text, secret


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory owned by nobody that nobody can reach (pytest's tmp_path is root-only)."""
    work = Path(tempfile.mkdtemp(prefix="gateway-nobody-"))
    shutil.chown(work, "nobody", "nogroup")
    yield work
    shutil.rmtree(work, ignore_errors=True)


def _status_ids(pid: int) -> dict[str, list[int]]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(v) for v in value.split()]
    return out


def test_privileges_drop_to_server_user_after_binding(
    make_gateway: GatewayFactory, dns: DNSServer, tmp_path: Path, nobody_dir: Path
) -> None:
    require_root("dropping privileges needs a process started as root")
    work = nobody_dir
    with SinkServer() as sink:
        config = overrides(sink.port, dns, quarantine_policy(tmp_path / "rules"))
        config["server.user"] = "nobody"
        gw = make_gateway(config, workdir=work)
        ids = _status_ids(gw.pid)
        assert ids["Uid"] == [65534] * 4 and ids["Gid"] == [65534] * 4, ids
        assert ids["Groups"] == [], ids  # supplementary groups dropped too
        with smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=10) as client:
            client.sendmail(
                SENDER,
                [RCPT],
                b"X-Test-Verdict: quarantine\r\n" + numbered_message("q", sender=SENDER, rcpt=RCPT),
            )  # the quarantine is written as nobody
            client.sendmail(SENDER, [RCPT], numbered_message("r", sender=SENDER, rcpt=RCPT))
        files = list((work / "quarantine" / "messages").glob("*.eml"))
        assert len(files) == 1 and files[0].stat().st_uid == 65534
        assert len(sink.wait_for(1)) == 1


def test_refuses_to_start_when_the_user_cannot_write_its_directories(
    make_gateway: GatewayFactory, dns: DNSServer, nobody_dir: Path
) -> None:
    require_root("dropping privileges needs a process started as root")
    root_only = nobody_dir.parent / (nobody_dir.name + "-root-only")
    root_only.mkdir(mode=0o755)
    work = nobody_dir
    with SinkServer() as sink:
        config = overrides(sink.port, dns)
        config.update({"server.user": "nobody", "quarantine.path": str(root_only / "q")})
        try:
            with pytest.raises(GatewayFailed) as info:
                make_gateway(config, workdir=work, start_timeout=15)
        finally:
            shutil.rmtree(root_only, ignore_errors=True)
        assert "quarantine.path" in str(info.value) and "not writable" in str(info.value)


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"server.user": "no-such-user-zq"}, 'no such user "no-such-user-zq"'),
        ({"server.user": "nobody", "server.group": "no-such-group-zq"}, "no such group"),
        ({"server.group": "nogroup"}, "needs server.user"),
    ],
)
def test_unknown_accounts_are_config_errors(
    tmp_path: Path, values: dict[str, str], problem: str
) -> None:
    path = write_config(values, tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any(problem in p and p.startswith("server.") for p in info.value.problems), (
        info.value.problems
    )


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_1_1_client_is_refused_and_tls_1_2_accepted(
    make_gateway: GatewayFactory, dns: DNSServer, tmp_path: Path
) -> None:
    cert, key = make_self_signed(tmp_path)
    with SinkServer() as sink:
        config = overrides(
            sink.port, dns, {"server.tls_cert": str(cert), "server.tls_key": str(key)}
        )
        gw = make_gateway(config)
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname = False
        old.verify_mode = ssl.CERT_NONE
        old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        with smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=10) as client:
            client.ehlo("old.sender.test")
            with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
                client.starttls(context=old)
        modern = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        modern.check_hostname = False
        modern.verify_mode = ssl.CERT_NONE
        modern.maximum_version = ssl.TLSVersion.TLSv1_2
        with smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=10) as client:
            client.ehlo("new.sender.test")
            client.starttls(context=modern)
            assert client.sock is not None
            assert client.sock.version() == "TLSv1.2"  # type: ignore[attr-defined]
            client.ehlo("new.sender.test")
            client.sendmail(SENDER, [RCPT], numbered_message("t", sender=SENDER, rcpt=RCPT))
        assert len(sink.wait_for(1)) == 1
        assert os.path.exists(cert)


def test_web_ui_is_off_by_default_and_on_loopback_in_the_example() -> None:
    example = example_config_path()
    assert example is not None
    assert WebConfig().listen == ""
    host, _ = parse_hostport(load_config(example).web.listen)
    assert ipaddress.ip_address(host).is_loopback
