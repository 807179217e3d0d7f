"""One aggregate-report row per evaluated Author Domain, from the message's verdict.

A row is what RFC 7489 appendix C (and RFC 9990 §3) reports for a group of
messages: source IP, header From domain, the disposition we applied, DMARC's
aligned DKIM and SPF outcome, overrides, and the raw DKIM and SPF results with
their domains and selectors. Rows with the same content are counted, not
repeated, so a row's canonical JSON is its storage key.

Everything in a row is bounded (names, number of signatures, comments), so a
hostile message cannot make a storage key or a report line grow.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.api import AuthResult, DNSError, Resolver
from policies._authcommon import printable, valid_domain
from policies.dmarc import DMARCRecord, TreeWalk

__all__ = [
    "DISPOSITIONS",
    "DKIM_RESULTS",
    "SPF_RESULTS",
    "DKIMEntry",
    "Override",
    "PolicyPublished",
    "Row",
    "SPFEntry",
    "disposition_of",
    "rows_for",
]

DKIM_RESULTS = ("none", "pass", "fail", "policy", "neutral", "temperror", "permerror")
SPF_RESULTS = ("none", "neutral", "pass", "fail", "softfail", "temperror", "permerror")
DISPOSITIONS = ("none", "quarantine", "reject")
OVERRIDES = (
    "forwarded",
    "sampled_out",
    "trusted_forwarder",
    "mailing_list",
    "local_policy",
    "other",
)
MAX_SIGNATURES = 8  # DKIM results kept per row: a message with 500 signatures is one row
MAX_COMMENT = 100  # characters of an override's comment


@dataclass(frozen=True, slots=True)
class DKIMEntry:
    domain: str
    selector: str
    result: str  # one of DKIM_RESULTS


@dataclass(frozen=True, slots=True)
class SPFEntry:
    domain: str
    scope: str  # "mfrom" or "helo" (RFC 7489 appendix C SPFDomainScope)
    result: str  # one of SPF_RESULTS


@dataclass(frozen=True, slots=True)
class Override:
    """A PolicyOverrideReason: why the disposition is not what the policy asked for."""

    type: str  # one of OVERRIDES
    comment: str = ""


@dataclass(frozen=True, slots=True)
class Row:
    source_ip: str
    header_from: str
    disposition: str  # one of DISPOSITIONS
    dkim_aligned: str  # "pass" | "fail": DMARC's view of DKIM
    spf_aligned: str  # "pass" | "fail": DMARC's view of SPF
    reasons: tuple[Override, ...] = ()
    dkim: tuple[DKIMEntry, ...] = ()
    spf: tuple[SPFEntry, ...] = ()

    def key(self) -> str:
        """Canonical JSON: equal rows, equal keys (the store counts by it)."""
        return json.dumps(
            [
                self.source_ip,
                self.header_from,
                self.disposition,
                self.dkim_aligned,
                self.spf_aligned,
                [[r.type, r.comment] for r in self.reasons],
                [[d.domain, d.selector, d.result] for d in self.dkim],
                [[s.domain, s.scope, s.result] for s in self.spf],
            ],
            separators=(",", ":"),
        )

    @classmethod
    def from_key(cls, key: str) -> Row:
        """The row a :meth:`key` came from; ValueError for anything else."""
        try:
            ip, hf, disp, dk, sp, reasons, dkim, spf = json.loads(key)
            return cls(
                str(ip),
                str(hf),
                _one_of(disp, DISPOSITIONS),
                _one_of(dk, ("pass", "fail")),
                _one_of(sp, ("pass", "fail")),
                tuple(Override(_one_of(t, OVERRIDES), str(c)) for t, c in reasons),
                tuple(DKIMEntry(str(d), str(s), _one_of(r, DKIM_RESULTS)) for d, s, r in dkim),
                tuple(
                    SPFEntry(str(d), _one_of(s, ("mfrom", "helo")), _one_of(r, SPF_RESULTS))
                    for d, s, r in spf
                ),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a stored DMARC report row: {exc}") from None


@dataclass(frozen=True, slots=True)
class PolicyPublished:
    """The policy record as we found it (RFC 7489 appendix C PolicyPublishedType)."""

    domain: str
    adkim: str = "r"
    aspf: str = "r"
    p: str = "none"
    sp: str = "none"
    pct: int = 100
    np: str = ""  # RFC 9990; not in the RFC 7489 schema, so not in the XML
    testing: bool = False

    @classmethod
    def of(cls, record: DMARCRecord) -> PolicyPublished:
        return cls(
            record.domain,
            record.adkim,
            record.aspf,
            record.p.value,
            (record.sp or record.p).value,
            record.pct,
            record.np.value if record.np else "",
            record.testing,
        )

    def to_json(self) -> str:
        return json.dumps(
            [self.domain, self.adkim, self.aspf, self.p, self.sp, self.pct, self.np, self.testing],
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> PolicyPublished:
        try:
            d, adkim, aspf, p, sp, pct, np, testing = json.loads(text)
            return cls(
                str(d),
                _one_of(adkim, ("r", "s")),
                _one_of(aspf, ("r", "s")),
                _one_of(p, DISPOSITIONS),
                _one_of(sp, DISPOSITIONS),
                int(pct),
                str(np),
                bool(testing),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a stored DMARC policy: {exc}") from None


def _one_of(value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
    return str(value)


def disposition_of(action: str, dmarc_result: str) -> str:
    """What we did with a message, as DMARC reports it: only DMARC failures are
    "quarantined" or "rejected" by DMARC; a passing message is reported ``none``."""
    if dmarc_result != "fail":
        return "none"
    return action if action in ("reject", "quarantine") else "none"


def _overrides(symbols: Sequence[tuple[str, str]]) -> tuple[Override, ...]:
    """The operator's exceptions the dmarc policy applied, as RFC 7489 override reasons."""
    kinds = {
        "DMARC_ARC_OVERRIDE": "trusted_forwarder",
        "DMARC_ALLOWLISTED": "local_policy",
        "DMARC_MONITOR": "local_policy",
    }
    out = []
    for name, detail in symbols:
        kind = kinds.get(name)
        if kind is not None:
            comment = detail.partition(": ")[2] if name == "DMARC_MONITOR" else detail
            out.append(Override(kind, printable(comment, MAX_COMMENT)))
    return tuple(out)


