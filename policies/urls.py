"""URL analysis: what the links of a message point at, and whether they hide it.

URLs come normalized from :func:`gateway.api.urls` (IDNA, numeric IP forms,
redirectors unwrapped). Each symbol fires once per message, its detail naming
the first URL that showed it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.api import (
    URL,
    Context,
    OptionError,
    Policy,
    Result,
    Symbol,
    SymbolDef,
    URLSource,
    registrable_domain,
    urls,
)

__all__ = ["URLOptions", "URLPolicy"]

DEFAULT_SHORTENERS = (
    "bit.ly", "t.co", "tinyurl.com", "goo.gl", "ow.ly", "is.gd", "buff.ly", "rebrand.ly",
    "cutt.ly", "shorturl.at", "tiny.cc", "rb.gy", "s.id", "t.ly", "v.gd", "bl.ink",
    "soo.gd", "qrco.de", "shorte.st", "adf.ly", "x.co", "lnkd.in", "tr.im", "snip.ly",
)  # fmt: skip
DEFAULT_SUSPICIOUS_TLDS = (
    "zip", "mov", "top", "xyz", "click", "country", "gq", "tk", "ml", "cf", "ga", "work",
    "loan", "kim", "men", "review", "stream", "download", "racing", "win", "bid", "date",
    "faith", "party", "science", "cricket", "accountant", "rest", "buzz", "cam", "surf",
)  # fmt: skip

SYMBOLS = {
    "URI_IP_HOST": SymbolDef(3.2, "a link points at a bare IP address instead of a name"),
    "URI_IP_OBFUSCATED": SymbolDef(2.5, "a link hides an IP address in decimal, hex or octal form"),
    "URI_TEXT_MISMATCH": SymbolDef(
        0.1, "link text shows one domain while the link goes to another"
    ),
    "URI_SHORTENER": SymbolDef(0.5, "a link goes through a URL shortener that hides its target"),
    "URI_SUSPICIOUS_TLD": SymbolDef(1.0, "a link points into a top-level domain abused by spam"),
    "URI_USERINFO": SymbolDef(
        3.9, "a link carries user@ before its host (http://bank.example@evil.example/)"
    ),
    "URI_REDIRECTOR": SymbolDef(0.3, "a link goes through an open redirector"),
}

_SHOWN_DOMAIN = re.compile(
    r"^\s*(?:(?:https?|ftp)://)?(?:[^\s/@]+@)?((?:[a-z0-9-]+\.)+[a-z][a-z0-9-]{1,62})(?:[:/?#]|\s*$)",
    re.I,
)


@dataclass(frozen=True, slots=True)
class URLOptions:
    shorteners: tuple[str, ...] = DEFAULT_SHORTENERS  # host names (and their subdomains)
    suspicious_tlds: tuple[str, ...] = DEFAULT_SUSPICIOUS_TLDS  # without the dot

    def __post_init__(self) -> None:
        for i, tld in enumerate(self.suspicious_tlds):
            if not tld or "." in tld.strip(".") or tld != tld.strip():
                raise OptionError(f"suspicious_tlds[{i}]", f'must be a TLD like "xyz", got {tld!r}')
        for i, host in enumerate(self.shorteners):
            if not host or " " in host:
                raise OptionError(f"shorteners[{i}]", f"must be a host name, got {host!r}")


class URLPolicy(Policy):
    name = "urls"
    symbols = SYMBOLS
    Options = URLOptions

    def __init__(self, options: URLOptions) -> None:
        super().__init__(options)
        self.options: URLOptions = options
        self._shorteners = frozenset(h.lower().strip(".") for h in options.shorteners)
        self._tlds = frozenset(t.lower().strip(".") for t in options.suspicious_tlds)

    async def check(self, ctx: Context) -> Result:
        hits: dict[str, str] = {}
        for url in urls(ctx):
            for name, detail in self._findings(url):
                hits.setdefault(name, detail)
            if len(hits) == len(SYMBOLS):
                break
        return Result(symbols=tuple(Symbol(n, detail=d) for n, d in hits.items()))

    def _findings(self, url: URL) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        shown = url.url if len(url.url) <= 80 else url.url[:77] + "..."
        if url.obfuscated_ip:
            out.append(("URI_IP_OBFUSCATED", shown))
        elif url.is_ip and url.source is not URLSource.SRC:
            out.append(("URI_IP_HOST", shown))
        if url.userinfo:
            out.append(("URI_USERINFO", shown))
        if url.redirector:
            out.append(("URI_REDIRECTOR", f"{url.redirector} -> {url.host}"))
        if not url.is_ip:
            host = url.host
            labels = host.split(".")  # the host and each parent: set lookups, not a scan
            if any(".".join(labels[i:]) in self._shorteners for i in range(len(labels))):
                out.append(("URI_SHORTENER", shown))
            if host.rpartition(".")[2] in self._tlds:
                out.append(("URI_SUSPICIOUS_TLD", host))
        if url.source is URLSource.HREF and url.text:
            mismatch = _text_mismatch(url)
            if mismatch:
                out.append(("URI_TEXT_MISMATCH", mismatch))
        return out


def _text_mismatch(url: URL) -> str:
    """'shown -> actual' when the link text reads as a domain other than the target's."""
    m = _SHOWN_DOMAIN.match(url.text)
    if not m:
        return ""
    shown = m.group(1).lower().rstrip(".")
    probe = "x." + shown
    if registrable_domain(probe) == probe:
        return ""  # no known public suffix: "file.txt", "readme.md" are not domains
    if registrable_domain(shown) == (url.domain or url.host):
        return ""
    return f"{shown} -> {url.host}"
