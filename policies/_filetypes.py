"""What a file really is, from its first bytes, and what its name claims.

Detection is a small explicit signature table for the types that matter to
security (executables, scripts with a shebang, shortcuts, installers, disk
images, archives, Office containers, a few common documents), checked first
because it is exact, fast (microseconds) and reviewable. ``puremagic`` (pure
Python, no libmagic system dependency, so the same answers on every host)
labels everything else when an operator blocks a type we do not know.
libmagic was not chosen: a C library parsing hostile input in-process, whose
answers change with the installed magic database.
"""

from __future__ import annotations

import enum
import struct
import unicodedata
from dataclasses import dataclass

__all__ = [
    "KNOWN_MIMES",
    "FileType",
    "Kind",
    "NameInfo",
    "normalize_name",
    "puremagic_mime",
    "sniff",
]

# Enough for every signature below: ISO 9660 / UDF descriptors at 0x8001..0x9005.
HEAD_BYTES = 64 * 1024
# Enough for every signature except the disk-image descriptors (read on demand).
SHORT_HEAD_BYTES = 4096
ISO_HEAD_BYTES = 0x9006
TAIL_BYTES = 512


class Kind(enum.Enum):
    """Detected content kinds; the classes below group them."""

    PE = "Windows executable (PE)"
    DOS_EXE = "DOS executable (MZ)"
    ELF = "ELF executable"
    MACHO = "Mach-O executable"
    SCRIPT = "script with #! interpreter line"
    LNK = "Windows shortcut (LNK)"
    MSI = "Windows installer (MSI)"
    JAR = "Java archive (JAR)"
    ISO = "ISO 9660 / UDF disk image"
    VHD = "VHD disk image"
    VHDX = "VHDX disk image"
    DMG = "Apple disk image"
    FAT_IMG = "FAT disk image"
    ZIP = "zip archive"
    SEVENZ = "7z archive"
    RAR = "rar archive"
    GZIP = "gzip"
    BZIP2 = "bzip2"
    XZ = "xz"
    TAR = "tar archive"
    CAB = "cabinet archive (CAB)"
    OLE = "OLE compound document"
    PDF = "PDF"
    PNG = "PNG image"
    JPEG = "JPEG image"
    GIF = "GIF image"
    UNKNOWN = "unknown"


EXECUTABLE_KINDS = frozenset(
    {Kind.PE, Kind.DOS_EXE, Kind.ELF, Kind.MACHO, Kind.SCRIPT, Kind.LNK, Kind.MSI, Kind.JAR}
)
DISK_IMAGE_KINDS = frozenset({Kind.ISO, Kind.VHD, Kind.VHDX, Kind.DMG, Kind.FAT_IMG})
COMPRESSED_KINDS = frozenset({Kind.GZIP, Kind.BZIP2, Kind.XZ})
ARCHIVE_KINDS = frozenset({Kind.ZIP, Kind.SEVENZ, Kind.RAR, Kind.TAR, Kind.CAB}) | COMPRESSED_KINDS

_MIME = {
    Kind.PE: "application/x-dosexec",
    Kind.DOS_EXE: "application/x-dosexec",
    Kind.ELF: "application/x-executable",
    Kind.MACHO: "application/x-mach-binary",
    Kind.SCRIPT: "text/x-script",
    Kind.LNK: "application/x-ms-shortcut",
    Kind.MSI: "application/x-msi",
    Kind.JAR: "application/java-archive",
    Kind.ISO: "application/x-iso9660-image",
    Kind.VHD: "application/x-vhd",
    Kind.VHDX: "application/x-vhdx",
    Kind.DMG: "application/x-apple-diskimage",
    Kind.FAT_IMG: "application/x-raw-disk-image",
    Kind.ZIP: "application/zip",
    Kind.SEVENZ: "application/x-7z-compressed",
    Kind.RAR: "application/vnd.rar",
    Kind.GZIP: "application/gzip",
    Kind.BZIP2: "application/x-bzip2",
    Kind.XZ: "application/x-xz",
    Kind.TAR: "application/x-tar",
    Kind.CAB: "application/vnd.ms-cab-compressed",
    Kind.OLE: "application/x-ole-storage",
    Kind.PDF: "application/pdf",
    Kind.PNG: "image/png",
    Kind.JPEG: "image/jpeg",
    Kind.GIF: "image/gif",
    Kind.UNKNOWN: "application/octet-stream",
}


KNOWN_MIMES = frozenset(_MIME.values())


@dataclass(frozen=True, slots=True)
class FileType:
    kind: Kind

    @property
    def mime(self) -> str:
        return _MIME[self.kind]

    @property
    def is_executable(self) -> bool:
        return self.kind in EXECUTABLE_KINDS

    @property
    def is_disk_image(self) -> bool:
        return self.kind in DISK_IMAGE_KINDS

    @property
    def is_archive(self) -> bool:
        return self.kind in ARCHIVE_KINDS


_LNK_HEADER = bytes.fromhex("4c0000000114020000000000c000000000000046")
_OLE = bytes.fromhex("d0cf11e0a1b11ae1")
_MACHO = (
    bytes.fromhex("feedface"),
    bytes.fromhex("feedfacf"),
    bytes.fromhex("cefaedfe"),
    bytes.fromhex("cffaedfe"),
    bytes.fromhex("cafebabe"),  # fat Mach-O (also a Java class file: executable either way)
)


