"""Quarantine digests: one mail per recipient listing what was held for them, with signed links.

Proxmox Mail Gateway's daily spam report is what admins expect: a recipient
sees the messages held for them and releases a false positive without
asking anyone. Each listed message carries two links (release, delete)
signed for that recipient, that message and that action
(:mod:`gateway.web.links`); they open the confirmation pages of
:mod:`gateway.web.recipient` under ``web.base_url``.

A digest lists the messages received since ``since`` (the schedule: the last
24 hours; the CLI: ``--since HOURS`` or ``--all``), newest first, at most
:data:`MAX_LISTED` per recipient (the rest are counted, never silently
dropped). Digests go straight to ``[relay]`` (they are the gateway's own
mail, not scanned again), from ``web.digest_from``, marked
``Auto-Submitted: auto-generated`` so vacation responders stay quiet.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import jinja2

from gateway import metrics
from gateway.config import Config
from gateway.quarantine import QuarantineFilter, QuarantineItem, QuarantineStore
from gateway.relay import Relay, RelayError
from gateway.web.links import sign
from gateway.web.paths import RECIPIENT_PREFIX

__all__ = [
    "MAX_LISTED",
    "Digest",
    "DigestError",
    "DigestRun",
    "base_url",
    "collect",
    "render",
    "send_digests",
    "sender",
]

log = logging.getLogger("gateway.digest")

MAX_LISTED = 100  # messages one digest lists; the rest are counted ("and 12 more")
MAX_RECIPIENTS = 5_000  # recipients one run mails; the rest are counted and logged
_PAGE = 500  # quarantine rows per store call
_SUBJECT_CHARS = 120  # of a held message's subject, in the digest
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,  # subjects and names are the sender's: they show as text
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


class DigestError(Exception):
    """Digests cannot be built with this config (the message says which key to set)."""


@dataclass(slots=True)
class Digest:
    """What one recipient is told: the held messages (newest first) and how many more."""

    rcpt: str
    items: list[QuarantineItem] = field(default_factory=list)
    more: int = 0

    @property
    def total(self) -> int:
        return len(self.items) + self.more


@dataclass(slots=True)
class DigestRun:
    """What a run did: digests sent or printed, failed, recipients left out over the cap."""

    sent: int = 0
    failed: int = 0
    skipped_recipients: int = 0
    messages: int = 0  # held messages listed, over all digests
    errors: list[str] = field(default_factory=list)


def base_url(config: Config) -> str:
    """Where recipients reach the web app: ``web.base_url``, else ``http://<web.listen>``."""
    web = config.web
    if web.base_url:
        return web.base_url.rstrip("/")
    if web.listen and not web.listen.endswith(":0"):
        return f"http://{web.listen}"
    raise DigestError(
        "digests need links people can open: set web.base_url (e.g. "
        '"https://quarantine.example.org") or web.listen'
    )


def sender(config: Config) -> str:
    """The digests' From: ``web.digest_from``, else postmaster of the first accepted domain."""
    if config.web.digest_from:
        return config.web.digest_from
    return f"postmaster@{config.server.accepted_domains[0]}"


async def collect(
    store: QuarantineStore,
    since: datetime | None,
    *,
    max_listed: int = MAX_LISTED,
    max_recipients: int = MAX_RECIPIENTS,
) -> tuple[list[Digest], int]:
    """Per recipient (case-insensitive), the messages held since ``since``; and how many
    recipients were left out over ``max_recipients``.

    Memory is bounded by ``max_recipients * max_listed`` items however large the
    quarantine is: the store is read page by page, newest first.
    """
    digests: dict[str, Digest] = {}
    left_out: set[str] = set()
    cursor: str | None = None
    query = QuarantineFilter(since=since)
    while True:
        page = await store.search(query, limit=_PAGE, cursor=cursor)
        for item in page.items:
            for rcpt in item.rcpt_tos:
                key = rcpt.lower()
                digest = digests.get(key)
                if digest is None:
                    if len(digests) >= max_recipients:
                        left_out.add(key)
                        continue
                    digest = digests[key] = Digest(rcpt)
                if len(digest.items) < max_listed:
                    digest.items.append(item)
                else:
                    digest.more += 1
        if page.next is None:
            break
        cursor = page.next
    return sorted(digests.values(), key=lambda d: d.rcpt.lower()), len(left_out)


