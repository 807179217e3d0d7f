"""Derived message content, computed once per message and shared by policies.

Every function here takes a :class:`~gateway.api.Context` and is meant for
``ctx.memo(fn)``: the message is decoded and its HTML parsed once, whichever
policy asks first. Everything is bounded, because every message is hostile:
decoded text per part and in total, the number of parts visited, links and
URLs kept.

- :func:`text_parts`: decoded ``text/plain`` and ``text/html`` (rendered to
  text with selectolax), attachments skipped.
- :func:`body_text`: the text a reader sees, one string (an HTML part that
  merely repeats its ``text/plain`` alternative is left out).
- :func:`html_links`: ``href``/``src``/``action`` targets with their link text.
- :func:`urls`: every URL from text and HTML, normalized (lower-case host,
  IDNA, safe percent-decoding, numeric IP forms, common redirectors unwrapped).
- :func:`registrable_domain`: the public-suffix + 1 of a host name.

The public suffix list is tldextract's bundled snapshot: it is created with
``suffix_list_urls=()`` and no cache directory, so it never fetches or writes
anything at run time. An outdated snapshot only misjudges suffixes added since
the package was released, which is harmless for scoring.
"""

from __future__ import annotations

import binascii
import codecs
import enum
import functools
import ipaddress
import quopri
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage, Message
from typing import Protocol, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import charset_normalizer
import idna
import tldextract
from selectolax.lexbor import LexborHTMLParser

_T = TypeVar("_T")


class Context(Protocol):
    """What these functions need of :class:`gateway.api.Context` (a Protocol, so this
    module does not import the API module that re-exports it)."""

    @property
    def message(self) -> EmailMessage: ...

    def memo(self, fn: Callable[[Context], _T]) -> _T: ...


__all__ = [
    "URL",
    "HTMLLink",
    "MIMEStructure",
    "TextPart",
    "URLSource",
    "body_text",
    "html_links",
    "mime_structure",
    "normalize_url",
    "registrable_domain",
    "text_parts",
    "urls",
]

# Bounds: a hostile message must cost little more than a normal one.
MAX_PARTS = 64  # MIME parts visited
MAX_ENCODED_PART = 2 * 1024 * 1024  # encoded characters of one part considered
MAX_PART_TEXT = 256 * 1024  # decoded bytes of one text part
MAX_TOTAL_TEXT = 1024 * 1024  # decoded bytes over all text parts
MAX_LINKS = 500  # HTML links kept
MAX_URLS = 200  # URLs kept
MAX_URL_CANDIDATES = 2000  # bare-URL matches in text looked at (repeats included)
MAX_URL_LENGTH = 2048  # longer URLs are cut before parsing
MAX_REDIRECT_DEPTH = 3  # nested redirectors unwrapped
GUESS_SAMPLE = 16 * 1024  # bytes of an unlabelled 8-bit part its charset is guessed from
MAX_GUESSES = 4  # parts a message whose charset is guessed (up to ~3 ms each); then UTF-8


@dataclass(frozen=True, slots=True)
class TextPart:
    """One decoded text part. ``text`` is rendered text for HTML parts."""

    text: str
    is_html: bool
    content_type: str
    charset: str
    truncated: bool = False  # decoded size was capped
    alternative: bool = False  # an HTML part with a text/plain sibling in multipart/alternative
    raw_html: str = ""  # the (capped) HTML source for HTML parts


@dataclass(frozen=True, slots=True)
class HTMLLink:
    """A link target in HTML with its visible text (``tag`` is a, area, img, form ...)."""

    target: str
    text: str
    tag: str


class URLSource(enum.Enum):
    TEXT = "text"  # a bare URL in text
    HREF = "href"  # <a href>, <area href>
    SRC = "src"  # <img src> and other embedded resources
    FORM = "form"  # <form action>


