"""Tokens of a message for the statistical classifier.

The tokenizer follows SpamBayes (Graham, Peters, Robinson): a message becomes
a *set* of short strings, each counted once per message. What is in it, and
what is deliberately left out, decides how well training on one site's mail
carries over to the next message:

- Body: lower-cased words of the decoded text parts (HTML rendered to text),
  3..12 characters kept whole; longer words become a "skip" token of their
  first character and length bucket; e-mail addresses in the text become
  their domain. Shouted (all-caps) words of plain text also as ``caps:`` tokens,
  a bucketed image count of each HTML part, and amounts of money by their
  number of digits (``money:4`` for "$4,500" and "$5,000" alike: each
  amount is a rare word of its own, its order of magnitude is what
  "what kind of message" shares across senders). Optional: word bigrams,
  HTML tag names.
- URLs: each host's registrable domain and full host name, "IP literal", scheme, and the
  alphanumeric pieces of the path (``remove``, ``cgi``, ``unsubscribe``).
- Headers, by an explicit list: Subject words, the From domain and display
  name words (and the shape of its local part), whether Reply-To is on
  another domain, a bucketed recipient count, the mail client's product name
  and its whole X-Mailer/User-Agent string,
  Content-Type/charset/transfer-encoding of every part, and the *presence* of
  a few generic headers (List-Id, In-Reply-To, References, Precedence ...).
- Left out on purpose: Received, Return-Path, Delivered-To, Message-ID
  domains, X-Spam-* and other filter headers, and the To/Cc addresses. They
  describe the path a message took to the collector that labelled it (on the
  2002 development corpus: the collectors' relays and fetchmail hops), which
  lets a classifier score well on that corpus and badly on the next site.

Every token is hashed to 8 bytes of BLAKE2b (16 hex characters) before it
goes to the state store: bounded key size, no message text at rest.
"""

from __future__ import annotations

import email.header
import email.utils
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message

from gateway.api import Context, registrable_domain, text_parts, urls

__all__ = ["TokenizerOptions", "hash_token", "message_tokens"]

MAX_TEXT = 200_000  # characters of body text tokenized; the rest adds little and costs time
MAX_HEADER = 2_000  # characters of one header value considered
MIN_WORD, MAX_WORD = 3, 12  # SpamBayes' word length window
MAX_FIELDS = 200  # header fields read per part
MAX_PARTS = 50  # MIME parts looked at

# Header fields whose mere presence is evidence and generalises across sites.
_PRESENCE = (
    "in-reply-to",
    "references",
    "list-id",
    "list-unsubscribe",
    "list-post",
    "organization",
    "user-agent",
    "x-mailer",
    "x-priority",
    "x-msmail-priority",
    "importance",
    "mime-version",
    "sender",
    "reply-to",
    "cc",
    "message-id",
    "date",
    "x-mimeole",
    "disposition-notification-to",
)
# Header fields whose (short) value is evidence.
_VALUE = ("precedence", "x-priority", "x-msmail-priority", "importance", "content-class")

_PUNCT = "\"'()[]{}<>.,;:`*-_=+|~/\\"
_EMAIL_IN_TEXT = re.compile(r"[\w.+-]+@([\w-]+(?:\.[\w-]+)+)")
_SUBJECT_WORD = re.compile(r"[\w$'\-]+|[!?]{2,}|\$")
_NAME_WORD = re.compile(r"[\w'\-]+")
_PRODUCT = re.compile(r"[A-Za-z][A-Za-z\-]{2,20}")
_DIGITS = re.compile(r"\d")
_URL_PIECE = re.compile(r"[a-z0-9]+")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_CHARSET = re.compile(r"""charset\s*=\s*["']?([^"';\s]+)""", re.I)
_FILENAME = re.compile(r"""(?:file)?name\*?\s*=\s*["']?([^"';\r\n]+)""", re.I)


@dataclass(frozen=True, slots=True)
class TokenizerOptions:
    bigrams: bool = False
    html_tags: bool = False
    max_tokens: int = 3_000  # distinct tokens kept per message (hostile input bound)


