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


def ole_bytes(
    storages: tuple[str, ...] = ("Macros", "VBA"),
    stream: str = "_VBA_PROJECT",
    clsid: bytes = b"\0" * 16,
    data: bytes = b"",
) -> bytes:
    """A minimal OLE compound file (MS-CFB v3): root -> storages (nested) -> one stream.

    The default is a Word 97 document's VBA project path (Macros/VBA/_VBA_PROJECT);
    ``clsid`` sets the root CLSID (MSI packages are recognised by theirs). ``data``
    is padded to the 4096-byte mini-stream cutoff so it lives in regular sectors
    (MS-CFB §2.6.3), chained in the one FAT sector (at most 126 sectors).
    """
    end, free, fat_sect, nostream = 0xFFFFFFFE, 0xFFFFFFFF, 0xFFFFFFFD, 0xFFFFFFFF
    if data:
        data = data.ljust(4096, b"\0")
    sectors = -(-len(data) // 512)
    assert sectors <= 126, "stream too large for this one-FAT-sector writer"
    header = bytearray(512)
    header[0:8] = bytes.fromhex("d0cf11e0a1b11ae1")
    struct.pack_into("<HHHHH", header, 24, 0x3E, 3, 0xFFFE, 9, 6)
    struct.pack_into("<IIIIIIII", header, 40, 0, 1, 1, 0, 4096, end, 0, end)
    struct.pack_into("<I", header, 76, 0)  # DIFAT[0]: the FAT is sector 0
    for i in range(1, 109):
        struct.pack_into("<I", header, 76 + 4 * i, free)
    chain = [2 + i + 1 for i in range(sectors - 1)] + ([end] if sectors else [])
    fat = struct.pack("<II", fat_sect, end) + struct.pack(f"<{len(chain)}I", *chain)
    fat += struct.pack("<I", free) * (128 - 2 - len(chain))

    def entry(name: str, kind: int, child: int, cls: bytes = b"\0" * 16, size: int = 0) -> bytes:
        encoded = name.encode("utf-16-le") + b"\0\0"
        start = 2 if size else end
        return (
            encoded.ljust(64, b"\0")
            + struct.pack("<HBB", len(encoded), kind, 1)
            + struct.pack("<III", nostream, nostream, child)
            + cls
            + b"\0" * 20
            + struct.pack("<IQ", start, size)
        )

    names = [*storages, stream]
    entries = [entry("Root Entry", 5, 1, clsid)]
    for i, name in enumerate(names, 1):
        last = i == len(names)
        kind, child = (2, nostream) if last else (1, i + 1)
        entries.append(entry(name, kind, child, size=len(data) if last else 0))
    directory = b"".join(entries).ljust(512, b"\0")
    return bytes(header) + fat + directory + data.ljust(sectors * 512, b"\0")


def ole_package(filename: str, payload: bytes) -> bytes:
    """An OLE "Package" object: an embedded file in an \\x01Ole10Native stream (MS-OLEDS 2.3.6)."""
    name = filename.encode("latin-1") + b"\0"
    body = (
        struct.pack("<H", 2)
        + name
        + b"C:\\Users\\x\\"
        + name
        + struct.pack("<II", 0, 0)
        + b"C:\\Temp\\"
        + name
        + struct.pack("<I", len(payload))
        + payload
    )
    native = struct.pack("<I", len(body)) + body
    return ole_bytes((), "\x01Ole10Native", data=native)


def xls_with_macro_sheet() -> bytes:
    """A BIFF8 workbook stream whose globals declare an Excel 4.0 macro sheet (BOUNDSHEET8 dt=1)."""

    def record(kind: int, body: bytes) -> bytes:
        return struct.pack("<HH", kind, len(body)) + body

    sheet = b"\x06\x00Macro1"  # ShortXLUnicodeString: 6 chars, compressed
    workbook = (
        record(0x0809, struct.pack("<HHHHII", 0x0600, 0x0005, 0, 0, 0, 0))  # BOF, globals
        + record(0x0085, struct.pack("<IBB", 0, 0x01, 0x01) + sheet)  # hidden macro sheet
        + record(0x000A, b"")  # EOF of the globals substream
    )
    return ole_bytes((), "Workbook", data=workbook)


def docx_with_embedding(filename: str, payload: bytes) -> bytes:
    """A docx carrying an embedded OLE Package object (word/embeddings/oleObject1.bin)."""
    base = zipfile.ZipFile(io.BytesIO(docm_bytes(macros=False)))
    members = {i.filename: base.read(i) for i in base.infolist()}
    members["word/embeddings/oleObject1.bin"] = ole_package(filename, payload)
    return zip_bytes(members)


MSI_CLSID = struct.pack("<IHH", 0x000C1084, 0, 0) + bytes.fromhex("c000000000000046")


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


def rar_bytes(members: dict[str, bytes], *, encrypted: bool = False) -> bytes:
    """A RAR 2.9/4.x archive with stored (uncompressed) members, written by hand.

    Block layout per the RAR 4 technote: marker, archive header (0x73), one file
    header (0x74) per member followed by its data, end block (0x7b); each header
    carries the low 16 bits of the CRC-32 of its bytes after the CRC field.
    """

    def block(kind: int, flags: int, body: bytes) -> bytes:
        head = struct.pack("<BHH", kind, flags, 7 + len(body)) + body
        return struct.pack("<H", zlib.crc32(head) & 0xFFFF) + head

    out = b"Rar!\x1a\x07\x00" + block(0x73, 0, b"\0" * 6)
    for name, data in members.items():
        fname = name.encode()
        flags = 0x8000 | (0x04 if encrypted else 0)  # LONG_BLOCK, PASSWORD
        body = struct.pack(
            "<IIBIIBBHI", len(data), len(data), 2, zlib.crc32(data), 0x5A210000, 29, 0x30,
            len(fname), 0x20,
        ) + fname  # fmt: skip
        out += block(0x74, flags, body) + data
    return out + block(0x7B, 0x4000, b"")


def iso9660_bytes(files: dict[str, bytes]) -> bytes:
    """An ISO 9660 image (ECMA-119): PVD, terminator, a root directory, one extent per file."""

    def both32(v: int) -> bytes:
        return struct.pack("<I", v) + struct.pack(">I", v)

    def both16(v: int) -> bytes:
        return struct.pack("<H", v) + struct.pack(">H", v)

    def record(name: bytes, extent: int, size: int, flags: int) -> bytes:
        body = (
            b"\0" + both32(extent) + both32(size) + b"\0" * 7 + bytes([flags, 0, 0])
            + both16(1) + bytes([len(name)]) + name
        )  # fmt: skip
        body += b"\0" * ((len(body) + 1) % 2)  # ECMA-119 §9.1.12: padded to even, counted
        return bytes([len(body) + 1]) + body

    extents, lba = [], 19
    for data in files.values():
        extents.append(lba)
        lba += max(1, -(-len(data) // 2048))
    root = record(b"\0", 18, 2048, 2) + record(b"\1", 18, 2048, 2)
    for (fname, data), extent in zip(files.items(), extents, strict=True):
        root += record(fname.upper().encode() + b";1", extent, len(data), 0)
    pvd = bytearray(2048)
    pvd[0:7] = b"\x01CD001\x01"
    pvd[80:88] = both32(lba)
    pvd[128:132] = both16(2048)
    pvd[156:190] = record(b"\0", 18, 2048, 2)
    out = bytearray(16 * 2048) + pvd + b"\xffCD001\x01".ljust(2048, b"\0") + root.ljust(2048, b"\0")
    for data in files.values():
        out += data.ljust(max(1, -(-len(data) // 2048)) * 2048, b"\0")
    return bytes(out)


def cab_bytes(names: list[str]) -> bytes:
    """A cabinet's header, one stored folder and its CFFILE table ([MS-CAB] §2.1-2.3), no data."""
    files = b""
    for name in names:
        files += struct.pack("<IIHHHH", 0, 0, 0, 0x5A21, 0, 0x20) + name.encode() + b"\0"
    header_size, folder_size = 36, 8
    total = header_size + folder_size + len(files)
    header = b"MSCF" + struct.pack(
        "<IIIIIBBHHHHH", 0, total, 0, header_size + folder_size, 0, 3, 1, 1, len(names), 0, 0, 0
    )
    folder = struct.pack("<IHH", total, 0, 0)
    return header + folder + files


def compressed_bytes(kind: str, data: bytes) -> bytes:
    """``data`` compressed as a single gzip, bzip2 or xz stream."""
    import bz2
    import gzip
    import lzma

    return {"gz": lambda: gzip.compress(data, mtime=0), "bz2": lambda: bz2.compress(data),
            "xz": lambda: lzma.compress(data)}[kind]()  # fmt: skip


def tar_bytes(members: dict[str, bytes], compression: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


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


def test_ole_builder_makes_a_compound_file_olefile_reads() -> None:
    import olefile

    ole = olefile.OleFileIO(ole_bytes())
    assert ["Macros", "VBA", "_VBA_PROJECT"] in ole.listdir()
    msi = olefile.OleFileIO(ole_bytes((), "SummaryInformation", MSI_CLSID))
    assert msi.root.clsid == "000C1084-0000-0000-C000-000000000046"


def test_rar_builder_makes_an_archive_rarfile_lists_and_reads() -> None:
    import rarfile

    with rarfile.RarFile(io.BytesIO(rar_bytes({"a.txt": b"hello"}))) as rf:
        assert rf.namelist() == ["a.txt"]
        assert rf.read("a.txt") == b"hello"
    with rarfile.RarFile(io.BytesIO(rar_bytes({"a.txt": b"hello"}, encrypted=True))) as rf:
        assert rf.infolist()[0].needs_password()


def test_ole_builder_writes_stream_data_and_packages_olefile_and_oletools_read() -> None:
    import olefile
    from oletools.oleobj import OleNativeStream

    ole = olefile.OleFileIO(ole_package("evil.exe", b"MZ payload"))
    native = OleNativeStream(ole.openstream("\x01Ole10Native").read())
    assert native.filename == "evil.exe" and native.data == b"MZ payload"
    wb = olefile.OleFileIO(xls_with_macro_sheet()).openstream("Workbook").read()
    assert wb[:2] == b"\x09\x08"