@dataclass(frozen=True, slots=True)
class URL:
    """A normalized URL. ``host`` is lower-case ASCII (IDNA); IP literals are bare."""

    url: str
    scheme: str
    host: str
    port: int | None
    path: str  # path plus ?query, percent-decoded where safe
    source: URLSource
    text: str = ""  # link text for HTML links
    redirector: str = ""  # host of the redirector this URL was unwrapped from
    obfuscated_ip: bool = False  # host was a numeric IP in decimal/hex/octal form
    userinfo: bool = False  # had user@ before the host (http://bank.com@evil.example/)
    is_ip: bool = False  # the host is an IP literal (v4 or v6)

    @property
    def domain(self) -> str:
        """Registrable domain of the host ('' for IP literals)."""
        return "" if self.is_ip else registrable_domain(self.host)


# -- text parts ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MIMEStructure:
    """The shape of a message: how many parts, which are attachments, what is broken."""

    parts: int  # MIME entities visited (bounded by MAX_PARTS)
    attachments: tuple[str, ...]  # content types of parts that are attachments
    defects: frozenset[str]  # email.errors defect class names found in the structure
    truncated: bool  # more parts than MAX_PARTS


@dataclass(frozen=True, slots=True)
class _Parsed:
    parts: tuple[TextPart, ...]
    links: tuple[HTMLLink, ...]
    structure: MIMEStructure


def text_parts(ctx: Context) -> tuple[TextPart, ...]:
    """Decoded text/plain and text/html parts (HTML rendered to text), bounded."""
    return ctx.memo(_parse).parts


def html_links(ctx: Context) -> tuple[HTMLLink, ...]:
    """Link targets of every HTML part with their link text, bounded."""
    return ctx.memo(_parse).links


def mime_structure(ctx: Context) -> MIMEStructure:
    """Part count, attachments and structural defects, from the same single walk."""
    return ctx.memo(_parse).structure


def body_text(ctx: Context) -> str:
    """The text a reader sees: every text part, minus HTML that repeats its plain alternative."""
    return ctx.memo(_body_text)


def _body_text(ctx: Context) -> str:
    parts = text_parts(ctx)
    return "\n".join(p.text for p in parts if not p.alternative)


@dataclass(frozen=True, slots=True)
class _Head:
    """What this module needs of a part's header, read from the raw fields.

    The stdlib's structured header parsing (policy=default) costs far more than
    everything else here; Content-Type and Content-Disposition are simple
    enough to read directly (RFC 2045 §5.1, RFC 2183 §2).
    """

    ctype: str
    params: dict[str, str]
    disposition: str
    filename: bool
    cte: str


_CTYPE = re.compile(r"\s*([!#-'*+.0-9A-Z^-~-]+)\s*/\s*([!#-'*+.0-9A-Z^-~-]+)")
_PARAM = re.compile(r';\s*([A-Za-z0-9!#$%&\'*+.^_`|~-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')
_FILENAME = re.compile(r"(?i);\s*(?:file)?name\*?(?:\*\d+\*?)?\s*=")


def _head(part: Message, default: str = "text/plain") -> _Head:
    fields: dict[str, str] = {}
    for name, value in part.raw_items():
        fields.setdefault(name.lower(), str(value))
    raw_ct = fields.get("content-type", "")
    m = _CTYPE.match(raw_ct)
    ctype = f"{m.group(1)}/{m.group(2)}".lower() if m else default
    params = {k.lower(): v.strip('"') for k, v in _PARAM.findall(raw_ct[m.end() if m else 0 :])}
    raw_cd = fields.get("content-disposition", "")
    disposition = raw_cd.split(";", 1)[0].strip().lower()
    filename = bool(_FILENAME.search(raw_cd) or _FILENAME.search(raw_ct))
    cte = fields.get("content-transfer-encoding", "").strip().lower()
    return _Head(ctype, params, disposition, filename, cte)


def _is_attachment(head: _Head) -> bool:
    return head.disposition == "attachment" or (
        head.disposition != "inline" and head.filename and not head.ctype.startswith("multipart/")
    )


