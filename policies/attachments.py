"""Attachment restrictions: file types, disguises, archives, macros and sizes.

An operator says "no executables, no scripts, no macros, nothing over 10 MB,
look inside archives" in a few lines, and a disguise does not get through:
names are decoded and normalized the way a desktop shows them, the real type
comes from the content's first bytes, and archives are opened (in memory,
within a budget) and their members judged by the same rules.

Consequences: every finding is a symbol whose score ``[scores]`` may change
or turn into an action. The rule groups that force an action by default
(``action_blocked`` = reject, ``action_encrypted`` / ``action_macro`` =
quarantine, ...) take ``"score"`` to drop the forced action and let the score
decide.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import time
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from gateway.api import Action, Context, OptionError, Policy, Result, Symbol, SymbolDef
from policies._archives import (
    ArchiveBombError,
    Budget,
    Member,
    ole_info,
    open_archive,
)
from policies._filetypes import (
    ARCHIVE_KINDS,
    HEAD_BYTES,
    KNOWN_MIMES,
    TAIL_BYTES,
    FileType,
    Kind,
    NameInfo,
    normalize_name,
    puremagic_mime,
    sniff,
)
from policies._mime_walk import MimePart, MimeWalk, walk_message

__all__ = ["AttachmentsOptions", "AttachmentsPolicy"]

Consequence = Literal["reject", "quarantine", "add_header", "score"]

# Executables, scripts, installers, shortcuts, and disk images that carry them
# past Mark-of-the-Web: what Windows runs on a double click.
DEFAULT_BLOCKED_EXTENSIONS: tuple[str, ...] = (
    "exe", "scr", "com", "pif", "bat", "cmd", "vbs", "vbe", "js", "jse", "wsf", "wsh",
    "ps1", "msi", "msp", "hta", "cpl", "jar", "lnk", "reg",
    "iso", "img", "vhd", "vhdx",
    "dll", "ocx", "sys", "drv", "efi", "msc", "mst", "msix", "msixbundle", "appx",
    "appxbundle", "application", "appref-ms", "gadget", "inf", "scf", "sct", "shs", "chm",
    "hlp", "ps1xml", "ps2", "ps2xml", "psc1", "psc2", "psm1", "psd1", "vb", "ws", "wsc",
    "xll", "xbap", "settingcontent-ms", "url", "udf", "dmg",
)  # fmt: skip

DEFAULT_BLOCKED_TYPES: tuple[str, ...] = (
    "application/x-dosexec",
    "application/x-msdownload",
    "application/x-msdos-program",
    "application/x-ms-dos-executable",
    "application/vnd.microsoft.portable-executable",
    "application/x-executable",
    "application/x-msi",
    "application/x-ms-installer",
    "application/x-ms-shortcut",
    "application/hta",
    "application/java-archive",
    "application/x-java-archive",
    "application/x-iso9660-image",
)

# Extensions that say honestly what an executable kind is (no disguise).
_HONEST_EXT: dict[Kind, frozenset[str]] = {
    Kind.PE: frozenset({"exe", "dll", "scr", "com", "pif", "cpl", "sys", "ocx", "drv", "efi",
                        "mui", "xll", "msp", "node", "pyd"}),
    Kind.DOS_EXE: frozenset({"exe", "com", "dll", "scr", "pif", "sys", "drv"}),
    Kind.ELF: frozenset({"elf", "so", "bin", "run", "out", "o", "ko", "axf"}),
    Kind.MACHO: frozenset({"dylib", "bundle", "so", "class", "macho"}),
    Kind.SCRIPT: frozenset({"sh", "bash", "zsh", "ksh", "csh", "py", "pl", "rb", "php", "awk",
                            "tcl", "lua", "js", "command", "tool", "run", "cgi"}),
    Kind.LNK: frozenset({"lnk"}),
    Kind.MSI: frozenset({"msi", "msp", "mst", "msm"}),
    Kind.JAR: frozenset({"jar", "war", "ear"}),
    Kind.ISO: frozenset({"iso", "img", "udf"}),
    Kind.VHD: frozenset({"vhd", "img"}),
    Kind.VHDX: frozenset({"vhdx"}),
    Kind.DMG: frozenset({"dmg", "img"}),
    Kind.FAT_IMG: frozenset({"img", "ima", "vfd", "flp", "dsk", "bin"}),
}  # fmt: skip


class Group(enum.Enum):
    """Rule groups whose consequence is an option (``action_<group>``)."""

    BLOCKED = "blocked"
    ENCRYPTED = "encrypted"
    MACRO = "macro"
    SIZE = "size"
    BOMB = "bomb"
    UNINSPECTABLE = "uninspectable"
    SCORE = "score"  # only a score unless [scores] says otherwise


SYMBOLS: dict[str, tuple[SymbolDef, Group]] = {
    "ATTACH_BLOCKED_EXT": (
        SymbolDef(8.0, "attachment with a blocked file extension"),
        Group.BLOCKED,
    ),
    "ATTACH_DOUBLE_EXT": (
        SymbolDef(4.0, "blocked extension hidden behind a harmless one (invoice.pdf.exe)"),
        Group.BLOCKED,
    ),
    "ATTACH_DISGUISED_EXEC": (
        SymbolDef(10.0, "content is an executable or disk image but name or type says otherwise"),
        Group.BLOCKED,
    ),
    "ATTACH_BLOCKED_TYPE": (SymbolDef(8.0, "attachment of a blocked MIME type"), Group.BLOCKED),
    "ATTACH_ENCRYPTED_ARCHIVE": (
        SymbolDef(4.0, "password-protected archive or Office file: content cannot be inspected"),
        Group.ENCRYPTED,
    ),
    "ATTACH_MACRO": (SymbolDef(5.0, "Office document with macros"), Group.MACRO),
    "ATTACH_ARCHIVE_BOMB": (
        SymbolDef(10.0, "archive over the ratio, expanded size, member or time limit"),
        Group.BOMB,
    ),
    "ATTACH_ARCHIVE_TOO_DEEP": (
        SymbolDef(4.0, "archives nested deeper than max_archive_depth: not fully inspected"),
        Group.UNINSPECTABLE,
    ),
    "ATTACH_MIME_LIMIT": (
        SymbolDef(4.0, "MIME structure over max_mime_depth/max_parts or unparseable"),
        Group.UNINSPECTABLE,
    ),
    "ATTACH_TOO_LARGE": (SymbolDef(5.0, "attachment over max_attachment_size"), Group.SIZE),
    "ATTACH_TOTAL_TOO_LARGE": (
        SymbolDef(5.0, "attachments together over max_total_size"),
        Group.SIZE,
    ),
    "ATTACH_TOO_MANY": (SymbolDef(3.0, "more attachments than max_attachments"), Group.SIZE),
    "ATTACH_ARCHIVE_UNREADABLE": (
        SymbolDef(
            4.0, "archive or document that could not be opened (corrupt, unsupported, too big)"
        ),
        Group.UNINSPECTABLE,
    ),
    "ATTACH_MALFORMED": (
        SymbolDef(2.6, "broken MIME structure or transfer encoding, corrupt OLE document"),
        Group.SCORE,
    ),
    "ATTACH_BIDI_NAME": (
        SymbolDef(6.0, "file name with a direction override or invisible characters"),
        Group.SCORE,
    ),
}

_FORCE = {
    "reject": Action.REJECT,
    "quarantine": Action.QUARANTINE,
    "add_header": Action.ADD_HEADER,
    "score": None,
}

# Archives and OLE files bigger than this (encoded) are scanned in a worker thread.
_INLINE_LIMIT = 64 * 1024
_DETAIL_LIMIT = 400


@dataclass(frozen=True, slots=True)
class AttachmentsOptions:
    """``[policies.attachments]``; sizes in bytes."""

    blocked_extensions: tuple[str, ...] = DEFAULT_BLOCKED_EXTENSIONS
    allowed_extensions: tuple[str, ...] = ()  # non-empty: every other extension is blocked
    blocked_types: tuple[str, ...] = DEFAULT_BLOCKED_TYPES
    max_attachment_size: int = 10_000_000
    max_total_size: int = 25_000_000
    max_attachments: int = 50
    max_mime_depth: int = 20
    max_parts: int = 500
    scan_archives: bool = True
    max_archive_depth: int = 3
    max_archive_members: int = 1000
    max_expanded_size: int = 50_000_000
    max_ratio: float = 100.0
    scan_time_limit: float = 5.0
    scan_workers: int = 2  # archive scans at once; bounds memory (see the docs)
    action_blocked: Consequence = "reject"
    action_encrypted: Consequence = "quarantine"
    action_macro: Consequence = "quarantine"
    action_size: Consequence = "reject"
    action_bomb: Consequence = "reject"
    action_uninspectable: Consequence = "quarantine"
    _blocked: frozenset[str] = field(init=False, repr=False, compare=False)
    _allowed: frozenset[str] = field(init=False, repr=False, compare=False)
    _blocked_types: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key in (
            "max_attachment_size",
            "max_total_size",
            "max_attachments",
            "max_mime_depth",
            "max_parts",
            "max_archive_members",
            "max_expanded_size",
            "scan_workers",
        ):
            if getattr(self, key) < 1:
                raise OptionError(key, "must be at least 1")
        if self.max_archive_depth < 1:
            raise OptionError(
                "max_archive_depth", "must be at least 1; scan_archives = false opens none"
            )
        if self.max_ratio < 1:
            raise OptionError("max_ratio", "must be at least 1 (expanded:compressed)")
        if self.scan_time_limit <= 0:
            raise OptionError("scan_time_limit", "must be a number of seconds > 0")
        for key in ("blocked_extensions", "allowed_extensions"):
            for ext in getattr(self, key):
                if not ext or ext.startswith(".") or ext != ext.strip():
                    raise OptionError(
                        key, f'write extensions without a dot, like "exe", got "{ext}"'
                    )
        for mime in self.blocked_types:
            if "/" not in mime:
                raise OptionError("blocked_types", f'must be type/subtype, got "{mime}"')
        object.__setattr__(
            self, "_blocked", frozenset(e.casefold() for e in self.blocked_extensions)
        )
        object.__setattr__(
            self, "_allowed", frozenset(e.casefold() for e in self.allowed_extensions)
        )
        object.__setattr__(self, "_blocked_types", frozenset(t.lower() for t in self.blocked_types))

    def consequence(self, group: Group) -> Action | None:
        if group is Group.SCORE:
            return None
        return _FORCE[getattr(self, f"action_{group.value}")]

    def ext_blocked(self, ext: str) -> bool:
        if ext in self._blocked:
            return True
        return bool(self._allowed) and bool(ext) and ext not in self._allowed


@dataclass(frozen=True, slots=True)
class Finding:
    symbol: str
    detail: str  # "<where>: <what>", also the sender-facing reason
    about_file: bool = True  # False for message-wide findings (count, total size, structure)

    @property
    def reason(self) -> str:
        return f"attachment {self.detail}" if self.about_file else self.detail


@dataclass(slots=True)
class _Scan:
    """The state of one message's scan."""

    options: AttachmentsOptions
    budget: Budget
    findings: list[Finding] = field(default_factory=list)
    bombed: bool = False  # after a bomb, no further archive is opened: the budget is spent

    def add(self, symbol: str, detail: str, *, about_file: bool = True) -> None:
        self.findings.append(Finding(symbol, detail, about_file))


