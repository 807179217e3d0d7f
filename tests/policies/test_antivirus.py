"""The antivirus policy against a real clamd with a tiny signature database of our own.

The fixture starts Debian's ``clamd`` (``gateway.testing.clamd``) with two
signatures, EICAR and a harmless marker; no freshclam, no network. Under
``CI=true`` a missing clamd fails these tests instead of skipping them.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from test_attachments_builders import message, rar_bytes, sevenzip_bytes, zip_bytes

from gateway.api import Action, OptionError, Result
from gateway.registry import plan_policies
from gateway.replies import verdict_reply
from gateway.schema import Problems
from gateway.testing.clamd import EICAR, EICAR_SIGNATURE, MARKER, MARKER_SIGNATURE, ThrowawayClamd
from gateway.testing.context import make_context
from gateway.testing.tcpproxy import TCPProxy
from policies.antivirus import AntivirusOptions, AntivirusPolicy

OCTET = "application/octet-stream"
FOUND_EICAR = f"{EICAR_SIGNATURE}.UNOFFICIAL"  # clamd marks signatures not signed by Cisco


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawayClamd]:
    with ThrowawayClamd(tmp_path_factory.mktemp("clamd")) as server:
        yield server


def policy(address: str, **options: object) -> AntivirusPolicy:
    return AntivirusPolicy(replace(AntivirusOptions(address=address), **options))


async def scan(address: str, raw: bytes, **options: object) -> Result:
    return await policy(address, **options).check(make_context(raw))


def only(result: Result) -> tuple[str, str]:
    assert len(result.symbols) == 1, result.symbols
    return result.symbols[0].name, result.symbols[0].detail


async def test_eicar_in_the_body_is_rejected_with_a_550_naming_the_signature(
    clamd: ThrowawayClamd,
) -> None:
    result = await scan(clamd.address, message(text=EICAR.decode() + "\n"))
    name, detail = only(result)
    assert name == "AV_VIRUS"
    assert detail.startswith(FOUND_EICAR)
    assert result.force is Action.REJECT
    reply = verdict_reply(result.force, result.reason, "Q1")
    assert str(reply) == f"550 5.7.1 Message rejected: message contains a virus ({FOUND_EICAR})"


async def test_base64_attachment_is_decoded_by_clamd_and_the_file_is_named(
    clamd: ThrowawayClamd,
) -> None:
    raw = message(("eicar.com", EICAR, OCTET))
    assert EICAR not in raw  # only the base64 form is on the wire
    result = await scan(clamd.address, raw)
    assert only(result) == ("AV_VIRUS", f"{FOUND_EICAR} in eicar.com")


@pytest.mark.parametrize(
    ("label", "attachment"),
    [
        ("zip", ("report.zip", zip_bytes({"report.txt": EICAR}))),
        (
            "zip in 7z",
            ("bundle.7z", sevenzip_bytes({"inner.zip": zip_bytes({"x/eicar.txt": EICAR})})),
        ),
        ("rar", ("files.rar", rar_bytes({"eicar.txt": EICAR}))),
        ("zip in rar", ("files.rar", rar_bytes({"inner.zip": zip_bytes({"e.txt": EICAR})}))),
    ],
)
async def test_archives_are_unpacked_by_clamd(
    clamd: ThrowawayClamd, label: str, attachment: tuple[str, bytes]
) -> None:
    name, data = attachment
    result = await scan(clamd.address, message((name, data, OCTET)))
    assert only(result) == ("AV_VIRUS", f"{FOUND_EICAR} in {name}"), label
    assert result.force is Action.REJECT


async def test_harmless_marker_signature_is_found_over_the_unix_socket(
    clamd: ThrowawayClamd,
) -> None:
    raw = message(("notes.txt", b"meeting notes\n" + MARKER + b"\n", "text/plain"))
    result = await scan(clamd.unix_address, raw)
    assert only(result) == ("AV_VIRUS", f"{MARKER_SIGNATURE}.UNOFFICIAL in notes.txt")


async def test_clean_message_passes_without_symbols(clamd: ThrowawayClamd) -> None:
    raw = message(("report.zip", zip_bytes({"report.txt": b"quarterly numbers\n"}), OCTET))
    assert await scan(clamd.address, raw) == Result()


async def test_on_virus_quarantine_and_score(clamd: ThrowawayClamd) -> None:
    raw = message(text=EICAR.decode())
    assert (await scan(clamd.address, raw, on_virus="quarantine")).force is Action.QUARANTINE
    scored = await scan(clamd.address, raw, on_virus="score")
    assert scored.force is None and only(scored)[0] == "AV_VIRUS"


async def test_clamd_stopped_tempfails_by_default_and_accept_lets_mail_through(
    tmp_path: Path,
) -> None:
    down = ThrowawayClamd(tmp_path).start()
    address = down.address
    down.stop()
    raw = message(text="hello\n")
    result = await scan(address, raw)
    name, detail = only(result)
    assert name == "AV_ERROR" and "cannot connect to clamd" in detail
    assert result.force is Action.TEMPFAIL
    assert str(verdict_reply(result.force, result.reason, "Q")).startswith("451 4.7.1")
    accepted = await scan(address, raw, on_error="accept")
    assert only(accepted)[0] == "AV_ERROR" and accepted.force is None
    assert await policy(address).ready() == f"antivirus: {detail}"
    assert await policy(address, on_error="accept").ready() is None


async def test_slow_clamd_times_out(clamd: ThrowawayClamd) -> None:
    with TCPProxy("127.0.0.1", clamd.port, delay=1.0) as slow:
        result = await scan(f"127.0.0.1:{slow.port}", message(text="hi\n"), read_timeout=0.3)
    name, detail = only(result)
    assert name == "AV_TIMEOUT" and "did not answer within 0.3s" in detail
    assert result.force is Action.TEMPFAIL


async def test_hung_clamd_times_out_and_readiness_names_it(tmp_path: Path) -> None:
    """clamd stopped with SIGSTOP: the kernel still accepts connections, nothing answers."""
    with ThrowawayClamd(tmp_path) as hung:
        assert hung.proc is not None
        hung.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            results = await asyncio.gather(
                *(scan(hung.address, message(text="hi\n"), read_timeout=0.5) for _ in range(3))
            )
            ready = await policy(hung.address, read_timeout=30.0).ready()
            elapsed = time.monotonic() - started
        finally:
            hung.proc.send_signal(signal.SIGCONT)
    for result in results:
        assert only(result)[0] == "AV_TIMEOUT" and result.force is Action.TEMPFAIL
    assert ready == f"antivirus: clamd at {hung.address} did not answer PING"
    assert elapsed < 5.0


async def test_over_max_stream_size_is_skipped_not_sent(clamd: ThrowawayClamd) -> None:
    raw = message(text=EICAR.decode() + "\n" + "x" * 5000)
    result = await scan(clamd.address, raw, max_stream_size=4096)
    assert only(result)[0] == "AV_SKIPPED_TOO_LARGE" and result.force is None
    strict = await scan(clamd.address, raw, max_stream_size=4096, on_too_large="reject")
    assert strict.force is Action.REJECT


@pytest.mark.parametrize("size", [3000, 200_000])
async def test_clamd_stream_limit_below_ours_is_an_error_that_says_what_to_fix(
    tmp_path: Path, size: int
) -> None:
    """clamd replies "size limit exceeded" or its reset beats the reply: the same AV_ERROR."""
    with ThrowawayClamd(tmp_path, stream_max_length="1K") as small:
        result = await scan(small.address, message(("big.bin", b"\x01" * size, OCTET)))
    name, detail = only(result)
    assert name == "AV_ERROR" and "StreamMaxLength" in detail, detail
    assert result.force is Action.TEMPFAIL


async def test_fifty_concurrent_scans_each_get_their_own_verdict(clamd: ThrowawayClamd) -> None:
    p = policy(clamd.address)
    infected = message(("eicar.com", EICAR, OCTET))
    clean = message(("notes.txt", b"nothing to see\n", "text/plain"))
    raws = [infected if i % 2 else clean for i in range(50)]
    results = await asyncio.gather(*(p.check(make_context(r)) for r in raws))
    for i, result in enumerate(results):
        if i % 2:
            assert only(result) == ("AV_VIRUS", f"{FOUND_EICAR} in eicar.com")
        else:
            assert result == Result()


async def test_ready_pings_clamd(clamd: ThrowawayClamd) -> None:
    assert await policy(clamd.address).ready() is None
    assert await policy(clamd.unix_address).ready() is None


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"address": "localhost"}, "address"),
        ({"address": "unix:relative.sock"}, "address"),
        ({"address": "127.0.0.1:99999"}, "address"),
        ({"read_timeout": 0}, "read_timeout"),
        ({"max_stream_size": 0}, "max_stream_size"),
    ],
)
def test_bad_options_name_their_key(options: dict[str, object], key: str) -> None:
    with pytest.raises(OptionError) as err:
        AntivirusOptions(**options)  # type: ignore[arg-type]
    assert err.value.key == key


def test_table_validates_through_the_registry() -> None:
    problems = Problems()
    plan_policies({"antivirus": {"on_error": "ignore", "adress": "x"}}, problems)
    text = "\n".join(problems.lines)
    assert "policies.antivirus.on_error" in text and "policies.antivirus.adress" in text


def test_a_disabled_table_is_validated_too() -> None:
    """A typo shows in check-config now, not on the day the table is enabled."""
    problems = Problems()
    plan = plan_policies({"antivirus": {"enabled": False, "adress": "x"}}, problems)
    assert plan.policies == ()
    assert any(line.startswith("policies.antivirus.adress") for line in problems.lines)
