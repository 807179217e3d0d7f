"""Rate limits across two gateway nodes sharing one Redis, and Redis going away.

Redis here is a throwaway ``redis-server`` started from the binary on a free
port, so stopping it mid-run disturbs nothing else on the machine.
"""

from __future__ import annotations

import shutil
import smtplib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.testing.harness import GatewayProcess
from gateway.testing.require import require
from gateway.testing.services import ThrowawayRedis
from gateway.testing.sink import SinkServer

MSG = b"From: a@sender.test\r\nTo: u@example.org\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def throwaway_redis(tmp_path: Path) -> Iterator[ThrowawayRedis]:
    require(
        shutil.which("redis-server"), "redis-server binary not installed (apt install redis-server)"
    )
    server = ThrowawayRedis(tmp_path, persist=False)  # a restart comes back empty
    server.start()
    yield server
    server.stop()


def send(port: int, client_ip_note: str = "") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        client.ehlo("client.sender.test")
        client.mail("a@sender.test")
        code, _ = client.rcpt("u@example.org")
        assert code == 250
        return client.data(MSG)


def test_a_limit_is_counted_across_nodes_and_mail_flows_while_redis_is_down(
    make_gateway: Callable[..., GatewayProcess], sink: SinkServer, throwaway_redis: ThrowawayRedis
) -> None:
    overrides = {
        "state.backend": "redis",
        "state.url": f"redis://127.0.0.1:{throwaway_redis.port}/0",
        "policies": {
            "ratelimit": {
                "client_ip_limit": 0,
                "sender_domain_limit": 3,
                "recipient_limit": 0,
            }
        },
    }
    node_a = make_gateway(sink, overrides)
    node_b = make_gateway(sink, overrides)
    replies = [send(port) for port in (node_a.smtp_port, node_b.smtp_port) * 2]
    assert [code for code, _ in replies] == [250, 250, 250, 451]
    assert replies[3][1].startswith(
        b"4.7.1 Message deferred: rate limit: sender domain sender.test"
    )
    assert len(sink.messages) == 3

    throwaway_redis.stop()
    code, _ = send(node_a.smtp_port)
    assert code == 250  # the limit steps aside; mail keeps flowing
    assert "RATELIMIT_UNAVAILABLE" in sink.messages[-1].data.split(b"\r\n\r\n")[0].decode()

    throwaway_redis.start()  # empty again: counting starts over, by itself
    deadline = time.monotonic() + 20
    while True:
        code, _ = send(node_b.smtp_port)
        head = sink.messages[-1].data.split(b"\r\n\r\n")[0].decode()
        if "RATELIMIT_UNAVAILABLE" not in head or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert code == 250 and "RATELIMIT_UNAVAILABLE" not in head
