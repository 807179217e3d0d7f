"""The aggregate report document (RFC 7489 appendix C; RFC 9990 §3 reads it too).

Built with ElementTree, so every value from mail (domains, selectors,
comments) is escaped. The elements are unqualified, as the reports receivers
send and every report parser reads. Rows that did not fit the store's caps are
not lost silently: ``report_metadata/error`` says how many messages are missing.
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET

from gateway.config import DmarcReportsConfig
from gateway.dmarcreports.store import DomainReport

__all__ = ["build_xml", "report_id"]


def report_id(receiver: str, domain: str, begin: int) -> str:
    """Stable for one (receiver, domain, interval): a retried report keeps its id."""
    digest = hashlib.sha256(f"{receiver}!{domain}!{begin}".encode()).hexdigest()[:16]
    return f"{begin}.{digest}"


def _sub(parent: ET.Element, tag: str, text: str | int | None = None) -> ET.Element:
    el = ET.SubElement(parent, tag)
    if text is not None:
        el.text = str(text)
    return el


def build_xml(config: DmarcReportsConfig, report: DomainReport) -> bytes:
    """The report as UTF-8 XML bytes with a declaration."""
    begin = report.interval
    end = begin + config.interval - 1  # inclusive, as receivers send it
    policy = report.policy
    root = ET.Element("feedback")
    _sub(root, "version", "1.0")
    meta = _sub(root, "report_metadata")
    _sub(meta, "org_name", config.org_name)
    _sub(meta, "email", config.email)
    _sub(meta, "report_id", report_id(config.receiver_domain, policy.domain, begin))
    dates = _sub(meta, "date_range")
    _sub(dates, "begin", begin)
    _sub(dates, "end", end)
    if report.dropped:
        _sub(
            meta,
            "error",
            f"{report.dropped} message(s) not counted: more distinct rows than this "
            "receiver keeps per domain per interval",
        )
    published = _sub(root, "policy_published")
    _sub(published, "domain", policy.domain)
    _sub(published, "adkim", policy.adkim)
    _sub(published, "aspf", policy.aspf)
    _sub(published, "p", policy.p)
    _sub(published, "sp", policy.sp)
    _sub(published, "pct", policy.pct)
    for row, count in report.rows:
        record = _sub(root, "record")
        r = _sub(record, "row")
        _sub(r, "source_ip", row.source_ip)
        _sub(r, "count", count)
        evaluated = _sub(r, "policy_evaluated")
        _sub(evaluated, "disposition", row.disposition)
        _sub(evaluated, "dkim", row.dkim_aligned)
        _sub(evaluated, "spf", row.spf_aligned)
        for reason in row.reasons:
            why = _sub(evaluated, "reason")
            _sub(why, "type", reason.type)
            if reason.comment:
                _sub(why, "comment", reason.comment)
        ids = _sub(record, "identifiers")
        _sub(ids, "header_from", row.header_from)
        results = _sub(record, "auth_results")
        for d in row.dkim:
            dkim = _sub(results, "dkim")
            _sub(dkim, "domain", d.domain)
            if d.selector:
                _sub(dkim, "selector", d.selector)
            _sub(dkim, "result", d.result)
        for s in row.spf:
            spf = _sub(results, "spf")
            _sub(spf, "domain", s.domain)
            _sub(spf, "scope", s.scope)
            _sub(spf, "result", s.result)
    ET.indent(root, space="  ")
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data + b"\n"
