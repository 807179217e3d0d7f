"""Header and structure anomalies that spam and phishing show and real mail rarely does.

Each finding is weak on its own (no default score comes near the reject
threshold); together, and with the classifier, they add up. Times are judged
against the message's own first ``Received`` stamp, never against the clock:
stored mail is replayed, and a three-day-old message is not suspicious for
being read today.
"""

from __future__ import annotations

import contextlib
import email.utils
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType

import idna

from gateway.api import (
    Context,
    OptionError,
    Policy,
    Result,
    Services,
    Symbol,
    SymbolDef,
    html_links,
    mime_structure,
    registrable_domain,
    text_parts,
)
from policies import _language
from policies._mail import Address, addresses, from_address, header, raw_headers

__all__ = ["HeuristicsOptions", "HeuristicsPolicy"]

# Brands that phishing impersonates in display names -> the domains they mail from.
DEFAULT_BRANDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "paypal": ("paypal.com", "paypal.co.uk", "paypal.de", "paypal-communication.com"),
        "apple": ("apple.com", "icloud.com", "itunes.com"),
        "icloud": ("apple.com", "icloud.com"),
        "microsoft": ("microsoft.com", "office.com", "office365.com", "outlook.com", "live.com"),
        "office 365": ("microsoft.com", "office.com", "office365.com"),
        "amazon": ("amazon.com", "amazon.co.uk", "amazon.de", "amazonses.com", "amazon.fr"),
        "netflix": ("netflix.com",),
        "dhl": ("dhl.com", "dhl.de", "dhl.co.uk"),
        "fedex": ("fedex.com",),
        "docusign": ("docusign.com", "docusign.net"),
        "dropbox": ("dropbox.com", "dropboxmail.com"),
        "wells fargo": ("wellsfargo.com",),
        "bank of america": ("bankofamerica.com", "bofa.com"),
        "ebay": ("ebay.com", "ebay.co.uk", "ebay.de"),
        "linkedin": ("linkedin.com",),
        "facebook": ("facebook.com", "facebookmail.com", "meta.com"),
        "instagram": ("instagram.com", "facebookmail.com"),
        "coinbase": ("coinbase.com",),
        "binance": ("binance.com",),
        "usps": ("usps.com", "usps.gov"),
    }
)

SYMBOLS: Mapping[str, SymbolDef] = {
    "HDR_MISSING_DATE": SymbolDef(1.0, "no Date header field (RFC 5322 §3.6 requires one)"),
    "HDR_MISSING_MESSAGE_ID": SymbolDef(
        0.5, "no Message-ID header field (RFC 5322 §3.6.4 says SHOULD)"
    ),
    "HDR_DATE_INVALID": SymbolDef(2.0, "Date header field cannot be parsed (RFC 5322 §3.3)"),
    "HDR_DATE_FUTURE": SymbolDef(2.0, "Date is far after the first Received time"),
    "HDR_DATE_PAST": SymbolDef(0.2, "Date is far before the first Received time"),
    "FROM_NAME_HAS_ADDRESS": SymbolDef(
        2.0, "From display name shows an address on another domain than the sender's"
    ),
    "FROM_NAME_BRAND": SymbolDef(
        3.0, "From display name is a brand (plus words like Support) the sender's domain is not"
    ),
    "HDR_REPLYTO_DIFF_DOMAIN": SymbolDef(
        0.3, "Reply-To is on another domain than From (not a mailing list)"
    ),
    "HDR_MANY_RECIPIENTS": SymbolDef(1.3, "many recipients visible in To and Cc"),
    "SUBJ_ALL_CAPS": SymbolDef(2.0, "Subject is written in capital letters only"),
    "MIME_BROKEN": SymbolDef(2.0, "MIME structure is broken (boundaries, multipart layout)"),
    "FROM_PUNYCODE": SymbolDef(1.0, "From domain is an internationalized (punycode) name"),
    "FROM_MIXED_SCRIPT": SymbolDef(
        3.0, "From domain mixes writing systems in one label (look-alike of a Latin name)"
    ),
    "MIME_EMPTY_BODY_ATTACHMENT": SymbolDef(1.0, "no text to read, only an attachment"),
    "MIME_HTML_ONLY": SymbolDef(0.1, "HTML without a text/plain alternative"),
    "MIME_HTML_LITTLE_TEXT": SymbolDef(3.2, "HTML-only mail with very little text"),
    # SpamAssassin's UNWANTED_LANGUAGE_BODY (TextCat plugin, ok_languages) scores 2.8.
    "BODY_UNWANTED_LANGUAGE": SymbolDef(
        2.8, "text is in a language not listed in policies.heuristics.ok_languages"
    ),
}

