"""Real files for the attachment tests, built in memory, and tests that they are real.

Each builder makes the genuine article (a PE with a valid PE signature at
e_lfanew, a PNG with correct CRCs, a ZipCrypto zip that zipfile decrypts with
its password, a 7z py7zr encrypts), so a policy that passes these tests
handles what arrives by mail, not a caricature of it. The end-to-end tests
import this module by path.
"""

from __future__ import annotations

import base64
import io
import struct
import tarfile
import zipfile
import zlib
from email.message import EmailMessage
from email.policy import SMTP

import py7zr

# --------------------------------------------------------------------------- executables


def pe_bytes(size: int = 1024) -> bytes:
    """A minimal Windows PE: DOS header, e_lfanew -> "PE\\0\\0", a COFF header for x86-64."""
    dos = bytearray(0x80)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, 0x80)  # e_lfanew
    coff = b"PE\0\0" + struct.pack("<HHIIIHH", 0x8664, 0, 0, 0, 0, 0xF0, 0x22)
    body = bytes(dos) + coff
    return body + b"\0" * max(0, size - len(body))


def elf_bytes() -> bytes:
    """A minimal 64-bit little-endian ELF header (ET_EXEC, x86-64)."""
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    return ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, 0x400000, 64, 0, 0, 64, 56, 0, 64, 0, 0
    )


# --------------------------------------------------------------------------- documents


