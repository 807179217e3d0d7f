"""List and read archive members in memory, never expanding without a bound.

Every byte decompressed is charged to one per-message :class:`Budget`
(expanded bytes, members, wall time); declared sizes are checked before any
decompression (a zip member never yields more than its declared size in
:mod:`zipfile`), and actual reads are capped, so a bomb costs at most the
budget. Nothing is written to disk. Members are read only as far as needed:
the first 64 KiB for the type, whole only for nested archives and Office files.
RAR content comes from a bounded child process (:mod:`policies._rar_extract`).
"""

from __future__ import annotations

import bz2
import io
import lzma
import struct
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from policies._filetypes import HEAD_BYTES, ISO_HEAD_BYTES, SHORT_HEAD_BYTES, Kind, sniff

__all__ = [
    "ArchiveBombError",
    "Budget",
    "Listing",
    "Member",
    "WantFull",
    "ole_info",
    "open_archive",
    "read_head",
]

# Ratios are judged only above this size: small files of zeros compress 1000:1 honestly.
RATIO_FLOOR = 1 << 20

# OLE root CLSIDs of Windows Installer packages and patches (MS-CFB §2.6.3).
_MSI_CLSIDS = frozenset(
    {"000C1084-0000-0000-C000-000000000046", "000C1086-0000-0000-C000-000000000046"}
)


class ArchiveBombError(Exception):
    """An archive exceeded a bound; ``str(exc)`` says which."""


@dataclass(slots=True)
class Budget:
    """What one message may cost: expanded bytes, members and time."""

    expanded_left: int
    members_left: int
    max_ratio: float
    deadline: float

    def take(self, nbytes: int, where: str) -> None:
        self.expanded_left -= nbytes
        if self.expanded_left < 0:
            raise ArchiveBombError(f"{where}: expands beyond the expanded size limit")
        self.check_time(where)

    def count(self, n: int, where: str) -> None:
        self.members_left -= n
        if self.members_left < 0:
            raise ArchiveBombError(f"{where}: more archive members than the limit")

    def check_time(self, where: str) -> None:
        if time.monotonic() > self.deadline:
            raise ArchiveBombError(f"{where}: inspection exceeded the time limit")

    def ratio(self, expanded: int, compressed: int, where: str) -> None:
        if expanded > RATIO_FLOOR and expanded > self.max_ratio * max(compressed, 1):
            raise ArchiveBombError(
                f"{where}: compression ratio {expanded // max(compressed, 1)}:1 "
                f"over {self.max_ratio:g}:1"
            )


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    size: int
    data: bytes  # prefix, whole, or b"" when unreadable
    complete: bool
    encrypted: bool = False
    unreadable: str = ""  # why the content could not be read (the name is still judged)


@dataclass(slots=True)
class Listing:
    # Zip members are produced one at a time: only one member's bytes live at once.
    members: Iterable[Member] = field(default_factory=list)
    encrypted: bool = False  # members or headers need a password
    problem: str = ""  # corrupt or unreadable, in words
    container: str = ""  # "ooxml", "odf", "jar" for zip-based formats
    macros: tuple[str, ...] = ()  # member names that carry macros


WantFull = Callable[[str, bytes], bool]


def open_archive(
    kind: Kind, data: bytes, name: str, budget: Budget, want_full: WantFull
) -> Listing:
    """Members of an archive of ``kind``; raises ArchiveBombError when a bound is hit."""
    budget.check_time(name)
    try:
        if kind is Kind.ZIP:
            return _zip(data, name, budget, want_full)
        if kind is Kind.SEVENZ:
            return _sevenzip(data, name, budget)
        if kind is Kind.TAR:
            return _tar(data, name, budget, want_full)
        if kind in (Kind.GZIP, Kind.BZIP2, Kind.XZ):
            return _compressed(kind, data, name, budget, want_full)
        if kind is Kind.RAR:
            return _rar(data, name, budget, want_full)
        if kind is Kind.CAB:
            return _cab(data, name, budget)
        if kind is Kind.ISO:
            return _iso(data, name, budget, want_full)
    except ArchiveBombError:
        raise
    except Exception as exc:  # hostile bytes make parsers raise anything; found by fuzzing
        return Listing(problem=f"corrupt {kind.value} ({type(exc).__name__})")
    return Listing(problem=f"{kind.value} cannot be inspected")