def _parse(ctx: Context) -> _Parsed:
    leaves: list[tuple[Message, _Head, int]] = []  # (part, head, id of its alternative or 0)
    alt_parent: dict[int, int] = {}
    attachments: list[str] = []
    defects: set[str] = set()
    visited = 0
    stack: list[tuple[Message, str]] = [(ctx.message, "text/plain")]
    while stack and visited < MAX_PARTS:
        part, default = stack.pop()
        visited += 1
        defects.update(type(d).__name__ for d in getattr(part, "defects", ()))
        head = _head(part, default)
        payload = getattr(part, "_payload", None)  # get_payload() would re-decode 8-bit text
        if isinstance(payload, list):
            alt = id(part) if head.ctype == "multipart/alternative" else 0
            child_default = "message/rfc822" if head.ctype == "multipart/digest" else "text/plain"
            children = [c for c in payload if isinstance(c, Message)]
            for child in children:
                alt_parent[id(child)] = alt
            stack.extend((c, child_default) for c in reversed(children))
        elif _is_attachment(head):
            attachments.append(head.ctype)
        elif head.ctype in ("text/plain", "text/html"):
            leaves.append((part, head, alt_parent.get(id(part), 0)))
    with_plain = {alt for _, head, alt in leaves if alt and head.ctype == "text/plain"}
    parts: list[TextPart] = []
    links: list[HTMLLink] = []
    budget = MAX_TOTAL_TEXT
    guesses = 0
    for part, head, alt in leaves:
        if budget <= 0:
            break
        data, truncated = _decoded_bytes(part, head.cte, min(MAX_PART_TEXT, budget))
        budget -= len(data)
        charset = _charset(head.params.get("charset", ""))
        if charset == "ascii":  # none declared, or US-ASCII
            if guesses < MAX_GUESSES and not _is_utf8(data):
                guesses += 1
                charset = _guess_charset(data[:GUESS_SAMPLE])
            else:
                charset = "utf-8"  # mislabelled 8-bit text is common; UTF-8 is a superset
        text = data.decode(charset, errors="replace")
        if head.ctype == "text/html":
            rendered, found = _render_html(text, MAX_LINKS - len(links))
            links.extend(found)
            alternative = alt in with_plain
            parts.append(
                TextPart(rendered, True, "text/html", charset, truncated, alternative, text)
            )
        else:
            parts.append(TextPart(_squeeze(text), False, "text/plain", charset, truncated))
    structure = MIMEStructure(visited, tuple(attachments), frozenset(defects), bool(stack))
    return _Parsed(tuple(parts), tuple(links), structure)


def _charset(name: str) -> str:
    """The codec a part declares: ``ascii`` for none or US-ASCII, UTF-8 for an unknown one.

    Undeclared (or US-ASCII) 8-bit text that is not UTF-8 is common in old and
    foreign mail (Shift_JIS, GB2312, KOI8-R, windows-1252 with no label).
    Decoded as UTF-8 it turns to replacement characters that neither the
    language check nor the classifier can read, so :func:`_parse` guesses its
    charset from a bounded sample (at most ``MAX_GUESSES`` parts a message).
    """
    try:
        return codecs.lookup(name.strip().strip('"') or "us-ascii").name
    except LookupError:
        return "utf-8"


def _is_utf8(data: bytes) -> bool:
    """Whether the sample is ASCII or UTF-8 (a character cut by the sample's end allowed)."""
    if data.isascii():
        return True
    try:
        data[:GUESS_SAMPLE].decode("utf-8")
    except UnicodeDecodeError as e:
        # A multi-byte sequence cut by the sample's end is still UTF-8.
        return e.start >= min(len(data), GUESS_SAMPLE) - 3 and e.reason == "unexpected end of data"
    return True


def _guess_charset(sample: bytes) -> str:
    best = charset_normalizer.from_bytes(sample).best()
    if best is None:
        return "windows-1252"  # the Latin-1 superset old mail uses; 5 unassigned bytes replaced
    try:
        return codecs.lookup(best.encoding).name
    except LookupError:
        return "windows-1252"


_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_NOT_BASE64 = bytes(b for b in range(256) if b not in _BASE64_ALPHABET)