# Defects that mean the MIME structure itself is broken (email.errors).
_STRUCTURAL = frozenset(
    {
        "StartBoundaryNotFoundDefect",
        "CloseBoundaryNotFoundDefect",
        "MultipartInvariantViolationDefect",
        "NoBoundaryInMultipartDefect",
        "MissingHeaderBodySeparatorDefect",
        "MisplacedEnvelopeHeaderDefect",
        "FirstHeaderLineIsContinuationDefect",
    }
)
_EMBEDDED_ADDRESS = re.compile(r"[A-Za-z0-9._%+-]+@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)")
# A mailing list (RFC 2369, RFC 2919, and the older Mailing-List of ezmlm/Yahoo Groups).
_LIST_HEADERS = ("list-id", "list-post", "list-unsubscribe", "mailing-list")
_LANGUAGE_CODE = re.compile(r"[a-z]{2,3}")


@dataclass(frozen=True, slots=True)
class HeuristicsOptions:
    date_future_hours: float = 3.0  # Date after the first Received by more than this
    date_past_hours: float = 96.0  # Date before the first Received by more than this
    max_visible_recipients: int = 25  # To + Cc addresses before HDR_MANY_RECIPIENTS
    caps_min_letters: int = 10  # subjects shorter than this are never "all caps"
    html_min_text: int = 100  # characters of rendered text below which HTML-only is "little"
    brands: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: DEFAULT_BRANDS)
    # Languages your users get mail in (ISO 639 codes, e.g. ["en", "de"]); text
    # in another language scores BODY_UNWANTED_LANGUAGE. Empty: every language is fine.
    ok_languages: tuple[str, ...] = ()
    language_min_confidence: float = 0.5  # the language model's certainty needed to judge

    def __post_init__(self) -> None:
        for code in self.ok_languages:
            if not _LANGUAGE_CODE.fullmatch(code):
                raise OptionError(
                    "ok_languages", f'"{code}" is not an ISO 639 code like "en" or "de"'
                )
        if not 0.0 < self.language_min_confidence <= 1.0:
            raise OptionError(
                "language_min_confidence", f"must be 0 < x <= 1, got {self.language_min_confidence}"
            )
        for key in ("date_future_hours", "date_past_hours"):
            if getattr(self, key) <= 0:
                raise OptionError(key, f"must be a number of hours > 0, got {getattr(self, key)}")
        if self.max_visible_recipients < 2:
            raise OptionError("max_visible_recipients", "must be at least 2")
        for brand, domains in self.brands.items():
            if not brand.strip() or not domains:
                raise OptionError(f"brands.{brand}", "needs a name and at least one domain")