def _zip_declared_count(data: bytes) -> int | None:
    """Entry count from the end-of-central-directory record (APPNOTE 4.3.16), before parsing."""
    at = data.rfind(b"PK\x05\x06", max(0, len(data) - 65_557))
    if at < 0 or at + 22 > len(data):
        return None
    (total,) = struct.unpack_from("<H", data, at + 10)
    return None if total == 0xFFFF else int(total)  # 0xFFFF: see the Zip64 record


def _zip(data: bytes, name: str, budget: Budget, want_full: WantFull) -> Listing:
    declared = _zip_declared_count(data)
    if declared is not None:
        budget.count(declared, name)
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        return Listing(problem=f"corrupt zip ({type(exc).__name__})")
    if declared is None:
        budget.count(len(infos), name)
    listing = Listing()
    lowered = [i.filename.casefold() for i in infos]
    if "[content_types].xml" in lowered:
        listing.container = "ooxml"
        listing.macros = tuple(
            i.filename
            for i, low in zip(infos, lowered, strict=True)
            if low.endswith("vbaproject.bin") or low.startswith("xl/macrosheets/")
        )
        # Embedded files and OLE objects (word/embeddings/...) are judged like members.
        embedded = [i for i, low in zip(infos, lowered, strict=True) if "/embeddings/" in low]
        listing.members = _zip_members(zf, embedded, name, budget, want_full)
        return listing
    if "mimetype" in lowered and "meta-inf/manifest.xml" in lowered:
        listing.container = "odf"
        listing.macros = tuple(
            i.filename for i, low in zip(infos, lowered, strict=True) if low.startswith("basic/")
        )
        return listing
    if "meta-inf/manifest.mf" in lowered and any(low.endswith(".class") for low in lowered):
        listing.container = "jar"
    total = sum(i.file_size for i in infos)
    if total > budget.expanded_left:
        raise ArchiveBombError(
            f"{name}: declares {total} bytes expanded, over the expanded size limit"
        )
    budget.ratio(total, len(data), name)
    for info in infos:
        where = f"{name} > {info.filename}"
        budget.ratio(info.file_size, info.compress_size, where)
    # APPNOTE 4.4.4 bit 0: encrypted (ZipCrypto or AES)
    listing.encrypted = any(i.flag_bits & 0x1 for i in infos if not i.is_dir())
    listing.members = _zip_members(zf, infos, name, budget, want_full)
    return listing


def _zip_members(
    zf: zipfile.ZipFile,
    infos: list[zipfile.ZipInfo],
    name: str,
    budget: Budget,
    want_full: WantFull,
) -> Iterator[Member]:
    for info in infos:
        if info.is_dir():
            continue
        if info.flag_bits & 0x1:
            yield Member(info.filename, info.file_size, b"", False, True)
            continue
        yield _zip_member(zf, info, f"{name} > {info.filename}", budget, want_full)


def read_head(fh: Any, size: int) -> bytes:
    """The first bytes for sniffing; more only when a disk-image descriptor could be there."""
    head: bytes = fh.read(SHORT_HEAD_BYTES)
    if len(head) == SHORT_HEAD_BYTES and size > len(head) and sniff(head).kind is Kind.UNKNOWN:
        head += fh.read(ISO_HEAD_BYTES - len(head))
    return head


def _zip_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, budget: Budget, want_full: WantFull
) -> Member:
    try:
        with zf.open(info) as fh:
            head = read_head(fh, info.file_size)
            budget.take(len(head), where)
            complete = len(head) >= info.file_size
            if complete or not want_full(info.filename, head):
                return Member(info.filename, info.file_size, head, complete)
            rest = fh.read(max(0, budget.expanded_left) + 1)
            budget.take(len(rest), where)
            return Member(info.filename, info.file_size, head + rest, True)
    except ArchiveBombError:
        raise
    except Exception as exc:  # corrupt data or an unsupported method: name still judged
        return Member(info.filename, info.file_size, b"", False, unreadable=type(exc).__name__)


