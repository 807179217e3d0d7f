"""The report message (RFC 7489 §7.2.1.1; RFC 9990 §4): one gzip'd XML attachment.

Subject ``Report Domain: <policy domain> Submitter: <our domain> Report-ID:
<<id>>``, the attachment named ``<receiver>!<policy domain>!<begin>!<end>!<id>.xml.gz``
(``application/gzip``), a short text part for people. CRLF line ends: the
relay sends the bytes as they are.
"""

from __future__ import annotations

import email.policy
import email.utils
import gzip
from dataclasses import dataclass
from email.message import EmailMessage

__all__ = ["ReportMail", "compose", "gzip_xml"]


@dataclass(frozen=True, slots=True)
class ReportMail:
    data: bytes  # the whole message
    attachment_size: int  # bytes of the gzip'd report


def gzip_xml(xml: bytes) -> bytes:
    # mtime=0: the same report gives the same bytes (retries, tests)
    return gzip.compress(xml, compresslevel=9, mtime=0)


def compose(
    *,
    sender: str,
    org_name: str,
    receiver: str,
    domain: str,
    rua: str,
    report_id: str,
    begin: int,
    end: int,
    gz: bytes,
    hostname: str,
) -> ReportMail:
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = email.utils.formataddr((org_name, sender))
    msg["To"] = rua
    msg["Subject"] = f"Report Domain: {domain} Submitter: {receiver} Report-ID: <{report_id}>"
    msg["Date"] = email.utils.formatdate(usegmt=True)
    msg["Message-ID"] = email.utils.make_msgid("dmarc-report", domain=hostname)
    msg.set_content(
        f"DMARC aggregate report for {domain} from {org_name} ({receiver}),\n"
        f"messages received between {email.utils.formatdate(begin, usegmt=True)} and "
        f"{email.utils.formatdate(end, usegmt=True)}.\n"
        "The report is the attached gzip'd XML file (RFC 9990, RFC 7489 appendix C).\n"
    )
    msg.add_attachment(
        gz,
        maintype="application",
        subtype="gzip",
        filename=f"{receiver}!{domain}!{begin}!{end}!{report_id}.xml.gz",
    )
    return ReportMail(msg.as_bytes(), len(gz))
