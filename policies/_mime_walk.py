"""Walk the MIME tree once, bounded, and decode only what a decision needs.

The tree is the one the engine already parsed (``ctx.message``); the walk is
iterative (no recursion limit to hit) and stops at ``max_depth`` and
``max_parts``. Decoding is lazy: the first 64 KiB tell the real type of a
PDF or an image, so a 2 MB PDF costs a small decode, and only archives and
Office containers are decoded whole (once, cached on the part).
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field
from email.message import EmailMessage, Message

__all__ = ["Decoded", "MimePart", "MimeWalk", "decode_part", "walk_message"]

# RFC 2045 §6.1: the transfer encodings; anything else is an unknown encoding.
_KNOWN_CTE = frozenset({"7bit", "8bit", "binary", "base64", "quoted-printable"})
_IDENTITY_CTE = frozenset({"7bit", "8bit", "binary"})
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_WS = b" \t\r\n"
_NOT_B64 = bytes(c for c in range(256) if c not in _B64_ALPHABET)

# Parser defects that mean the structure was damaged or truncated.
_STRUCTURAL_DEFECTS = frozenset(
    {
        "StartBoundaryNotFoundDefect",
        "CloseBoundaryNotFoundDefect",
        "NoBoundaryInMultipartDefect",
        "MultipartInvariantViolationDefect",
        "FirstHeaderLineIsContinuationDefect",
        "MisplacedEnvelopeHeaderDefect",
        "MissingHeaderBodySeparatorDefect",
        "InvalidMultipartContentTransferEncodingDefect",
    }
)


@dataclass(slots=True)
class Decoded:
    """Decoded content of a part: a prefix or the whole, with encoding problems found."""

    data: bytes
    complete: bool
    tail: bytes = b""
    problems: tuple[str, ...] = ()


@dataclass(slots=True, eq=False)
class MimePart:
    """One leaf part: what it declares about itself, and its content on demand."""

    path: str  # "1.2.1": position in the tree, for details when a part has no name
    content_type: str
    names: tuple[str, ...]  # raw, decoded (RFC 2231 / RFC 2047) file names, filename first
    is_attachment: bool  # named or Content-Disposition: attachment
    cte: str
    encoded_size: int
    defects: tuple[str, ...]
    message: Message = field(repr=False)
    _cache: dict[bool, Decoded] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return self.names[0] if self.names else f"part {self.path} ({self.content_type})"

    def estimated_size(self) -> int:
        """Decoded size, upper bound without decoding (base64: 3 bytes per 4 characters)."""
        if self.cte == "base64":
            return self.encoded_size * 3 // 4
        return self.encoded_size

    def content(self, *, full: bool) -> Decoded:
        """The decoded prefix (``full=False``) or the whole content, decoded at most once each."""
        if full in self._cache:
            return self._cache[full]
        if not full and True in self._cache:
            return self._cache[True]
        decoded = decode_part(self, full=full)
        self._cache[full] = decoded
        return decoded


@dataclass(frozen=True, slots=True)
class MimeWalk:
    parts: tuple[MimePart, ...]
    limit: str  # "" or what stopped the walk ("MIME depth over 20")
    defects: tuple[tuple[str, str], ...]  # (where, defect name) on containers
    unparsed: bool  # the engine could not parse the message at all


def walk_message(msg: EmailMessage, raw: bytes, *, max_depth: int, max_parts: int) -> MimeWalk:
    """Every leaf part in document order, including those inside message/rfc822."""
    parts: list[MimePart] = []
    defects: list[tuple[str, str]] = []
    limit = ""
    unparsed = not msg.keys() and bool(raw.strip())
    stack: list[tuple[Message, str, int]] = [(msg, "1", 0)]
    seen = 0
    while stack:
        node, path, depth = stack.pop()
        seen += 1
        if seen > max_parts:
            limit = f"more than {max_parts} MIME parts"
            break
        if node.is_multipart():
            if depth >= max_depth:
                limit = f"MIME nesting deeper than {max_depth}"
                continue
            for d in node.defects:
                if type(d).__name__ in _STRUCTURAL_DEFECTS:
                    defects.append((path, type(d).__name__))
            cte = str(node.get("content-transfer-encoding", "7bit")).strip().lower()
            if cte not in _IDENTITY_CTE:  # RFC 2045 §6.4, RFC 2046 §5.2.1
                defects.append((path, f"transfer encoding {cte} on {node.get_content_type()}"))
            children = node.get_payload()
            if not isinstance(children, list):
                continue
            for i in range(len(children) - 1, -1, -1):
                child = children[i]
                if isinstance(child, Message):
                    stack.append((child, f"{path}.{i + 1}", depth + 1))
            continue
        parts.append(_leaf(node, path))
    return MimeWalk(tuple(parts), limit, tuple(defects), unparsed)


def _leaf(node: Message, path: str) -> MimePart:
    names: list[str] = []
    # email.policy.default decodes RFC 2231 continuations/charsets and RFC 2047 words.
    for source in ("filename", "name"):
        try:
            value: object = node.get_filename() if source == "filename" else node.get_param("name")
        except (ValueError, LookupError, TypeError, AttributeError):
            continue
        if isinstance(value, tuple):  # compat32-style RFC 2231 triple
            value = value[2]
        if isinstance(value, str) and value and value not in names:
            names.append(value)
    disposition = (node.get_content_disposition() or "").lower()
    cte = str(node.get("content-transfer-encoding", "7bit")).strip().lower() or "7bit"
    payload = node.get_payload()
    size = len(payload) if isinstance(payload, str | bytes) else 0
    return MimePart(
        path=path,
        content_type=node.get_content_type(),
        names=tuple(names),
        is_attachment=bool(names) or disposition == "attachment",
        cte=cte,
        encoded_size=size,
        defects=tuple(
            type(d).__name__ for d in node.defects if type(d).__name__ in _STRUCTURAL_DEFECTS
        ),
        message=node,
    )


def decode_part(part: MimePart, *, full: bool, head: int = 64 * 1024) -> Decoded:
    """Decode base64 ourselves (prefix or whole, strict, problems named); others via stdlib."""
    if part.cte == "base64":
        payload = part.message.get_payload()
        if not isinstance(payload, str):
            return Decoded(b"", True, problems=("part payload is not text",))
        return _decode_base64(payload, full=full, head=head)
    problems: tuple[str, ...] = ()
    if part.cte not in _KNOWN_CTE:
        problems = (f"unknown transfer encoding {part.cte}",)
    # The stdlib restores 8-bit bytes exactly (get_payload() without decode would
    # replace them) and decodes quoted-printable and the uuencode variants.
    data = part.message.get_payload(decode=True)
    if not isinstance(data, bytes):
        return Decoded(b"", True, problems=(*problems, "part payload is not text"))
    return Decoded(data, True, tail=data[-512:], problems=problems)


def _decode_base64(text: str, *, full: bool, head: int) -> Decoded:
    problems: list[str] = []
    if not text.isascii():
        problems.append("non-ASCII characters in base64")
        text = text.encode("ascii", "ignore").decode("ascii")
    # A prefix is enough for the type of a large part; take a little more text
    # than needed to cover line breaks, then cut at a 4-character boundary.
    complete = full or len(text) <= head * 2
    chunk = text if complete else text[: head * 4 // 3 + head // 8 + 8]
    data = _b64(chunk.encode("ascii"), problems, final=complete)
    tail = data[-512:]
    if not complete:
        tail = _b64(text[-800:].encode("ascii"), [], final=True, from_end=True)[-512:]
    return Decoded(data, complete, tail=tail, problems=tuple(dict.fromkeys(problems)))


def _b64(chunk: bytes, problems: list[str], *, final: bool, from_end: bool = False) -> bytes:
    if chunk.translate(None, _B64_ALPHABET + _WS):
        problems.append("invalid characters in base64")
    compact = chunk.translate(None, _NOT_B64)
    del chunk  # the caller's temporary: free it before decoding (peak memory)
    if from_end:
        compact = compact[len(compact) % 4 :]
    elif not final:
        compact = compact[: len(compact) - len(compact) % 4]
    trailing = 2 if compact.endswith(b"==") else 1 if compact.endswith(b"=") else 0
    inner_pad = compact.find(b"=", 0, len(compact) - trailing) >= 0
    if len(compact) % 4 == 0 and not inner_pad:
        try:  # well-formed: decode in place, without further copies
            return binascii.a2b_base64(compact)
        except binascii.Error:
            pass
    body = compact.rstrip(b"=")
    if inner_pad:
        problems.append("padding inside base64 data")
        body = body.replace(b"=", b"")
    if final and len(compact) % 4:
        problems.append("truncated base64 (length not a multiple of 4)")
    # RFC 4648 §3.5: decode what is there; a dangling single character carries no byte.
    usable = body[: len(body) - (1 if len(body) % 4 == 1 else 0)]
    padded = usable + b"=" * (-len(usable) % 4)
    try:
        return binascii.a2b_base64(padded)
    except binascii.Error:
        problems.append("undecodable base64")
        return b""