class HeuristicsPolicy(Policy):
    name = "heuristics"
    symbols = SYMBOLS
    Options = HeuristicsOptions

    def __init__(self, options: HeuristicsOptions) -> None:
        super().__init__(options)
        self.options: HeuristicsOptions = options
        self._brands = [
            (
                re.compile(r"(?i)(?<![a-z0-9])" + re.escape(b.lower()) + r"(?![a-z0-9])"),
                b,
                frozenset(registrable_domain(d) for d in ds),
            )
            for b, ds in options.brands.items()
        ]
        self._ok_languages = frozenset(options.ok_languages)

    @classmethod
    def preload(cls, options: HeuristicsOptions) -> None:
        # The public suffix table (the brands' domains need it) and the language
        # model are per process: a parent that loads them forks workers that have them.
        registrable_domain("example.com")
        if options.ok_languages:
            with contextlib.suppress(_language.LanguageModelError):  # start() reports it
                _language.load()

    async def start(self, services: Services) -> None:
        if self._ok_languages:
            try:
                _language.load()
            except _language.LanguageModelError as exc:
                raise OptionError("ok_languages", str(exc)) from None

    async def check(self, ctx: Context) -> Result:
        found: list[Symbol] = []
        found += self._dates(ctx)
        sender = from_address(ctx)
        if sender is not None:
            found += self._display_name(sender)
            found += _lookalike(sender.domain)
            found += self._reply_to(ctx, sender)
        found += self._recipients(ctx)
        found += self._subject(ctx)
        found += _mime(ctx, self.options.html_min_text)
        if self._ok_languages:
            found += self._language(ctx)
        return Result(symbols=tuple(found))

    def _language(self, ctx: Context) -> list[Symbol]:
        pieces: list[str] = []
        budget = 2 * _language.MAX_CHARS  # detect() reads no more than this
        for part in text_parts(ctx):
            if not part.alternative and budget > 0:
                pieces.append(part.text[:budget])
                budget -= len(pieces[-1])
        guess = _language.detect(" ".join(pieces))
        if (
            guess is None
            or guess.language in self._ok_languages
            or guess.confidence < self.options.language_min_confidence
        ):
            return []
        return [
            Symbol("BODY_UNWANTED_LANGUAGE", detail=f"{guess.language} ({guess.confidence:.2f})")
        ]

    # -- dates ----------------------------------------------------------------

    def _dates(self, ctx: Context) -> list[Symbol]:
        out = [Symbol("HDR_MISSING_MESSAGE_ID")] if header(ctx, "message-id") is None else []
        value = header(ctx, "date")
        if value is None:
            return [*out, Symbol("HDR_MISSING_DATE")]
        date = _parse_date(value)
        if date is None:
            return [*out, Symbol("HDR_DATE_INVALID", detail=value[:60])]
        received = _first_received(ctx)
        if received is None:
            return out
        hours = (date - received).total_seconds() / 3600
        if hours > self.options.date_future_hours:
            out.append(Symbol("HDR_DATE_FUTURE", detail=f"{hours:.0f}h after first Received"))
        elif -hours > self.options.date_past_hours:
            out.append(Symbol("HDR_DATE_PAST", detail=f"{-hours:.0f}h before first Received"))
        return out

    # -- sender identity --------------------------------------------------------

    def _display_name(self, sender: Address) -> list[Symbol]:
        out: list[Symbol] = []
        name = sender.name
        own = registrable_domain(sender.domain)
        if not name:
            return out
        for m in _EMBEDDED_ADDRESS.finditer(name):
            if registrable_domain(m.group(1).lower()) != own:
                out.append(Symbol("FROM_NAME_HAS_ADDRESS", detail=f"{m.group(0)[:60]} via {own}"))
                break
        for pattern, brand, domains in self._brands:
            if own not in domains and pattern.search(name) and _only_brand(pattern, name):
                out.append(Symbol("FROM_NAME_BRAND", detail=f"{brand} from {own}"))
                break
        return out

    def _reply_to(self, ctx: Context, sender: Address) -> list[Symbol]:
        if any(header(ctx, h) is not None for h in _LIST_HEADERS):
            return []  # mailing lists set Reply-To to the list on purpose
        own = registrable_domain(sender.domain)
        for rt in addresses(ctx, "reply-to"):
            other = registrable_domain(rt.domain)
            if rt.domain and other != own:
                return [Symbol("HDR_REPLYTO_DIFF_DOMAIN", detail=f"{other} vs {own}")]
        return []

    def _recipients(self, ctx: Context) -> list[Symbol]:
        count = len(addresses(ctx, "to")) + len(addresses(ctx, "cc"))
        if count >= self.options.max_visible_recipients:
            return [Symbol("HDR_MANY_RECIPIENTS", detail=f"{count} in To/Cc")]
        return []

    def _subject(self, ctx: Context) -> list[Symbol]:
        subject = header(ctx, "subject") or ""
        letters = [c for c in subject if c.isalpha()]
        if len(letters) >= self.options.caps_min_letters and all(c.isupper() for c in letters):
            return [Symbol("SUBJ_ALL_CAPS", detail=subject[:60])]
        return []