@dataclass(frozen=True, slots=True)
class _Entry:
    """One listed message as the templates show it."""

    received: str
    sender: str
    subject: str
    score: str
    reason: str
    release: str
    delete: str


def _entries(digest: Digest, key: bytes, base: str, expires: int) -> Iterator[_Entry]:
    for item in digest.items:
        subject = item.subject or "(no subject)"
        if len(subject) > _SUBJECT_CHARS:
            subject = subject[: _SUBJECT_CHARS - 1] + "…"
        links = {
            action: f"{base}{RECIPIENT_PREFIX}{sign(key, action, item.id, digest.rcpt, expires)}"
            for action in ("release", "delete")
        }
        yield _Entry(
            received=f"{item.received_at:%Y-%m-%d %H:%M}",
            sender=(item.header_from or f"<{item.mail_from}>")[:_SUBJECT_CHARS],
            subject=subject,
            score=f"{item.score:.1f}",
            reason=(item.reasons[0] if item.reasons else "")[:_SUBJECT_CHARS],
            release=links["release"],
            delete=links["delete"],
        )


def render(config: Config, digest: Digest, key: bytes, now: float | None = None) -> bytes:
    """The digest mail for ``digest.rcpt`` (text and HTML alternatives), CRLF line ends."""
    now = time.time() if now is None else now
    expires = int(now + config.web.link_expiry_days * 86_400)
    entries = list(_entries(digest, key, base_url(config), expires))
    values = {
        "rcpt": digest.rcpt,
        "entries": entries,
        "more": digest.more,
        "total": digest.total,
        "hostname": config.server.hostname,
        "expires": datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%d %H:%M"),
    }
    msg = EmailMessage(policy=SMTP)
    msg["From"] = email.utils.formataddr(("Quarantine", sender(config)))
    msg["To"] = digest.rcpt
    plural = "message" if digest.total == 1 else "messages"
    msg["Subject"] = f"Quarantine digest: {digest.total} {plural} held for {digest.rcpt}"
    msg["Date"] = email.utils.formatdate(now)
    msg["Message-ID"] = email.utils.make_msgid("digest", domain=config.server.hostname)
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Auto-Response-Suppress"] = "All"
    msg.set_content(_ENV.get_template("digest.txt").render(**values))
    msg.add_alternative(_ENV.get_template("digest.html").render(**values), subtype="html")
    return msg.as_bytes()


async def send_digests(
    config: Config,
    store: QuarantineStore,
    key: bytes,
    *,
    since: datetime | None,
    send: bool,
    printer: Callable[[str, bytes], None] | None = None,
) -> DigestRun:
    """Build every recipient's digest; with ``send`` relay each, else hand it to ``printer``.

    ``printer`` is called with (recipient, message bytes) in a dry run. A digest
    the downstream refuses is counted and logged; the others still go.
    """
    run = DigestRun()
    digests, run.skipped_recipients = await collect(store, since)
    if run.skipped_recipients:
        log.warning(
            "digest_recipients_capped",
            extra={"mailed": len(digests), "left_out": run.skipped_recipients},
        )
    relay = Relay(config.relay, config.server.hostname) if send else None
    envelope_from = sender(config)
    try:
        for digest in digests:
            data = render(config, digest, key)
            run.messages += len(digest.items)
            if relay is None:
                if printer is not None:
                    printer(digest.rcpt, data)
                run.sent += 1
                continue
            try:
                await relay.send(envelope_from, [digest.rcpt], data)
            except RelayError as exc:
                run.failed += 1
                said = f"{exc.code} {exc.text}" if exc.code is not None else exc.text
                run.errors.append(f"{digest.rcpt}: {said}")
                metrics.QUARANTINE_DIGESTS.labels("failed").inc()
                log.error("digest_failed", extra={"rcpt": digest.rcpt, "error": said})
                continue
            run.sent += 1
            metrics.QUARANTINE_DIGESTS.labels("sent").inc()
            log.info("digest_sent", extra={"rcpt": digest.rcpt, "listed": digest.total})
    finally:
        if relay is not None:
            with contextlib.suppress(Exception):
                await relay.close()
    return run