def display(name: str, limit: int = 120) -> str:
    """A name safe to show: control and format characters escaped, length bounded."""
    out = "".join(
        f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cc", "Cf") else c for c in name
    )
    return out if len(out) <= limit else out[: limit - 3] + "..."


class AttachmentsPolicy(Policy):
    name = "attachments"
    symbols = {name: sdef for name, (sdef, _group) in SYMBOLS.items()}
    Options = AttachmentsOptions

    def __init__(self, options: AttachmentsOptions) -> None:
        super().__init__(options)
        self.options: AttachmentsOptions = options
        # Memo key for this policy's walk bounds; the parts cache their decoded content.
        self._walk: Callable[[Context], MimeWalk] = lambda ctx: walk_message(
            ctx.message, ctx.raw, max_depth=options.max_mime_depth, max_parts=options.max_parts
        )
        self._puremagic = any(t.lower() not in KNOWN_MIMES for t in options.blocked_types)
        self._executor: ThreadPoolExecutor | None = None

    def _pool(self) -> ThreadPoolExecutor:
        # A small pool of our own: at most scan_workers archive scans hold memory at once.
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                self.options.scan_workers, thread_name_prefix="attachments"
            )
        return self._executor

    async def close(self) -> None:
        if self._executor is not None:
            # Scans already queued finish: a reload must not fail messages in flight.
            self._executor.shutdown(wait=False, cancel_futures=False)
            self._executor = None

    async def check(self, ctx: Context) -> Result:
        walk = ctx.memo(self._walk)
        inspect = [p for p in walk.parts if _worth_inspecting(p)]
        if not inspect and not walk.limit and not walk.defects and not walk.unparsed:
            findings = [f for p in walk.parts for f in _cheap_findings(p)]
            return self._result(findings) if findings else Result()
        if any(_needs_thread(p) for p in inspect):
            loop = asyncio.get_running_loop()
            findings = await loop.run_in_executor(self._pool(), functools.partial(self.scan, walk))
        else:
            findings = self.scan(walk)
        return self._result(findings)

    def scan(self, walk: MimeWalk) -> list[Finding]:
        """Every finding of one message (synchronous: CPU only, bounded by the budget)."""
        opts = self.options
        budget = Budget(
            expanded_left=opts.max_expanded_size,
            members_left=opts.max_archive_members,
            max_ratio=opts.max_ratio,
            deadline=time.monotonic() + opts.scan_time_limit,
        )
        st = _Scan(opts, budget)
        if walk.unparsed:
            st.add("ATTACH_MIME_LIMIT", "message could not be parsed as MIME", about_file=False)
        if walk.limit:
            st.add("ATTACH_MIME_LIMIT", walk.limit, about_file=False)
        for where, defect in walk.defects:
            st.add("ATTACH_MALFORMED", f"part {where}: {_defect_text(defect)}", about_file=False)
        total = 0
        count = 0
        sizes: list[tuple[MimePart, int]] = []
        for part in walk.parts:
            for f in _cheap_findings(part):
                st.findings.append(f)
            if not _worth_inspecting(part):
                continue
            where = display(part.label)
            size = part.estimated_size()  # an upper bound, made exact only near a limit
            if size > opts.max_attachment_size:
                size = _exact_size(part)
            if part.is_attachment:
                count += 1
            total += size
            sizes.append((part, size))
            if size > opts.max_attachment_size:
                st.add(
                    "ATTACH_TOO_LARGE",
                    f"{where}: {size} bytes, over the limit of {opts.max_attachment_size}",
                )
            self._judge_part(part, where, size, st)
        if count > opts.max_attachments:
            st.add(
                "ATTACH_TOO_MANY",
                f"{count} attachments, more than {opts.max_attachments}",
                about_file=False,
            )
        if total > opts.max_total_size:
            total = sum(_exact_size(p) for p, _ in sizes)
        if total > opts.max_total_size:
            st.add(
                "ATTACH_TOTAL_TOO_LARGE",
                f"attachments total {total} bytes, over {opts.max_total_size}",
                about_file=False,
            )
        return st.findings

    def _judge_part(self, part: MimePart, where: str, size: int, st: _Scan) -> None:
        head = part.content(full=False)
        if head.problems:
            st.add("ATTACH_MALFORMED", f"{where}: " + ", ".join(head.problems))
        inspectable = size <= self.options.max_attachment_size

        def full() -> bytes | None:
            if head.complete:
                return head.data
            if not inspectable:
                return None
            decoded = part.content(full=True)
            return decoded.data

        try:
            self._judge(
                part.names, where, part.content_type, head.data[:HEAD_BYTES], head.tail, full, 0, st
            )
        except ArchiveBombError as exc:
            st.add("ATTACH_ARCHIVE_BOMB", str(exc))
            st.bombed = True

    def _judge(
        self,
        names: Sequence[str],
        where: str,
        declared: str | None,
        head: bytes,
        tail: bytes,
        full: Callable[[], bytes | None],
        depth: int,
        st: _Scan,
    ) -> None:
        opts = self.options
        infos = [normalize_name(n) for n in names]
        if any(i.bidi or i.invisible for i in infos):
            st.add("ATTACH_BIDI_NAME", f"{where}: direction override or invisible characters")
        blocked_ext = next((i for i in infos if opts.ext_blocked(i.extension)), None)
        if blocked_ext is not None:
            shown = (
                where if blocked_ext.name in where.casefold() else f"{where} ({blocked_ext.name})"
            )
            st.add(
                "ATTACH_BLOCKED_EXT", f"{shown}: file type .{blocked_ext.extension} is not accepted"
            )
            if len(blocked_ext.extensions) >= 2 and not opts.ext_blocked(
                blocked_ext.extensions[-2]
            ):
                st.add(
                    "ATTACH_DOUBLE_EXT",
                    f"{where}: .{blocked_ext.extension} hidden behind "
                    f".{blocked_ext.extensions[-2]}",
                )
        if declared and declared.lower() in opts._blocked_types:
            st.add("ATTACH_BLOCKED_TYPE", f"{where}: declared type {declared} is not accepted")
        ftype = sniff(head, tail)
        kind = ftype.kind
        if kind is Kind.OLE:
            data = full()
            if data is None:
                st.add(
                    "ATTACH_ARCHIVE_UNREADABLE", f"{where}: document not opened (too big to read)"
                )
            else:
                info = ole_info(data, st.budget, where)
                if info.problem:
                    st.add("ATTACH_MALFORMED", f"{where}: {info.problem}")
                if info.macros:
                    st.add("ATTACH_MACRO", f"{where}: document contains macros ({info.macros[0]})")
                if info.encrypted:
                    st.add(
                        "ATTACH_ENCRYPTED_ARCHIVE", f"{where}: password-protected Office document"
                    )
                if info.msi:
                    kind = Kind.MSI
                if info.package is not None:
                    self._judge_member(info.package, where, depth, st)
        # Disk images are listed too: an ISO is how executables skip Mark-of-the-Web.
        if (kind in ARCHIVE_KINDS or kind is Kind.ISO) and (opts.scan_archives or kind is Kind.ZIP):
            kind = self._judge_archive(kind, where, full, depth, st)
        self._judge_kind(FileType(kind), infos, where, head, blocked_ext is not None, st)

    def _judge_kind(
        self,
        ftype: FileType,
        infos: list[NameInfo],
        where: str,
        head: bytes,
        ext_flagged: bool,
        st: _Scan,
    ) -> None:
        opts = self.options
        if ftype.is_executable or ftype.is_disk_image:
            honest = _HONEST_EXT.get(ftype.kind, frozenset())
            if ftype.kind is Kind.SCRIPT and not any(i.extension for i in infos):
                # A "#!" script without an extension (a Unix admin's "rotate") runs nowhere
                # by a double-click; it is a disguise only when its name claims another type.
                return
            if not ext_flagged and not any(i.extension in honest for i in infos):
                claimed = next((f".{i.extension}" for i in infos if i.extension), "no extension")
                st.add(
                    "ATTACH_DISGUISED_EXEC",
                    f"{where}: {ftype.kind.value} disguised as {claimed}",
                )
            return
        real = ftype.mime if ftype.kind is not Kind.UNKNOWN else None
        if real is None and self._puremagic and head:
            real = puremagic_mime(head)
        if real and real in opts._blocked_types:
            st.add("ATTACH_BLOCKED_TYPE", f"{where}: content is {real}, which is not accepted")

    def _judge_archive(
        self, kind: Kind, where: str, full: Callable[[], bytes | None], depth: int, st: _Scan
    ) -> Kind:
        """Open an archive and judge its members; returns the kind (JAR when it is one)."""
        opts = self.options
        if depth >= opts.max_archive_depth:
            st.add(
                "ATTACH_ARCHIVE_TOO_DEEP",
                f"{where}: archives nested deeper than {opts.max_archive_depth}",
            )
            return kind
        if st.bombed:
            return kind
        data = full()
        if data is None:
            st.add(
                "ATTACH_ARCHIVE_UNREADABLE", f"{where}: {kind.value} not opened (too big to read)"
            )
            return kind
        try:
            listing = open_archive(kind, data, where, st.budget, _want_full)
        except ArchiveBombError as exc:
            st.add("ATTACH_ARCHIVE_BOMB", str(exc))
            st.bombed = True
            return kind
        if not opts.scan_archives and listing.container not in ("ooxml", "odf"):
            # Zip was opened only to recognise Office and Java files; members are not judged.
            return Kind.JAR if listing.container == "jar" else kind
        if listing.container in ("ooxml", "odf"):
            if listing.macros:
                st.add("ATTACH_MACRO", f"{where}: document contains macros ({listing.macros[0]})")
        elif listing.encrypted:
            st.add("ATTACH_ENCRYPTED_ARCHIVE", f"{where}: encrypted {kind.value}")
        elif listing.problem:
            st.add("ATTACH_ARCHIVE_UNREADABLE", f"{where}: {listing.problem}")
        try:
            for member in listing.members:
                self._judge_member(member, where, depth, st)
        except ArchiveBombError as exc:
            st.add("ATTACH_ARCHIVE_BOMB", str(exc))
            st.bombed = True
        return Kind.JAR if listing.container == "jar" else kind

    def _judge_member(self, member: Member, outer: str, depth: int, st: _Scan) -> None:
        where = f"{outer} > {display(member.name)}"
        data = member.data
        if member.unreadable:
            st.add("ATTACH_ARCHIVE_UNREADABLE", f"{where}: unreadable ({member.unreadable})")

        def full() -> bytes | None:
            return data if member.complete else None

        try:
            self._judge(
                (member.name,),
                where,
                None,
                data[:HEAD_BYTES],
                data[-TAIL_BYTES:] if member.complete else b"",
                full,
                depth + 1,
                st,
            )
        except ArchiveBombError as exc:
            st.add("ATTACH_ARCHIVE_BOMB", str(exc))
            st.bombed = True

    def _result(self, findings: list[Finding]) -> Result:
        if not findings:
            return Result()
        by_symbol: dict[str, list[str]] = {}
        for f in findings:
            details = by_symbol.setdefault(f.symbol, [])
            if f.detail not in details:
                details.append(f.detail)
        symbols = tuple(Symbol(name, detail=_join(details)) for name, details in by_symbol.items())
        force: Action | None = None
        reason = ""
        for f in findings:
            action = self.options.consequence(SYMBOLS[f.symbol][1])
            if action is not None and (force is None or action.rank > force.rank):
                force, reason = action, f.reason
        return Result(symbols=symbols, force=force, reason=reason)