def hash_token(token: str) -> str:
    """The key stored for ``token``: 16 hex characters of BLAKE2b-64."""
    return hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def message_tokens(ctx: Context, options: TokenizerOptions) -> list[str]:
    """Distinct tokens of the message in ``ctx``, in first-seen order, at most ``max_tokens``.

    Tokens come in chunks (lists), each computed only while the limit is not reached;
    a chunk that cannot reach it is merged whole (``dict.update`` keeps first-seen
    order), which is what a token-by-token loop would do, several times faster.
    """
    seen: dict[str, None] = {}
    limit = options.max_tokens
    for chunk in _token_chunks(ctx, options):
        if len(seen) + len(chunk) < limit:
            seen.update(dict.fromkeys(chunk))
            continue
        for tok in chunk:
            if tok not in seen:
                seen[tok] = None
                if len(seen) >= limit:
                    return list(seen)
    return list(seen)


def _token_chunks(ctx: Context, options: TokenizerOptions) -> Iterator[list[str]]:
    yield list(_header_tokens(ctx.message))
    yield list(_url_tokens(ctx))
    yield from _body_tokens(ctx, options)


# -- headers ------------------------------------------------------------------


class _Fields:
    """Raw header fields by lower-case name, decoded on demand.

    Reading fields through ``policy=default`` builds a headerregistry object
    per access, which was most of the learning time; the raw values plus
    RFC 2047 decoding of the few fields that need it are several times faster.
    """

    __slots__ = ("fields",)

    def __init__(self, part: Message) -> None:
        self.fields: dict[str, list[str]] = {}
        for i, (name, value) in enumerate(part.raw_items()):
            if i >= MAX_FIELDS:
                break
            self.fields.setdefault(name.lower(), []).append(str(value))

    def __contains__(self, name: str) -> bool:
        return name in self.fields

    def raw(self, name: str) -> str:
        """The first field ``name``, unfolded (RFC 5322 §2.2.3), at most MAX_HEADER characters."""
        values = self.fields.get(name)
        return _FOLD.sub(" ", values[0][:MAX_HEADER]).strip() if values else ""

    def text(self, name: str) -> str:
        """Like :meth:`raw`, with RFC 2047 encoded-words decoded."""
        return _decode_words(self.raw(name))


def _decode_words(value: str) -> str:
    if "=?" not in value:
        return value
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except Exception:  # unknown charset, broken base64: keep the raw text
        return value


def _address(fields: _Fields, name: str) -> tuple[str, str, str] | None:
    """(display name, local part, domain) of the first address in field ``name``."""
    value = fields.raw(name)
    if not value:
        return None
    display, addr = email.utils.parseaddr(value)
    if not addr and not display:
        return None
    local, _, domain = addr.rpartition("@")
    return _decode_words(display), local, domain.lower().strip(".<> ")