def _dkim_entries(auth: Sequence[AuthResult]) -> tuple[DKIMEntry, ...]:
    out = []
    for a in auth:
        d = (a.prop("header.d") or "").lower().rstrip(".")
        if a.method != "dkim" or not d:
            continue
        result = a.result if a.result in DKIM_RESULTS else "permerror"
        out.append(DKIMEntry(printable(d, 253), printable(a.prop("header.s") or "", 63), result))
        if len(out) >= MAX_SIGNATURES:
            break
    return tuple(out)


def _spf_entries(auth: Sequence[AuthResult], mail_from: str, helo: str) -> tuple[SPFEntry, ...]:
    """The MAIL FROM result, else the HELO one (a null sender: RFC 7208 §2.4)."""
    mfrom = helo_entry = None
    for a in auth:
        if a.method != "spf":
            continue
        result = a.result if a.result in SPF_RESULTS else "permerror"
        mf = a.prop("smtp.mailfrom")
        if mf is not None and mfrom is None:
            # a null sender's identity is the HELO name (RFC 7208 §2.4): "postmaster@<helo>"
            null = not mail_from.strip("<> ")
            domain = mf.rpartition("@")[2] if "@" in mf else (helo if null else mf)
            scope = "helo" if null else "mfrom"
            mfrom = SPFEntry(printable(domain.lower().rstrip("."), 253), scope, result)
        elif a.prop("smtp.helo") is not None and helo_entry is None:
            helo_entry = SPFEntry(
                printable((a.prop("smtp.helo") or "").lower(), 253), "helo", result
            )
    entry = mfrom or helo_entry
    if entry is None:  # the spf policy is off: say so rather than leave the schema's spf out
        domain = mail_from.rpartition("@")[2] if "@" in mail_from else helo
        entry = SPFEntry(
            printable(domain.lower(), 253), "mfrom" if "@" in mail_from else "helo", "none"
        )
    return (entry,)


async def _aligned(walk: TreeWalk, ident: str, author: str, mode: str) -> bool:
    try:
        return await walk.aligned(ident, author, "s" if mode == "s" else "r")
    except DNSError:
        return False


async def rows_for(
    *,
    resolver: Resolver,
    auth: Sequence[AuthResult],
    symbols: Sequence[tuple[str, str]],
    action: str,
    client_ip: str,
    mail_from: str,
    helo: str,
) -> list[tuple[PolicyPublished, Row]]:
    """(policy, row) for each Author Domain DMARC passed or failed, with its policy record.

    The policy record and the Organizational Domains are read again through the
    gateway's caching resolver: the dmarc policy just looked them up, so these are
    cache hits. A lookup that fails now leaves that domain out (DNSError).
    """
    out: list[tuple[PolicyPublished, Row]] = []
    walk = TreeWalk(resolver)
    dkim = _dkim_entries(auth)
    spf = _spf_entries(auth, mail_from, helo)
    reasons = _overrides(symbols)
    for a in auth:
        if a.method != "dmarc" or a.result not in ("pass", "fail"):
            continue
        author = (a.prop("header.from") or "").lower()
        where = (a.prop("polrec.domain") or "").lower()
        if not valid_domain(author) or not valid_domain(where):
            continue
        record = await walk.record_at(where)
        if record is None:
            continue  # the record changed since the evaluation
        policy = PolicyPublished.of(record)
        dkim_ok = spf_ok = False
        if a.result == "pass":
            for d in dkim:
                if d.result == "pass" and await _aligned(walk, d.domain, author, policy.adkim):
                    dkim_ok = True
                    break
            s = spf[0]  # DMARC aligns the MAIL FROM, or the HELO name of a null sender
            spf_ok = s.result == "pass" and await _aligned(walk, s.domain, author, policy.aspf)
        row = Row(
            client_ip,
            author,
            disposition_of(action, a.result),
            "pass" if dkim_ok else "fail",
            "pass" if spf_ok else "fail",
            reasons if a.result == "fail" else (),
            dkim,
            spf,
        )
        out.append((policy, row))
    return out