class _CappedWriter:
    """py7zr output that charges the budget and aborts extraction when it runs out."""

    def __init__(self, name: str, budget: Budget) -> None:
        self.name = name
        self.budget = budget
        self.buffer = io.BytesIO()

    def write(self, s: bytes | bytearray) -> int:
        self.budget.take(len(s), self.name)
        return self.buffer.write(s)

    def read(self, size: int | None = None) -> bytes:
        return self.buffer.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.buffer.seek(offset, whence)

    def flush(self) -> None:
        return None

    def size(self) -> int:
        return self.buffer.getbuffer().nbytes

    def close(self) -> None:
        return None


def _sevenzip(data: bytes, name: str, budget: Budget) -> Listing:
    import py7zr
    import py7zr.io

    try:
        archive = py7zr.SevenZipFile(io.BytesIO(data))
    except py7zr.exceptions.PasswordRequired:
        return Listing(encrypted=True, problem="7z with encrypted headers: names hidden")
    except (py7zr.exceptions.ArchiveError, EOFError, ValueError, OSError, KeyError) as exc:
        return Listing(problem=f"corrupt 7z ({type(exc).__name__})")
    with archive:
        try:
            infos = [f for f in archive.list() if not f.is_directory]
            encrypted = bool(archive.needs_password())
        except (py7zr.exceptions.ArchiveError, ValueError, KeyError, AttributeError) as exc:
            return Listing(problem=f"corrupt 7z ({type(exc).__name__})")
        budget.count(len(infos), name)
        if encrypted:
            return Listing(
                [
                    Member(str(f.filename), int(f.uncompressed or 0), b"", False, True)
                    for f in infos
                ],
                encrypted=True,
            )
        total = sum(int(f.uncompressed or 0) for f in infos)
        if total > budget.expanded_left:
            raise ArchiveBombError(
                f"{name}: declares {total} bytes expanded, over the expanded size limit"
            )
        budget.ratio(total, len(data), name)
        writers: dict[str, _CappedWriter] = {}

        class Factory(py7zr.io.WriterFactory):
            def create(self, filename: str) -> Any:
                writers[filename] = _CappedWriter(f"{name} > {filename}", budget)
                return writers[filename]

        try:
            archive.extract(factory=Factory())
        except ArchiveBombError:
            raise
        except Exception as exc:  # py7zr raises many types on hostile input
            return Listing(problem=f"unreadable 7z ({type(exc).__name__})")
    members = []
    for f in infos:
        writer = writers.get(str(f.filename))
        content = writer.buffer.getvalue() if writer else b""
        members.append(
            Member(str(f.filename), int(f.uncompressed or 0), content, writer is not None)
        )
    return Listing(members)


def _tar(data: bytes, name: str, budget: Budget, want_full: WantFull) -> Listing:
    members: list[Member] = []
    listing = Listing(members)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for ti in tf:
                budget.count(1, name)
                if not ti.isfile():
                    continue
                fh = tf.extractfile(ti)
                content = read_head(fh, ti.size) if fh else b""
                if fh and len(content) < ti.size and want_full(ti.name, content):
                    content += fh.read()  # already in memory: ``data`` is the bounded tar
                members.append(Member(ti.name, ti.size, content, len(content) >= ti.size))
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        listing.problem = f"corrupt tar ({type(exc).__name__})"
    return listing


def _compressed(kind: Kind, data: bytes, name: str, budget: Budget, want_full: WantFull) -> Listing:
    """gzip, bzip2, xz: one stream, decompressed with a hard cap; a tar inside is listed."""
    cap = max(0, budget.expanded_left)
    inner = _inner_name(kind, data, name)
    try:
        out = _decompress(kind, data, cap + 1)
    except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError) as exc:
        return Listing(problem=f"corrupt {kind.value} ({type(exc).__name__})")
    budget.take(len(out), name)
    budget.ratio(len(out), len(data), name)
    if sniff(out[:HEAD_BYTES]).kind is Kind.TAR:
        return _tar(out, name, budget, want_full)
    return Listing([Member(inner, len(out), out, True)])


