"""RAR members are read (bsdtar in a bounded child process) and judged like zip and 7z members.

Compressed fixtures are real RAR 4 and RAR 5 files (``data/rar/README.md``);
stored archives with chosen content come from ``rar_bytes``. A missing bsdtar
skips these tests locally and fails them under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import struct
import time
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
from test_attachments_builders import (
    message,
    pdf_bytes,
    pe_bytes,
    rar_bytes,
    sevenzip_bytes,
    zip_bytes,
)

from gateway.api import Action, Result
from gateway.testing.context import make_context
from gateway.testing.require import require_tool
from policies._archives import ArchiveBombError, Budget, open_archive
from policies._filetypes import Kind
from policies._rar_extract import extract
from policies.attachments import AttachmentsOptions, AttachmentsPolicy

DATA = Path(__file__).parent / "data" / "rar"
OCTET = "application/octet-stream"
LINES = b"".join(b"%03d\n" % i for i in range(512))  # what every fixture member holds


@pytest.fixture(autouse=True)
def _bsdtar() -> None:
    require_tool("bsdtar", "apt-get install libarchive-tools, or make test")


def budget(expanded: int = 50_000_000, seconds: float = 5.0) -> Budget:
    return Budget(expanded, 1000, 100.0, time.monotonic() + seconds)


def check(raw: bytes, **options: object) -> Result:
    policy = AttachmentsPolicy(replace(AttachmentsOptions(), **options))
    return asyncio.run(policy.check(make_context(raw)))


def found(result: Result) -> dict[str, str]:
    return {s.name: s.detail for s in result.symbols}


def renamed(rar4: bytes, old: str, new: str) -> bytes:
    """A RAR 4 archive with one member renamed (same length), its header CRC recomputed."""
    assert len(old) == len(new)
    out = bytearray(rar4)
    pos = 7  # after the marker block
    while pos + 7 <= len(out):
        _crc, kind, flags, size = struct.unpack_from("<HBHH", out, pos)
        add = struct.unpack_from("<I", out, pos + 7)[0] if flags & 0x8000 else 0
        if kind == 0x74:
            at = out.find(old.encode(), pos, pos + size)
            if at >= 0:
                out[at : at + len(old)] = new.encode()
                crc = zlib.crc32(bytes(out[pos + 2 : pos + size])) & 0xFFFF
                struct.pack_into("<H", out, pos, crc)
                return bytes(out)
        pos += size + add
    raise AssertionError(f"{old} not found")


@pytest.mark.parametrize("fixture", ["seektest.rar", "rar5-solid.rar"])
def test_compressed_members_are_decompressed(fixture: str) -> None:
    listing = open_archive(
        Kind.RAR, (DATA / fixture).read_bytes(), fixture, budget(), lambda n, h: True
    )
    members = {m.name: m for m in listing.members}
    assert set(members) == {"stest1.txt", "stest2.txt"}
    for m in members.values():
        assert (m.data, m.complete, m.unreadable) == (LINES, True, "")


def test_rar4_solid_members_bsdtar_cannot_read_are_unreadable_not_silently_passed() -> None:
    raw = message(("old.rar", (DATA / "rar3-solid.rar").read_bytes(), OCTET))
    result = check(raw)
    assert found(result) == {
        "ATTACH_ARCHIVE_UNREADABLE": "old.rar > stest2.txt: unreadable "
        "(RAR solid archive support unavailable)"
    }
    assert result.force is Action.QUARANTINE


def test_compressed_member_with_a_double_extension_is_rejected() -> None:
    data = renamed((DATA / "seektest.rar").read_bytes(), "stest1.txt", "ab.pdf.exe")
    result = check(message(("mail.rar", data, OCTET)))
    assert set(found(result)) == {"ATTACH_BLOCKED_EXT", "ATTACH_DOUBLE_EXT"}
    assert "mail.rar > ab.pdf.exe" in found(result)["ATTACH_DOUBLE_EXT"]
    assert result.force is Action.REJECT


def test_archive_inside_a_rar_is_opened_and_its_exe_found() -> None:
    rar = rar_bytes({"inner.zip": zip_bytes({"setup.exe": pe_bytes()})})
    result = check(message(("files.rar", rar, OCTET)))
    assert "files.rar > inner.zip > setup.exe" in found(result)["ATTACH_BLOCKED_EXT"]
    assert result.force is Action.REJECT


def test_rar_inside_a_7z_inside_a_zip_is_judged_to_the_depth_limit() -> None:
    rar = rar_bytes({"a.pdf": pe_bytes()})
    outer = zip_bytes({"b.7z": sevenzip_bytes({"c.rar": rar})})
    result = check(message(("d.zip", outer, OCTET)))
    assert "d.zip > b.7z > c.rar > a.pdf" in found(result)["ATTACH_DISGUISED_EXEC"]
    shallow = check(message(("d.zip", outer, OCTET)), max_archive_depth=2)
    assert "ATTACH_ARCHIVE_TOO_DEEP" in found(shallow)


def test_clean_rar_passes() -> None:
    rar = rar_bytes({"report.pdf": pdf_bytes(), "notes.txt": b"hello\n"})
    assert check(message(("docs.rar", rar, OCTET))) == Result()


def test_encrypted_rar_member_is_encrypted_not_unreadable() -> None:
    rar = rar_bytes({"a.pdf": pdf_bytes()}, encrypted=True)
    assert set(found(check(message(("s.rar", rar, OCTET))))) == {"ATTACH_ENCRYPTED_ARCHIVE"}


def test_rar_over_the_expanded_size_budget_is_a_bomb() -> None:
    rar = rar_bytes({"big.bin": b"\x01" * 2_000_000})
    result = check(message(("big.rar", rar, OCTET)), max_expanded_size=1_000_000)
    assert "ATTACH_ARCHIVE_BOMB" in found(result)
    assert result.force is Action.REJECT


def test_extraction_stops_at_the_byte_budget_and_the_deadline() -> None:
    rar = rar_bytes({"big.bin": b"\x01" * 3_000_000})
    with pytest.raises(ArchiveBombError, match="expanded size limit"):
        extract(rar, "big.rar", budget(expanded=1_000_000), lambda n, h: False)
    with pytest.raises(ArchiveBombError, match="time limit"):
        extract(rar, "big.rar", budget(seconds=-1.0), lambda n, h: False)