def _decoded_bytes(part: Message, cte: str, limit: int) -> tuple[bytes, bool]:
    """The part's body decoded from its transfer encoding, at most ``limit`` bytes."""
    payload = getattr(part, "_payload", None)
    if not isinstance(payload, str):
        return b"", False
    cut = len(payload) > MAX_ENCODED_PART
    if cut:  # decode only a prefix of an oversized part
        payload = payload[:MAX_ENCODED_PART]
    if cte == "base64":
        # Characters outside the base64 alphabet are ignored (RFC 2045 §6.8), stray
        # 8-bit bytes included: one junk byte must not hide the whole body from rules.
        compact = payload.encode("ascii", "ignore").translate(None, _NOT_BASE64)
        compact = compact[: len(compact) - len(compact) % 4]
        try:
            data = binascii.a2b_base64(compact)
        except (binascii.Error, ValueError):  # padding in the middle and similar damage
            data = b""
    else:
        # The parser keeps undecodable 8-bit bytes as surrogate escapes.
        raw = payload.encode("utf-8", "surrogateescape")
        data = quopri.decodestring(raw) if cte == "quoted-printable" else raw
    if len(data) > limit:
        return data[:limit], True
    return data, cut


# Runs of white space become one space. A lone space already is one: the pattern
# skips it (a regex replacement per word was most of _squeeze's time).
_WS = re.compile(r"[\t\r\f\v\xa0][ \t\r\f\v\xa0]*| [ \t\r\f\v\xa0]+")
_BLANK_LINES = re.compile(r"\n\s*\n+")
# Block-level tags end a line when rendered; without this, "<p>a</p><p>b</p>" reads "ab".
_BLOCK_TAG = re.compile(
    r"<(?=/?(?:br|p|div|tr|td|th|li|ul|ol|h[1-6]|table|blockquote|hr|center|pre)\b)", re.I
)


def _squeeze(text: str) -> str:
    text = text.replace("\r\n", "\n")
    if "  " in text or any(c in text for c in "\t\r\f\v\xa0"):  # else there is no run
        text = _WS.sub(" ", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]{0,15})\b[^>]{0,2000}?(/?)>")
_VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param"}
    | {"source", "track", "wbr"}
)
_INVISIBLE = re.compile(r"(?i)<(script|style|head|noscript|template)\b")
_ANY_TAG = re.compile(r"<[^>]{0,2000}>")
_LINK = re.compile(
    r"""(?i)<(a|area|img|iframe|form)\b[^>]{0,2000}?\b(href|src|action)\s*=\s*"""
    r"""(?:"([^"]*)"|'([^']*)'|([^\s>]+))"""
)
MAX_HTML_DEPTH = 1000  # deeper nesting makes HTML tree building quadratic


def _too_deep(html: str) -> bool:
    """True when elements nest deeper than MAX_HTML_DEPTH (only checked for big documents)."""
    if html.count("<") <= MAX_HTML_DEPTH:
        return False
    depth = 0
    for m in _TAG.finditer(html):
        name = m.group(2).lower()
        if m.group(3) or name in _VOID:
            continue
        depth = max(depth - 1, 0) if m.group(1) else depth + 1
        if depth > MAX_HTML_DEPTH:
            return True
    return False


def _render_html_flat(html: str, max_links: int) -> tuple[str, list[HTMLLink]]:
    """A linear-time fallback for pathological HTML: tags stripped by regex."""
    links: list[HTMLLink] = []
    for m in _LINK.finditer(html):
        if len(links) >= max_links:
            break
        target = m.group(3) or m.group(4) or m.group(5) or ""
        if target:
            links.append(HTMLLink(target.strip(), "", m.group(1).lower()))
    text = _ANY_TAG.sub("", _BLOCK_TAG.sub("\n<", _drop_invisible(html)))
    return _squeeze(text), links


