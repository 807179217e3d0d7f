"""The milter front end: a Postfix message becomes a Submission, the Outcome a Decision.

Postfix keeps the queue, the client, TLS and ``accepted_domains`` (its
``smtpd_recipient_restrictions``); the gateway only judges. The verdict
leaves as header edits on Postfix's copy:

- relay / add_header: forged ``Authentication-Results`` carrying our
  authserv-id (and every ``X-Spam-*``) deleted by index, our fields inserted
  at the top, then accept: Postfix delivers it.
- reject: ``SMFIR_REPLYCODE`` with the same 550 text SMTP mode sends;
  tempfail: 451.
- quarantine: stored durably (fsync) in the gateway's quarantine first, then
  ``SMFIR_DISCARD``: Postfix reports success to the client and drops its copy.
  Holding it in Postfix's own hold queue instead would put it out of reach of
  the gateway's quarantine (web UI, digests, retention, release); a release
  sends it through ``[relay]`` (e.g. Postfix's re-injection port). When the
  quarantine cannot store it the answer is 451, so nothing is lost.
"""

from __future__ import annotations

import ipaddress
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from gateway import headers, replies
from gateway.api import TLSInfo
from gateway.engine import Envelope, Evaluation
from gateway.handoff import Submission, new_queue_id
from gateway.milter.message import Budget, header_edits
from gateway.milter.session import Decision, MilterLimits, MilterMessage
from gateway.replies import Reply

if TYPE_CHECKING:
    from gateway.server import Gateway, Generation

__all__ = ["MilterDelivery", "MilterFrontend"]

log = logging.getLogger("gateway.milter")


class MilterDelivery:
    """Nothing to send: Postfix delivers its own copy once we accept it."""

    async def deliver(
        self, gen: Generation, sub: Submission, evaluation: Evaluation, clean: bytes
    ) -> tuple[Reply, str, dict[str, Any]]:
        return replies.queued(sub.envelope.queue_id), evaluation.action.value, {}


class MilterFrontend:
    """:class:`~gateway.milter.session.MilterBackend` over the front-end-agnostic core."""

    def __init__(self, core: Gateway) -> None:
        self.core = core
        self.budget: Budget = core.budget  # shared with SMTP sessions (and workers)
        self._delivery = MilterDelivery()

    @property
    def draining(self) -> bool:
        return self.core.draining

    def limits(self) -> MilterLimits:
        server = self.core.gen.config.server
        return MilterLimits(
            max_message_size=server.max_message_size,
            idle_timeout=server.command_timeout,
            message_timeout=server.data_timeout,
        )

    def refusal(self, reason: Literal["too_big", "no_memory"]) -> str:
        return str(replies.MESSAGE_TOO_BIG if reason == "too_big" else replies.NO_MEMORY)

    async def judge(self, message: MilterMessage) -> Decision:
        macros = message.macros
        upstream_id = macros.get("i", "")
        sub = Submission(
            _envelope(message),
            message.raw,
            "milter",
            log_fields={
                "upstream_queue_id": upstream_id or None,  # Postfix's queue id (the i macro)
                "mta": macros.get("j") or None,
                "auth": macros.get("auth_authen") or None,
            },
        )
        outcome = await self.core.hand_off(sub, self._delivery)
        reply = outcome.reply
        if reply.code >= 400:
            return Decision("reply", str(reply))
        if outcome.action == "quarantine":
            return Decision("discard")
        hostname = self.core.gen.config.server.hostname
        edits = header_edits(
            message.raw,
            headers.untrusted_field(hostname),
            outcome.added,
            leading_space=message.leading_space,
        )
        return Decision("accept", edits=tuple(edits))


def _envelope(message: MilterMessage) -> Envelope:
    macros = message.macros
    client_ip = macros.get("client_addr") or (message.client.address if message.client else "")
    try:
        ipaddress.ip_address(client_ip)
    except ValueError:
        client_ip = ""  # a local submission (pickup, sendmail): no network client
    name = macros.get("client_name", "")
    if name.startswith("[") or name == "unknown":
        name = ""  # Postfix's placeholder for a client without verified rDNS
    tls_version = macros.get("tls_version", "")
    return Envelope(
        client_ip=client_ip or None,
        helo=message.helo,
        mail_from=message.mail_from,
        rcpt_to=message.rcpt_to,
        queue_id=new_queue_id(),
        client_name=name,
        tls=TLSInfo(tls_version, macros.get("cipher", "")) if tls_version else None,
        received_at=datetime.now(UTC),
    )