def _header_tokens(msg: Message) -> Iterator[str]:
    fields = _Fields(msg)
    for name in _PRESENCE:
        yield f"hdr:{name}:{'yes' if name in fields else 'no'}"
    for name in _VALUE:
        if name in fields:
            yield f"hdr:{name}={fields.raw(name).lower()[:20]}"

    subject = fields.text("subject")
    if not subject:
        yield "subject:none"
    for word in _SUBJECT_WORD.findall(subject):
        yield f"subject:{word.lower()}"
    letters = [c for c in subject if c.isalpha()]
    if len(letters) >= 8 and sum(c.isupper() for c in letters) / len(letters) > 0.8:
        yield "subject:ALLCAPS"

    sender = _address(fields, "from")
    if sender is None:
        yield "from:none"
    else:
        display, local, domain = sender
        yield f"from:domain:{domain}"
        yield f"from:rdomain:{registrable_domain(domain) if domain else ''}"
        digits = len(_DIGITS.findall(local))
        yield f"from:local-digits:{min(digits, 5)}"
        if not display:
            yield "from:noname"
        for word in _NAME_WORD.findall(display.lower())[:8]:
            yield f"from:name:{word}"
        reply = _address(fields, "reply-to")
        if reply is not None:
            same = registrable_domain(reply[2]) == registrable_domain(domain)
            yield f"reply-to:{'same' if same else 'other'}-domain"

    count = fields.raw("to").count("@") + fields.raw("cc").count("@")
    yield f"rcpt:count:{_bucket(count, (0, 1, 2, 5, 10, 20))}"
    if "undisclosed" in fields.raw("to").lower():
        yield "rcpt:undisclosed"

    mailer = fields.raw("x-mailer") or fields.raw("user-agent")
    if mailer:
        products = _PRODUCT.findall(mailer)[:2]
        yield "mailer:" + " ".join(p.lower() for p in products)
        # The whole string (versions, build numbers): bulk tools and forged
        # Outlook strings have recognisable exact values.
        yield "mailer:full:" + mailer.lower()[:40]

    yield from _mime_tokens(msg, fields)


def _mime_tokens(msg: Message, top: _Fields) -> Iterator[str]:
    stack: list[Message] = [msg]
    seen = 0
    while stack and seen < MAX_PARTS:
        part = stack.pop()
        fields = top if seen == 0 else _Fields(part)
        seen += 1
        ctype_field = fields.raw("content-type")
        ctype = ctype_field.partition(";")[0].strip().lower()
        if "/" not in ctype:
            ctype = "text/plain"  # RFC 2045 §5.2 default
        yield f"ctype:{ctype[:40]}"
        charset = _CHARSET.search(ctype_field)
        if charset:
            yield f"charset:{charset.group(1).lower()[:20]}"
        cte = fields.raw("content-transfer-encoding").lower()[:20]
        if cte:
            yield f"cte:{cte}"
        filename = _FILENAME.search(fields.raw("content-disposition")) or _FILENAME.search(
            ctype_field
        )
        if filename:
            name = filename.group(1).strip()
            yield f"filename:ext:{name.rpartition('.')[2].lower()[:8] if '.' in name else ''}"
        payload = part.get_payload()
        if isinstance(payload, list):
            stack.extend(reversed([p for p in payload if isinstance(p, Message)]))


def _bucket(n: int, edges: tuple[int, ...]) -> str:
    for edge in edges:
        if n <= edge:
            return str(edge)
    return f">{edges[-1]}"


# -- URLs ---------------------------------------------------------------------


def _url_tokens(ctx: Context) -> Iterator[str]:
    found = ctx.memo(urls)
    yield f"url:count:{_bucket(len(found), (0, 1, 3, 10, 30))}"
    for u in found:
        if u.is_ip:
            yield "url:ip"
            continue
        yield f"url:{u.domain}"
        yield f"url:host:{u.host.lower()[:80]}"
        yield f"url:scheme:{u.scheme}"
        for piece in _URL_PIECE.findall(u.path.lower())[:20]:
            if MIN_WORD <= len(piece) <= MAX_WORD:
                yield f"url:path:{piece}"
        if u.port is not None:
            yield "url:port"
        if u.redirector:
            yield f"url:via:{registrable_domain(u.redirector)}"


# -- body ---------------------------------------------------------------------


def _body_tokens(ctx: Context, options: TokenizerOptions) -> Iterator[list[str]]:
    """The body's tokens, one chunk (list) per step: each is computed only when asked for."""
    parts = ctx.memo(text_parts)
    has_plain = any(not p.is_html for p in parts)
    has_html = any(p.is_html for p in parts)
    yield [
        f"body:{'plain' if has_plain else ''}{'+' if has_plain and has_html else ''}"
        + ("html" if has_html else "")
    ]
    budget = MAX_TEXT
    for part in parts:
        if part.alternative or budget <= 0:
            continue  # an HTML alternative repeats its text/plain sibling
        text = part.text[:budget]
        budget -= len(text)
        yield _words(text.lower(), options.bigrams)
        yield _money(text)
    for part in parts:
        if part.is_html:
            # How many images the HTML shows: image-only spam versus text newsletters.
            images = part.raw_html[:MAX_TEXT].lower().count("<img")
            yield [f"imgs:{_bucket(images, (0, 1, 3, 10))}"]
        else:
            yield _caps_words(part.text[:MAX_TEXT])
    if options.html_tags:
        for part in parts:
            if part.is_html:
                yield list(_html_tokens(part.raw_html[:MAX_TEXT]))


