"""A crash or a failing quarantine never loses an acknowledged message.

- SIGKILL in the middle of a load of relayed and quarantined mail: every
  message that got a 250 is at the downstream or in the quarantine, and the
  quarantine (files + SQLite index) is consistent and usable after restart.
- A quarantine that cannot be written (its path lies below a regular file:
  ENOTDIR, which holds even for root) or a full disk (RLIMIT_FSIZE on the
  gateway process: writes fail with EFBIG) answers 451, never 250.
"""

from __future__ import annotations

import asyncio
import resource
import smtplib
from pathlib import Path

import pytest
from rel_support import RCPT, SENDER, GatewayFactory, overrides, quarantine_policy

from gateway.config import QuarantineConfig
from gateway.quarantine import open_quarantine
from gateway.testing.dnsserver import DNSServer
from gateway.testing.faults import Ledger, ledger_ids, numbered_message, send_with_retries
from gateway.testing.sink import SinkServer


def _message(ident: str, quarantine: bool) -> bytes:
    msg = numbered_message(ident, sender=SENDER, rcpt=RCPT, body=b"x" * 60 + b"\r\n" * 50)
    if quarantine:
        msg = b"X-Test-Verdict: quarantine\r\n" + msg
    return msg


async def _quarantined(path: Path) -> tuple[list[str], list[str], int]:
    """(ledger ids held, problems, files without an index row).

    Every index row must have its file with the indexed size. A file without
    a row is a put() the crash interrupted before its commit: never
    acknowledged, and set aside to ``orphans/`` by the next open after a grace.
    """
    store = open_quarantine(QuarantineConfig(backend="local", path=str(path)), path)
    problems: list[str] = []
    held: list[str] = []
    try:
        items = await store.list(limit=100_000)
        if await store.count() != len(items):
            problems.append(f"count {await store.count()} != listed {len(items)}")
        for item in items:
            got = await store.get(item.id)
            if got is None:
                problems.append(f"{item.id}: indexed but unreadable")
                continue
            _, raw = got
            if len(raw) != item.size:
                problems.append(f"{item.id}: {len(raw)} bytes, index says {item.size}")
            held.extend(ledger_ids(raw))
    finally:
        await store.close()
    files = {p.name[:-4] for p in (path / "messages").glob("*.eml")}
    return held, problems, len(files - {i.id for i in items})


@pytest.mark.slow
async def test_sigkill_under_load_loses_no_acknowledged_message_and_quarantine_is_consistent(
    make_gateway: GatewayFactory, dns: DNSServer, tmp_path: Path
) -> None:
    work = tmp_path / "gw"
    with SinkServer() as sink:
        config = overrides(sink.port, dns, quarantine_policy(work))
        gw = make_gateway(config, workdir=work)
        ledger = Ledger()
        batches = [
            [(f"k{s:02d}m{n:03d}", _message(f"k{s:02d}m{n:03d}", n % 2 == 0)) for n in range(200)]
            for s in range(10)
        ]

        async def killer() -> None:
            while len(ledger.acknowledged()) < 80:
                await asyncio.sleep(0.01)
            gw.kill()  # SIGKILL, mid-flight
            killed.set()

        killed = asyncio.Event()
        deadline = asyncio.get_running_loop().time() + 30
        await asyncio.gather(
            killer(),
            *(
                send_with_retries(
                    ledger,
                    gw.smtp_port,
                    b,
                    sender=SENDER,
                    rcpt=RCPT,
                    max_attempts=1,
                    deadline=deadline,
                    stop=killed,
                    seed=i,
                )
                for i, b in enumerate(batches)
            ),
        )
        held, problems, unindexed = await _quarantined(work / "quarantine")
        audit = ledger.audit(sink.messages, held)
        print(
            audit.summary(),
            f"held={len(held)} relayed={len(sink.messages)} unindexed_files={unindexed}",
        )
        assert audit.acknowledged >= 80
        assert audit.lost == [], audit.summary()
        assert problems == []
        # The same directories serve again after the crash, and take new mail.
        again = make_gateway(config, workdir=work)
        with smtplib.SMTP("127.0.0.1", again.smtp_port, timeout=10) as client:
            client.sendmail(SENDER, [RCPT], _message("after-restart", True))
        held_after, problems_after, _ = await _quarantined(work / "quarantine")
        assert problems_after == []
        assert "after-restart" in held_after and set(held) <= set(held_after)


def test_unwritable_quarantine_answers_451_not_250(
    make_gateway: GatewayFactory, dns: DNSServer, tmp_path: Path
) -> None:
    """quarantine.path below a regular file: every write fails (ENOTDIR), even as root."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the quarantine's parent should be\n")
    with SinkServer() as sink:
        config = overrides(sink.port, dns, quarantine_policy(tmp_path / "rules"))
        config["quarantine.path"] = str(blocker / "quarantine")
        gw = make_gateway(config)
        with smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=10) as client:
            with pytest.raises(smtplib.SMTPDataError) as info:
                client.sendmail(SENDER, [RCPT], _message("q1", True))
            assert info.value.smtp_code == 451
            # Mail that needs no quarantine still flows.
            client.sendmail(SENDER, [RCPT], _message("r1", False))
        assert [ledger_ids(m.data) for m in sink.messages] == [["r1"]]
        assert gw.wait_for_event("quarantine_failed", timeout=5) is not None


def test_full_disk_answers_451_and_leaves_no_partial_file(
    make_gateway: GatewayFactory, dns: DNSServer, tmp_path: Path
) -> None:
    """RLIMIT_FSIZE on the running gateway: the quarantine write fails with EFBIG -> 451."""
    work = tmp_path / "gw"
    with SinkServer() as sink:
        gw = make_gateway(overrides(sink.port, dns, quarantine_policy(work)), workdir=work)
        with smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=10) as client:
            client.sendmail(SENDER, [RCPT], _message("small", True))  # opens the store
            limit = 64 * 1024
            _, hard = resource.prlimit(gw.pid, resource.RLIMIT_FSIZE)
            resource.prlimit(gw.pid, resource.RLIMIT_FSIZE, (limit, hard))  # the soft limit
            big = _message("big", True) + (b"y" * 78 + b"\r\n") * (4 * limit // 80)
            with pytest.raises(smtplib.SMTPDataError) as info:
                client.sendmail(SENDER, [RCPT], big)
            assert info.value.smtp_code == 451
            resource.prlimit(gw.pid, resource.RLIMIT_FSIZE, (hard, hard))
            client.sendmail(SENDER, [RCPT], big)  # space again: accepted
        leftovers = [p.name for p in (work / "quarantine" / "messages").iterdir()]
        assert not [n for n in leftovers if n.startswith(".tmp-")], leftovers
