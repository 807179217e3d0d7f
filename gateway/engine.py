"""One config generation: the policies, their scores and thresholds, and evaluation.

The SMTP server and ``scan`` both call :meth:`Engine.evaluate`, so the CLI
explains exactly what the server would do. A reload builds a new Engine and
swaps it in; sessions already evaluating keep the one they started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.feedparser
import email.policy
import email.utils
import logging
import re
from collections.abc import Generator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

from gateway import elide, metrics
from gateway.api import (
    Action,
    AutoLearn,
    Context,
    Policy,
    Result,
    Services,
    StateStore,
    Symbol,
    SymbolDef,
    TLSInfo,
    VerdictView,
)
from gateway.config import Config
from gateway.dns import CachingResolver
from gateway.pipeline import Pipeline, PipelineRun, PolicyRun
from gateway.registry import Plan, plan_policies
from gateway.replies import Reply, queued, verdict_reply
from gateway.schema import Problems
from gateway.verdict import Observe, Verdict, decide, verdict_headers

__all__ = ["Engine", "Envelope", "Evaluation", "observe_scope", "parse_message", "services_for"]

log = logging.getLogger("gateway.engine")


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
    autolearn: tuple[tuple[str, AutoLearn], ...] = ()  # (policy, decision) from after_verdict

    @property
    def action(self) -> Action:
        return self.verdict.action

    def reply(self) -> Reply:
        """The reply for reject/tempfail; for other actions the hand-off decides."""
        return verdict_reply(self.verdict.action, self.verdict.reason, self.envelope.queue_id)


_PARSE_INLINE = 256 * 1024  # bytes; larger messages are parsed step by step, yielding
_STEP = 1 << 20  # bytes of container counting per step
_FEED = 64 * 1024  # bytes fed to the parser per step (~3 ms of pure-Python parsing)
# Matched on lower-cased bytes: a literal prefix keeps the regex a fast scan
# (re.IGNORECASE made it 0.45 s on 25 MB, all of it blocking the event loop).
_MULTIPART = re.compile(rb"content-type:[ \t]*(?:\r?\n[ \t]+)?multipart/")
_Parsed = tuple[EmailMessage, Symbol | None]


class _FieldCachePolicy(email.policy.EmailPolicy):
    """``policy.default`` that parses each header field once per message.

    EmailMessage re-parses a field on every access (``get_content_type()``
    parses Content-Type each call) and policies read the same fields many
    times: this was a fifth of the pipeline's CPU. The cache lives on the
    message's own policy instance, so it is freed with the message.

    Behind it, the last :data:`_SHARED_FIELDS` MIME fields parsed by any
    message: ``text/plain; charset=utf-8`` and its kin come back in most
    messages and cost ~80 us to parse each time. Parsing depends on the name
    and value only, and the header objects are read-only (``params`` is a
    mapping proxy), so sharing one is the same as parsing again. Multipart
    Content-Types are left out (their boundary is unique to a message), and so
    is From: it repeats per sender only, and one parsed address is ~18 KB.
    """

    field_cache: dict[tuple[str, str], Any] | None = None

    def header_fetch_parse(self, name: str, value: str) -> Any:
        cache = self.field_cache
        if cache is None or hasattr(value, "name"):
            return super().header_fetch_parse(name, value)
        key = (name, value)
        parsed = cache.get(key)
        if parsed is None:
            parsed = _SHARED.get(key)
            if parsed is None:
                parsed = super().header_fetch_parse(name, value)
                if (
                    len(value) <= _SHARED_MAX_LENGTH
                    and name.lower() in _SHARED_NAMES
                    and "boundary" not in value.lower()
                ):
                    if len(_SHARED) >= _SHARED_FIELDS:
                        # The oldest (insertion order); a policy's thread may race us here.
                        with contextlib.suppress(RuntimeError, KeyError, StopIteration):
                            del _SHARED[next(iter(_SHARED))]
                    _SHARED[key] = parsed
            cache[key] = parsed
        return parsed


_SHARED_FIELDS = 256  # parsed MIME fields kept across messages (first in, first out), ~12 KB each
_SHARED_MAX_LENGTH = 200  # characters; longer values are parsed per message only
_SHARED_NAMES = frozenset({"content-type", "content-disposition", "content-transfer-encoding"})
_SHARED: dict[tuple[str, str], Any] = {}


_POLICY = _FieldCachePolicy()

_stdlib_has_surrogates = email.utils._has_surrogates  # type: ignore[attr-defined]


def _has_surrogates(s: str) -> bool:
    """``email.utils._has_surrogates`` without UTF-8 encoding an ASCII string.

    The stdlib answers by encoding the whole string, so every ``get_payload()``
    of a 20 MB attachment made a 20 MB copy. An ASCII string has no surrogates
    (``isascii()`` is a flag lookup): same answer, no copy.
    """
    return not s.isascii() and bool(_stdlib_has_surrogates(s))


# email.message looks it up on the module at each call.
email.utils._has_surrogates = _has_surrogates  # type: ignore[attr-defined]


def parse_message(raw: bytes) -> EmailMessage:
    """Parse once; the result is shared by every policy.

    A message the parser cannot make sense of still yields an EmailMessage
    (with ``defects``): bad mail is a symbol, never a crash.
    """
    return parse_bounded(raw, max_containers=None)[0]


def parse_bounded(raw: bytes, max_containers: int | None) -> _Parsed:
    """Parse within a bounded cost; a message we could not inspect fully yields a symbol."""
    steps = _parse_steps(raw, max_containers)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


async def parse_bounded_async(raw: bytes, max_containers: int | None) -> _Parsed:
    """:func:`parse_bounded` in steps of a few milliseconds, yielding to the event loop."""
    if len(raw) <= _PARSE_INLINE:
        return parse_bounded(raw, max_containers)
    steps = _parse_steps(raw, max_containers)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        await asyncio.sleep(0)


def _parse_steps(raw: bytes, max_containers: int | None) -> Generator[None, None, _Parsed]:
    if max_containers is not None:
        containers = 0
        for start in range(0, len(raw), _STEP):
            containers += _containers_in_step(raw, start)
            yield
        if containers > max_containers:
            msg = yield from _feed(raw, headersonly=True)
            # Policies see the header only: a body they cannot walk is not a crash.
            del msg["Content-Type"]
            msg.set_payload("")
            return msg, Symbol("MIME_TOO_COMPLEX", detail=f"{containers} multipart containers")
    try:
        msg = yield from _feed_elided(raw)
    except (RecursionError, Exception) as exc:  # the stdlib parser is lenient; a backstop
        log.warning("message_parse_failed", extra={"error": type(exc).__name__})
        return EmailMessage(), Symbol("MIME_UNPARSEABLE", detail=type(exc).__name__)
    return msg, None


_MAX_COLONS = 1000  # colons looked at one by one per step before scanning the step instead
_MULTIPART_ANY_CASE = re.compile(_MULTIPART.pattern, re.I)  # only ever anchored: cheap


def _containers_in_step(
    raw: bytes, start: int, step: int = _STEP, max_colons: int = _MAX_COLONS
) -> int:
    """Multipart Content-Type fields starting in ``raw[start:start + step]``.

    Each is found at its colon (a one-byte search: base64 has none, so a 2 MB
    attachment costs 0.1 ms instead of 2.5 ms lower-casing and scanning it);
    a step with many colons is lower-cased and scanned. Either way a match may
    run on 256 bytes past the step (the overlap), and counts the same.
    """
    stop = start + step
    limit = stop + 256
    found = 0
    colon = raw.find(b":", start + 12, stop + 12)  # "content-type" is 12 bytes
    for _ in range(max_colons):
        if colon < 0:
            return found
        field = colon - 12
        if raw[field:colon].lower() == b"content-type" and _MULTIPART_ANY_CASE.match(
            raw, field, limit
        ):
            found += 1
        colon = raw.find(b":", colon + 1, stop + 12)
    if colon < 0:
        return found
    window = raw[start:limit].lower()  # overlap: no match is cut
    return sum(1 for m in _MULTIPART.finditer(window) if m.start() < step)


def _feed_elided(raw: bytes) -> Generator[None, None, EmailMessage]:
    """:func:`_feed` without handing the parser every line of big base64 attachments.

    Same result (``gateway/elide.py``): the runs are put back after parsing, or
    the original is parsed when they cannot be. A fifth of the CPU and half
    the memory of parsing a message with a 20 MB attachment.
    """
    elided = (yield from elide.elide_steps(raw)) if len(raw) >= _ELIDE_FROM else None
    if elided is not None:
        msg = yield from _feed(elided.data)
        if elide.restore(msg, elided):
            return msg
    return (yield from _feed(raw))


_ELIDE_FROM = 32 * 1024  # bytes; smaller messages have no run worth eliding
_DRAIN_LIMIT = 10.0  # seconds close() waits for background learning before cancelling it


def _feed(raw: bytes, *, headersonly: bool = False) -> Generator[None, None, EmailMessage]:
    """What ``BytesParser(policy=default).parsebytes`` does, one slice per step."""
    # A fresh field cache per message (typeshed lists only the stock policy keys).
    policy = _POLICY.clone(field_cache={})  # type: ignore[call-arg]
    parser = email.feedparser.FeedParser(policy=policy)
    if headersonly:
        parser._set_headersonly()  # type: ignore[attr-defined]  # what parse(headersonly=True) calls
    for start in range(0, len(raw), _FEED):
        # ASCII with surrogateescape maps byte for byte, so slices decode independently.
        parser.feed(raw[start : start + _FEED].decode("ascii", "surrogateescape"))
        yield
    msg = parser.close()
    assert isinstance(msg, EmailMessage)  # policy=default builds EmailMessage
    return msg


def services_for(config: Config, state: StateStore) -> Services:
    """The services policies get: the one resolver, the state store, our name."""
    return Services(
        resolver=CachingResolver(config.dns),
        state=state,
        hostname=config.server.hostname,
        config_dir=config.base_dir,
    )


def _without_retry_floors(run: PipelineRun) -> PipelineRun:
    """``run`` without the tempfail floors of policies that finished (``replay``)."""
    if not any(r.result.force is Action.TEMPFAIL and r.outcome == "ok" for r in run.runs):
        return run
    return PipelineRun(
        tuple(
            PolicyRun(r.name, replace(r.result, force=None), r.seconds, r.outcome)
            if r.result.force is Action.TEMPFAIL and r.outcome == "ok"
            else r
            for r in run.runs
        )
    )


def observe_scope(config: Config, plan: Plan) -> Observe:
    """What this config only observes: everything (``[actions] mode``) or some policies."""
    return Observe(
        everything=config.actions.mode == "observe",
        policies=frozenset(p.name for p in plan.policies if p.observe),
        hard=frozenset({"gateway", *(p.name for p in plan.policies if not p.cls.observable)}),
    )


def _learns(cls: type[Policy]) -> bool:
    """Does the policy decide auto-learning (overrides ``after_verdict``)?"""
    return cls.after_verdict is not Policy.after_verdict


class Engine:
    def __init__(
        self, config: Config, plan: Plan, services: Services, *, retry_floors: bool = True
    ) -> None:
        """``retry_floors=False`` (``replay``): a check that could not answer (a DNS
        temperror, a rate limit) does not force tempfail; a policy error still does."""
        self.config = config
        self.retry_floors = retry_floors
        self.plan = plan
        self.services = services
        on_error = Action.TEMPFAIL if config.pipeline.on_policy_error == "tempfail" else None
        self.pipeline = Pipeline(
            plan, default_timeout=config.pipeline.policy_timeout, on_error=on_error
        )
        self.observe = observe_scope(config, plan)
        self._declared: dict[str, tuple[str, SymbolDef]] = {}
        self._learning: set[asyncio.Task[None]] = set()
        self._pending: dict[str, int] = {}
        self._closing = False

    @staticmethod
    def make_plan(config: Config) -> Plan:
        """Validate the policy tables; raises ConfigError-compatible SchemaError."""
        from gateway.config import ConfigError

        problems = Problems()
        plan = plan_policies(config.policies, problems)
        if problems.lines:
            raise ConfigError(problems.lines)
        return plan

    @staticmethod
    def preload(plan: Plan) -> None:
        """Each enabled policy's process-wide set-up, once, before forking workers."""
        for p in plan.policies:
            p.cls.preload(p.options)

    async def start(self) -> None:
        await self.pipeline.start(self.services)
        self._declared = self.declared_symbols()
        self._export_metrics()

    def _export_metrics(self) -> None:
        """This configuration's policy, symbol and auth series, at zero until counted."""
        auth: dict[str, set[str]] = {}
        for enabled in self.plan.policies:
            for method, results in enabled.cls.auth_results.items():
                auth.setdefault(method, set()).update(results)
        metrics.export_policies(
            policies=[p.name for p in self.plan.policies],
            symbols=self._declared,
            auth=auth,
            learners=[p.name for p in self.plan.policies if _learns(p.cls)],
            observed=sorted(self.observe.policies),
            capping=[p.name for p in self.plan.policies if p.cls.may_cap],
        )

    async def close(self) -> None:
        """Let background learning finish (bounded), then close the policies."""
        self._closing = True
        if self._learning:
            _done, late = await asyncio.wait(set(self._learning), timeout=_DRAIN_LIMIT)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
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
        # The stdlib parser is pure Python (~20 ms/MB): big messages go step by step.
        message, parse_problem = await parse_bounded_async(
            raw, self.config.pipeline.max_mime_containers
        )
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
        if not self.retry_floors:
            run = _without_retry_floors(run)
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
            observe=self.observe,
        )
        autolearn = self._after_verdict(ctx.with_results(run.results), verdict)
        label = autolearn[0][1].label if autolearn else ""
        headers = tuple(verdict_headers(verdict, self.config.server.hostname, label))
        return Evaluation(envelope, verdict, run, headers, autolearn)

    def _after_verdict(self, ctx: Context, verdict: Verdict) -> tuple[tuple[str, AutoLearn], ...]:
        """Each policy's :meth:`Policy.after_verdict`; one that raises is logged and skipped."""
        out: list[tuple[str, AutoLearn]] = []
        learners = (
            (name, policy)
            for name, policy in self.pipeline.policies.items()
            if _learns(type(policy))
        )
        if self.observe.everything:  # nothing is enforced: nothing to learn from
            no = AutoLearn("no", "observe mode: verdicts are not learned")
            return tuple((name, no) for name, _ in learners)
        view: VerdictView = verdict.enforced(self.observe) if self.observe.active else verdict
        for name, policy in learners:
            try:
                decision = policy.after_verdict(ctx, view)
            except Exception as exc:
                log.exception(
                    "after_verdict_failed",
                    extra={"policy": name, "queue_id": ctx.queue_id, "error": type(exc).__name__},
                )
                continue
            if decision is not None:
                out.append((name, decision))
        return tuple(out)

    def learn_from(self, evaluation: Evaluation) -> dict[str, str]:
        """Start the background learning the policies decided on; the message log's fields.

        Called by the server once the hand-off is decided, so learning never
        delays a reply (``scan`` does not call it: it learns nothing). The log
        reads ``autolearn=spam|ham|no|unavailable`` as in SpamAssassin, plus
        ``autolearn_detail``; a second policy's fields carry its name.
        """
        fields: dict[str, str] = {}
        for name, decision in evaluation.autolearn:
            label, detail = decision.label, decision.detail
            if decision.learn is not None:
                pending = self._pending.get(name, 0)
                if self._closing or pending >= decision.max_pending:
                    metrics.AUTOLEARN.labels(name, decision.label, "skipped").inc()
                    why = "shutting down" if self._closing else f"{pending} learns pending"
                    label, detail = "unavailable", f"{why}; not learned as {decision.label}"
                else:
                    self._start_learning(name, decision, evaluation.envelope.queue_id)
            key = "autolearn" if "autolearn" not in fields else f"autolearn_{name}"
            fields[key] = label
            if detail:
                fields[f"{key}_detail"] = detail
        return fields

    def _start_learning(self, name: str, decision: AutoLearn, queue_id: str) -> None:
        self._pending[name] = self._pending.get(name, 0) + 1
        task = asyncio.get_running_loop().create_task(self._learn(name, decision, queue_id))
        self._learning.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._learning.discard(task)
            self._pending[name] -= 1

        task.add_done_callback(done)

    async def _learn(self, name: str, decision: AutoLearn, queue_id: str) -> None:
        """One background learn: bounded by its timeout; errors are logged and counted."""
        assert decision.learn is not None
        extra: dict[str, object] = {"policy": name, "queue_id": queue_id, "class": decision.label}
        try:
            async with asyncio.timeout(decision.timeout):
                changed = await decision.learn()
        except TimeoutError:
            result, extra["error"] = "failed", f"no answer within {decision.timeout}s"
        except asyncio.CancelledError:
            metrics.AUTOLEARN.labels(name, decision.label, "failed").inc()
            log.warning("message_autolearn_cancelled", extra=extra)
            raise
        except Exception as exc:
            result, extra["error"] = "failed", f"{type(exc).__name__}: {exc}"[:200]
        else:
            result = "learned" if changed else "known"
        metrics.AUTOLEARN.labels(name, decision.label, result).inc()
        extra["result"] = result
        if result == "failed":
            log.warning("message_autolearn_failed", extra=extra)
        else:
            log.info("message_autolearned", extra=extra)

    def preview_reply(self, evaluation: Evaluation) -> Reply:
        """What the client would be told if the hand-off succeeds (for ``scan``)."""
        if evaluation.action in (Action.REJECT, Action.TEMPFAIL):
            return evaluation.reply()
        return queued(evaluation.envelope.queue_id)
