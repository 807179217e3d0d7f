"""Policies through a real entry point, SIGHUP reload, SIGTERM drain, metrics and readiness.

The third-party policies come from ``policy_plugin``: a package module plus a
``.dist-info`` with entry_points.txt on the gateway subprocess's PYTHONPATH,
i.e. genuinely installed plugins discovered through ``gateway.policies``.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.testing.harness import GatewayProcess
from gateway.testing.sink import SinkServer

GatewayFactory = Callable[..., GatewayProcess]
Connect = Callable[..., smtplib.SMTP]


def message(verdict: str = "", body: bytes = b"hello\r\n") -> bytes:
    head = b"From: a@sender.test\r\nTo: x@example.org\r\nSubject: t\r\n"
    if verdict:
        head += f"X-Test-Verdict: {verdict}\r\n".encode()
    return head + b"\r\n" + body


def send(port: int, data: bytes, connect: Connect) -> tuple[int, bytes]:
    with connect(port) as client:
        client.mail("a@sender.test")
        client.rcpt("x@example.org")
        return client.data(data)


@pytest.fixture
def plugin_gateway(
    make_gateway: GatewayFactory, sink: SinkServer, policy_plugin: Path
) -> GatewayProcess:
    return make_gateway(
        sink,
        {
            "policies": {
                "gwtest_verdict": {},
                "gwtest_raise": {"enabled": False},
                "gwtest_hang": {"enabled": False},
            }
        },
        extra_pythonpath=[policy_plugin],
    )


@pytest.mark.parametrize("policy", ["gwtest_raise", "gwtest_hang"])
def test_a_policy_that_raises_or_hangs_gives_451_without_exception_text(
    policy: str,
    make_gateway: GatewayFactory,
    sink: SinkServer,
    policy_plugin: Path,
    connect: Connect,
) -> None:
    gw = make_gateway(
        sink, {"policies": {policy: {"timeout": 0.5}}}, extra_pythonpath=[policy_plugin]
    )
    started = time.monotonic()
    code, text = send(gw.smtp_port, message(), connect)
    assert code == 451, text
    assert text.startswith(b"4.")
    assert b"secret" not in text and b"RuntimeError" not in text and b"passwd" not in text
    assert time.monotonic() - started < 5
    assert sink.messages == []
    event = gw.wait_for_event("message_processed")
    assert event is not None and event["action"] == "tempfail"
    assert event["policy_errors"] == [policy]


@pytest.mark.parametrize(
    ("verdict", "code", "status", "reason"),
    [
        ("reject", 550, b"5.7.1", b"test policy says no"),
        ("tempfail", 451, b"4.7.1", b"test policy wants a retry"),
    ],
)
def test_policy_reject_and_tempfail_verdicts_answer_with_the_reason(
    verdict: str,
    code: int,
    status: bytes,
    reason: bytes,
    plugin_gateway: GatewayProcess,
    sink: SinkServer,
    connect: Connect,
) -> None:
    got_code, text = send(plugin_gateway.smtp_port, message(verdict), connect)
    assert (got_code, text[:5]) == (code, status)
    assert reason in text
    assert sink.messages == []


def test_spam_score_over_add_header_relays_with_x_spam_flag(
    plugin_gateway: GatewayProcess, sink: SinkServer, connect: Connect
) -> None:
    data = message("spam")
    assert send(plugin_gateway.smtp_port, data, connect)[0] == 250
    (got,) = sink.wait_for(1)
    assert got.data.endswith(data)
    head = got.data[: -len(data)]
    assert b"\r\nX-Spam-Flag: YES\r\n" in head
    assert b"X-Spam-Status: Yes, score=6.00" in head


def test_quarantine_stores_durably_then_release_delivers_identical_bytes(
    plugin_gateway: GatewayProcess, sink: SinkServer, connect: Connect
) -> None:
    data = message("quarantine", b"keep me exactly\r\n..dot\r\n")
    code, text = send(plugin_gateway.smtp_port, data, connect)
    assert code == 250, text
    assert sink.messages == []
    cli = [sys.executable, "-m", "gateway", "quarantine"]
    config = ["--config", str(plugin_gateway.config_path)]
    env_path = {"PYTHONPATH": ":".join(plugin_gateway.extra_pythonpath)}
    listed = subprocess.run(
        [*cli, "list", "--json", *config],
        capture_output=True,
        text=True,
        timeout=30,
        env={**_env(), **env_path},
    )
    assert listed.returncode == 0, listed.stderr
    (item,) = json.loads(listed.stdout)
    assert item["mail_from"] == "a@sender.test" and item["rcpt_tos"] == ["x@example.org"]
    released = subprocess.run(
        [*cli, "release", item["id"], *config],
        capture_output=True,
        text=True,
        timeout=30,
        env={**_env(), **env_path},
    )
    assert released.returncode == 0, released.stdout + released.stderr
    (got,) = sink.wait_for(1)
    assert got.mail_from == "a@sender.test" and got.rcpt_tos == ("x@example.org",)
    assert got.data.endswith(data)
    assert got.data.startswith(b"Received: from client.sender.test (unknown [127.0.0.1])")


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_sighup_reload_with_a_valid_config_swaps_the_policies(
    make_gateway: GatewayFactory, sink: SinkServer, policy_plugin: Path, connect: Connect
) -> None:
    gw = make_gateway(sink, extra_pythonpath=[policy_plugin])
    assert send(gw.smtp_port, message("reject"), connect)[0] == 250  # no policy yet
    gw.rewrite_config({"policies": {"gwtest_verdict": {}}})
    gw.signal(signal.SIGHUP)
    assert gw.wait_for_event("config_reloaded", timeout=10) is not None
    assert send(gw.smtp_port, message("reject"), connect)[0] == 550


def test_sighup_with_an_invalid_config_keeps_the_old_one_and_says_why(
    make_gateway: GatewayFactory, sink: SinkServer, connect: Connect
) -> None:
    gw = make_gateway(sink)
    original = gw.config_path.read_text()
    gw.write_raw_config(original.replace(f"port = {sink.port}", 'port = "abc"'))
    gw.signal(signal.SIGHUP)
    event = gw.wait_for_event("config_reload_invalid", timeout=10)
    assert event is not None
    assert any(p.startswith("relay.port:") for p in event["problems"]), event
    gw.write_raw_config(original + "\n[policies.no_such_policy]\n")
    gw.signal(signal.SIGHUP)
    event = gw.wait_for_event("config_reload_invalid", timeout=10, after=1)
    assert event is not None and "policies.no_such_policy" in event["problems"][0]
    assert send(gw.smtp_port, message(), connect)[0] == 250  # still serving the old config
    assert len(sink.wait_for(1)) == 1
    metrics = _get(gw, "/metrics")[1]
    assert 'gateway_config_reloads_total{result="invalid"} 2.0' in metrics


def test_sigterm_finishes_the_message_in_flight_then_exits_0(
    make_gateway: GatewayFactory, sink: SinkServer
) -> None:
    gw = make_gateway(sink)
    busy = socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=10)
    idle = socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=10)
    bf = busy.makefile("rb")
    bf.readline()
    assert idle.recv(4096).startswith(b"220")
    busy.sendall(b"HELO c.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
    replies = [bf.readline() for _ in range(4)]
    assert replies[-1].startswith(b"354")
    busy.sendall(b"Subject: in flight\r\n\r\nfirst half\r\n")
    gw.signal(signal.SIGTERM)
    assert idle.recv(4096).startswith(b"421 4.3.2")  # idle sessions are told right away
    time.sleep(0.3)
    with pytest.raises(OSError):  # no new sessions
        socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=2).recv(10)
    busy.sendall(b"second half\r\n.\r\n")
    assert bf.readline().startswith(b"250 ")
    assert bf.readline().startswith(b"421 4.3.2")
    assert gw.wait(15) == 0
    (got,) = sink.wait_for(1)
    assert got.data.endswith(b"Subject: in flight\r\n\r\nfirst half\r\nsecond half\r\n")
    busy.close()
    idle.close()


def _get(gw: GatewayProcess, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{gw.metrics_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_metrics_count_replies_sessions_and_readiness_follows_the_downstream(
    make_gateway: GatewayFactory, sink: SinkServer, connect: Connect
) -> None:
    gw = make_gateway(sink)
    assert send(gw.smtp_port, message(), connect)[0] == 250
    status, text = _get(gw, "/metrics")
    assert status == 200
    assert 'gateway_smtp_replies_total{code="250",stage="data"} 1.0' in text
    assert 'gateway_messages_total{action="relay",frontend="smtp"} 1.0' in text
    assert "gateway_smtp_sessions_active 0.0" in text
    assert "gateway_message_size_bytes_count 1.0" in text
    assert _get(gw, "/readyz")[0] == 200
    sink.stop()
    assert _get(gw, "/readyz")[0] == 503


def test_a_client_hanging_up_during_the_hand_off_does_not_cancel_it(
    make_gateway: GatewayFactory, sink: SinkServer, policy_plugin: Path
) -> None:
    """The hand-off completes (and SIGTERM waits for it); the client, never told 250, retries."""
    gw = make_gateway(sink, {"policies": {"gwtest_slow": {}}}, extra_pythonpath=[policy_plugin])
    with socket.create_connection(("127.0.0.1", gw.smtp_port), timeout=10) as sock:
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(
            b"HELO c.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n"
        )
        assert [f.readline()[:3] for _ in range(4)][-1] == b"354"
        sock.sendall(b"Subject: gone\r\n\r\nbye\r\n.\r\n")
    time.sleep(0.2)
    gw.signal(signal.SIGTERM)
    assert gw.wait(15) == 0
    (got,) = sink.wait_for(1)
    assert got.data.endswith(b"Subject: gone\r\n\r\nbye\r\n")


def test_workers_share_the_port_reload_together_and_a_killed_worker_is_replaced(
    make_gateway: GatewayFactory, sink: SinkServer, connect: Connect
) -> None:
    gw = make_gateway(sink, {"server.workers": 2})
    assert gw.wait_for_event("gateway_started", after=1) is not None  # both workers up
    pids = {e["pid"] for e in gw.events("gateway_started")}
    assert len(pids) == 2 and gw.pid not in pids
    for _ in range(6):
        assert send(gw.smtp_port, message(), connect)[0] == 250
    gw.signal(signal.SIGHUP)
    assert gw.wait_for_event("config_reloaded", after=1, timeout=10) is not None
    os.kill(min(pids), signal.SIGKILL)
    assert gw.wait_for_event("gateway_started", after=2, timeout=15) is not None
    for _ in range(6):
        assert send(gw.smtp_port, message(), connect)[0] == 250
    assert len(sink.wait_for(12)) == 12
    assert gw.stop() == 0
