"""DMARC (RFC 9989, which obsoletes RFC 7489), with ARC (RFC 8617) for trusted forwarders.

- Policy discovery and the Organizational Domain both come from the DNS Tree
  Walk of RFC 9989 §4.10 (at most 8 queries of ``_dmarc.<name>``, honouring
  ``psd=y|n``); no Public Suffix List.
- Identifier alignment (§4.4): SPF — the MAIL FROM domain SPF passed (for a
  null sender, the HELO domain, RFC 7208 §2.4); DKIM — the ``d=`` of every
  passing signature; strict = same name, relaxed = same Organizational Domain.
- Policy: ``p`` for the Author Domain's own record, otherwise ``np`` for a
  non-existent Author Domain (no A, AAAA or MX: NXDOMAIN or NODATA) when
  given, else ``sp``, else ``p``. ``t=y`` (testing) applies the next-lower
  policy (reject -> quarantine -> none).
- ``pct`` is not part of RFC 9989. A legacy ``pct=0`` (which senders used to
  mean "test") is read as ``t=y`` when no ``t`` tag is present; any other pct
  value is ignored, i.e. the policy applies in full.
- Several From addresses: each distinct domain is evaluated and the strictest
  outcome counts (a failing domain is not hidden behind a passing one); no
  usable From domain: no DMARC result, a symbol says so.
- Enforcement: ``reject`` -> REJECT floor (550 5.7.1 naming the policy),
  ``quarantine`` -> QUARANTINE floor; the operator can downgrade to monitor
  only (globally or per Author Domain), allowlist client networks and
  authenticated sender domains (forwarders, lists), and trust ARC sealers.
"""

from __future__ import annotations

import email.utils
import enum
import ipaddress
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Literal

from gateway.api import (
    Action,
    AuthResult,
    Context,
    DNSTemporaryError,
    OptionError,
    Policy,
    Resolver,
    Result,
    Symbol,
    SymbolDef,
)
from policies._authcommon import ascii_domain, org_aligned, printable, valid_domain
from policies.arc import ARCOutcome, verify_arc

__all__ = [
    "DMARCOptions",
    "DMARCPolicy",
    "DMARCRecord",
    "Disposition",
    "DomainEvaluation",
    "ReportURI",
    "TreeWalk",
    "parse_record",
    "parse_rua",
    "tree_walk_names",
]

MAX_WALK = 8  # RFC 9989 §4.10: at most 8 DNS queries per tree walk
MAX_RUA = 10  # rua URIs kept per record; a record listing dozens is hostile (the rest counted)
_MAX_URI = 320  # characters: "mailto:" + a 254-character address + a size suffix


class Disposition(enum.Enum):
    NONE = "none"
    QUARANTINE = "quarantine"
    REJECT = "reject"

    def lower(self) -> Disposition:
        """The next-less-restrictive policy (RFC 9989 ``t=y``)."""
        if self is Disposition.REJECT:
            return Disposition.QUARANTINE
        return Disposition.NONE


@dataclass(frozen=True, slots=True)
class DMARCRecord:
    """The tags of one DMARC Policy Record that this receiver acts on."""

    domain: str  # where it was found (without ``_dmarc.``)
    p: Disposition  # as read, or none (RFC 9989 §4.10.1: invalid p/sp/np with a valid rua)
    sp: Disposition | None = None
    np: Disposition | None = None
    adkim: Literal["r", "s"] = "r"
    aspf: Literal["r", "s"] = "r"
    psd: Literal["y", "n", "u"] = "u"
    testing: bool = False  # t=y, or a legacy pct=0 without t
    usable: bool = True  # False: no valid p (or a bad sp/np) and no valid rua: no DMARC
    notes: tuple[str, ...] = ()  # tags we could not use, for the symbol detail
    pct: int = 100  # historic (RFC 7489 §6.3), kept for the aggregate report's policy_published
    rua: tuple[ReportURI, ...] = ()  # at most MAX_RUA, in the record's order
    rua_dropped: int = 0  # URIs past MAX_RUA, or too long to be one


