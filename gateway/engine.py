"""One config generation: the policies, their scores and thresholds, and evaluation.

The SMTP server and ``scan`` both call :meth:`Engine.evaluate`, so the CLI
explains exactly what the server would do. A reload builds a new Engine and
swaps it in; sessions already evaluating keep the one they started with.
"""

from __future__ import annotations

import email.parser
import email.policy
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage

from gateway.api import Action, Context, Result, Services, Symbol, SymbolDef, TLSInfo
from gateway.config import Config
from gateway.pipeline import Pipeline, PipelineRun, PolicyRun
from gateway.registry import Plan, plan_policies
from gateway.replies import Reply, queued, verdict_reply
from gateway.schema import Problems
from gateway.verdict import Verdict, decide, verdict_headers

__all__ = ["Engine", "Envelope", "Evaluation", "parse_message"]

log = logging.getLogger("gateway.engine")

_PARSER = email.parser.BytesParser(policy=email.policy.default)
_HEADER_PARSER = email.parser.BytesParser(policy=email.policy.default)


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the SMTP layer knows about one message before its content."""

    client_ip: str | None
    helo: str
    mail_from: str
    rcpt_to: tuple[str, ...]
    queue_id: str
    client_name: str = ""
    tls: TLSInfo | None = None
    received_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Evaluation:
    envelope: Envelope
    verdict: Verdict
    run: PipelineRun
    headers: tuple[str, ...]  # to prepend when relaying (folded, no trailing CRLF)

    @property
    def action(self) -> Action:
        return self.verdict.action

    def reply(self) -> Reply:
        """The reply for reject/tempfail; for other actions the hand-off decides."""
        return verdict_reply(self.verdict.action, self.verdict.reason, self.envelope.queue_id)


_MULTIPART = re.compile(rb"content-type:[ \t]*(?:\r?\n[ \t]+)?multipart/", re.IGNORECASE)


def parse_message(raw: bytes) -> EmailMessage:
    """Parse once; the result is shared by every policy.

    A message the parser cannot make sense of still yields an EmailMessage
    (with ``defects``): bad mail is a symbol, never a crash.
    """
    return parse_bounded(raw, max_containers=None)[0]


def parse_bounded(raw: bytes, max_containers: int | None) -> tuple[EmailMessage, Symbol | None]:
    """Parse within a bounded cost; a message we could not inspect fully yields a symbol."""
    if max_containers is not None:
        containers = len(_MULTIPART.findall(raw))
        if containers > max_containers:
            msg = _HEADER_PARSER.parsebytes(raw, headersonly=True)
            assert isinstance(msg, EmailMessage)
            # Policies see the header only: a body they cannot walk is not a crash.
            del msg["Content-Type"]
            msg.set_payload("")
            return msg, Symbol("MIME_TOO_COMPLEX", detail=f"{containers} multipart containers")
    try:
        msg = _PARSER.parsebytes(raw)
    except (RecursionError, Exception) as exc:  # the stdlib parser is lenient; a backstop
        log.warning("message_parse_failed", extra={"error": type(exc).__name__})
        return EmailMessage(), Symbol("MIME_UNPARSEABLE", detail=type(exc).__name__)
    assert isinstance(msg, EmailMessage)  # policy=default builds EmailMessage
    return msg, None


class Engine:
    def __init__(self, config: Config, plan: Plan, services: Services) -> None:
        self.config = config
        self.plan = plan
        self.services = services
        on_error = Action.TEMPFAIL if config.pipeline.on_policy_error == "tempfail" else None
        self.pipeline = Pipeline(
            plan, default_timeout=config.pipeline.policy_timeout, on_error=on_error
        )
        self._declared: dict[str, tuple[str, SymbolDef]] = {}

    @staticmethod
    def make_plan(config: Config) -> Plan:
        """Validate the policy tables; raises ConfigError-compatible SchemaError."""
        from gateway.config import ConfigError

        problems = Problems()
        plan = plan_policies(config.policies, problems)
        if problems.lines:
            raise ConfigError(problems.lines)
        return plan

    async def start(self) -> None:
        await self.pipeline.start(self.services)
        self._declared = self.declared_symbols()

    async def close(self) -> None:
        await self.pipeline.close()

    def declared_symbols(self) -> dict[str, tuple[str, SymbolDef]]:
        """Every symbol: declared by policy classes plus those rule files add at run time."""
        out = self.plan.symbols()
        for name, policy in self.pipeline.policies.items():
            for sym, sdef in policy.rule_symbols().items():
                out[sym] = (name, sdef)
        return out

    def unknown_score_keys(self) -> list[str]:
        """``[scores]`` entries that name no symbol of an enabled policy (typos)."""
        known = self._declared or self.declared_symbols()
        return [k for k in self.config.scores if k not in known]

    async def evaluate(self, envelope: Envelope, raw: bytes) -> Evaluation:
        message, parse_problem = parse_bounded(raw, self.config.pipeline.max_mime_containers)
        ctx = Context(
            client_ip=envelope.client_ip,
            client_name=envelope.client_name,
            helo=envelope.helo,
            mail_from=envelope.mail_from,
            rcpt_to=envelope.rcpt_to,
            raw=raw,
            message=message,
            resolver=self.services.resolver,
            hostname=self.config.server.hostname,
            queue_id=envelope.queue_id,
            tls=envelope.tls,
            received_at=envelope.received_at or datetime.now(UTC),
        )
        run = await self.pipeline.run(ctx)
        if parse_problem is not None:
            # Content we could not inspect is never relayed on a guess: quarantine it.
            flagged = Result(
                symbols=(parse_problem,),
                force=Action.QUARANTINE,
                reason="message structure too complex to inspect",
            )
            run = PipelineRun((PolicyRun("gateway", flagged, 0.0, "ok"), *run.runs))
        verdict = decide(
            run,
            declared=self._declared or self.declared_symbols(),
            overrides=self.config.scores,
            thresholds=self.config.actions,
        )
        headers = tuple(verdict_headers(verdict, self.config.server.hostname))
        return Evaluation(envelope, verdict, run, headers)

    def preview_reply(self, evaluation: Evaluation) -> Reply:
        """What the client would be told if the hand-off succeeds (for ``scan``)."""
        if evaluation.action in (Action.REJECT, Action.TEMPFAIL):
            return evaluation.reply()
        return queued(evaluation.envelope.queue_id)