_TAG = re.compile(r"<\s*([a-zA-Z][a-zA-Z0-9]{0,10})[\s/>]")


def _html_tokens(html: str) -> Iterator[str]:
    """Markup the reader never sees: tag names (off by default, see docs/quality.md)."""
    for i, m in enumerate(_TAG.finditer(html)):
        if i >= 2000:
            break
        tag = m.group(1).lower()
        yield f"html:<{tag}"


_MONEY = re.compile(r"[$\u00a3\u20ac]\s?(\d[\d,]*)")
MAX_MONEY_TEXT = 50_000  # characters of one part looked at for amounts


def _money(text: str) -> list[str]:
    """Amounts of money by order of magnitude: ``money:4`` is $1,000-9,999 (or pounds, euros).

    "$5,000", "$25,000,000" and "$39" are each a rare word of their own, so
    a classifier that has seen "$4,500" learns nothing about "$5,000"; the
    number of digits before any decimals is what they share.
    """
    out: list[str] = []
    for match in _MONEY.finditer(text, 0, MAX_MONEY_TEXT):
        digits = len(match.group(1).replace(",", "").lstrip("0")) or 1
        out.append("money:" + _bucket(digits, (1, 2, 3, 4, 5, 6)))
    return out


_CAPS_STRIP = ".,;:!?\"'()"
MAX_CAPS_WORDS = 5_000  # words of one part looked at for shouting


def _caps_words(text: str) -> list[str]:
    """Shouted words of plain text ("FREE", "ORDER"), kept apart from their lower-case selves.

    The body words are lower-cased (SpamBayes), which loses the shouting that
    separates "FREE BONUS OFFER" from a colleague's "free"; these tokens keep it.
    (Words are filtered by ``isupper()`` before stripping: the stripped
    characters are uncased, so stripping never changes that answer.)
    """
    shouted = (raw.strip(_CAPS_STRIP) for raw in text.split()[:MAX_CAPS_WORDS] if raw.isupper())
    return ["caps:" + word[:MAX_WORD] for word in shouted if len(word) >= 4 and word.isalpha()]


def _words(text: str, bigrams: bool) -> list[str]:
    if bigrams:
        return list(_words_and_bigrams(text))
    kept = [word for word in [raw.strip(_PUNCT) for raw in text.split()] if len(word) >= MIN_WORD]
    if max(map(len, kept), default=0) <= MAX_WORD:
        return kept  # the common case: no long word to turn into its shape
    out: list[str] = []
    for word in kept:
        n = len(word)
        if n > MAX_WORD:
            out.extend(_long_word(word, n))
        else:
            out.append(word)
    return out


def _long_word(word: str, n: int) -> list[str]:
    match = _EMAIL_IN_TEXT.search(word)
    if match:
        return [f"email:{registrable_domain(match.group(1))}"]
    if "://" not in word and not word.startswith("www."):
        # SpamBayes: long words are mostly noise, but their shape is a clue.
        return [f"skip:{word[0]} {n // 10 * 10}"]
    return []


def _words_and_bigrams(text: str) -> Iterator[str]:
    previous = ""
    for raw in text.split():
        word = raw.strip(_PUNCT)
        n = len(word)
        if n < MIN_WORD:
            previous = ""
            continue
        if n > MAX_WORD:
            yield from _long_word(word, n)
            previous = ""
            continue
        yield word
        if previous:
            yield f"bi:{previous} {word}"
        previous = word