def _join(details: list[str]) -> str:
    out = "; ".join(details)
    if len(out) <= _DETAIL_LIMIT:
        return out
    return out[: _DETAIL_LIMIT - 20] + f"... ({len(details)} findings)"


def _want_full(name: str, head: bytes) -> bool:
    """Read an archive member whole only when its content is itself a container."""
    kind = sniff(head).kind
    return kind in ARCHIVE_KINDS or kind is Kind.OLE


def _needs_thread(part: MimePart) -> bool:
    """Whole-content work on a big part, and every archive, runs off the event loop.

    Any archive may hold a RAR, whose members a child process extracts (a
    blocking read of up to ``scan_time_limit``), so archives never run inline.
    """
    kind = sniff(part.content(full=False).data[:HEAD_BYTES]).kind
    if kind in ARCHIVE_KINDS:
        return True
    return part.encoded_size > _INLINE_LIMIT and kind is Kind.OLE


def _worth_inspecting(part: MimePart) -> bool:
    """Unnamed inline text is displayed, never run; everything else is looked at."""
    return part.is_attachment or not part.content_type.startswith("text/")


def _cheap_findings(part: MimePart) -> list[Finding]:
    """Problems visible without decoding: structural defects, unknown transfer encodings."""
    out = [
        Finding("ATTACH_MALFORMED", f"{display(part.label)}: {_defect_text(d)}")
        for d in part.defects
    ]
    if part.cte not in ("7bit", "8bit", "binary", "base64", "quoted-printable"):
        out.append(
            Finding(
                "ATTACH_MALFORMED",
                f"{display(part.label)}: unknown transfer encoding {display(part.cte, 40)}",
            )
        )
    return out


_DEFECT_TEXT = {
    "StartBoundaryNotFoundDefect": "multipart boundary never found",
    "CloseBoundaryNotFoundDefect": "multipart not closed (truncated)",
    "NoBoundaryInMultipartDefect": "multipart without a boundary",
    "MultipartInvariantViolationDefect": "multipart without parts",
    "FirstHeaderLineIsContinuationDefect": "header starts with a continuation line",
    "MisplacedEnvelopeHeaderDefect": "envelope header inside the headers",
    "MissingHeaderBodySeparatorDefect": "no blank line between header and body",
}


def _defect_text(defect: str) -> str:
    return _DEFECT_TEXT.get(defect, defect)


def _exact_size(part: MimePart) -> int:
    """Decoded size; base64 is counted without decoding (4 characters carry 3 bytes)."""
    if part.cte != "base64":
        return part.encoded_size
    payload = part.message.get_payload()
    if not isinstance(payload, str):
        return part.estimated_size()
    spaces = sum(payload.count(c) for c in " \t\r\n")
    chars = len(payload) - spaces - payload.count("=")
    return chars * 3 // 4
