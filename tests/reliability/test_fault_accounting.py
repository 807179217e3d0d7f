"""Nothing acknowledged is lost while the downstream and DNS misbehave.

Twenty sending MTAs (sessions) send 400 numbered messages through a gateway
subprocess while faults are injected; every sender retries 4xx replies and
lost connections like a real MTA. The ledger of replies is then compared with
what the downstream recorded: every 2xx message arrived (zero lost), and a
message arrived twice only where SMTP allows it (the downstream accepted it
and dropped the connection before its 250 reached the gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

import pytest
from rel_support import RCPT, SENDER, GatewayFactory, overrides

from gateway.testing.dnsserver import DNSServer
from gateway.testing.faults import (
    FaultyProxy,
    FlakySink,
    Ledger,
    numbered_message,
    send_with_retries,
)

SESSIONS = 20
PER_SESSION = 20
BODY = b"".join(
    b"line %04d of a numbered message body, long enough to be cut\r\n" % i for i in range(40)
)


def _messages(session: int, count: int = PER_SESSION) -> list[tuple[str, bytes]]:
    out = []
    for n in range(count):
        ident = f"s{session:02d}m{n:02d}"
        out.append((ident, numbered_message(ident, sender=SENDER, rcpt=RCPT, body=BODY)))
    return out


async def _send_all(
    port: int, ledger: Ledger, budget: float, sessions: int = SESSIONS, each: int = PER_SESSION
) -> None:
    deadline = asyncio.get_running_loop().time() + budget
    await asyncio.gather(
        *(
            send_with_retries(
                ledger,
                port,
                _messages(s, each),
                sender=SENDER,
                rcpt=RCPT,
                deadline=deadline,
                seed=s,
            )
            for s in range(sessions)
        )
    )


@pytest.mark.slow
async def test_downstream_faults_lose_nothing_and_duplicate_only_after_a_lost_250(
    make_gateway: GatewayFactory, dns: DNSServer
) -> None:
    """Downstream answers 4xx at random, drops before/after accepting, is cut mid-DATA
    and restarted twice: every acknowledged message arrived; duplicates <= lost 250s."""
    with (
        FlakySink(tempfail=0.08, drop_before=0.03, drop_after=0.03, seed=7) as sink,
        FaultyProxy(
            "127.0.0.1", sink.port, cut_probability=0.15, cut_after=(50, 6000), seed=3
        ) as proxy,
    ):
        gw = make_gateway(overrides(proxy.port, dns))
        ledger = Ledger()

        async def chaos() -> None:
            for _ in range(2):
                await asyncio.sleep(1.5)
                await asyncio.to_thread(sink.stop)
                await asyncio.sleep(1.0)
                await asyncio.to_thread(sink.start)

        started = time.monotonic()
        await asyncio.gather(_send_all(gw.smtp_port, ledger, 60.0), chaos())
        elapsed = time.monotonic() - started
        audit = ledger.audit(sink.messages)
        report = (
            f"{audit.summary()} faults={dict(sink.faults)} lost_250s={len(sink.unacknowledged)} "
            f"cuts={proxy.cuts} "
            f"cuts_after_end_of_data={proxy.cuts_after_end_of_data} {elapsed:.1f}s"
        )
        print(report)
        assert audit.lost == [], report
        assert audit.acknowledged == SESSIONS * PER_SESSION, report
        assert audit.arrived_without_any_ack == [], report
        # A second copy only where a 250 was lost on its way to the gateway.
        lost_250s = Counter(sink.unacknowledged)
        for ident, copies in audit.duplicates.items():
            assert copies - 1 <= lost_250s[ident] + proxy.cuts_after_end_of_data, (ident, report)
        # The faults really happened and were answered with 4xx, never 2xx.
        assert sink.faults["tempfail"] and sink.faults["drop_before"] and proxy.cuts, report
        assert sum(v for k, v in audit.attempt_codes.items() if k.startswith("4")) > 0, report
        assert not any(k.startswith("5") for k in audit.attempt_codes), report


@pytest.mark.slow
async def test_dns_servfail_and_stalls_defer_and_lose_nothing(
    make_gateway: GatewayFactory, dns: DNSServer
) -> None:
    """SPF, DKIM and DMARC on; 10 sessions send 100 messages while DNS alternates SERVFAIL,
    silence and answers: DMARC that cannot be decided answers 451, senders retry, every
    acknowledged message arrived, none twice."""
    with FlakySink() as sink:
        config = overrides(
            sink.port,
            dns,
            {
                "dns.cache_size": 0,
                "policies": {
                    "spf": {"check_timeout": 1.0},
                    "dkim": {},
                    "dmarc": {},
                },
                "pipeline.policy_timeout": 3.0,
            },
        )
        gw = make_gateway(config)
        ledger = Ledger()
        stop = asyncio.Event()
        outages: list[str] = []

        async def chaos() -> None:
            modes = ["servfail", None, "drop", None]
            i = 0
            while not stop.is_set():
                dns.outage = modes[i % len(modes)]
                if dns.outage:
                    outages.append(dns.outage)
                i += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.7)
            dns.outage = None

        async def senders() -> None:
            try:
                await _send_all(gw.smtp_port, ledger, 60.0, sessions=10, each=10)
            finally:
                stop.set()

        await asyncio.gather(senders(), chaos())
        audit = ledger.audit(sink.messages)
        report = f"{audit.summary()} outages={len(outages)}"
        print(report)
        assert audit.lost == [], report
        assert audit.acknowledged == 100, report
        assert audit.duplicates == {}, report
        assert audit.attempt_codes.get("451", 0) > 0, report
        assert not any(k.startswith("5") for k in audit.attempt_codes), report