def _drop_invisible(html: str) -> str:
    """Cut script/style/head... blocks in one forward pass (an unclosed one ends the text)."""
    lower = html.lower()
    out: list[str] = []
    pos = 0
    while (m := _INVISIBLE.search(html, pos)) is not None:
        out.append(html[pos : m.start()])
        end = lower.find("</" + m.group(1).lower(), m.end())
        if end < 0:
            return " ".join(out)
        close = lower.find(">", end)
        pos = len(html) if close < 0 else close + 1
    out.append(html[pos:])
    return " ".join(out)


def _render_html(html: str, max_links: int) -> tuple[str, list[HTMLLink]]:
    """Visible text of an HTML document and its links (script/style/head dropped)."""
    if _too_deep(html):
        return _render_html_flat(html, max_links)
    tree = LexborHTMLParser(_BLOCK_TAG.sub("\n<", html))
    links: list[HTMLLink] = []
    if max_links > 0:
        for node in tree.css("a[href], area[href], img[src], form[action], iframe[src]"):
            if len(links) >= max_links:
                break
            tag = node.tag or ""
            attr = "action" if tag == "form" else "src" if tag in ("img", "iframe") else "href"
            target = node.attributes.get(attr) or ""
            if not target:
                continue
            text = "" if tag in ("img", "iframe", "form") else _squeeze(node.text(deep=True))
            links.append(HTMLLink(target.strip(), text[:300], tag))
    tree.strip_tags(["script", "style", "head", "noscript", "template"])
    root = tree.body or tree.root
    text = root.text(deep=True, separator="", strip=False) if root is not None else ""
    return _squeeze(text), links


# -- URLs ---------------------------------------------------------------------

_BARE_URL = re.compile(
    r"""(?:\b(?:https?|ftp)://|\bwww\d{0,3}\.)[^\s<>"'`{}|\\^\[\]]{1,2048}""", re.I
)
_TRAILING = ".,;:!?'\")]}>*"
_SCHEMES = frozenset({"http", "https", "ftp"})
_UNRESERVED = re.compile(r"%([0-9A-Fa-f]{2})")
_NUMERIC_HOST = re.compile(r"^(?:0x[0-9a-f]+|[0-9]+)(?:\.(?:0x[0-9a-f]+|[0-9]+)){0,3}$")

# Redirectors whose target is a query parameter: (host or suffix, path, parameter).
# A shortener (t.co, bit.ly) hides its target behind a lookup and is not unwrapped;
# the urls policy reports those.
_REDIRECTORS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("google.", "/url", ("q", "url")),
    ("l.facebook.com", "/l.php", ("u",)),
    ("lm.facebook.com", "/l.php", ("u",)),
    ("www.youtube.com", "/redirect", ("q",)),
    ("youtube.com", "/redirect", ("q",)),
    ("out.reddit.com", "/", ("url",)),
    ("href.li", "/", ("",)),
    ("safelinks.protection.outlook.com", "/", ("url",)),
    ("urldefense.proofpoint.com", "/v2/url", ("u",)),
)


def urls(ctx: Context) -> tuple[URL, ...]:
    """Every URL of the message, normalized and de-duplicated, at most MAX_URLS."""
    return ctx.memo(_urls)


def _urls(ctx: Context) -> tuple[URL, ...]:
    seen: set[tuple[str, URLSource, str]] = set()
    seen_raw: set[str] = set()
    out: list[URL] = []

    def add(u: URL | None) -> bool:
        if u is None:
            return True
        key = (u.url, u.source, u.text)
        if key not in seen:
            seen.add(key)
            out.append(u)
        return len(out) < MAX_URLS

    for link in html_links(ctx):
        source = {"img": URLSource.SRC, "iframe": URLSource.SRC, "form": URLSource.FORM}.get(
            link.tag, URLSource.HREF
        )
        if not add(normalize_url(link.target, source, link.text)):
            return tuple(out)
    candidates = 0
    for part in text_parts(ctx):
        if part.is_html:
            continue
        for m in _BARE_URL.finditer(part.text):
            candidates += 1
            raw = m.group(0).rstrip(_TRAILING)
            if candidates > MAX_URL_CANDIDATES:
                return tuple(out)
            if raw in seen_raw:
                continue
            seen_raw.add(raw)
            if not add(normalize_url(raw, URLSource.TEXT)):
                return tuple(out)
    return tuple(out)