@dataclass(frozen=True, slots=True)
class ReportURI:
    """One ``rua`` destination (RFC 9990 §2.1; RFC 7489 §6.4 ``!size``)."""

    uri: str  # as published, without the size suffix
    scheme: str  # lower case; only "mailto" is ever sent to
    address: str  # mailto: the addr-spec (percent-decoded); "" for other schemes
    max_size: int | None = None  # bytes, from "!10m"; None = no limit given

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower().rstrip(".")


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")  # RFC 3986 scheme ":" something
_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}")  # RFC 5322 dot-atom characters
_SIZE = re.compile(r"^(\d{1,15})([kmgt]?)$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_rua(value: str, limit: int = MAX_RUA) -> tuple[tuple[ReportURI, ...], int]:
    """(the first ``limit`` usable URIs of a ``rua`` tag, how many more there were).

    A URI that is not one, or is absurdly long, counts as dropped; a bad ``!size``
    drops the size (no limit), as the URI itself stays usable.
    """
    kept: list[ReportURI] = []
    dropped = 0
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        if len(kept) >= limit or len(part) > _MAX_URI or not _URI.match(part):
            dropped += 1
            continue
        uri, bang, size_text = part.rpartition("!")
        if not bang or ":" not in uri:
            uri, size_text = part, ""
        max_size = None
        m = _SIZE.match(size_text)
        if m:
            max_size = int(m.group(1)) * _UNITS[m.group(2).lower()]
        scheme, _, rest = uri.partition(":")
        scheme = scheme.lower()
        address = ""
        if scheme == "mailto":
            address = urllib.parse.unquote(rest.partition("?")[0]).strip()
            local, _, dom = address.rpartition("@")
            if not _LOCAL.fullmatch(local) or not valid_domain(ascii_domain(dom)):
                dropped += 1
                continue
            address = f"{local}@{ascii_domain(dom)}"
        kept.append(ReportURI(uri, scheme, address, max_size))
    return tuple(kept), dropped


def _disposition(value: str | None) -> Disposition | None:
    if value is None:
        return None
    try:
        return Disposition(value.strip().lower())
    except ValueError:
        return None


def parse_record(domain: str, text: str) -> DMARCRecord | None:
    """A DMARC record (RFC 9989 §4.7), or None when ``text`` is not one (``v=DMARC1`` first)."""
    parts = [p.strip() for p in text.split(";")]
    version, eq, value = parts[0].partition("=")
    if not eq or version.strip() != "v" or value.strip() != "DMARC1":  # case-sensitive (§4.8)
        return None
    tags: dict[str, str] = {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if eq and key.strip():
            tags.setdefault(key.strip().lower(), value.strip())
    notes: list[str] = []
    p = _disposition(tags.get("p"))
    sp = _disposition(tags.get("sp"))
    np = _disposition(tags.get("np"))
    usable = True
    if p is None or ("sp" in tags and sp is None) or ("np" in tags and np is None):
        # RFC 9989 §4.10.1: with a valid rua act as p=none, otherwise no DMARC processing.
        uris = [u.strip() for u in tags.get("rua", "").split(",")]
        usable = any(_URI.match(u) for u in uris)
        notes.append(
            "no valid p/sp/np, read as p=none (rua given)"
            if usable
            else "no valid p/sp/np and no valid rua: DMARC not applied"
        )
        p, sp, np = Disposition.NONE, None, None
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    psd = tags.get("psd", "u").lower()
    testing = tags.get("t", "").lower() == "y"
    if "t" not in tags and tags.get("pct", "").strip() == "0":
        # pct is historic (RFC 9989 §A.6): pct=0 meant "testing", i.e. t=y.
        testing = True
        notes.append("legacy pct=0 read as t=y")
    pct_text = tags.get("pct", "100").strip()
    pct = int(pct_text) if re.fullmatch(r"[0-9]{1,3}", pct_text) and int(pct_text) <= 100 else 100
    rua, rua_dropped = parse_rua(tags.get("rua", ""))
    return DMARCRecord(
        domain=domain,
        p=p,
        sp=sp,
        np=np,
        adkim="s" if adkim == "s" else "r",
        aspf="s" if aspf == "s" else "r",
        psd="y" if psd == "y" else "n" if psd == "n" else "u",
        testing=testing,
        usable=usable,
        notes=tuple(notes),
        pct=pct,
        rua=rua,
        rua_dropped=rua_dropped,
    )


def tree_walk_names(domain: str) -> list[str]:
    """The names a DNS Tree Walk queries, in order (RFC 9989 §4.10).

    The starting name first; with more than 8 labels, then straight to its
    last 7 labels; then one label fewer each step, down to the top-level name.
    """
    labels = domain.split(".")
    start = len(labels) - 7 if len(labels) > MAX_WALK else 1
    return [domain] + [".".join(labels[i:]) for i in range(start, len(labels))]


class TreeWalk:
    """DMARC record lookups for one message; raises DNSTemporaryError on SERVFAIL/timeout."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self._records: dict[str, DMARCRecord | None] = {}
        self._orgs: dict[str, tuple[str, DMARCRecord | None]] = {}

    async def record_at(self, name: str) -> DMARCRecord | None:
        if name in self._records:
            return self._records[name]
        answer = await self.resolver.query(f"_dmarc.{name}", "TXT")
        records = [r for r in (parse_record(name, t) for t in answer.records) if r is not None]
        # More than one DMARC record at a name: none of them is usable (RFC 9989 §4.10).
        rec = records[0] if len(records) == 1 else None
        self._records[name] = rec
        return rec

    async def policy_record(self, domain: str) -> DMARCRecord | None:
        """The record whose policy applies to ``domain`` (RFC 9989 §4.10.1): its own, else
        its Organizational Domain's, else its Public Suffix Domain's (psd=y); a record at
        an intermediate name covers only that name."""
        own = await self.record_at(domain)
        if own is not None:
            return own
        org, psd = await self._discover(domain)
        if org != domain:
            rec = await self.record_at(org)
            if rec is not None:
                return rec
        return psd

    async def organizational_domain(self, domain: str) -> str:
        """RFC 9989 §4.10.2 (see :meth:`_discover`)."""
        return (await self._discover(domain))[0]

    async def _discover(self, domain: str) -> tuple[str, DMARCRecord | None]:
        """(Organizational Domain, the psd=y record that decided it, if any).

        Walking from ``domain`` up: a record with psd=n is the Organizational Domain;
        a psd=y record above the start makes it the name one label below; otherwise
        the record with the fewest labels; no record at all: ``domain`` itself.
        """
        if domain in self._orgs:
            return self._orgs[domain]
        labels = domain.split(".")
        found: list[str] = []
        result: tuple[str, DMARCRecord | None] | None = None
        for name in tree_walk_names(domain):
            rec = await self.record_at(name)
            if rec is None:
                continue
            if rec.psd == "n":
                result = (name, None)
                break
            if rec.psd == "y" and name != domain:
                result = (".".join(labels[-(name.count(".") + 2) :]), rec)
                break
            found.append(name)
        if result is None:
            result = (min(found, key=lambda n: n.count(".")) if found else domain, None)
        self._orgs[domain] = result
        return result

    async def aligned(self, identifier: str, author: str, mode: Literal["r", "s"]) -> bool:
        """Identifier alignment (RFC 9989 §4.4.1, §4.4.2)."""
        identifier, author = identifier.lower().rstrip("."), author.lower().rstrip(".")
        if identifier == author:
            return True
        if mode == "s" or not valid_domain(identifier):
            return False
        if identifier.rpartition(".")[2] != author.rpartition(".")[2]:
            return False  # no common label at all: no common Organizational Domain, no DNS
        return await self.organizational_domain(identifier) == await self.organizational_domain(
            author
        )


async def _nonexistent(resolver: Resolver, domain: str) -> bool:
    """RFC 9989 §3.2 "Non-existent Domains": NXDOMAIN, as RFC 8020 reads it. Unknown
    (a temporary error) counts as existing."""
    try:
        return (await resolver.query(domain, "A")).nxdomain
    except DNSTemporaryError:
        return False


# -- evaluation ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DomainEvaluation:
    """DMARC for one Author Domain."""

    domain: str
    result: str  # pass fail none temperror permerror
    policy: Disposition | None = None  # effective policy (after t=y)
    published: Disposition | None = None  # before t=y
    record_domain: str = ""
    testing: bool = False
    detail: str = ""
    record_p: Disposition | None = None  # the record's own p= (A-R polrec.p)

    def auth(self) -> AuthResult:
        props: list[tuple[str, str]] = [("header.from", self.domain)]
        if self.policy is not None:
            props.append(("policy.dmarc", self.policy.value))  # the policy applied
        if self.record_p is not None:
            props.append(("polrec.p", self.record_p.value))  # RFC 9989 IANA: p= as read
        if self.record_domain:
            props.append(("polrec.domain", self.record_domain))
        return AuthResult("dmarc", self.result, properties=tuple(props))


@dataclass(frozen=True, slots=True)
class _Identifiers:
    spf: tuple[tuple[str, str], ...]  # (domain, result) for the MAIL FROM identity
    dkim: tuple[tuple[str, str], ...]  # (d=, result) per signature


def _identifiers(ctx: Context) -> _Identifiers:
    spf = []
    for a in ctx.auth("spf"):
        mf = a.prop("smtp.mailfrom")
        if mf is not None:
            spf.append((mf.rpartition("@")[2].lower().rstrip("."), a.result))
    dkim = []
    for a in ctx.auth("dkim"):
        d = a.prop("header.d")
        if d:
            dkim.append((d.lower().rstrip("."), a.result))
    return _Identifiers(tuple(spf), tuple(dkim))


async def evaluate_domain(
    walk: TreeWalk, resolver: Resolver, domain: str, ids: _Identifiers
) -> DomainEvaluation:
    try:
        record = await walk.policy_record(domain)
    except DNSTemporaryError as exc:
        return DomainEvaluation(domain, "temperror", detail=f"policy lookup: {printable(str(exc))}")
    if record is None:
        return DomainEvaluation(domain, "none", detail="no DMARC policy record")
    if not record.usable:
        return DomainEvaluation(
            domain,
            "none",
            record_domain=record.domain,
            detail=f"record at {record.domain}: " + "; ".join(record.notes),
        )
    if record.domain == domain:
        published, which = record.p, "p"
    elif record.np is not None and await _nonexistent(resolver, domain):
        published, which = record.np, "np"
    elif record.sp is not None:
        published, which = record.sp, "sp"
    else:
        published, which = record.p, "p"
    policy = (
        published.lower() if record.testing and published is not Disposition.NONE else published
    )
    where = f"{which}={published.value} at {record.domain}"
    if record.testing:
        where += f", t=y applied as {policy.value}"
    if record.notes:
        where += " (" + "; ".join(record.notes) + ")"
    evidence: list[str] = []
    temp = False
    for mode, kind, pairs in (
        ("s" if record.aspf == "s" else "r", "spf", ids.spf),
        ("s" if record.adkim == "s" else "r", "dkim", ids.dkim),
    ):
        for ident, result in pairs:
            evidence.append(f"{kind}={result} {ident or '-'}")
            if result not in ("pass", "temperror") or not ident:
                continue
            try:
                ok = await walk.aligned(ident, domain, mode)  # type: ignore[arg-type]
            except DNSTemporaryError:
                temp = True
                continue
            if ok and result == "pass":
                return DomainEvaluation(
                    domain,
                    "pass",
                    policy,
                    published,
                    record.domain,
                    record.testing,
                    printable(f"{where}; aligned {kind} pass {ident}"),
                    record.p,
                )
            if ok:
                temp = True  # an aligned identifier could not be checked (temperror)
    seen = ", ".join(evidence) or "no SPF or DKIM results"
    result = "temperror" if temp else "fail"
    return DomainEvaluation(
        domain,
        result,
        policy,
        published,
        record.domain,
        record.testing,
        printable(f"{where}; no aligned SPF or DKIM pass ({seen})", 300),
        record.p,
    )


def from_domains(ctx: Context) -> tuple[int, list[str], list[str]]:
    """(number of From fields, valid Author Domains in order, unusable addresses)."""
    try:
        fields = ctx.message.get_all("From") or []
    except Exception:  # a header the parser chokes on is no From at all
        fields = []
    domains: list[str] = []
    bad: list[str] = []
    for value in fields:
        try:
            addrs = [(a.username, a.domain) for a in value.addresses]
        except Exception:
            addrs = []
            for _name, addr in email.utils.getaddresses([str(value)]):
                local, at, dom = addr.rpartition("@")
                addrs.append((local, dom) if at else (addr, ""))
        if not addrs:
            bad.append(printable(str(value), 80))
        for _local, dom in addrs:
            d = ascii_domain(dom)
            if valid_domain(d):
                if d not in domains:
                    domains.append(d)
            else:
                bad.append(printable(dom or "(no domain)", 80))
    return len(fields), domains, bad


# -- the policy ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DMARCOptions:
    monitor_only: bool = False  # never enforce: symbols and scores only
    monitor_domains: tuple[str, ...] = ()  # Author Domains (and subdomains) never enforced
    allowlist_domains: tuple[str, ...] = ()  # SPF- or DKIM-authenticated senders never enforced
    allowlist_networks: tuple[str, ...] = ()  # client networks never enforced (CIDR)
    trusted_arc_sealers: tuple[str, ...] = ()  # ARC sealers whose valid chain may override
    arc: bool = True  # validate ARC chains and report arc= (RFC 8617)
    tempfail_on_temperror: bool = True  # 451 (retry) when DMARC cannot be decided (DNS)
    max_author_domains: int = 10  # distinct From domains evaluated (DNS cost bound)
    # Several author domains: "strictest" evaluates each and the strictest outcome counts
    # (local policy: a second address must not switch DMARC off); "exempt" follows
    # RFC 9989 §5.3.1 to the letter (no DMARC checking, only DMARC_MULTIPLE_FROM).
    multiple_from: Literal["strictest", "exempt"] = "strictest"
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default=(), init=False, repr=False
    )

    def __post_init__(self) -> None:
        nets = []
        for i, net in enumerate(self.allowlist_networks):
            try:
                nets.append(ipaddress.ip_network(net, strict=False))
            except ValueError:
                raise OptionError(
                    f"allowlist_networks[{i}]",
                    f'must be an IP network like "192.0.2.0/24", got "{net}"',
                ) from None
        for key in ("monitor_domains", "allowlist_domains", "trusted_arc_sealers"):
            for i, d in enumerate(getattr(self, key)):
                if not valid_domain(d.lower(), multi_label=False):
                    raise OptionError(f"{key}[{i}]", f'must be a domain name, got "{d}"')
        if not 1 <= self.max_author_domains <= 100:
            raise OptionError(
                "max_author_domains", f"must be 1..100, got {self.max_author_domains}"
            )
        object.__setattr__(self, "networks", tuple(nets))


class DMARCPolicy(Policy):
    """DMARC evaluation and enforcement, ARC chain validation and trusted-sealer override."""

    name = "dmarc"
    auth_results = {"dmarc": ("none", "pass", "fail", "temperror", "permerror")}  # RFC 7489 §11.2
    after = ("spf", "dkim")
    Options = DMARCOptions
    symbols = {
        "DMARC_PASS": SymbolDef(-0.5, "DMARC: the From domain is authenticated (aligned SPF/DKIM)"),
        "DMARC_NONE": SymbolDef(0.0, "DMARC: the From domain publishes no DMARC policy"),
        "DMARC_POLICY_NONE": SymbolDef(
            0.5, "DMARC: failed; the domain asks for no action (p=none)"
        ),
        "DMARC_POLICY_QUARANTINE": SymbolDef(1.5, "DMARC: failed; the domain asks for quarantine"),
        "DMARC_POLICY_REJECT": SymbolDef(2.0, "DMARC: failed; the domain asks for rejection"),
        "DMARC_TESTING": SymbolDef(0.0, "DMARC: the domain's policy is in testing mode (t=y)"),
        "DMARC_TEMPERROR": SymbolDef(0.0, "DMARC: could not be decided (temporary DNS error)"),
        "DMARC_PERMERROR": SymbolDef(0.0, "DMARC: could not be evaluated (permanent error)"),
        "DMARC_NO_FROM": SymbolDef(1.0, "DMARC: no usable From address, DMARC does not apply"),
        "DMARC_MULTIPLE_FROM": SymbolDef(
            1.0, "DMARC: several From fields or author domains; each was evaluated"
        ),
        "DMARC_TOO_MANY_FROM": SymbolDef(
            3.0, "DMARC: more From domains than max_author_domains; the rest were not evaluated"
        ),
        "DMARC_MONITOR": SymbolDef(0.0, "DMARC: failure not enforced (operator: monitor only)"),
        "DMARC_ALLOWLISTED": SymbolDef(
            0.0, "DMARC: failure ignored for an allowlisted forwarder (network or domain)"
        ),
        "DMARC_ARC_OVERRIDE": SymbolDef(
            0.0, "DMARC: failure overridden by a valid ARC chain from a trusted sealer"
        ),
        "ARC_PASS": SymbolDef(0.0, "ARC: the chain of custody validates (RFC 8617)"),
        "ARC_FAIL": SymbolDef(0.5, "ARC: the chain of custody is broken"),
        "ARC_NONE": SymbolDef(0.0, "ARC: the message carries no ARC sets"),
        "ARC_TEMPERROR": SymbolDef(0.0, "ARC: a sealer key lookup failed temporarily"),
    }

    def __init__(self, options: DMARCOptions) -> None:
        super().__init__(options)
        self.options: DMARCOptions = options
        self._sealers = {s.lower().rstrip(".") for s in options.trusted_arc_sealers}

    async def check(self, ctx: Context) -> Result:
        symbols: list[Symbol] = []
        auth: list[AuthResult] = []
        arc: ARCOutcome | None = None
        if self.options.arc:
            arc = await verify_arc(ctx)
            auth.append(arc.auth(ctx.client_ip))
            if arc.temperror:
                symbols.append(Symbol("ARC_TEMPERROR", detail=arc.reason))
            else:
                detail = arc.sealer if arc.result == "pass" else arc.reason
                symbols.append(Symbol(f"ARC_{arc.result.upper()}", detail=printable(detail)))

        nfields, domains, bad = from_domains(ctx)
        if not domains:
            detail = "no From field" if nfields == 0 else "no usable From domain: " + ", ".join(bad)
            symbols.append(Symbol("DMARC_NO_FROM", detail=printable(detail)))
            auth.append(AuthResult("dmarc", "none", reason="no From domain"))
            return Result(symbols=tuple(symbols), auth=tuple(auth))
        if nfields > 1 or len(domains) > 1 or bad:
            symbols.append(
                Symbol(
                    "DMARC_MULTIPLE_FROM",
                    detail=printable(f"{nfields} From field(s): " + ", ".join(domains + bad)),
                )
            )
            if len(domains) > 1 and self.options.multiple_from == "exempt":
                reason = "several author domains: exempt from DMARC (RFC 9989 5.3.1)"
                auth.append(AuthResult("dmarc", "none", reason=reason))
                return Result(symbols=tuple(symbols), auth=tuple(auth))

        limit = self.options.max_author_domains
        if len(domains) > limit:
            symbols.append(
                Symbol(
                    "DMARC_TOO_MANY_FROM",
                    detail=f"{len(domains)} author domains, the first {limit} evaluated",
                )
            )
            domains = domains[:limit]
        walk = TreeWalk(ctx.resolver)
        ids = _identifiers(ctx)
        evaluations = [await evaluate_domain(walk, ctx.resolver, d, ids) for d in domains]
        auth.extend(e.auth() for e in evaluations)

        force: Action | None = None
        reason = ""
        for ev in evaluations:
            sym, f, why = await self._judge(ctx, walk, ev, arc)
            symbols.extend(sym)
            if f is not None and f.rank > (force.rank if force else -1):
                force, reason = f, why
        return Result(symbols=tuple(_merge(symbols)), force=force, reason=reason, auth=tuple(auth))

    async def _judge(
        self, ctx: Context, walk: TreeWalk, ev: DomainEvaluation, arc: ARCOutcome | None
    ) -> tuple[list[Symbol], Action | None, str]:
        """Symbols, forced action and sender-facing reason for one Author Domain."""
        d = ev.domain
        if ev.result == "pass":
            return [Symbol("DMARC_PASS", detail=f"{d}: {ev.detail}")], None, ""
        if ev.result == "none":
            return [Symbol("DMARC_NONE", detail=f"{d}: {ev.detail}")], None, ""
        if ev.result == "permerror":
            return [Symbol("DMARC_PERMERROR", detail=f"{d}: {ev.detail}")], None, ""
        if ev.result == "temperror":
            sym = [Symbol("DMARC_TEMPERROR", detail=f"{d}: {ev.detail}")]
            # Policy unknown (the lookup failed) or known to ask for action: retry later,
            # unless the operator exempted this sender or domain from enforcement.
            if (
                self.options.tempfail_on_temperror
                and ev.policy is not Disposition.NONE
                and not self._monitored(d)
                and not await self._allowlisted(ctx)
            ):
                return sym, Action.TEMPFAIL, f"DMARC check for {d} failed temporarily (DNS)"
            return sym, None, ""
        assert ev.policy is not None
        out: list[Symbol] = []
        policy_sym = f"DMARC_POLICY_{ev.policy.value.upper()}"
        detail = f"{d}: {ev.detail}"
        if ev.testing:
            out.append(Symbol("DMARC_TESTING", detail=f"{d}: {ev.detail.split(';')[0]}"))
        if ev.policy is Disposition.NONE:
            return [Symbol(policy_sym, detail=detail), *out], None, ""
        action = Action.REJECT if ev.policy is Disposition.REJECT else Action.QUARANTINE
        # Exceptions the operator configured, strongest first.
        allowed = await self._allowlisted(ctx)
        if allowed:
            out += [
                Symbol(policy_sym, weight=0.0, detail=detail),
                Symbol("DMARC_ALLOWLISTED", detail=allowed),
            ]
            return out, None, ""
        override = await self._arc_override(walk, d, arc)
        if override:
            out += [
                Symbol(policy_sym, weight=0.0, detail=detail),
                Symbol("DMARC_ARC_OVERRIDE", detail=override),
            ]
            return out, None, ""
        monitored = self._monitored(d)
        out.append(Symbol(policy_sym, detail=detail))
        if monitored:
            out.append(
                Symbol("DMARC_MONITOR", detail=f"{d}: {ev.policy.value} not enforced ({monitored})")
            )
            return out, None, ""
        reason = (
            f"DMARC policy of {d} is {ev.policy.value} and the message is not "
            f"authenticated as coming from {d}"
        )
        return out, action, reason

    async def _allowlisted(self, ctx: Context) -> str:
        addr = ctx.client_address
        if addr is not None and isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        if addr is not None:
            for net in self.options.networks:
                if addr.version == net.version and addr in net:
                    return f"client {addr} in {net}"
        if self.options.allowlist_domains:
            ids = _identifiers(ctx)
            for kind, pairs in (("spf", ids.spf), ("dkim", ids.dkim)):
                for ident, result in pairs:
                    if result != "pass" or not ident:
                        continue
                    for allowed in self.options.allowlist_domains:
                        if org_aligned(ident, allowed):
                            return f"{kind} pass for allowlisted {allowed} ({ident})"
        return ""

    def _monitored(self, domain: str) -> str:
        if self.options.monitor_only:
            return "policies.dmarc.monitor_only"
        for m in self.options.monitor_domains:
            if org_aligned(domain, m):
                return f"policies.dmarc.monitor_domains: {m}"
        return ""

    async def _arc_override(self, walk: TreeWalk, domain: str, arc: ARCOutcome | None) -> str:
        """RFC 8617 §7.2.1: a receiver may use a trusted sealer's recorded results."""
        if arc is None or arc.result != "pass" or arc.sealer not in self._sealers:
            return ""
        for r in arc.recorded:
            if r.result != "pass":
                continue
            try:
                if r.method == "dmarc":
                    hf = r.prop("header.from")
                    if hf is None or hf.rpartition("@")[2] == domain:
                        return f"{arc.sealer} recorded dmarc=pass for {domain}"
                elif r.method == "dkim":
                    d = r.prop("header.d") or ""
                    if d and await walk.aligned(d, domain, "r"):
                        return f"{arc.sealer} recorded aligned dkim=pass d={d}"
                elif r.method == "spf":
                    mf = (r.prop("smtp.mailfrom") or "").rpartition("@")[2]
                    if mf and await walk.aligned(mf, domain, "r"):
                        return f"{arc.sealer} recorded aligned spf=pass {mf}"
            except DNSTemporaryError:
                continue
        return ""


def _merge(symbols: list[Symbol]) -> list[Symbol]:
    """One symbol per name (several From domains): evidence joined, the highest weight kept."""
    merged: dict[str, Symbol] = {}
    for s in symbols:
        prev = merged.get(s.name)
        if prev is None:
            merged[s.name] = Symbol(s.name, s.weight, printable(s.detail, 300))
        else:
            merged[s.name] = Symbol(
                s.name, max(prev.weight, s.weight), printable(f"{prev.detail}; {s.detail}", 300)
            )
    return list(merged.values())