def _decompress(kind: Kind, data: bytes, limit: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    rest = data
    while rest and got < limit:  # concatenated streams (RFC 1952 §2.2 members)
        dec: Any
        if kind is Kind.GZIP:
            dec = zlib.decompressobj(wbits=31)
        elif kind is Kind.BZIP2:
            dec = bz2.BZ2Decompressor()
        else:
            dec = lzma.LZMADecompressor()
        piece = dec.decompress(rest, limit - got)
        chunks.append(piece)
        got += len(piece)
        if got >= limit:
            break
        if kind is Kind.GZIP:
            if not dec.eof:
                break
            rest = dec.unused_data
        else:
            if not dec.eof:
                break
            rest = dec.unused_data
        if rest and sniff(rest[:8]).kind is not kind:
            break
    return b"".join(chunks)


def _inner_name(kind: Kind, data: bytes, name: str) -> str:
    """gzip FNAME (RFC 1952 §2.3.1) or the outer name without its compression suffix."""
    if kind is Kind.GZIP and len(data) > 10 and data[3] & 0x08:
        start = 10
        if data[3] & 0x04:  # FEXTRA
            (xlen,) = struct.unpack_from("<H", data, 10) if len(data) >= 12 else (0,)
            start = 12 + xlen
        end = data.find(b"\0", start, start + 1024)
        if end > start:
            return data[start:end].decode("latin-1")
    base = name.rsplit(" > ", 1)[-1]
    for suffix in (".gz", ".gzip", ".bz2", ".xz", ".tgz", ".tbz2", ".txz"):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)] + (".tar" if suffix.startswith(".t") else "")
    return base + ".decompressed"


def _rar(data: bytes, name: str, budget: Budget, want_full: WantFull) -> Listing:
    """Names, sizes and encryption from the headers (``rarfile``); content from bsdtar.

    Members are decompressed by libarchive's ``bsdtar`` in a child process
    (:mod:`policies._rar_extract`), charged to the budget as they stream and
    killed at its deadline. Stored members of an archive bsdtar cannot read are
    still read through ``rarfile`` (no decompression needed).
    """
    import rarfile

    from policies._rar_extract import extract

    try:
        rf = rarfile.RarFile(io.BytesIO(data))
    except rarfile.PasswordRequired:
        return Listing(encrypted=True, problem="rar with encrypted headers: names hidden")
    except (rarfile.Error, OSError, EOFError, ValueError) as exc:
        return Listing(problem=f"corrupt rar ({type(exc).__name__})")
    members: list[Member] = []
    listing = Listing(members)
    with rf:
        try:
            if rf.needs_password() and not rf.infolist():
                return Listing(encrypted=True, problem="rar with encrypted headers: names hidden")
            infos = [i for i in rf.infolist() if not i.is_dir()]
        except (rarfile.Error, OSError, ValueError) as exc:
            return Listing(problem=f"corrupt rar ({type(exc).__name__})")
        budget.count(len(infos), name)
        readable = [i for i in infos if not i.needs_password()]
        total = sum(int(i.file_size or 0) for i in readable)
        if total > budget.expanded_left:
            raise ArchiveBombError(
                f"{name}: declares {total} bytes expanded, over the expanded size limit"
            )
        budget.ratio(total, len(data), name)
        for info in readable:
            budget.ratio(int(info.file_size or 0), int(info.compress_size or 0), name)
        extracted = extract(data, name, budget, want_full) if readable else None
        for info in infos:
            fname = str(info.filename)
            size = int(info.file_size or 0)
            if info.needs_password():
                listing.encrypted = True
                members.append(Member(fname, size, b"", False, True))
                continue
            got = extracted.members.get(fname) if extracted else None
            if info.is_symlink():
                members.append(Member(fname, size, b"", True))  # a name only, no content
            elif got is not None:
                members.append(Member(fname, size, got.data, got.complete))
            elif info.compress_type == rarfile.RAR_M0:
                members.append(_rar_stored(rf, info, f"{name} > {fname}", budget, want_full))
            else:
                why = extracted.problem if extracted and extracted.problem else "not extracted"
                members.append(Member(fname, size, b"", False, unreadable=why))
    return listing


