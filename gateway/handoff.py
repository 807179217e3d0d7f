"""The one hand-off both front ends call: evaluate, then refuse, quarantine or deliver.

The SMTP listener and the milter differ only in how a message arrives and how
the verdict leaves: the SMTP path relays the bytes to ``[relay]`` and answers
the client with the downstream's reply; the milter path answers Postfix with
header edits. Everything between (evaluation, metrics, forged
Authentication-Results removal, durable quarantine, the ``message_processed``
log line, learning) is here, once, so the two never drift apart.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

from gateway import headers, metrics, replies
from gateway.api import Action
from gateway.engine import Envelope, Evaluation
from gateway.quarantine import QuarantineError, QuarantineStore, new_quarantine_item
from gateway.relay import RelayError
from gateway.replies import Reply

if TYPE_CHECKING:
    from gateway.server import Generation

__all__ = [
    "Delivery",
    "Outcome",
    "RelayDelivery",
    "Submission",
    "downstream_reply",
    "hand_off",
    "new_queue_id",
    "record_evaluation",
]

log = logging.getLogger("gateway.handoff")

Frontend = Literal["smtp", "milter"]
FRONTENDS: tuple[Frontend, ...] = ("smtp", "milter")

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s+(.*)$", re.S)
_YIELD_AFTER = 1 << 20  # bytes; past this, whole-message copies yield to the loop between


@dataclass(frozen=True, slots=True)
class Submission:
    """One received message, as a front end hands it over."""

    envelope: Envelope
    raw: bytes  # exactly as received
    frontend: Frontend
    prepend: tuple[str, ...] = ()  # fields the front end adds on top (SMTP: our Received:)
    log_fields: dict[str, Any] = field(default_factory=dict)  # front-end facts for the log line
    relay_client: Any = None  # the client as the downstream should see it (relay XFORWARD)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the front end answers, and why."""

    reply: Reply
    action: str
    evaluation: Evaluation | None
    fields: dict[str, Any] = field(default_factory=dict)  # delivery facts for the log line
    added: tuple[str, ...] = ()  # header fields the verdict adds (milter: SMFIR_INSHEADER)
    removed: tuple[str, ...] = ()  # field names whose forged instances were dropped


class Delivery(Protocol):
    """Where an accepted message goes: the relay (SMTP) or back to the MTA (milter)."""

    async def deliver(
        self, gen: Generation, sub: Submission, evaluation: Evaluation, clean: bytes
    ) -> tuple[Reply, str, dict[str, Any]]:
        """``clean`` is ``sub.raw`` without forged fields; return (reply, action, log fields)."""
        ...


def new_queue_id() -> str:
    """A unique, roughly time-ordered queue id (16 base32 characters)."""
    stamp = int(time.time() * 1000).to_bytes(6, "big")[1:]
    return base64.b32encode(stamp + os.urandom(5)).decode("ascii")


def record_evaluation(evaluation: Evaluation) -> None:
    """Policy timings and outcomes, symbols and auth results of one message (not the action)."""
    for run in evaluation.run.runs:
        metrics.POLICY_DURATION.labels(policy=run.name).observe(run.seconds)
        metrics.POLICY_RUNS.labels(policy=run.name, outcome=run.outcome).inc()
    for sym in evaluation.verdict.symbols:
        metrics.SYMBOLS.labels(symbol=metrics.label(sym.name)).inc()
    for auth in evaluation.verdict.auth:
        metrics.AUTH_RESULTS.labels(
            method=metrics.label(auth.method), result=metrics.label(auth.result)
        ).inc()
    for policy, action in evaluation.verdict.observed_by_policy:
        metrics.OBSERVED_ACTIONS.labels(action=action.value, policy=policy).inc()
    verdict = evaluation.verdict
    if verdict.held_by is not None:
        metrics.CAPPED_ACTIONS.labels(action=verdict.action.value, policy=verdict.held_by).inc()


def downstream_reply(code: int, text: str, default_status: str) -> Reply:
    m = _ENHANCED.match(text)
    if m and m.group(1)[0] == str(code)[0]:
        return Reply(code, m.group(1), m.group(2) or "downstream refused the message")
    return Reply(code, default_status, text or "downstream refused the message")


class RelayDelivery:
    """SMTP mode: relay to ``[relay]``; 2xx only when every recipient was accepted."""

    async def deliver(
        self, gen: Generation, sub: Submission, evaluation: Evaluation, clean: bytes
    ) -> tuple[Reply, str, dict[str, Any]]:
        env = sub.envelope
        data = headers.prepend(clean, [*sub.prepend, *evaluation.headers])
        try:
            result = await gen.relay.send(env.mail_from, env.rcpt_to, data, client=sub.relay_client)
        except RelayError as exc:
            fields: dict[str, Any] = {"downstream": f"{exc.code or ''} {exc.text}".strip()}
            if exc.permanent and exc.code is not None:
                return downstream_reply(exc.code, exc.text, "5.0.0"), "reject", fields
            if exc.code is None:
                return replies.RELAY_UNAVAILABLE, "tempfail", fields
            return replies.RELAY_TEMPFAIL, "tempfail", fields
        except Exception:
            log.exception("relay_crashed", extra={"queue_id": env.queue_id})
            return replies.LOCAL_ERROR, "tempfail", {}
        downstream = f"{result.reply[0]} {result.reply[1]}"
        fields = {"downstream": downstream, "accepted": list(result.accepted)}
        if set(result.accepted) != set(env.rcpt_to):
            # Never half a delivery behind a 2xx: the client retries every recipient
            # (duplicates for the accepted ones are what SMTP allows, RFC 5321 §4.5.4.1).
            log.warning(
                "relay_partial",
                extra={"queue_id": env.queue_id, "accepted": list(result.accepted)},
            )
            return replies.RELAY_TEMPFAIL, "tempfail", fields
        return replies.queued(env.queue_id, downstream), evaluation.action.value, fields


