"""Fuzzing the parse-and-policy path: hostile bytes never crash the attachments policy.

A crash would become POLICY_ERROR and a 451 forever (the sender retries the
same bytes), so every input must end in a Result within bounded time.
Bounded example counts keep this in CI (``ATTACH_FUZZ_EXAMPLES`` raises
them); crashers found are kept as ``@example`` regression cases.
"""

from __future__ import annotations

import asyncio
import os
import time

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_attachments_builders import (
    docm_bytes,
    docx_with_embedding,
    iso9660_bytes,
    message,
    pdf_bytes,
    pe_bytes,
    rar_bytes,
    sevenzip_bytes,
    tar_gz_bytes,
    xls_with_macro_sheet,
    zip_bytes,
    zipcrypto_bytes,
)

from gateway.api import Result
from gateway.testing.context import make_context
from policies.attachments import AttachmentsOptions, AttachmentsPolicy

POLICY = AttachmentsPolicy(AttachmentsOptions())
# ATTACH_FUZZ_EXAMPLES=5000 for a longer campaign than CI's.
FUZZ = settings(
    max_examples=int(os.environ.get("ATTACH_FUZZ_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SEEDS = [
    zip_bytes({"a.pdf": pdf_bytes(), "b/c.exe": pe_bytes()}),
    zip_bytes({"inner.zip": zip_bytes({"x.txt": b"hello" * 100})}),
    zipcrypto_bytes("secret.pdf", pdf_bytes()),
    sevenzip_bytes({"a.pdf": pdf_bytes(), "run.bat": b"@echo off"}),
    tar_gz_bytes({"a.pdf": pdf_bytes(), "evil.scr": pe_bytes()}),
    rar_bytes({"a.pdf": pdf_bytes()}),
    docm_bytes(),
    docx_with_embedding("evil.exe", pe_bytes()),
    xls_with_macro_sheet(),
    iso9660_bytes({"a.pdf": pdf_bytes(), "setup.exe": pe_bytes()}),
    pe_bytes(),
]


def run(raw: bytes) -> Result:
    started = time.perf_counter()
    result = asyncio.run(POLICY.check(make_context(raw)))
    assert isinstance(result, Result)
    assert time.perf_counter() - started < 10
    for sym in result.symbols:
        assert sym.name in AttachmentsPolicy.symbols
    return result


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed file with bytes flipped, spliced out, or the tail cut off."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "cut", "truncate", "insert"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
    return bytes(data)


@FUZZ
@given(
    mutated(),
    st.sampled_from(["a.zip", "a.7z", "a.tar.gz", "a.rar", "a.docm", "a.xls", "a.img", "a.bin"]),
)
@example(  # zipfile raised NotImplementedError for a mutated "version needed" field
    b"PK\x03\x04\x14\x00\x00\x00\x08\x00\xcf*w],\xfc!|L\x00\x00\x00x\x00\x00\x00\t\x00\x00"
    b"\x00inner.zip\x0b\xf0ff\x11a``\xe0`8\xafU\x1e\xabQ\xd1}\x82\x07\xc8\xfb\xc2\xc8\xc0\xc0"
    b"\n\xa4+\xf4J*JN{\x9c=y\xf2\xbc\x84\xaa\x9b\x10#C\x807#\x93\x083n\r0\xd0\xc0\xc8\x00"
    b"\xd3\x1e\xe0\xcd\xca\x06\xe20\x02\xa11\x90\xd6\x07+\x00\x00PK\x01\x02\x14\x03T\x00"
    b"\x00\x00\x08\x00\xcf*w],\xfc!|L\x00\x00\x00x\x00\x00\x00\t\x00\x00\x00\x00\x00\x00"
    b"\x00\x00\x00\x00\x00\x80\x01\x00\x00\x00\x00inner.zipPK\x05\x06\x00\x00\x00\x00\x01"
    b"\x00\x01\x007\x00\x00\x00s\x00\x00\x00\x00\x00",
    "a.zip",
)
def test_mutated_archives_always_give_a_result(data: bytes, name: str) -> None:
    run(message((name, data, "application/octet-stream")))


NAMES = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]),
    max_size=60,
)


@FUZZ
@given(NAMES, st.binary(max_size=2048), st.sampled_from(["application/pdf", "image/png", "x/y"]))
@example("\u202e\u0000../..\\exe.", b"MZ", "application/pdf")
@example(".", b"", "x/y")
def test_any_file_name_and_content_give_a_result(name: str, data: bytes, mime: str) -> None:
    msg = message(("placeholder.bin", data, mime))
    # Put the hostile name in as RFC 2231 (any Unicode survives) without the stdlib's checks.
    encoded = "".join(f"%{b:02X}" for b in name.encode("utf-8"))
    raw = msg.replace(b'filename="placeholder.bin"', b"filename*=utf-8''" + encoded.encode("ascii"))
    run(raw)


HOSTILE_LINES = [
    b"--BOUNDARY\r\n",
    b"--BOUNDARY--\r\n",
    b"Content-Type: multipart/mixed; boundary=BOUNDARY\r\n",
    b"Content-Type: message/rfc822\r\n",
    b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"Content-Transfer-Encoding: x-garbage\r\n",
    b"Content-Disposition: attachment; filename*0*=utf-8''%E2%80; filename*1=\"x.exe\"\r\n",
    b'Content-Type: application/octet-stream; name="=?utf-8?B?!!!?="\r\n',
    b"\r\n",
    b"TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAgAAAAA\r\n",
    b"=\r\n",
    b"=3D=XX=\r\n",
    b"\x00\xff\xfe\r\n",
    b"A" * 3000 + b"\r\n",
]


@FUZZ
@given(st.lists(st.sampled_from(HOSTILE_LINES), max_size=60))
def test_hostile_mime_structure_gives_a_result(lines: list[bytes]) -> None:
    head = (
        b"From: a@example.net\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="BOUNDARY"\r\n\r\n'
    )
    run(head + b"".join(lines))