# Words that dress up an impersonated brand ("PayPal Service", "Apple Support Team").
_SERVICE_WORDS = frozenset(
    [
        "the",
        "support",
        "service",
        "services",
        "security",
        "team",
        "account",
        "accounts",
        "billing",
        "customer",
        "care",
        "alert",
        "alerts",
        "notification",
        "notifications",
        "online",
        "help",
        "center",
        "centre",
        "desk",
        "noreply",
        "no",
        "reply",
        "info",
        "inc",
        "ltd",
        "llc",
        "official",
        "secure",
        "verification",
        "department",
        "dept",
        "com",
        "net",
        "mail",
        "message",
        "messages",
        "update",
        "updates",
        "payments",
        "payment",
        "id",
        "store",
        "prime",
    ]
)
_WORD = re.compile(r"[^\W_]+")


def _only_brand(pattern: re.Pattern[str], name: str) -> bool:
    """The display name is the brand plus service words only: "PayPal Service" yes,
    "Lockergnome's Apple Tips" (a newsletter about the brand) no."""
    rest = pattern.sub(" ", name.lower())
    return all(word in _SERVICE_WORDS for word in _WORD.findall(rest))


def _parse_date(value: str) -> datetime | None:
    """RFC 5322 §3.3 date-time; None when unparseable. Naive (-0000) is taken as UTC."""
    try:
        date = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if date is None:
        return None
    return date if date.tzinfo is not None else date.replace(tzinfo=UTC)


def _first_received(ctx: Context) -> datetime | None:
    """Time stamp of the topmost Received field that has a parseable one (RFC 5321 §4.4)."""
    for name, value in raw_headers(ctx):
        if name != "received":
            continue
        _, semi, stamp = value.rpartition(";")
        if semi:
            date = _parse_date(stamp.strip())
            if date is not None:
                return date
    return None


def _scripts(label: str) -> set[str]:
    out = set()
    for ch in label:
        if ch.isalpha():
            try:
                out.add(unicodedata.name(ch).split(" ")[0])
            except ValueError:
                out.add("UNKNOWN")
    return out


def _lookalike(domain: str) -> list[Symbol]:
    if not domain:
        return []
    labels = domain.split(".")
    out = []
    unicode_labels = []
    for label in labels:
        if label.startswith("xn--"):
            try:
                unicode_labels.append(idna.decode(label))
            except (idna.IDNAError, UnicodeError, ValueError):
                unicode_labels.append(label)
        else:
            unicode_labels.append(label)
    if any(lbl.startswith("xn--") for lbl in labels):
        out.append(Symbol("FROM_PUNYCODE", detail=".".join(unicode_labels)[:60]))
    for label in unicode_labels:
        if len(_scripts(label)) > 1:
            out.append(
                Symbol(
                    "FROM_MIXED_SCRIPT", detail=f"{label[:40]}: {'+'.join(sorted(_scripts(label)))}"
                )
            )
            break
    return out


def _mime(ctx: Context, html_min_text: int) -> list[Symbol]:
    out: list[Symbol] = []
    structure = mime_structure(ctx)
    broken = sorted(structure.defects & _STRUCTURAL)
    if broken:
        out.append(Symbol("MIME_BROKEN", detail=", ".join(broken)[:80]))
    parts = text_parts(ctx)
    text_len = sum(len(p.text.strip()) for p in parts if not p.alternative)
    attachments = len(structure.attachments)
    if attachments and text_len < 10:
        out.append(Symbol("MIME_EMPTY_BODY_ATTACHMENT", detail=f"{attachments} attachment(s)"))
    if parts and all(p.is_html for p in parts):
        out.append(Symbol("MIME_HTML_ONLY"))
        if text_len < html_min_text:
            images = sum(1 for link in html_links(ctx) if link.tag == "img")
            out.append(
                Symbol("MIME_HTML_LITTLE_TEXT", detail=f"{text_len} characters, {images} image(s)")
            )
    return out
