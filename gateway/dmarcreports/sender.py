"""Send the reports that are due: fresh ``rua`` lookup, destination checks, relay.

For each complete interval (ended ``send_delay`` ago) and each policy domain
not yet settled, under the store's lease (one node of a cluster sends):

1. ``exclude_domains``, then the domain's current DMARC record: no record or no
   ``rua`` -> skipped. ``rua`` past the parser's cap is counted (``rua_dropped``).
2. Per URI: only ``mailto:`` (never https or anything else); an address whose
   Organizational Domain differs from the policy domain's is an external
   destination and must publish ``<policy-domain>._report._dmarc.<rua-domain>``
   TXT starting with ``v=DMARC1`` (RFC 7489 §7.1, RFC 9990 §4); the report must
   fit ``max_report_size`` and the URI's ``!size``; at most
   ``max_per_destination_per_day`` mails per address.
3. The gzip'd report goes through ``[relay]``. A temporary relay or DNS failure
   leaves the domain unsettled, so the next run tries again (within
   ``retention_days``); everything else settles it.

Every outcome is logged (``dmarc_report_sent`` / ``_skipped`` / ``_failed``)
and counted in ``gateway_dmarc_reports_total{outcome,reason}``. ``ruf``
(failure reports) is never sent: they carry message content (docs/dmarc-reports.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway import metrics
from gateway.api import DNSTemporaryError, Resolver, StateUnavailableError
from gateway.config import Config
from gateway.dmarcreports.mail import compose, gzip_xml
from gateway.dmarcreports.recorder import excluded, interval_start
from gateway.dmarcreports.store import DomainReport, ReportStore
from gateway.dmarcreports.xml import build_xml, report_id
from gateway.relay import Relay, RelayError
from policies._authcommon import printable, valid_domain
from policies.dmarc import ReportURI, TreeWalk

__all__ = ["REASONS", "ReportSender", "SendOutcome"]

log = logging.getLogger("gateway.dmarcreports")

REASONS = {
    "sent": ("ok",),
    "failed": ("relay", "dns", "store"),
    "skipped": (
        "excluded",
        "empty",
        "no_record",
        "no_rua",
        "rua_dropped",
        "not_mailto",
        "unverified",
        "verify_temperror",
        "name_too_long",
        "too_large",
        "destination_limit",
        "locked",
    ),
}
_LOCK_TTL = 900.0  # seconds: a node that dies while sending frees the lease by then
_RUN_BUDGET = 600.0  # seconds one run may send for, well inside the lease; then it yields
_DOMAIN_DEADLINE = 300.0  # seconds for one domain's destinations (DNS + relay each bounded)


@dataclass(frozen=True, slots=True)
class SendOutcome:
    interval: int
    domain: str
    destination: str  # the rua URI, "" for a domain-level outcome
    outcome: str  # sent | failed | skipped
    reason: str  # one of REASONS[outcome]
    detail: str = ""
    retry: bool = False  # temporary: the domain stays unsettled


class ReportSender:
    def __init__(
        self,
        config: Callable[[], Config],
        store: ReportStore,
        resolver: Callable[[], Resolver],
        relay: Callable[[], Relay],
    ) -> None:
        """Callables: ``gateway run`` passes the current generation's config, resolver, relay."""
        self.config = config
        self.store = store
        self._resolver = resolver
        self.relay = relay
        self.unfinished = False  # the last run stopped at its time budget: run again soon

    @property
    def resolver(self) -> Resolver:
        return self._resolver()

    # -- preview -----------------------------------------------------------------

    async def reports(self, domain: str | None = None) -> list[tuple[DomainReport, bytes]]:
        """Every stored report not yet settled (the interval in progress too), as XML."""
        cfg = self.config().dmarc_reports
        out = []
        for interval in await self.store.intervals():
            marks = await self.store.marks(interval)
            for name in await self.store.domains(interval):
                if (domain and name != domain.lower().rstrip(".")) or name in marks:
                    continue
                report = await self.store.report(interval, name)
                if report is not None and report.rows:
                    out.append((report, await asyncio.to_thread(build_xml, cfg, report)))
        return out

    # -- sending -----------------------------------------------------------------

    async def send_due(self, now: float | None = None) -> list[SendOutcome]:
        """Send every report whose interval is complete; the outcomes, in order."""
        now = time.time() if now is None else now
        cfg = self.config().dmarc_reports
        token = await self.store.lock(_LOCK_TTL)
        if token is None:
            outcome = SendOutcome(0, "", "", "skipped", "locked", "another process is sending")
            self._note(outcome)
            return [outcome]
        outcomes: list[SendOutcome] = []
        started = time.monotonic()
        self.unfinished = False
        try:
            oldest = interval_start(cfg, now) - cfg.retention_days * 86_400
            for interval in await self.store.intervals():
                if interval < oldest or interval + cfg.interval + cfg.send_delay > now:
                    continue
                expires = now + cfg.retention_days * 86_400
                marks = await self.store.marks(interval)
                for domain in await self.store.domains(interval):
                    if domain in marks:
                        continue
                    if time.monotonic() - started > _RUN_BUDGET:
                        self.unfinished = True  # the lease must not run out mid-send
                        return outcomes
                    outcomes += await self._settle(interval, domain, now, expires)
                lost = await self.store.dropped_domains(interval)
                if lost and "" not in marks:
                    log.warning(
                        "dmarc_report_domains_dropped",
                        extra={"interval": interval, "messages": lost, "cap": cfg.max_domains},
                    )
                    await self.store.mark(interval, "", "dropped", expires)
            await self.store.purge(oldest)
        finally:
            await self.store.unlock(token)
        return outcomes

    async def _settle(
        self, interval: int, domain: str, now: float, expires: float
    ) -> list[SendOutcome]:
        """Send one domain's report and mark it settled, unless it is worth a retry."""
        try:
            async with asyncio.timeout(_DOMAIN_DEADLINE):
                done = await self._send_domain(interval, domain, now)
        except TimeoutError:
            done = [SendOutcome(interval, domain, "", "failed", "dns", "timed out", True)]
        except StateUnavailableError as exc:
            done = [SendOutcome(interval, domain, "", "failed", "store", printable(str(exc)), True)]
        for o in done:
            self._note(o)
        sent = any(o.outcome == "sent" for o in done)
        if sent or not any(o.retry for o in done):
            # one destination sent and another failed: settled, never a duplicate
            await self.store.mark(interval, domain, "sent" if sent else "skipped", expires)
        return done

    def _note(self, o: SendOutcome) -> None:
        metrics.DMARC_REPORTS.labels(outcome=o.outcome, reason=o.reason).inc()
        event = f"dmarc_report_{o.outcome}"
        extra = {
            "interval": o.interval,
            "domain": o.domain,
            "destination": o.destination,
            "reason": o.reason,
            "detail": o.detail,
        }
        if o.outcome == "failed":
            log.warning(event, extra=extra)
        else:
            log.info(event, extra=extra)

    async def _send_domain(self, interval: int, domain: str, now: float) -> list[SendOutcome]:
        config = self.config()
        cfg = config.dmarc_reports

        def outcome(
            dest: str, kind: str, reason: str, detail: str = "", retry: bool = False
        ) -> SendOutcome:
            return SendOutcome(interval, domain, dest, kind, reason, printable(detail, 200), retry)

        if excluded(cfg, domain):
            return [outcome("", "skipped", "excluded")]
        report = await self.store.report(interval, domain)
        if report is None or not report.rows:
            return [outcome("", "skipped", "empty")]
        walk = TreeWalk(self.resolver)
        try:
            record = await walk.record_at(domain)
        except DNSTemporaryError as exc:
            return [outcome("", "failed", "dns", str(exc), retry=True)]
        if record is None:
            return [outcome("", "skipped", "no_record", f"no DMARC record at _dmarc.{domain}")]
        out: list[SendOutcome] = []
        if record.rua_dropped:
            out.append(
                outcome("", "skipped", "rua_dropped", f"{record.rua_dropped} rua URI(s) ignored")
            )
        if not record.rua:
            return [*out, outcome("", "skipped", "no_rua", "the record has no usable rua")]
        # ~50 ms per 1000 rows: a worker thread's, never the event loop's
        xml = await asyncio.to_thread(build_xml, cfg, report)
        gz = await asyncio.to_thread(gzip_xml, xml)
        rid = report_id(cfg.receiver_domain, domain, interval)
        end = interval + cfg.interval - 1
        seen: set[str] = set()
        for uri in record.rua:
            key = uri.address.lower() or uri.uri
            if key in seen:
                continue
            seen.add(key)
            if uri.scheme != "mailto":
                out.append(outcome(uri.uri, "skipped", "not_mailto", "only mailto: is sent"))
                continue
            if len(gz) > cfg.max_report_size:
                out.append(outcome(uri.uri, "skipped", "too_large", f"{len(gz)} bytes"))
                continue
            mail = await asyncio.to_thread(
                compose,
                sender=cfg.email,
                org_name=cfg.org_name,
                receiver=cfg.receiver_domain,
                domain=domain,
                rua=uri.address,
                report_id=rid,
                begin=interval,
                end=end,
                gz=gz,
                hostname=config.server.hostname,
            )
            if uri.max_size is not None and len(mail.data) > uri.max_size:
                out.append(
                    outcome(uri.uri, "skipped", "too_large", f"{len(mail.data)} > !{uri.max_size}")
                )
                continue
            verdict = await self._verify(walk, domain, uri)
            if verdict:
                out.append(outcome(uri.uri, "skipped", verdict, uri.domain))
                continue
            day = int(now // 86_400)
            count = await self.store.count_destination(day, uri.address, (day + 2) * 86_400)
            if count > cfg.max_per_destination_per_day:
                out.append(outcome(uri.uri, "skipped", "destination_limit", f"{count} today"))
                continue
            try:
                await self.relay().send(cfg.email, [uri.address], mail.data)
            except RelayError as exc:
                out.append(
                    outcome(
                        uri.uri,
                        "failed",
                        "relay",
                        f"{exc.code or ''} {exc.text}".strip(),
                        retry=not exc.permanent,
                    )
                )
                continue
            out.append(outcome(uri.uri, "sent", "ok", f"{len(gz)} bytes gzip, id {rid}"))
        return out

    async def _verify(self, walk: TreeWalk, domain: str, uri: ReportURI) -> str:
        """ "" when ``uri`` may receive ``domain``'s reports, else the skip reason."""
        target = uri.domain
        try:
            if await walk.organizational_domain(target) == await walk.organizational_domain(domain):
                return ""
            name = f"{domain}._report._dmarc.{target}"
            if not valid_domain(name):
                return "name_too_long"
            answer = await self.resolver.query(name, "TXT")
        except DNSTemporaryError:
            return "verify_temperror"
        if any(r.strip().startswith("v=DMARC1") for r in answer.records):
            return ""
        return "unverified"