def sniff(head: bytes, tail: bytes = b"") -> FileType:
    """The kind of content from its first bytes (and last 512, for VHD and DMG footers)."""
    return FileType(_sniff(head, tail))


def _sniff(head: bytes, tail: bytes) -> Kind:
    if head[:2] == b"MZ":
        if len(head) >= 0x40:
            (e_lfanew,) = struct.unpack_from("<I", head, 0x3C)
            if head[e_lfanew : e_lfanew + 4] == b"PE\0\0":
                return Kind.PE
        # A DOS header is binary; text that merely starts with "MZ" has no NUL.
        if b"\0" in head[:64]:
            return Kind.DOS_EXE
    if head[:4] == b"\x7fELF":
        return Kind.ELF
    if head[:4] in _MACHO:
        return Kind.MACHO
    if head[:2] == b"#!" and head[2:4].lstrip()[:1] == b"/":
        return Kind.SCRIPT
    if head[:20] == _LNK_HEADER:
        return Kind.LNK
    if head[:8] == b"vhdxfile":
        return Kind.VHDX
    if head[:8] == b"conectix" or tail[-512:][:8] == b"conectix":
        return Kind.VHD
    if len(tail) >= 512 and tail[-512:][:4] == b"koly":
        return Kind.DMG
    for off in (0x8001, 0x8801, 0x9001):  # ECMA-119 §8.1 / ECMA-167 volume descriptors
        if head[off : off + 5] in (b"CD001", b"BEA01", b"NSR02", b"NSR03"):
            return Kind.ISO
    if head[:8] == _OLE:
        return Kind.OLE
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return Kind.ZIP
    if head[:6] == b"7z\xbc\xaf\x27\x1c":
        return Kind.SEVENZ
    if head[:7] == b"Rar!\x1a\x07\x00" or head[:8] == b"Rar!\x1a\x07\x01\x00":
        return Kind.RAR
    if head[:3] == b"\x1f\x8b\x08":  # RFC 1952 §2.3.1: ID1 ID2, CM 8 (deflate)
        return Kind.GZIP
    if head[:3] == b"BZh" and head[3:4].isdigit():
        return Kind.BZIP2
    if head[:6] == b"\xfd7zXZ\x00":
        return Kind.XZ
    if head[257:262] == b"ustar":
        return Kind.TAR
    if head[:8] == b"MSCF\0\0\0\0":
        return Kind.CAB
    if b"%PDF-" in head[:1024]:
        return Kind.PDF
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return Kind.PNG
    if head[:3] == b"\xff\xd8\xff":
        return Kind.JPEG
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return Kind.GIF
    if len(head) >= 512 and head[510:512] == b"\x55\xaa" and b"FAT" in head[0x36:0x5A]:
        return Kind.FAT_IMG
    return Kind.UNKNOWN


def puremagic_mime(head: bytes) -> str | None:
    """puremagic's best MIME type for content our table does not know (about 0.4 ms)."""
    import puremagic

    try:
        found = puremagic.magic_string(head[:8192])
    except (puremagic.PureError, ValueError):
        return None
    for match in found:
        if match.mime_type:
            return str(match.mime_type).lower()
    return None


# Invisible characters that change how a name is displayed but not what it is:
# bidirectional overrides/isolates (U+202A..U+202E, U+2066..U+2069), zero-width
# marks and joiners, BOM, soft hyphen — all Unicode category Cf.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")


@dataclass(frozen=True, slots=True)
class NameInfo:
    """A file name as Windows would treat it, and what was hidden in it."""

    raw: str
    name: str  # normalized: basename, NFKC, lower case, no invisible chars, no trailing dots/spaces
    extensions: tuple[str, ...]  # every dot-separated suffix, last one last ("pdf", "exe")
    bidi: bool  # contained a direction override or isolate
    invisible: bool  # contained other invisible format or control characters

    @property
    def extension(self) -> str:
        return self.extensions[-1] if self.extensions else ""


def normalize_name(raw: str) -> NameInfo:
    """Normalize as a desktop would see the name, so a disguise cannot hide the real extension.

    NUL truncates (C APIs stop there); path separators keep the last component
    (RFC 2183 §2.3: the receiver must not use a path); trailing dots and spaces
    are dropped (Win32 path normalization drops them too).
    """
    text = raw.split("\0", 1)[0]
    bidi = any(c in _BIDI for c in text)
    invisible = False
    kept = []
    for c in unicodedata.normalize("NFKC", text):
        cat = unicodedata.category(c)
        if cat in ("Cf", "Cc") or c in _BIDI:
            invisible = invisible or c not in _BIDI
            continue
        kept.append(c)
    name = "".join(kept).replace("\\", "/").rsplit("/", 1)[-1]
    name = name.rstrip(". \t\u3000").strip().casefold()
    parts = name.split(".")
    exts = tuple(p.strip() for p in parts[1:] if p.strip()) if len(parts) > 1 else ()
    return NameInfo(raw=raw, name=name, extensions=exts, bidi=bidi, invisible=invisible)
