"""The command line: ``python -m gateway {run,check-config,scan,quarantine,replay,...}``.

Exit codes: 0 ok, 1 problems or failures (invalid config, failed release,
store unreachable), 2 usage (bad arguments, a command that does not apply to
this config). Output meant for people goes to stdout; errors to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import itertools
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from gateway.api import Action, AuthResult, OptionError, Services
from gateway.config import Config, ConfigError, load_config

if TYPE_CHECKING:  # imported lazily at run time, so `--help` stays fast
    from gateway.engine import Engine, Evaluation
    from gateway.quarantine import QuarantineItem, QuarantineStore
    from gateway.state import ClosableStateStore
    from gateway.verdict import Verdict

__all__ = ["main"]

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2

_LEARN_CHUNK = 200  # messages read (in a worker thread) per call to the classifier


class CLIError(Exception):
    """A failure to report as one line on stderr; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_PROBLEMS) -> None:
        super().__init__(message)
        self.code = code


# --- shared helpers ------------------------------------------------------------


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise _Problems(exc.problems) from None


class _Problems(Exception):
    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass(frozen=True, slots=True)
class _Runtime:
    """An engine for one CLI command, with the services it opened."""

    engine: Engine
    state: ClosableStateStore

    async def close(self) -> None:
        await self.engine.close()
        await self.state.close()


def _services(config: Config) -> tuple[Services, ClosableStateStore]:
    from gateway.engine import services_for
    from gateway.state import open_state

    state = open_state(config.state, config.base_dir)
    return services_for(config, state), state


async def _build(config: Config, *, start: bool = True) -> tuple[_Runtime, list[str]]:
    """Plan, construct and (optionally) start every enabled policy, collecting problems.

    Each policy is constructed and started on its own so a failure names it.
    Starting loads rule files and such; no policy talks to the network here.
    """
    from gateway.engine import Engine

    problems: list[str] = []
    try:
        plan = Engine.make_plan(config)
    except ConfigError as exc:
        raise _Problems(exc.problems) from None
    for ep in plan.policies:
        try:
            ep.cls(ep.options)
        except OptionError as exc:
            problems.append(f"policies.{ep.name}.{exc.key}: {exc.message}")
        except Exception as exc:
            problems.append(f"policies.{ep.name}: cannot construct: {type(exc).__name__}: {exc}")
    if problems:
        raise _Problems(problems)
    services, state = _services(config)
    engine = Engine(config, plan, services)
    runtime = _Runtime(engine, state)
    if start:
        for name, policy in engine.pipeline.policies.items():
            try:
                await policy.start(services)
            except OptionError as exc:
                problems.append(f"policies.{name}.{exc.key}: {exc.message}")
            except Exception as exc:
                problems.append(f"policies.{name}: cannot start: {type(exc).__name__}: {exc}")
    return runtime, problems