def _rar_stored(rf: Any, info: Any, where: str, budget: Budget, want_full: WantFull) -> Member:
    """A stored (uncompressed) member read straight from the archive, no extractor."""
    import rarfile

    fname, size = str(info.filename), int(info.file_size or 0)
    try:
        with rf.open(info) as fh:
            head = read_head(fh, size)
            budget.take(len(head), where)
            if len(head) >= size or not want_full(fname, head):
                return Member(fname, size, head, len(head) >= size)
            rest = fh.read(max(0, budget.expanded_left) + 1)
            budget.take(len(rest), where)
            return Member(fname, size, head + rest, True)
    except ArchiveBombError:
        raise
    except (rarfile.Error, OSError, ValueError, EOFError) as exc:
        return Member(fname, size, b"", False, unreadable=type(exc).__name__)


_ISO_MAX_DIRECTORIES = 1000


def _iso(data: bytes, name: str, budget: Budget, want_full: WantFull) -> Listing:
    """Files of an ISO 9660 image (ECMA-119 §9), Joliet names when present; no copy made."""
    block, root, joliet = 2048, None, None
    for sector in range(16, 32):  # volume descriptor set (ECMA-119 §8.1), ends with type 255
        vd = data[sector * 2048 : sector * 2048 + 2048]
        if len(vd) < 190 or vd[1:6] != b"CD001" or vd[0] == 255:
            break
        if vd[0] == 1 and root is None:
            block = struct.unpack_from("<H", vd, 128)[0] or 2048
            root = vd[156:190]
        elif vd[0] == 2 and vd[88:90] == b"%/" and vd[90:91] in (b"@", b"C", b"E"):
            joliet = vd[156:190]  # Joliet: UCS-2 names in a supplementary descriptor
    start = joliet or root
    if start is None:
        return Listing(problem="ISO image without a primary volume descriptor (UDF only)")
    encoding = "utf-16-be" if joliet else "latin-1"
    members: list[Member] = []
    queue = [(struct.unpack_from("<I", start, 2)[0], struct.unpack_from("<I", start, 10)[0], "")]
    seen: set[int] = set()
    while queue:
        extent, length, prefix = queue.pop()
        if extent in seen or len(seen) >= _ISO_MAX_DIRECTORIES:
            continue
        seen.add(extent)
        budget.check_time(name)
        pos, end = extent * block, min(extent * block + length, len(data))
        while pos < end:
            size = data[pos]
            if size == 0:  # records do not cross sectors: skip to the next one
                pos = (pos // block + 1) * block
                continue
            record = data[pos : pos + size]
            pos += size
            if len(record) < 34:
                break
            name_len = record[32]
            raw_name = record[33 : 33 + name_len]
            if raw_name in (b"\0", b"\1"):
                continue
            fname = raw_name.decode(encoding, "replace").split(";")[0].rstrip(".")
            f_extent, f_size = (
                struct.unpack_from("<I", record, 2)[0],
                struct.unpack_from("<I", record, 10)[0],
            )
            path = f"{prefix}{fname}"
            if record[25] & 0x02:  # directory
                queue.append((f_extent, f_size, path + "/"))
                continue
            budget.count(1, name)
            at = f_extent * block
            content = data[at : at + min(f_size, ISO_HEAD_BYTES)]
            if len(content) < f_size and want_full(path, content):
                content = data[at : at + f_size]
            members.append(Member(path, f_size, content, len(content) >= f_size))
    return Listing(members)


def _cab(data: bytes, name: str, budget: Budget) -> Listing:
    """File names from CFFILE records ([MS-CAB] §2.3); content is not decompressed."""
    if len(data) < 36:
        return Listing(problem="truncated cabinet")
    (coff_files,) = struct.unpack_from("<I", data, 16)
    (c_files,) = struct.unpack_from("<H", data, 28)
    budget.count(c_files, name)
    members: list[Member] = []
    listing = Listing(members)
    at = coff_files
    for _ in range(c_files):
        if at + 16 > len(data):
            listing.problem = "truncated cabinet"
            break
        (size,) = struct.unpack_from("<I", data, at)
        end = data.find(b"\0", at + 16, at + 16 + 512)
        if end < 0:
            listing.problem = "corrupt cabinet file name"
            break
        fname = data[at + 16 : end].decode("latin-1")
        members.append(Member(fname, size, b"", False))
        at = end + 1
    return listing


@dataclass(frozen=True, slots=True)
class OleInfo:
    macros: tuple[str, ...]  # where macros were found: VBA storage path or "Excel 4.0 macro sheet"
    msi: bool
    package: Member | None = None  # the file inside an OLE "Package" object (Ole10Native)
    encrypted: bool = False  # a password-protected Office file (MS-OFFCRYPTO EncryptedPackage)
    problem: str = ""


# Storages holding a VBA project (MS-OVBA §2.2; Word 97 "Macros", Excel "_VBA_PROJECT_CUR").
_VBA_NAMES = frozenset({"_vba_project", "vba", "_vba_project_cur", "macros"})


def ole_info(data: bytes, budget: Budget, where: str) -> OleInfo:
    """Macros (VBA storages, XLM macro sheets), MSI packages and embedded packages in OLE."""
    import olefile  # type: ignore[import-untyped]

    try:
        ole = olefile.OleFileIO(data)
    except Exception as exc:  # olefile raises many types on hostile input
        return OleInfo((), False, problem=f"corrupt OLE document ({type(exc).__name__})")
    try:
        entries = ole.listdir(streams=True, storages=True)
        clsid = str(getattr(ole.root, "clsid", "") or "").upper()
        macros = ["/".join(path) for path in entries if any(p.lower() in _VBA_NAMES for p in path)]
        lowered = {"/".join(path).lower(): path for path in entries}
        for name in ("workbook", "book"):
            if name in lowered and _biff_has_macro_sheet(
                _stream(ole, lowered[name], budget, where)
            ):
                macros.append("Excel 4.0 macro sheet")
        package = None
        if "\x01ole10native" in lowered:
            package = _ole_package(_stream(ole, lowered["\x01ole10native"], budget, where))
    except ArchiveBombError:
        raise
    except Exception as exc:
        return OleInfo((), False, problem=f"corrupt OLE document ({type(exc).__name__})")
    finally:
        ole.close()
    encrypted = "encryptedpackage" in lowered
    return OleInfo(tuple(macros[:1]), clsid in _MSI_CLSIDS, package, encrypted)


def _stream(ole: Any, path: list[str], budget: Budget, where: str) -> bytes:
    size = int(ole.get_size(path))
    budget.take(size, where)  # a stream is bounded by the file, but charge the copy
    return bytes(ole.openstream(path).read(size))


def _biff_has_macro_sheet(workbook: bytes) -> bool:
    """BOUNDSHEET8 records (MS-XLS 2.4.28) in the globals substream with dt=1: XLM macros."""
    pos = 0
    while pos + 4 <= len(workbook):
        kind, length = struct.unpack_from("<HH", workbook, pos)
        if kind == 0x0085 and length >= 6 and workbook[pos + 4 + 5] == 0x01:
            return True
        if kind == 0x000A:  # EOF: the globals substream, where sheets are declared, ends
            return False
        pos += 4 + length
    return False


def _ole_package(native: bytes) -> Member | None:
    """The embedded file of an OLE Package object (MS-OLEDS 2.3.6 OLENativeStream)."""
    from oletools.oleobj import OleNativeStream

    parsed = OleNativeStream(native)
    name = str(parsed.filename or parsed.src_path or "embedded")
    content = bytes(parsed.data or b"")
    return Member(name, len(content), content, True)
