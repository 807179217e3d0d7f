"""Redis and PostgreSQL stop and come back while two nodes take a steady stream of mail.

Both services are throwaway servers started from the binaries (see conftest), so
they can really be stopped: PostgreSQL with a fast shutdown (open sessions cut,
committed rows kept), Redis terminated (its append-only file keeps the data).
A sender thread delivers numbered messages alternately to node A and node B;
every third one carries a marker that a rule scores into the quarantine band.

What must hold (docs/cluster.md, "What each failure does"):

- zero lost: every message that got a 2xx is at the sink or in the PostgreSQL
  quarantine;
- while PostgreSQL is down, mail that would be quarantined gets 451, never 250,
  and other mail keeps flowing (250);
- while Redis is down, the rate limit and the classifier step aside with
  RATELIMIT_UNAVAILABLE and BAYES_UNAVAILABLE (in X-Spam-Status and in
  gateway_symbols_total);
- both recover by themselves: after the restart quarantining works again and
  the symbols are gone, without touching the gateways.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.testing.harness import GatewayProcess
from gateway.testing.sink import Delivered, SinkServer

ROOT = Path(__file__).resolve().parents[2]
UNAVAILABLE = ("RATELIMIT_UNAVAILABLE", "BAYES_UNAVAILABLE")
PER_PHASE = 9  # messages sent in each phase (before, during, after the outage)
OUTAGE = 2.0  # seconds at least that both services stay down


@dataclass(frozen=True, slots=True)
class Sent:
    n: int
    quarantine: bool  # carries the marker the rule scores into the quarantine band
    code: int | None  # final reply to DATA; None when the session failed
    started: float
    ended: float

    @property
    def sender(self) -> str:
        return f"n{self.n}@sender.test"


def message(n: int, quarantine: bool) -> bytes:
    body = "QUARANTINE-ME please" if quarantine else "see you at noon"
    return (
        f"From: n{n}@sender.test\r\nTo: x@example.org\r\nSubject: msg {n}\r\n"
        f"Message-ID: <{n}@cluster.test>\r\n\r\n{body}\r\n"
    ).encode()


class Stream(threading.Thread):
    """Numbered messages, one after another, alternately to each node."""

    def __init__(self, ports: tuple[int, int]) -> None:
        super().__init__(daemon=True)
        self.ports = ports
        self.sent: list[Sent] = []
        self.halt = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            quarantine = n % 3 == 0
            started = time.monotonic()
            code: int | None
            try:
                with smtplib.SMTP("127.0.0.1", self.ports[n % 2], timeout=30) as client:
                    client.ehlo("client.sender.test")
                    client.mail(f"n{n}@sender.test")
                    client.rcpt("x@example.org")
                    code, _ = client.data(message(n, quarantine))
            except (OSError, smtplib.SMTPException):
                code = None
            with self.lock:
                self.sent.append(Sent(n, quarantine, code, started, time.monotonic()))
            n += 1
            time.sleep(0.02)

    def since(self, t: float) -> list[Sent]:
        with self.lock:
            return [s for s in self.sent if s.started >= t]

    def wait_for(self, count: int, since: float, deadline: float) -> None:
        while len(self.since(since)) < count:
            assert time.monotonic() < deadline, f"stream stalled: {self.sent[-3:]}"
            time.sleep(0.05)


def spam_status(data: bytes) -> str:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    unfolded = head.replace("\r\n\t", " ").replace("\r\n ", " ")
    return next(line for line in unfolded.split("\r\n") if line.startswith("X-Spam-Status:"))


def symbol_count(metrics_port: int | None, symbol: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    prefix = f'gateway_symbols_total{{symbol="{symbol}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def test_redis_and_postgres_restarted_mid_stream_lose_nothing_and_recover_by_themselves(
    tmp_path: Path,
    sink: SinkServer,
    redis_server: Any,
    pg_server: Any,
    node_overrides: Any,
) -> None:
    rules = tmp_path / "quarantine.toml"
    rules.write_text(
        '[[rule]]\nname = "TEST_QUARANTINE_ME"\ntype = "body"\npattern = "QUARANTINE-ME"\n'
        'score = 12.0\ndescription = "test marker: scores into the quarantine band"\n'
    )
    overrides = node_overrides(
        {
            "rules": {"builtin": False, "files": [str(rules)]},
            "bayes": {"min_spam": 10, "min_ham": 10, "state_timeout": 2.0},
            "ratelimit": {
                "enabled": True,
                "client_ip_limit": 100_000,
                "sender_domain_limit": 100_000,
                "recipient_limit": 100_000,
                "exempt_networks": [],
            },
        },
        {
            "state.backend": "redis",
            "state.url": redis_server.url,
            "state.key_prefix": "gwtest-outage:",
            "quarantine.backend": "postgresql",
            "quarantine.dsn": f"{pg_server.dsn}?connect_timeout=2",
        },
    )
    with (
        GatewayProcess(overrides, workdir=tmp_path / "a") as node_a,
        GatewayProcess(overrides, workdir=tmp_path / "b") as node_b,
    ):
        stream = Stream((node_a.smtp_port, node_b.smtp_port))
        begin = time.monotonic()
        deadline = begin + 60
        stream.start()
        try:
            stream.wait_for(PER_PHASE, begin, deadline)
            down_begin = time.monotonic()
            redis_server.stop()
            pg_server.stop()
            down = time.monotonic()
            stream.wait_for(PER_PHASE, down, deadline)
            time.sleep(max(0.0, down + OUTAGE - time.monotonic()))
            up_begin = time.monotonic()
            pg_server.start()
            redis_server.start()
            up = time.monotonic()
            # Recovered: the last PER_PHASE messages since the restart all got 250.
            while True:
                after = stream.since(up)
                if len(after) >= PER_PHASE and all(s.code == 250 for s in after[-PER_PHASE:]):
                    break
                assert time.monotonic() < deadline, f"no recovery: {after}"
                time.sleep(0.1)
        finally:
            stream.halt.set()
            stream.join(40)
        listed = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "quarantine",
                "list",
                "--json",
                "--limit",
                "1000",
                "--config",
                str(node_b.config_path),
            ],
            capture_output=True,
            timeout=60,
            cwd=ROOT,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr
        unavailable_counts = {
            symbol: sum(symbol_count(node.metrics_port, symbol) for node in (node_a, node_b))
            for symbol in UNAVAILABLE
        }

    sent = stream.sent
    quarantined = [item["mail_from"] for item in json.loads(listed.stdout)]
    delivered: dict[str, Delivered] = {d.mail_from: d for d in sink.messages}

    # Zero lost: every 2xx is at the sink or in the PostgreSQL quarantine, never both.
    accepted = [s for s in sent if s.code is not None and 200 <= s.code < 300]
    lost = [s for s in accepted if s.sender not in (quarantined if s.quarantine else delivered)]
    assert not lost, lost
    assert not set(quarantined) & set(delivered)
    assert set(quarantined) <= {s.sender for s in sent if s.quarantine}

    before = [s for s in sent if s.ended <= down_begin]
    during = [s for s in sent if s.started >= down and s.ended <= up_begin]
    recovered = stream.since(up)[-PER_PHASE:]
    assert before and all(s.code == 250 for s in before), before
    # PostgreSQL down: mail to be quarantined is deferred (451), never accepted.
    assert [s.code for s in during if s.quarantine] == [451] * sum(s.quarantine for s in during)
    assert sum(s.quarantine for s in during) >= 2, during
    # ... and everything else keeps flowing, the Redis-backed policies stepping aside.
    flowing = [s for s in during if not s.quarantine]
    assert len(flowing) >= 4 and all(s.code == 250 for s in flowing), flowing
    for s in flowing:
        header = spam_status(delivered[s.sender].data)
        assert all(symbol in header for symbol in UNAVAILABLE), header
    assert all(count >= len(flowing) for count in unavailable_counts.values()), unavailable_counts
    # Both recovered by themselves: quarantining works and the symbols are gone.
    assert any(s.quarantine for s in recovered) and all(s.code == 250 for s in recovered)
    for s in recovered:
        if not s.quarantine:
            header = spam_status(delivered[s.sender].data)
            assert not any(symbol in header for symbol in UNAVAILABLE), header
    print(
        f"sent {len(sent)}: {len(accepted)} accepted, {len(quarantined)} quarantined, "
        f"{len(during)} during the outage; outage {up_begin - down_begin:.1f}s, "
        f"recovered {stream.since(up)[-PER_PHASE].started - up:.1f}s after the restart, "
        f"total {time.monotonic() - begin:.1f}s"
    )
