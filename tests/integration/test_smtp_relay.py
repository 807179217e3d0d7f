"""End to end: smtplib -> the real gateway (subprocess) -> the real SinkServer downstream.

The relayed message must be our prepended fields followed by every byte the
client sent; the DATA reply reflects the downstream's answer.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from gateway.testing.harness import GatewayProcess
from gateway.testing.require import require_tool
from gateway.testing.sink import SinkServer

GatewayFactory = Callable[..., GatewayProcess]
Connect = Callable[..., smtplib.SMTP]

MSG = b"From: a@sender.test\r\nTo: x@example.org\r\nSubject: hello\r\n\r\nhello\r\n"


def split_prepended(data: bytes, original: bytes) -> list[bytes]:
    """The header fields the gateway prepended (asserting the rest is ``original``)."""
    assert data.endswith(original), "the original bytes must follow our fields unchanged"
    head = data[: len(data) - len(original)]
    assert head.endswith(b"\r\n")
    return re.split(rb"\r\n(?=[^ \t])", head[:-2])


def raw_session(port: int, script: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``script`` (after reading the greeting) and return everything read until close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.recv(4096)
        sock.sendall(script)
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
        return out


def flood_session(port: int, script: bytes) -> tuple[bytes, bool]:
    """Send ``script`` while a thread reads; (everything read, whether a RST ended it)."""
    got: list[bytes] = []
    reset = threading.Event()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.recv(4096)

        def reader() -> None:
            while True:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    reset.set()
                    return
                except OSError:
                    return
                if not chunk:
                    return
                got.append(chunk)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        with contextlib.suppress(OSError):
            sock.sendall(script)
        thread.join(15)
    return b"".join(got), reset.is_set()


BODIES = {
    "dot_stuffed_lines": b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\n...three\r\n. \r\nend\r\n",
    "eight_bit_body": "Subject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße, ☃, \xff\r\n".encode("utf-8", "surrogateescape")
    + b"raw \xff\xfe\x80 bytes\r\n",
    "line_of_998_octets": b"Subject: long\r\n\r\n"
    + b"a" * 998
    + b"\r\n"
    + b"."
    + b"b" * 997
    + b"\r\n",
    "binary_ish_part": b"Subject: bin\r\nContent-Type: application/octet-stream\r\n\r\n"
    + bytes(b for b in range(256) if b not in (10, 13))
    + b"\r\n",
    "no_trailing_crlf_in_headers_fold": b"Subject: folded\r\n  continuation\r\n\tmore\r\n\r\nx\r\n",
    "empty_body": b"Subject: empty\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(BODIES))
def test_relay_is_byte_exact_after_our_prepended_fields(
    name: str, module_gateway: GatewayProcess, fresh_sink: SinkServer, connect: Connect
) -> None:
    """Every received byte reaches the downstream unchanged; only fields are prepended."""
    body = BODIES[name]
    with connect(module_gateway.smtp_port) as client:
        client.sendmail("a@sender.test", ["x@example.org"], body)
    (got,) = fresh_sink.wait_for(1)
    fields = split_prepended(got.data, body)
    assert fields[0].startswith(b"Received: from client.sender.test (unknown [127.0.0.1])")
    assert [f.split(b":", 1)[0] for f in fields[1:]] == [
        b"Authentication-Results",
        b"X-Spam-Status",
    ]
    assert got.mail_from == "a@sender.test"
    assert got.rcpt_tos == ("x@example.org",)


def test_received_field_names_hop_protocol_queue_id_and_single_recipient(
    module_gateway: GatewayProcess, fresh_sink: SinkServer, connect: Connect
) -> None:
    """RFC 5321 §4.4 trace field: from/by/with ESMTP/id/for, and the 250 names our queue id."""
    with connect(module_gateway.smtp_port) as client:
        client.mail("a@sender.test")
        client.rcpt("x@example.org")
        code, text = client.data(MSG)
    assert code == 250
    queue_id = re.search(rb"queued as ([A-Z0-9]+)", text)
    assert queue_id
    (got,) = fresh_sink.wait_for(1)
    received = split_prepended(got.data, MSG)[0].decode()
    assert re.match(
        r"Received: from client\.sender\.test \(unknown \[127\.0\.0\.1\]\)\r\n"
        r"\tby mx\.example\.org \(gateway\) with ESMTP\r\n"
        rf"\tid {queue_id.group(1).decode()}\r\n"
        r"\tfor <x@example\.org>;\r\n"
        r"\t\w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}$",
        received,
    ), received


def test_several_recipients_are_not_named_in_received(
    module_gateway: GatewayProcess, fresh_sink: SinkServer, connect: Connect
) -> None:
    """A repeated recipient is accepted once (the downstream delivers one copy)."""
    with connect(module_gateway.smtp_port) as client:
        client.sendmail("a@sender.test", ["x@example.org", "y@example.org", "x@example.org"], MSG)
    (got,) = fresh_sink.wait_for(1)
    assert got.rcpt_tos == ("x@example.org", "y@example.org")
    assert b"for <" not in split_prepended(got.data, MSG)[0]


def test_untrusted_incoming_spam_and_our_auth_results_fields_are_removed(
    module_gateway: GatewayProcess, fresh_sink: SinkServer, connect: Connect
) -> None:
    body = (
        b"X-Spam-Flag: NO\r\nAuthentication-Results: mx.example.org; spf=pass\r\n"
        b"Authentication-Results: other.example; spf=fail\r\nSubject: s\r\n\r\nbody\r\n"
    )
    with connect(module_gateway.smtp_port) as client:
        client.sendmail("a@sender.test", ["x@example.org"], body)
    (got,) = fresh_sink.wait_for(1)
    kept = b"Authentication-Results: other.example; spf=fail\r\nSubject: s\r\n\r\nbody\r\n"
    assert got.data.endswith(kept)
    assert b"X-Spam-Flag: NO" not in got.data
    assert b"mx.example.org; spf=pass" not in got.data


def test_ehlo_advertises_the_esmtp_extensions(
    module_gateway: GatewayProcess, connect: Connect
) -> None:
    with connect(module_gateway.smtp_port, ehlo=False) as client:
        code, text = client.ehlo("client.sender.test")
    assert code == 250
    lines = text.decode().splitlines()
    assert lines[0] == "mx.example.org"
    assert set(lines[1:]) >= {
        "SIZE 26214400",
        "8BITMIME",
        "SMTPUTF8",
        "PIPELINING",
        "ENHANCEDSTATUSCODES",
    }
    assert "STARTTLS" not in lines  # no certificate configured
    assert not any(line.startswith("AUTH") for line in lines)


def test_recipient_domain_is_matched_case_insensitively_and_case_is_kept(
    module_gateway: GatewayProcess, fresh_sink: SinkServer, connect: Connect
) -> None:
    with connect(module_gateway.smtp_port) as client:
        client.sendmail("a@sender.test", ["Mixed.Case@EXAMPLE.Org"], MSG)
    (got,) = fresh_sink.wait_for(1)
    assert got.rcpt_tos == ("Mixed.Case@EXAMPLE.Org",)


def test_null_sender_is_accepted_and_relayed(
    module_gateway: GatewayProcess, fresh_sink: SinkServer, connect: Connect
) -> None:
    with connect(module_gateway.smtp_port) as client:
        client.sendmail("<>", ["x@example.org"], MSG)
    (got,) = fresh_sink.wait_for(1)
    assert got.mail_from == ""


def test_pipelined_commands_after_end_of_data_are_answered(
    module_gateway: GatewayProcess, fresh_sink: SinkServer
) -> None:
    """RFC 2920: MAIL..DATA pipelined, and QUIT right behind the final dot in one packet."""
    out = raw_session(
        module_gateway.smtp_port,
        b"EHLO c.sender.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n"
        + MSG
        + b".\r\nQUIT\r\n",
    )
    codes = [line[:3] for line in out.split(b"\r\n") if line[:3].isdigit() and line[3:4] == b" "]
    assert codes == [b"250", b"250", b"250", b"354", b"250", b"221"]
    (got,) = fresh_sink.wait_for(1)
    assert got.data.endswith(MSG)


def test_message_over_size_limit_gets_552_while_streaming(
    make_gateway: GatewayFactory, sink: SinkServer, connect: Connect
) -> None:
    gw = make_gateway(sink, {"server.max_message_size": 4096})
    with connect(gw.smtp_port) as client:
        code, text = client.ehlo("c.sender.test")
        assert b"SIZE 4096" in text
        # Declared too big in MAIL FROM (RFC 1870).
        code, text = client.docmd("MAIL FROM:<a@sender.test> SIZE=5000")
        assert code == 552 and text.startswith(b"5.3.4")
        client.rset()
        # Not declared: refused after streaming, and the session stays usable.
        client.mail("a@sender.test")
        client.rcpt("x@example.org")
        code, text = client.data(b"Subject: big\r\n\r\n" + (b"y" * 76 + b"\r\n") * 200)
        assert (code, text[:5]) == (552, b"5.3.4")
        client.sendmail("a@sender.test", ["x@example.org"], MSG)
    assert [m.data.endswith(MSG) for m in sink.wait_for(1)] == [True]


def test_one_huge_line_is_bounded_by_the_size_limit(
    make_gateway: GatewayFactory, sink: SinkServer, connect: Connect
) -> None:
    gw = make_gateway(sink, {"server.max_message_size": 100_000})
    with connect(gw.smtp_port) as client:
        client.mail("a@sender.test")
        client.rcpt("x@example.org")
        code, text = client.data(b"Subject: x\r\n\r\n" + b"z" * 1_000_000)
        assert (code, text[:5]) == (552, b"5.3.4")
        assert client.noop()[0] == 250
    assert sink.messages == []


def test_more_recipients_than_allowed_get_452(
    make_gateway: GatewayFactory, sink: SinkServer, connect: Connect
) -> None:
    gw = make_gateway(sink, {"server.max_recipients": 2})
    with connect(gw.smtp_port) as client:
        client.mail("a@sender.test")
        assert client.rcpt("a@example.org")[0] == 250
        assert client.rcpt("b@example.org")[0] == 250
        code, text = client.rcpt("c@example.org")
        assert code == 452 and text.startswith(b"4.5.3")
        assert client.data(MSG)[0] == 250
    (got,) = sink.wait_for(1)
    assert got.rcpt_tos == ("a@example.org", "b@example.org")


def test_downstream_down_gives_451_and_nothing_is_acknowledged(
    make_gateway: GatewayFactory, sink: SinkServer, connect: Connect
) -> None:
    gw = make_gateway(sink, {"relay.verify_recipients": False})
    sink.stop()
    with connect(gw.smtp_port) as client, pytest.raises(smtplib.SMTPDataError) as err:
        client.sendmail("a@sender.test", ["x@example.org"], MSG)
    assert err.value.smtp_code == 451
    assert err.value.smtp_error.startswith(b"4.4.1")
    sink.start()
    with connect(gw.smtp_port) as client:
        client.sendmail("a@sender.test", ["x@example.org"], MSG)
    assert len(sink.wait_for(1)) == 1


def test_downstream_4xx_at_data_gives_4xx(
    module_gateway: GatewayProcess, fresh_sink: SinkServer, connect: Connect
) -> None:
    fresh_sink.data_reply = "452 4.3.1 Insufficient system storage"
    with (
        connect(module_gateway.smtp_port) as client,
        pytest.raises(smtplib.SMTPDataError) as err,
    ):
        client.sendmail("a@sender.test", ["x@example.org"], MSG)
    assert 400 <= err.value.smtp_code < 500


def test_downstream_5xx_at_data_is_passed_back(
    module_gateway: GatewayProcess, fresh_sink: SinkServer, connect: Connect
) -> None:
    fresh_sink.data_reply = "554 5.6.0 Content refused downstream"
    with (
        connect(module_gateway.smtp_port) as client,
        pytest.raises(smtplib.SMTPDataError) as err,
    ):
        client.sendmail("a@sender.test", ["x@example.org"], MSG)
    assert err.value.smtp_code == 554
    assert b"5.6.0" in err.value.smtp_error
    assert b"Content refused downstream" in err.value.smtp_error


def test_rcpt_verification_passes_back_the_downstream_5xx(
    module_gateway: GatewayProcess, fresh_sink: SinkServer, connect: Connect
) -> None:
    fresh_sink.rcpt_replies = {"nobody@example.org": "550 5.1.1 No such user here"}
    with connect(module_gateway.smtp_port) as client:
        client.mail("a@sender.test")
        code, text = client.rcpt("nobody@example.org")
        assert code == 550 and text == b"5.1.1 No such user here"
        assert client.rcpt("x@example.org")[0] == 250
        assert client.data(MSG)[0] == 250
    (got,) = fresh_sink.wait_for(1)
    assert got.rcpt_tos == ("x@example.org",)


def test_rcpt_verification_downstream_4xx_gives_451(
    module_gateway: GatewayProcess, fresh_sink: SinkServer, connect: Connect
) -> None:
    fresh_sink.rcpt_replies = {"busy@example.org": "450 4.2.1 Mailbox busy"}
    with connect(module_gateway.smtp_port) as client:
        client.mail("a@sender.test")
        code, text = client.rcpt("busy@example.org")
    assert code == 451 and text.startswith(b"4.4.1")


def test_rcpt_verification_downstream_down_gives_451(
    make_gateway: GatewayFactory, sink: SinkServer, connect: Connect
) -> None:
    gw = make_gateway(sink)
    sink.stop()
    with connect(gw.smtp_port) as client:
        client.mail("a@sender.test")
        code, text = client.rcpt("x@example.org")
    assert code == 451 and text.startswith(b"4.4.1")


def test_replies_carry_enhanced_status_codes_and_no_internal_detail(
    module_gateway: GatewayProcess, connect: Connect
) -> None:
    with connect(module_gateway.smtp_port) as client:
        assert client.docmd("DATA")[1].startswith(b"5.5.1")
        code, text = client.docmd("BOGUS\x01CMD")
        assert code == 500 and b"\x01" not in text
        assert client.docmd("AUTH PLAIN AGFiYwBkZWY=")[0] == 502
        assert client.noop() == (250, b"2.0.0 OK")


def test_overlong_command_line_is_refused(module_gateway: GatewayProcess, connect: Connect) -> None:
    with connect(module_gateway.smtp_port) as client:
        code, _ = client.docmd("NOOP " + "x" * 5000)
        assert code == 500
        assert client.noop()[0] == 250


def test_swaks_delivers_through_the_gateway(
    module_gateway: GatewayProcess, fresh_sink: SinkServer
) -> None:
    require_tool("swaks", "apt-get install swaks")
    out = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{module_gateway.smtp_port}",
            "--from",
            "a@sender.test",
            "--to",
            "x@example.org",
            "--pipeline",
            "--body",
            "swaks body",
            "--header",
            "Subject: swaks",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (got,) = fresh_sink.wait_for(1)
    assert b"swaks body" in got.data


def test_message_processed_log_line_explains_the_message(
    module_gateway: GatewayProcess, fresh_sink: SinkServer, connect: Connect
) -> None:
    with connect(module_gateway.smtp_port) as client:
        client.mail("a@sender.test")
        client.rcpt("x@example.org")
        code, text = client.data(MSG)
    assert code == 250
    queue_id = text.split(b"queued as ")[1].split()[0].decode()
    event: dict[str, object] = {}
    for n in range(200):  # the log reader thread may lag a little behind the reply
        mine = [e for e in module_gateway.events("message_processed") if e["queue_id"] == queue_id]
        if mine:
            event = mine[0]
            break
        time.sleep(0.05 * (n > 0))
    assert event["mail_from"] == "a@sender.test"
    assert event["rcpt_tos"] == ["x@example.org"]
    assert event["client_ip"] == "127.0.0.1"
    assert event["helo"] == "client.sender.test"
    assert event["action"] == "relay"
    assert event["size"] == len(MSG)
    assert event["downstream"].startswith("250")
    assert {"queue_id", "score", "symbols", "timings", "reply"} <= set(event)


def test_helo_session_is_recorded_as_smtp_and_gets_plain_replies(
    module_gateway: GatewayProcess, fresh_sink: SinkServer, connect: Connect
) -> None:
    with connect(module_gateway.smtp_port, ehlo=False) as client:
        client.helo("old.sender.test")
        code, text = client.docmd("MAIL FROM:<a@sender.test>")
        assert (code, text) == (250, b"OK")  # no enhanced codes without EHLO (RFC 2034)
        client.docmd("RCPT TO:<x@example.org>")
        assert client.data(MSG)[0] == 250
    (got,) = fresh_sink.wait_for(1)
    assert b"\twith SMTP\r\n" in got.data.split(MSG)[0] or b" with SMTP\r\n" in got.data


def test_smtputf8_and_8bitmime_envelopes_are_relayed(
    module_gateway: GatewayProcess, fresh_sink: SinkServer, connect: Connect
) -> None:
    body = "Subject: ünïcode\r\n\r\nGrüße\r\n".encode()
    with connect(module_gateway.smtp_port) as client:
        client.sendmail(
            "jörg@sender.test",
            ["Ärger@example.org"],
            body,
            mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        )
    (got,) = fresh_sink.wait_for(1)
    assert got.mail_from == "jörg@sender.test"
    assert got.rcpt_tos == ("Ärger@example.org",)
    assert got.data.endswith(body)
    assert b"with UTF8SMTP" in got.data


def test_thousands_of_recipients_and_a_pipelined_flood_get_bounded_answers(
    make_gateway: GatewayFactory, sink: SinkServer
) -> None:
    gw = make_gateway(sink, {"server.max_recipients": 5, "relay.verify_recipients": False})
    flood = b"EHLO flood.test\r\nMAIL FROM:<a@sender.test>\r\n" + b"".join(
        f"RCPT TO:<u{i}@example.org>\r\n".encode() for i in range(3000)
    )
    # The gateway closes with part of the flood unread, so the kernel may answer with
    # a RST that discards replies still queued for us: read while sending, and try
    # again when a reset ate the tail (a TCP effect, not a gateway answer).
    for _attempt in range(3):
        out, reset = flood_session(gw.smtp_port, flood)
        lines = [line for line in out.split(b"\r\n") if line[:3].isdigit() and line[3:4] == b" "]
        if not reset or (lines and lines[-1].startswith(b"421")):
            break
    codes = [line[:3] for line in lines]
    assert codes[:2] == [b"250", b"250"]
    assert codes[2:7] == [b"250"] * 5
    assert set(codes[7:-1]) == {b"452"}
    assert lines[-1].startswith(b"421 4.7.0")  # per-session command budget, then closed
    assert len(codes) < 1100