async def hand_off(
    gen: Generation, quarantine: QuarantineStore, sub: Submission, delivery: Delivery
) -> Outcome:
    """Evaluate ``sub`` and settle it; logs it, counts it, learns from it. Never raises."""
    started = time.monotonic()
    outcome = await _settle(gen, quarantine, sub, delivery)
    evaluation = outcome.evaluation
    if gen.reports is not None and evaluation is not None:
        # After the disposition is settled; a background task, never the reply's delay.
        with contextlib.suppress(Exception):
            gen.reports.record(evaluation, outcome.action)
    # After the hand-off: learning never delays the reply (the engine drains it on close).
    learned = gen.engine.learn_from(evaluation) if evaluation is not None else {}
    metrics.MESSAGE_SIZE.observe(len(sub.raw))
    metrics.record_action(outcome.action, sub.frontend)
    env = sub.envelope
    log.info(
        "message_processed",
        extra={
            "frontend": sub.frontend,
            "queue_id": env.queue_id,
            "client_ip": env.client_ip,
            "client_name": env.client_name,
            "helo": env.helo,
            **sub.log_fields,
            "mail_from": env.mail_from,
            "rcpt_tos": list(env.rcpt_to),
            "size": len(sub.raw),
            "tls": env.tls.version if env.tls else None,
            "action": outcome.action,
            **_observed_fields(evaluation),
            "score": float(evaluation.verdict.score) if evaluation else None,
            "symbols": {s.name: float(s.score) for s in evaluation.verdict.symbols}
            if evaluation
            else {},
            "timings": {r.name: round(r.seconds, 4) for r in evaluation.run.runs}
            if evaluation
            else {},
            "policy_errors": [r.name for r in evaluation.run.runs if r.outcome != "ok"]
            if evaluation
            else [],
            "reply": str(outcome.reply),
            "seconds": round(time.monotonic() - started, 4),
            **learned,
            **outcome.fields,
        },
    )
    return outcome


def _observed_fields(evaluation: Evaluation | None) -> dict[str, Any]:
    """Observe mode's part of the log line: what would have happened, and who decided it."""
    if evaluation is None or evaluation.verdict.observed is None:
        return {}
    v = evaluation.verdict
    return {
        "observed_action": v.observed.value if v.observed else None,
        "observed_forced_by": v.observed_forced_by,
        "observed_reason": v.observed_reason,
        "observed_by_policy": {p: a.value for p, a in v.observed_by_policy},
    }


async def _settle(
    gen: Generation, quarantine: QuarantineStore, sub: Submission, delivery: Delivery
) -> Outcome:
    env = sub.envelope
    try:
        evaluation = await gen.engine.evaluate(env, sub.raw)
    except Exception:
        log.exception("evaluation_failed", extra={"queue_id": env.queue_id})
        return Outcome(replies.LOCAL_ERROR, "tempfail", None)
    record_evaluation(evaluation)
    action = evaluation.action
    if action in (Action.REJECT, Action.TEMPFAIL):
        return Outcome(evaluation.reply(), action.value, evaluation)
    untrusted = headers.untrusted_field(gen.config.server.hostname)
    clean = headers.remove_fields(sub.raw, untrusted)
    if len(clean) > _YIELD_AFTER:
        await asyncio.sleep(0)  # each whole-message copy of a big message is its own step
    if gen.sealer is not None:
        # The ARC set goes above everything we add (SMTP: our Received too), signing
        # exactly the bytes that go on; a quarantined message is sealed now, so a
        # release sends what relaying it would have sent.
        seal = await gen.sealer.seal(evaluation.verdict, [*sub.prepend, *evaluation.headers], clean)
        sub = replace(sub, prepend=(*seal.fields, *sub.prepend))
        added = (*seal.fields, *evaluation.headers)
    else:
        added = tuple(evaluation.headers)
    if action is Action.QUARANTINE:
        reply = await _quarantine(quarantine, evaluation, sub, clean)
        return Outcome(reply, action.value, evaluation)
    try:
        reply, action_name, fields = await delivery.deliver(gen, sub, evaluation, clean)
    except Exception:
        log.exception("delivery_crashed", extra={"queue_id": env.queue_id})
        return Outcome(replies.LOCAL_ERROR, "tempfail", evaluation)
    return Outcome(reply, action_name, evaluation, fields, added)


async def _quarantine(
    store: QuarantineStore, evaluation: Evaluation, sub: Submission, clean: bytes
) -> Reply:
    item = new_quarantine_item(evaluation, len(clean))
    # Released mail carries exactly what relaying it would have sent.
    item = replace(item, headers=(*sub.prepend, *item.headers))
    try:
        await store.put(item, clean)
    except QuarantineError as exc:
        log.error("quarantine_failed", extra={"queue_id": item.queue_id, "error": str(exc)})
        return replies.QUARANTINE_FAILED
    except Exception:
        log.exception("quarantine_failed", extra={"queue_id": item.queue_id})
        return replies.QUARANTINE_FAILED
    log.info("message_quarantined", extra={"queue_id": item.queue_id, "id": item.id})
    with contextlib.suppress(Exception):
        metrics.QUARANTINE_MESSAGES.inc()
    return replies.quarantined(item.queue_id)