def normalize_url(raw: str, source: URLSource = URLSource.TEXT, text: str = "") -> URL | None:
    """Normalize one URL; None for other schemes (mailto:, cid:, data:) and garbage."""
    return _normalize(raw.strip()[:MAX_URL_LENGTH], source, text, 0, "")


def _normalize(raw: str, source: URLSource, text: str, depth: int, via: str) -> URL | None:
    raw = raw.replace("\\", "/")
    if raw[:4].lower() == "www." or re.match(r"(?i)www\d{1,3}\.", raw):
        raw = "http://" + raw
    elif raw.startswith("//"):
        raw = "http:" + raw
    try:
        parts = urlsplit(raw)
        port = parts.port
        hostname = parts.hostname
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES or not hostname:
        return None
    host, obfuscated = _normalize_host(hostname)
    if not host:
        return None
    path = _UNRESERVED.sub(_unquote_unreserved, parts.path or "/")
    if parts.query:
        path += "?" + parts.query
    if depth < MAX_REDIRECT_DEPTH:
        target = _redirect_target(host, parts.path, parts.query)
        if target:
            inner = _normalize(target, source, text, depth + 1, via or host)
            if inner is not None:
                return inner
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return URL(
        url=f"{scheme}://{netloc}{path}",
        scheme=scheme,
        host=host,
        port=port,
        path=path,
        source=source,
        text=text,
        redirector=via,
        obfuscated_ip=obfuscated,
        userinfo="@" in parts.netloc,
        is_ip=obfuscated or _ip(host) is not None,
    )


def _unquote_unreserved(m: re.Match[str]) -> str:
    """Percent-decode only unreserved characters (RFC 3986 §2.3): the URL means the same."""
    ch = chr(int(m.group(1), 16))
    return ch if ch.isascii() and (ch.isalnum() or ch in "-._~") else m.group(0).upper()


def _normalize_host(hostname: str) -> tuple[str, bool]:
    host = unquote(hostname).strip().rstrip(".").lower()
    if not host or len(host) > 253:
        return "", False
    if _ip(host) is not None:
        return str(ipaddress.ip_address(host)), False
    if _NUMERIC_HOST.match(host):
        try:  # inet_aton accepts 3232235777, 0xc0.0xa8.1.1, 0300.0250.1.1 (obfuscation)
            return socket.inet_ntoa(socket.inet_aton(host)), True
        except OSError:
            return "", False
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                return "", False
    return host, False


def _redirect_target(host: str, path: str, query: str) -> str:
    if not query:
        return ""
    for suffix, rpath, params in _REDIRECTORS:
        if suffix.endswith("."):
            match = host.startswith(suffix) or ("." + suffix) in host
            match = match and "google." in host
        else:
            match = host == suffix or host.endswith("." + suffix)
        if not match or (rpath != "/" and path != rpath):
            continue
        if params == ("",):
            return unquote(query)
        for key, value in parse_qsl(query, keep_blank_values=False):
            if key in params and re.match(r"(?i)(?:https?|ftp)://|www\.", value):
                return value
    return ""


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if ":" not in host and not host[:1].isdigit():
        return None  # neither IPv6 nor dotted IPv4: skip the costly ValueError
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


# -- domains ------------------------------------------------------------------

_EXTRACT = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)


@functools.lru_cache(maxsize=8192)
def registrable_domain(host: str) -> str:
    """``a.b.example.co.uk`` -> ``example.co.uk``; the host itself when no suffix is known.

    IP literals and single labels come back unchanged. Uses the bundled public
    suffix list snapshot only (ICANN section; no network, no cache files).
    """
    host = host.strip().rstrip(".").lower()
    if not host or _ip(host) is not None:
        return host
    ext = _EXTRACT(host)
    if not ext.suffix or not ext.domain:
        return host
    return f"{ext.domain}.{ext.suffix}"