def _unknown_scores(engine: Engine) -> list[str]:
    known = list(engine.declared_symbols())
    lines = []
    for key in engine.unknown_score_keys():
        close = difflib.get_close_matches(key, known, n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        lines.append(
            f"scores.{key}: no enabled policy declares this symbol{hint}; "
            "fix the name or enable the policy that emits it"
        )
    return lines


def _num(value: Decimal | float) -> float:
    return float(value)


# --- check-config --------------------------------------------------------------


def _policy_table_problems(path: str) -> list[str]:
    """Problems of the ``[policies.*]`` tables alone, for a file whose core config is invalid.

    So one run of ``check-config`` reports a typo in ``[relay]`` and one in
    ``[policies.dmarc]`` together.
    """
    import tomllib

    from gateway.registry import plan_policies
    from gateway.schema import Problems

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return []  # already reported by load_config
    tables = data.get("policies")
    if not isinstance(tables, dict):
        return []
    problems = Problems()
    plan_policies({k: v for k, v in tables.items() if isinstance(v, dict)}, problems)
    return problems.lines


def _arc_seal_problems(config: Config) -> list[str]:
    """The ``[arc_seal]`` key is read and parsed as ``run`` would (docs/arc.md)."""
    from gateway.arcseal import load_sealer

    try:
        load_sealer(config)
    except ConfigError as exc:
        return exc.problems
    return []


async def _check_config(args: argparse.Namespace, out: TextIO) -> int:
    try:
        config = _load(args.config)
    except _Problems as exc:
        raise _Problems(exc.lines + _policy_table_problems(args.config)) from None
    runtime, problems = await _build(config)
    try:
        problems += _unknown_scores(runtime.engine)
    finally:
        await runtime.close()
    problems += _arc_seal_problems(config)
    if problems:
        raise _Problems(problems)
    names = ", ".join(p.name for p in runtime.engine.plan.policies) or "none"
    observe = runtime.engine.observe
    if observe.everything:
        names += '; [actions] mode = "observe": nothing but hard protections acts'
    elif observe.policies:
        names += f"; observed only: {', '.join(sorted(observe.policies))}"
    print(f"{config.path}: OK (policies: {names})", file=out)
    return EXIT_OK


# --- scan ----------------------------------------------------------------------


def _read_message(source: str, limit: int) -> bytes:
    if source == "-":
        data = sys.stdin.buffer.read(limit + 1)
    else:
        try:
            with open(source, "rb") as fh:
                data = fh.read(limit + 1)
        except OSError as exc:
            raise CLIError(f"{source}: cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise CLIError(
            f"{source}: message is larger than server.max_message_size ({limit} bytes); "
            "the gateway would refuse it with 552 5.3.4"
        )
    return data


def _unbracket(address: str) -> str:
    """``<a@b.test>`` as typed from a MAIL FROM line -> ``a@b.test``; ``<>`` -> null sender."""
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        return text[1:-1]
    return text


def _auth_json(auth: Sequence[AuthResult]) -> dict[str, Any]:
    """``auth`` of ``scan --json`` from the RFC 8601 results (INTERFACE.md)."""
    spf, spf_helo = "none", "none"
    dkim: list[dict[str, str]] = []
    dmarc: dict[str, str] = {"result": "none", "policy": "none", "domain": ""}
    for a in auth:
        method = a.method.lower()
        if method == "spf":
            if a.prop("smtp.helo") is not None and a.prop("smtp.mailfrom") is None:
                spf_helo = a.result
            else:
                spf = a.result
        elif method == "dkim":
            if a.prop("header.d") is None and a.result == "none":
                continue  # "message not signed": the list holds signatures only
            dkim.append(
                {
                    "domain": a.prop("header.d") or "",
                    "selector": a.prop("header.s") or "",
                    "result": a.result,
                }
            )
        elif method == "dmarc":
            dmarc = {
                "result": a.result,
                "policy": a.prop("policy.dmarc") or "none",
                "domain": a.prop("header.from") or "",
            }
    return {"spf": spf, "spf_helo": spf_helo, "dkim": dkim, "dmarc": dmarc}


async def _scan(args: argparse.Namespace, out: TextIO) -> int:
    from gateway.engine import Envelope
    from gateway.quarantine import new_id

    config = _load(args.config)
    raw = await asyncio.to_thread(_read_message, args.file, config.server.max_message_size)
    runtime, problems = await _build(config)
    try:
        if problems:
            raise _Problems(problems)
        rcpts = tuple(args.rcpt) or (f"postmaster@{config.server.accepted_domains[0]}",)
        envelope = Envelope(
            client_ip=args.ip,
            helo=args.helo,
            mail_from=_unbracket(args.mail_from),
            rcpt_to=rcpts,
            queue_id=f"scan{new_id()[-8:]}",
        )
        evaluation = await runtime.engine.evaluate(envelope, raw)
        reply = str(runtime.engine.preview_reply(evaluation))
    finally:
        await runtime.close()
    verdict = evaluation.verdict
    if args.json:
        doc = {
            "action": verdict.action.value,
            **_observed_json(verdict),
            "score": _num(verdict.score),
            "symbols": [
                {
                    "name": s.name,
                    "score": _num(s.score),
                    "policy": s.policy,
                    "detail": s.detail,
                    "description": s.description,
                }
                for s in verdict.symbols
            ],
            "auth": _auth_json(verdict.auth),
            "smtp_reply": reply,
            "headers": list(evaluation.headers),
        }
        print(json.dumps(doc, ensure_ascii=False), file=out)
        return EXIT_OK
    _print_explanation(config, evaluation, reply, out)
    return EXIT_OK


def _observed_json(verdict: Verdict) -> dict[str, Any]:
    """Observe mode's keys of ``scan --json``: the observed outcome beside the enforced one."""
    if verdict.observed is None:
        return {}
    return {
        "observed": {
            "action": verdict.observed.value,
            "forced_by": verdict.observed_forced_by,
            "reason": verdict.observed_reason,
            "by_policy": {p: a.value for p, a in verdict.observed_by_policy},
        }
    }


def _print_explanation(config: Config, evaluation: Evaluation, reply: str, out: TextIO) -> None:
    """Like ``spamassassin -t``: the verdict, then every symbol with its points and evidence."""
    v = evaluation.verdict
    t = config.actions
    print(f"Action:     {v.action.value}", file=out)
    if v.observed is not None:
        by = f" by {v.observed_forced_by}" if v.observed_forced_by else ""
        print(f"Observed:   {v.observed.value}{by} (observe mode: not enforced)", file=out)
        if v.observed_reason:
            print(f"  because:  {v.observed_reason}", file=out)
        for policy, action in v.observed_by_policy:
            print(f"  {policy} alone: {action.value}", file=out)
    print(
        f"Score:      {v.score} (add_header {t.add_header}, quarantine {t.quarantine}, "
        f"reject {t.reject})",
        file=out,
    )
    if v.forced_by:
        print(f"Forced by:  {v.forced_by}", file=out)
    if v.reason:
        print(f"Reason:     {v.reason}", file=out)
    print(f"SMTP reply: {reply}", file=out)
    print("", file=out)
    print(" pts   symbol                       policy        description", file=out)
    print("------ ---------------------------- ------------- " + "-" * 40, file=out)
    for s in v.symbols:
        print(f"{s.score:6} {s.name:<28} {s.policy:<13} {s.description}", file=out)
        if s.detail:
            print(f"{'':50} [{s.detail}]", file=out)
    if not v.symbols:
        print("  (no symbols)", file=out)
    print("", file=out)
    print("Authentication:", file=out)
    for a in v.auth:
        props = " ".join(f"{k}={val}" for k, val in a.properties)
        reason = f" ({a.reason})" if a.reason else ""
        print(f"  {a.method}={a.result}{reason} {props}".rstrip(), file=out)
    if not v.auth:
        print("  (none)", file=out)
    print("", file=out)
    print("Headers added when relayed:", file=out)
    for h in evaluation.headers:
        print(f"  {h}".replace("\r\n", "\n  "), file=out)
    print("", file=out)
    print("Policy timings:", file=out)
    for run in evaluation.run.runs:
        print(f"  {run.name:<13} {run.seconds * 1000:8.1f} ms  {run.outcome}", file=out)


# --- symbols -------------------------------------------------------------------


async def _symbols(args: argparse.Namespace, out: TextIO) -> int:
    config = _load(args.config)
    runtime, problems = await _build(config)
    try:
        if problems:
            raise _Problems(problems)
        engine = runtime.engine
        from_classes = engine.plan.symbols()
        rows = []
        for name, (policy, sdef) in sorted(engine.declared_symbols().items()):
            override = config.scores.get(name)
            if isinstance(override, Action):
                score, source = sdef.score, f"[scores] override: forces {override.value}"
            elif override is not None:
                score, source = float(override), "[scores] override"
            else:
                score = sdef.score
                source = "default" if name in from_classes else "rule file"
            rows.append(
                {
                    "name": name,
                    "score": score,
                    "source": source,
                    "policy": policy,
                    "description": sdef.description,
                }
            )
    finally:
        await runtime.close()
    if args.json:
        print(json.dumps(rows, ensure_ascii=False), file=out)
        return EXIT_OK
    for r in rows:
        print(
            f"{r['name']:<30} {r['score']:7.2f}  {r['source']:<34} {r['policy']:<13} "
            f"{r['description']}",
            file=out,
        )
    return EXIT_OK


# --- quarantine ----------------------------------------------------------------


async def _quarantine(args: argparse.Namespace, out: TextIO) -> int:
    from gateway.quarantine import QuarantineError, open_quarantine, retention_cutoff, valid_id

    config = _load(args.config)
    store = open_quarantine(config.quarantine, config.base_dir)
    try:
        if getattr(args, "id", None) is not None and not valid_id(args.id):
            raise CLIError(f'"{args.id}" is not a quarantine id (see `quarantine list`)')
        if args.qcommand == "list":
            items = await store.list(
                limit=args.limit, offset=args.offset, mail_from=args.sender, rcpt=args.rcpt
            )
            if args.json:
                print(json.dumps([i.to_json() for i in items], ensure_ascii=False), file=out)
            else:
                for i in items:
                    reason = i.reasons[0] if i.reasons else ""
                    print(
                        f"{i.id}  {i.received_at:%Y-%m-%d %H:%M:%S}  {i.score:6.2f}  "
                        f"{i.size:>9}  <{i.mail_from}> -> {', '.join(i.rcpt_tos)}  {reason}",
                        file=out,
                    )
            return EXIT_OK
        if args.qcommand == "digest":
            return await _digest(config, store, args, out)
        if args.qcommand == "purge":
            n = await store.purge(retention_cutoff(config.quarantine))
            print(
                f"purged {n} messages older than {config.quarantine.retention_days} days",
                file=out,
            )
            return EXIT_OK
        if args.qcommand == "delete":
            held = await store.get(args.id) if args.spam else None
            if not await store.delete(args.id):
                raise CLIError(f"no quarantined message with id {args.id}")
            if held is not None:
                await _learn_released(config, store, held[0], held[1], spam=True, out=out)
            print(f"deleted {args.id}", file=out)
            return EXIT_OK
        got = await store.get(args.id)
        if got is None:
            raise CLIError(f"no quarantined message with id {args.id}")
        item, raw = got
        if args.qcommand == "show":
            out.flush()
            buffer = getattr(out, "buffer", None)
            if buffer is not None:
                buffer.write(raw)
                buffer.flush()
            else:
                out.write(raw.decode("utf-8", "replace"))
            return EXIT_OK
        return await _release(config, store, item, raw, out)
    except QuarantineError as exc:
        raise CLIError(str(exc)) from None
    finally:
        await store.close()


async def _digest(
    config: Config, store: QuarantineStore, args: argparse.Namespace, out: TextIO
) -> int:
    """Each recipient's digest: printed (``--dry-run``, the default) or relayed (``--send``)."""
    from datetime import UTC, datetime, timedelta

    from gateway.web.digest import DigestError, send_digests
    from gateway.web.links import LinkKeyError, link_key

    if not args.all and not 0 < args.since <= 87_600:
        raise CLIError(
            f"--since must be hours > 0 (at most ten years), got {args.since}", EXIT_USAGE
        )
    since = None if args.all else datetime.now(UTC) - timedelta(hours=args.since)

    def show(rcpt: str, data: bytes) -> None:
        print(f"--- digest for {rcpt} ({len(data)} bytes)", file=out)
        print(data.decode("utf-8", "replace"), file=out)

    try:
        key = await link_key(config.web, config.base_dir, store)
        run = await send_digests(config, store, key, since=since, send=args.send, printer=show)
    except (DigestError, LinkKeyError) as exc:
        raise CLIError(str(exc)) from None
    verb = "sent" if args.send else "built (dry run: nothing sent; --send sends)"
    summary = f"{run.sent} digests {verb}, listing {run.messages} held messages"
    if run.skipped_recipients:
        summary += f"; {run.skipped_recipients} recipients left out over the cap"
    print(summary, file=out if not args.send else sys.stderr)
    for problem in run.errors:
        print(f"digest failed: {problem}", file=sys.stderr)
    return EXIT_PROBLEMS if run.failed else EXIT_OK


async def _release(
    config: Config, store: QuarantineStore, item: QuarantineItem, raw: bytes, out: TextIO
) -> int:
    """Deliver with the original envelope and the stored headers prepended, then remove."""
    from gateway.release import ReleaseBusy, ReleaseFailed, release

    try:
        result = await release(config, store, item, raw)
    except ReleaseBusy as exc:
        raise CLIError(
            f"{exc}; if that one crashed, try again in {exc.hold / 60:.0f} minutes"
        ) from None
    except ReleaseFailed as exc:
        raise CLIError(
            f"release of {item.id} failed, message kept in quarantine: {exc.said}"
        ) from None
    if result.kept_error is not None:
        raise CLIError(
            f"{item.id} was delivered but could not be removed from quarantine "
            f"({result.kept_error}); remove it with `gateway quarantine delete {item.id}` "
            "to avoid a second delivery"
        )
    await _learn_released(config, store, item, raw, spam=False, out=out)
    code, text = result.reply
    print(f"released {item.id} to {', '.join(result.accepted)}: {code} {text}", file=out)
    if result.refused:
        print(f"downstream refused: {', '.join(result.refused)}", file=sys.stderr)
        return EXIT_PROBLEMS
    return EXIT_OK


async def _learn_released(
    config: Config,
    store: QuarantineStore,
    item: QuarantineItem,
    raw: bytes,
    *,
    spam: bool,
    out: TextIO,
) -> None:
    """quarantine.learn_on_release: train the classifier once on a person's decision."""
    from gateway.learning import learn_decision, learner_of

    if not config.quarantine.learn_on_release or "bayes" not in config.policies:
        return
    runtime, _ = await _build(config, start=False)
    try:
        learner = learner_of(runtime.engine.pipeline.policies)
        if learner is None:
            return
        await runtime.engine.pipeline.policies["bayes"].start(runtime.engine.services)
        if await learn_decision(store, learner, item.id, raw, spam=spam):
            print(f"learned {item.id} as {'spam' if spam else 'ham'}", file=out)
    finally:
        await runtime.close()


# --- learn ---------------------------------------------------------------------


def _messages(paths: Sequence[str], limit: int, skipped: list[str]) -> Iterator[bytes]:
    """Single-message files, directories of them (Maildir too) and mbox files, streamed."""
    from gateway.mailsource import Problem, Source, looks_like_mail, read_file_item, walk

    for p in paths:
        if not Path(p).exists():
            raise CLIError(f"{p}: no such file or directory")
    for item in walk([Source(p) for p in paths], limit):
        if isinstance(item, Problem):
            skipped.append(f"{item.name}: {item.reason}")
            continue
        try:
            data = read_file_item(item)
        except OSError as exc:
            skipped.append(f"{item.name}: cannot read: {exc.strerror or exc}")
            continue
        if not looks_like_mail(data):
            skipped.append(f"{item.name}: not a mail message (no header field first)")
            continue
        yield data


async def _learn(args: argparse.Namespace, out: TextIO) -> int:
    from gateway.api import StateUnavailableError

    config = _load(args.config)
    runtime, _ = await _build(config, start=False)
    try:
        policy = runtime.engine.pipeline.policies.get("bayes")
        learn: Callable[..., Coroutine[Any, Any, int]] | None = getattr(policy, "learn", None)
        if policy is None or learn is None:
            raise CLIError(
                f"the bayes policy is not enabled in {config.path}; add a [policies.bayes] "
                "table to train the classifier",
                EXIT_USAGE,
            )
        await policy.start(runtime.engine.services)
        spam = args.kind == "spam"
        skipped: list[str] = []
        source = _messages(args.paths, config.server.max_message_size, skipped)
        read = learned = 0
        while True:
            chunk = await asyncio.to_thread(lambda: list(itertools.islice(source, _LEARN_CHUNK)))
            if not chunk:
                break
            read += len(chunk)
            learned += await learn(chunk, spam)
        retrain: Callable[[], Coroutine[Any, Any, str | None]] | None = getattr(
            policy, "retrain", None
        )
        retrained = await retrain() if retrain is not None else None
    except StateUnavailableError as exc:
        raise CLIError(f"cannot reach the state store: {exc}") from None
    finally:
        await runtime.close()
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    print(
        f"learned {learned} of {read} messages as {args.kind} "
        f"({read - learned} already known as {args.kind})",
        file=out,
    )
    if retrained:
        print(retrained, file=out)
    return EXIT_OK


# --- replay --------------------------------------------------------------------


def _replay_sources(args: argparse.Namespace) -> list[Any]:
    from gateway.mailsource import QUARANTINE, Source, label_of

    sources = [Source(p, label_of(p) if p != QUARANTINE else "") for p in args.paths]
    for spec in args.label:
        label, sep, path = spec.partition("=")
        if not sep or label not in ("spam", "ham") or not path:
            raise CLIError(f"--label {spec}: expected spam=PATH or ham=PATH", EXIT_USAGE)
        sources.append(Source(path, label))
    if not sources:
        raise CLIError("replay needs at least one PATH (or --label spam=PATH)", EXIT_USAGE)
    return sources


def _replay(args: argparse.Namespace) -> int:
    from gateway.replay import ReplayError, ReplaySetup, replay

    if not 1 <= args.jobs <= 64:
        raise CLIError(f"--jobs must be 1..64, got {args.jobs}", EXIT_USAGE)
    setup = ReplaySetup(
        config_a=args.config,
        config_b=args.against,
        dns=args.dns,
        mail_from=_unbracket(args.mail_from) if args.mail_from is not None else None,
        rcpt=tuple(args.rcpt),
        ip=args.ip,
        helo=args.helo,
    )
    try:
        return replay(setup, _replay_sources(args), jobs=args.jobs, as_json=args.json)
    except ReplayError as exc:
        raise _Problems(str(exc).splitlines()) from None


# --- web -----------------------------------------------------------------------


async def _dmarc_report(args: argparse.Namespace, out: TextIO) -> int:
    from gateway.dmarcreports import cli

    return await cli.run(args, out)


async def _web(args: argparse.Namespace, out: TextIO) -> int:
    from gateway.web import cli

    return await cli.run(args, out)


# --- run -----------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    from gateway.server import run

    return run(Path(args.config))


# --- argument parsing ----------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    # --config is accepted anywhere (`gateway --config P quarantine list`, `gateway
    # quarantine list --config P`); SUPPRESS keeps a subcommand from resetting it.
    config_help = "TOML config file (default: $GATEWAY_CONFIG)"
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help)
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="Inbound mail filtering gateway (SMTP proxy in front of your MTA).",
    )
    parser.add_argument(
        "--config", metavar="PATH", default=os.environ.get("GATEWAY_CONFIG"), help=config_help
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="serve in the foreground until SIGTERM/SIGINT")
    sub.add_parser(
        "check-config", parents=[common], help="validate the config; one line per problem"
    )
    scan = sub.add_parser(
        "scan", parents=[common], help="run the whole pipeline on one message (no relay, no store)"
    )
    scan.add_argument("--ip", default=None, help="client IP address as the gateway would see it")
    scan.add_argument("--helo", default="", help="HELO/EHLO name the client sent")
    scan.add_argument(
        "--mail-from",
        default="",
        help="reverse-path as sent, unvalidated (default: the null sender <>)",
    )
    scan.add_argument(
        "--rcpt",
        action="append",
        default=[],
        help="recipient, repeat for several (default: postmaster@ the first accepted domain)",
    )
    scan.add_argument("--json", action="store_true", help="print one JSON object")
    scan.add_argument("file", metavar="FILE|-", help="the message; - reads stdin")
    symbols = sub.add_parser(
        "symbols", parents=[common], help="every enabled symbol, its effective score and source"
    )
    symbols.add_argument("--json", action="store_true", help="print a JSON array")
    q = sub.add_parser(
        "quarantine", parents=[common], help="list, show, release or delete quarantined mail"
    )
    qsub = q.add_subparsers(dest="qcommand", required=True, metavar="ACTION")
    qlist = qsub.add_parser("list", parents=[common], help="newest first")
    qlist.add_argument("--json", action="store_true", help="print a JSON array")
    qlist.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    qlist.add_argument("--offset", type=int, default=0, help="skip this many (paging)")
    qlist.add_argument("--from", dest="sender", default=None, help="only this envelope sender")
    qlist.add_argument("--rcpt", default=None, help="only messages for this recipient")
    for name, text in (
        ("show", "print the stored message"),
        ("release", "deliver to the relay with the original envelope, then remove"),
        ("delete", "remove without delivering"),
    ):
        p = qsub.add_parser(name, parents=[common], help=text)
        p.add_argument("id", metavar="ID")
        if name == "delete":
            p.add_argument(
                "--spam",
                action="store_true",
                help="delete as spam: train the classifier (quarantine.learn_on_release)",
            )
    qsub.add_parser(
        "purge", parents=[common], help="remove messages older than quarantine.retention_days"
    )
    digest = qsub.add_parser(
        "digest",
        parents=[common],
        help="mail each recipient the messages held for them, with signed release/delete links",
    )
    how = digest.add_mutually_exclusive_group()
    how.add_argument("--send", action="store_true", help="relay the digests through [relay]")
    how.add_argument(
        "--dry-run", action="store_true", help="print the digests, send nothing (the default)"
    )
    window = digest.add_mutually_exclusive_group()
    window.add_argument(
        "--since",
        type=float,
        default=24.0,
        metavar="HOURS",
        help="list messages held in the last HOURS (default 24, the daily schedule's)",
    )
    window.add_argument("--all", action="store_true", help="list everything still held")
    learn = sub.add_parser(
        "learn", parents=[common], help="train the classifier (the bayes policy)"
    )
    _replay_parser(sub, common)
    from gateway.web import cli as web_cli

    web_cli.add_parser(sub)
    from gateway.dmarcreports import cli as report_cli

    report_cli.add_parser(sub, common)
    learn.add_argument("kind", choices=["spam", "ham"])
    learn.add_argument(
        "paths", nargs="+", metavar="FILE_OR_DIR", help="message files, directories, mbox files"
    )
    return parser