def pdf_bytes(pad: int = 0) -> bytes:
    """A valid one-page PDF 1.4 with a correct xref table; ``pad`` adds a stream of that size."""
    stream = b"BT /F1 12 Tf 72 720 Td (Invoice) Tj ET\n" + b"%" * pad
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def png_bytes(width: int = 4, height: int = 4) -> bytes:
    """A valid RGB PNG (IHDR, IDAT, IEND with correct CRCs)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    raw = b"".join(b"\0" + b"\xff\x00\x00" * width for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- archives


def zip_bytes(members: dict[str, bytes], *, compress: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compress) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def nested_zip(depth: int, inner_name: str = "readme.txt", inner: bytes = b"hello\n") -> bytes:
    """A zip holding a zip holding ... ``depth`` zips in total, the innermost holding one file."""
    data = zip_bytes({inner_name: inner})
    for level in range(depth - 1, 0, -1):
        data = zip_bytes({f"level{level}.zip": data})
    return data


class _ZipCrypto:
    """Traditional PKWARE encryption (APPNOTE 6.1), enough to write a real encrypted zip."""

    def __init__(self, password: bytes) -> None:
        self.keys = [0x12345678, 0x23456789, 0x34567890]
        for c in password:
            self._update(c)

    @staticmethod
    def _crc(crc: int, b: int) -> int:
        return zlib.crc32(bytes([b]), crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF

    def _update(self, c: int) -> None:
        k0, k1, k2 = self.keys
        k0 = self._crc(k0, c)
        k1 = ((k1 + (k0 & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        k2 = self._crc(k2, k1 >> 24)
        self.keys = [k0, k1, k2]

    def encrypt(self, data: bytes) -> bytes:
        out = bytearray()
        for p in data:
            t = (self.keys[2] | 2) & 0xFFFF
            out.append(p ^ (((t * (t ^ 1)) >> 8) & 0xFF))
            self._update(p)
        return bytes(out)


def zipcrypto_bytes(name: str, plain: bytes, password: bytes = b"infected") -> bytes:
    """A stored zip whose member is ZipCrypto-encrypted (flag bit 0), readable with ``password``."""
    crc = zlib.crc32(plain)
    header = bytes(range(11)) + bytes([crc >> 24])  # APPNOTE 6.1.6: last byte checks the password
    enc = _ZipCrypto(password).encrypt(header + plain)
    fname = name.encode()
    local = struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 20, 0x1, 0, 0, 0, crc, len(enc), len(plain), len(fname), 0
    )
    central = struct.pack(
        "<IHHHHHHIIIHHHHHII",
        0x02014B50, 20, 20, 0x1, 0, 0, 0, crc, len(enc), len(plain), len(fname), 0, 0, 0, 0, 0, 0,
    )  # fmt: skip
    body = local + fname + enc
    cd = central + fname
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(cd), len(body), 0)
    return body + cd + eocd


def sevenzip_bytes(
    members: dict[str, bytes], password: str | None = None, *, hide_names: bool = False
) -> bytes:
    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w", password=password) as z:
        if hide_names:
            z.set_encrypted_header(True)
        for name, data in members.items():
            z.writestr(data, name)
    return buf.getvalue()


def tar_gz_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def docm_bytes(macros: bool = True) -> bytes:
    """A Word document (OOXML); with ``macros`` a docm carrying word/vbaProject.bin."""
    ctypes = (
        b'<?xml version="1.0" encoding="UTF-8"?>'
        b'<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        b'<Default Extension="xml" ContentType="application/xml"/>'
        b'<Default Extension="bin" ContentType="application/vnd.ms-office.vbaProject"/>'
        b"</Types>"
    )
    members = {
        "[Content_Types].xml": ctypes,
        "_rels/.rels": b"<Relationships/>",
        "word/document.xml": b"<w:document><w:body><w:p>Hello</w:p></w:body></w:document>",
    }
    if macros:
        members["word/vbaProject.bin"] = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 504
    return zip_bytes(members)


# --------------------------------------------------------------------------- messages


def message(
    *attachments: tuple[str, bytes, str],
    text: str = "Please find the file attached.\n",
    subject: str = "Documents",
) -> bytes:
    """A multipart/mixed message with a text body and (filename, data, mime type) attachments."""
    msg = EmailMessage()
    msg["From"] = "Alice <alice@example.net>"
    msg["To"] = "bob@example.org"
    msg["Subject"] = subject
    msg["Message-ID"] = "<attach-test@example.net>"
    msg.set_content(text)
    for filename, data, mime in attachments:
        maintype, _, subtype = mime.partition("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes(policy=SMTP)


def raw_message(parts: list[bytes], boundary: str = "BOUNDARY", close: bool = True) -> bytes:
    """A hand-written multipart message (for malformed and exotic headers)."""
    out = (
        b"From: alice@example.net\r\nTo: bob@example.org\r\nSubject: raw\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="%s"\r\n\r\n'
        % boundary.encode()
    )
    for part in parts:
        out += b"--%s\r\n" % boundary.encode() + part + b"\r\n"
    if close:
        out += b"--%s--\r\n" % boundary.encode()
    return out


def b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


# --------------------------------------------------------------------------- the files are real


def test_zipcrypto_builder_makes_a_zip_that_zipfile_decrypts_with_the_password() -> None:
    data = zipcrypto_bytes("secret.txt", b"top secret\n")
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo("secret.txt")
        assert info.flag_bits & 0x1
        assert zf.read("secret.txt", pwd=b"infected") == b"top secret\n"


def test_png_and_pdf_builders_make_well_formed_files() -> None:
    png = png_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png.endswith(b"IEND\xaeB`\x82")
    pdf = pdf_bytes()
    xref = int(pdf.rsplit(b"startxref\n", 1)[1].split(b"\n")[0])
    assert pdf[xref:].startswith(b"xref")


def test_pe_builder_has_a_pe_signature_at_e_lfanew() -> None:
    pe = pe_bytes()
    (e_lfanew,) = struct.unpack_from("<I", pe, 0x3C)
    assert pe[:2] == b"MZ" and pe[e_lfanew : e_lfanew + 4] == b"PE\0\0"


def test_encrypted_7z_builder_needs_a_password() -> None:
    with py7zr.SevenZipFile(io.BytesIO(sevenzip_bytes({"a.txt": b"x"}, "pw"))) as z:
        assert z.needs_password()