def _replay_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    replay = sub.add_parser(
        "replay",
        parents=[common],
        help="what this config (and --against another) would do to stored mail",
        description="Run the full pipeline over stored messages without relaying or storing "
        "anything, and compare two configs (docs/observe.md).",
    )
    replay.add_argument("--against", metavar="B", default=None, help="a second config to compare")
    replay.add_argument("--json", action="store_true", help="print one JSON object")
    replay.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    replay.add_argument(
        "--dns",
        choices=["live", "offline"],
        default="offline",
        help="offline (default): every lookup is skipped, deterministic; live: ask the resolver",
    )
    replay.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="spam=PATH",
        help="a labelled folder (spam= or ham=), for detection and false-positive rates",
    )
    replay.add_argument("--mail-from", default=None, help="envelope sender for every message")
    replay.add_argument("--rcpt", action="append", default=[], help="recipient, repeatable")
    replay.add_argument("--ip", default=None, help="client IP for every message")
    replay.add_argument("--helo", default=None, help="HELO name for every message")
    replay.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="message files, directories, Maildir and mbox folders; quarantine: for the store",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.config and args.command != "web":
        parser.error("the following arguments are required: --config PATH")
    if (
        args.command == "quarantine"
        and args.qcommand == "list"
        and (args.limit < 1 or args.offset < 0)
    ):
        print("gateway: --limit must be >= 1 and --offset >= 0", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    out = sys.stdout
    commands: dict[str, Callable[[argparse.Namespace, TextIO], Coroutine[Any, Any, int]]] = {
        "check-config": _check_config,
        "scan": _scan,
        "symbols": _symbols,
        "quarantine": _quarantine,
        "learn": _learn,
        "web": _web,
        "dmarc-report": _dmarc_report,
    }
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "replay":
            return _replay(args)
        return asyncio.run(commands[args.command](args, out))
    except _Problems as exc:
        stream = out if args.command == "check-config" else sys.stderr
        for line in exc.lines:
            print(line, file=stream)
        return EXIT_PROBLEMS
    except CLIError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
