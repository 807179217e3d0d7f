"""``gateway replay``: what a config (and a second one) would do to stored mail.

Each message (files, directories, Maildir, mbox, ``quarantine:``) goes through
the full pipeline of config A, and of config B with ``--against``, exactly as
``scan`` does, with nothing relayed, quarantined, learned or counted in the
state store (:class:`ReadOnlyState`). The result is a summary: actions under A
and B, the messages whose action changed, the symbols whose hits changed most,
and, for labelled folders (``spam``/``ham``), detection and false-positive
rates as ``bench.quality`` computes them (docs/observe.md).

Workers (``--jobs``) are processes, each with its own engines; the main
process only lists messages (references, not bytes) and adds up small rows,
with a bounded number of batches in flight, so memory stays flat however many
messages there are. Ctrl-C prints the summary so far and exits 130.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import json
import logging
import multiprocessing
import queue
import re
import signal
import sys
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

from gateway import headers, mailsource
from gateway.api import Action, DNSAnswer, DNSTemporaryError, Services, StateStore
from gateway.config import Config, ConfigError, load_config
from gateway.mailsource import Item, Problem, Source

__all__ = [
    "FLAGGED",
    "OfflineResolver",
    "ReadOnlyState",
    "ReplaySetup",
    "Replayer",
    "Row",
    "Summary",
    "envelope_for",
    "replay",
]

log = logging.getLogger("gateway.replay")

FLAGGED = frozenset({"add_header", "quarantine", "reject"})  # as bench.quality counts them
_BATCH = 8  # messages per task sent to a worker (evaluated concurrently there)
_IN_FLIGHT = 3  # batches queued per worker: enough to never wait, few enough that the
# last batches end together (the tail is at most this many batches on one worker)
_MAX_CHANGED = 10_000  # changed messages kept for the report; the count goes on
_MAX_PROBLEMS = 1_000  # problems kept for the report, likewise
_MESSAGE_TIMEOUT = 120.0  # seconds for one message under both configs
_QUARANTINE_PAGE = 500
_TOP_SYMBOLS = 10
_HEADER_SCAN = 64 * 1024  # bytes of a message searched for envelope fields

DNSMode = Literal["live", "offline"]


class ReplayError(Exception):
    """A problem that stops the replay before it starts (bad config, bad arguments)."""


# --- the world a replay runs in -------------------------------------------------


class OfflineResolver:
    """``--dns offline``: every lookup fails at once, the same way every run.

    Policies see a temporary DNS error, as when the network is down: SPF and
    DMARC report temperror, DKIM cannot fetch keys, blocklists are skipped
    (DNSBL_TEMPFAIL). Replay drops the tempfail floors that follow from them.
    """

    async def query(self, name: str, rdtype: str) -> DNSAnswer:
        raise DNSTemporaryError(f"{name}/{rdtype}: skipped (replay --dns offline)")


class ReadOnlyState:
    """The config's state store for reading (classifier tokens); writes go nowhere.

    A replay must not train the classifier or count towards rate limits: the
    counters are read as they are, and every ``hit`` is the first in its window.
    """

    def __init__(self, store: StateStore) -> None:
        self._store = store

    async def incr_many(self, table: str, deltas: Mapping[str, tuple[int, int]]) -> None:
        return None

    async def get_many(self, table: str, keys: list[str]) -> dict[str, tuple[int, int]]:
        return await self._store.get_many(table, keys)

    async def hit(self, key: str, window: float, now: float | None = None) -> int:
        return 1

    async def put_blobs(self, table: str, items: Mapping[str, bytes]) -> None:
        return None

    async def get_blobs(self, table: str, keys: list[str]) -> dict[str, bytes]:
        return await self._store.get_blobs(table, keys)

    async def blob_keys(self, table: str) -> list[str]:
        return await self._store.blob_keys(table)


@dataclass(frozen=True, slots=True)
class ReplaySetup:
    """What every worker needs to build its engines (small and picklable)."""

    config_a: str
    config_b: str | None = None
    dns: DNSMode = "offline"
    mail_from: str | None = None
    rcpt: tuple[str, ...] = ()
    ip: str | None = None
    helo: str | None = None


@dataclass(frozen=True, slots=True)
class Row:
    """One message's outcome under A (and B); ``error`` set when it was not evaluated."""

    name: str
    label: str = ""
    a: str = ""
    b: str | None = None
    symbols_a: tuple[str, ...] = ()
    symbols_b: tuple[str, ...] = ()
    error: str = ""


# --- envelopes from stored mail -------------------------------------------------

_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.M)
_ANGLE = re.compile(rb"<([^<>\s]*)>")
_ADDRESS = re.compile(rb"[^\s<>,;\"()]+@[^\s<>,;\"()]+")
_FROM_CLAUSE = re.compile(rb"^\s*from\s+(\S+)(?:\s+\(([^)]*)\))?.*?\sby\s+(\S+)", re.I | re.S)
_BRACKETED = re.compile(rb"\[(?:IPv6:)?([0-9A-Fa-f:.]+)\]")


@dataclass(frozen=True, slots=True)
class _Trace:
    helo: str
    ip: str | None
    by: str


def _header_fields(raw: bytes) -> list[tuple[bytes, bytes]]:
    end = headers.header_block_end(raw[:_HEADER_SCAN])
    return [(m.group(1).lower(), m.group(2)) for m in _FIELD.finditer(raw[:end])]


def _trace(value: bytes) -> _Trace | None:
    m = _FROM_CLAUSE.match(value)
    if m is None:
        return None
    ip = None
    for candidate in _BRACKETED.findall(m.group(2) or b"") + _BRACKETED.findall(value):
        with contextlib.suppress(ValueError):
            ip = str(ipaddress.ip_address(candidate.decode("ascii")))
            break
    by = m.group(3).decode("ascii", "replace").rstrip(";").lower()
    return _Trace(m.group(1).decode("ascii", "replace"), ip, by)


def envelope_for(
    raw: bytes, config: Config, setup: ReplaySetup, queue_id: str, held: Any = None
) -> Any:
    """The envelope a stored message most likely arrived with; options override.

    A quarantined message carries its own. Otherwise: ``Return-Path`` or
    ``X-Envelope-From`` is the sender; ``X-Envelope-To``, ``X-Original-To``
    and ``Delivered-To`` the recipients (else postmaster of the first
    accepted domain); the client and HELO come from the ``Received`` field our
    own hostname added, else from the topmost one with a ``from`` clause.
    """
    from gateway.engine import Envelope

    if held is not None:
        env = Envelope(held.client_ip, held.helo, held.mail_from, held.rcpt_tos, queue_id)
    else:
        fields = _header_fields(raw)
        sender = ""
        for name, value in fields:
            if name in (b"return-path", b"x-envelope-from"):
                m = _ANGLE.search(value) or _ADDRESS.search(value)
                if m:
                    sender = m.group(1 if m.re is _ANGLE else 0).decode("utf-8", "replace")
                    break
        rcpts: list[str] = []
        for name, value in fields:
            if name in (b"x-envelope-to", b"x-original-to", b"delivered-to"):
                for addr in _ADDRESS.findall(value):
                    text = addr.decode("utf-8", "replace").lower()
                    if text not in rcpts:
                        rcpts.append(text)
        traces = [t for name, value in fields if name == b"received" and (t := _trace(value))]
        ours = config.server.hostname.lower()
        trace = next((t for t in traces if t.by == ours), traces[0] if traces else None)
        env = Envelope(
            client_ip=trace.ip if trace else None,
            helo=trace.helo if trace else "",
            mail_from=sender,
            rcpt_to=tuple(rcpts[:100])
            or (f"postmaster@{(config.server.accepted_domains or ('localhost',))[0]}",),
            queue_id=queue_id,
        )
    return Envelope(
        client_ip=setup.ip if setup.ip is not None else env.client_ip,
        helo=setup.helo if setup.helo is not None else env.helo,
        mail_from=setup.mail_from if setup.mail_from is not None else env.mail_from,
        rcpt_to=setup.rcpt or env.rcpt_to,
        queue_id=queue_id,
    )


def as_received(raw: bytes, hostname: str) -> bytes:
    """The message as the gateway received it: what it and later hops added removed.

    Mail read back from a mailbox carries our ``Received`` field and the
    fields above it, and our ``X-Spam-*`` and ``Authentication-Results``;
    none were there when the gateway judged it. Line endings become CRLF, as
    on the wire (and as ``bench.quality`` feeds its corpus).
    """
    raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    ours = hostname.lower().encode()
    cut = None
    for start, end, name in headers.iter_fields(raw):
        if start > _HEADER_SCAN:
            break
        if name.lower() == b"received":
            t = _trace(raw[start:end].split(b":", 1)[1])
            if t is not None and t.by.encode() == ours:
                cut = end
                break
    if cut is not None:
        raw = raw[cut:]
    return headers.remove_fields(raw, headers.untrusted_field(hostname))


# --- one worker's engines ------------------------------------------------------


class Replayer:
    """Config A's engine (and B's) in one process; evaluates batches of items."""

    def __init__(self, setup: ReplaySetup) -> None:
        self.setup = setup
        self.configs: list[Config] = []
        self._engines: list[Any] = []
        self._states: list[Any] = []
        self._quarantine: Any = None

    async def open(self) -> None:
        from gateway.dns import CachingResolver
        from gateway.engine import Engine
        from gateway.state import open_state

        for path in filter(None, (self.setup.config_a, self.setup.config_b)):
            config = load_config(path)
            plan = Engine.make_plan(config)
            state = open_state(config.state, config.base_dir)
            self._states.append(state)
            resolver = OfflineResolver() if self.setup.dns == "offline" else None
            services = Services(
                resolver=resolver or CachingResolver(config.dns),
                state=ReadOnlyState(state),
                hostname=config.server.hostname,
                config_dir=config.base_dir,
            )
            engine = Engine(config, plan, services, retry_floors=False)
            await engine.start()
            self.configs.append(config)
            self._engines.append(engine)

    async def close(self) -> None:
        for engine in self._engines:
            with contextlib.suppress(Exception):
                await engine.close()
        for state in self._states:
            with contextlib.suppress(Exception):
                await state.close()
        if self._quarantine is not None:
            with contextlib.suppress(Exception):
                await self._quarantine.close()

    async def evaluate(self, items: Sequence[Item]) -> list[Row]:
        loaded = await asyncio.to_thread(self._read_files, items)
        pairs = zip(items, loaded, strict=True)
        return list(await asyncio.gather(*(self._one(item, got) for item, got in pairs)))

    def _read_files(self, items: Sequence[Item]) -> list[bytes | str | None]:
        """Each file/mbox item's bytes, or why not; quarantine items are fetched later."""
        out: list[bytes | str | None] = []
        for item in items:
            if item.kind == "quarantine":
                out.append(None)
                continue
            try:
                out.append(mailsource.read_file_item(item))
            except OSError as exc:
                out.append(f"cannot read: {exc.strerror or exc}")
        return out

    async def _one(self, item: Item, got: bytes | str | None) -> Row:
        try:
            async with asyncio.timeout(_MESSAGE_TIMEOUT):
                return await self._evaluate(item, got)
        except TimeoutError:
            return Row(item.name, item.label, error=f"not evaluated within {_MESSAGE_TIMEOUT:g}s")
        except Exception as exc:  # one hostile message never stops the replay
            log.warning("replay_failed", extra={"path": item.name, "error": type(exc).__name__})
            return Row(item.name, item.label, error=f"evaluation failed: {type(exc).__name__}")

    async def _evaluate(self, item: Item, got: bytes | str | None) -> Row:
        config = self.configs[0]
        held = None
        if item.kind == "quarantine":
            found = await self._held(item.ref)
            if found is None:
                return Row(item.name, item.label, error="no longer in quarantine")
            held, raw = found
        elif isinstance(got, str):
            return Row(item.name, item.label, error=got)
        else:
            assert got is not None
            raw = got
        limit = config.server.max_message_size
        if len(raw) > limit:
            return Row(item.name, item.label, error=f"over server.max_message_size ({limit})")
        if not mailsource.looks_like_mail(raw):
            return Row(item.name, item.label, error="not a mail message (no header field first)")
        # The envelope from the trace fields first: as_received drops our Received field.
        queue_id = f"replay{zlib.crc32(item.name.encode('utf-8', 'replace')):08x}"  # stable
        env = envelope_for(raw, config, self.setup, queue_id, held)
        raw = as_received(raw, config.server.hostname)
        outcomes = []
        for engine in self._engines:
            ev = await engine.evaluate(env, raw)
            outcomes.append((ev.action.value, tuple(ev.verdict.symbol_names())))
        (a, syms_a), *rest = outcomes
        b, syms_b = rest[0] if rest else (None, ())
        return Row(item.name, item.label, a, b, syms_a, syms_b)

    async def _held(self, id: str) -> tuple[Any, bytes] | None:
        from gateway.quarantine import open_quarantine

        if self._quarantine is None:
            config = self.configs[0]
            self._quarantine = open_quarantine(config.quarantine, config.base_dir)
        got: tuple[Any, bytes] | None = await self._quarantine.get(id)
        return got


# --- adding up -----------------------------------------------------------------


@dataclass
class Summary:
    """Order-independent totals of every row; bounded lists of changes and problems."""

    against: bool
    messages: int = 0
    errors: int = 0
    actions: list[collections.Counter[str]] = field(
        default_factory=lambda: [collections.Counter(), collections.Counter()]
    )
    symbols: list[collections.Counter[str]] = field(
        default_factory=lambda: [collections.Counter(), collections.Counter()]
    )
    labels: dict[str, list[list[int]]] = field(default_factory=dict)  # label -> [[flagged, total]]
    changed: list[Row] = field(default_factory=list)
    changed_total: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0

    def problem(self, name: str, reason: str) -> None:
        self.errors += 1
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append((name, reason))

    def add(self, row: Row) -> None:
        if row.error:
            self.problem(row.name, row.error)
            return
        self.messages += 1
        sides = [(row.a, row.symbols_a)]
        if self.against and row.b is not None:
            sides.append((row.b, row.symbols_b))
        for i, (action, symbols) in enumerate(sides):
            self.actions[i][action] += 1
            self.symbols[i].update(symbols)
        if row.label:
            counts = self.labels.setdefault(row.label, [[0, 0], [0, 0]])
            for i, (action, _) in enumerate(sides):
                counts[i][0] += action in FLAGGED
                counts[i][1] += 1
        if self.against and row.b is not None and row.a != row.b:
            self.changed_total += 1
            if len(self.changed) < _MAX_CHANGED:
                self.changed.append(row)

    def symbol_changes(self) -> list[tuple[str, int, int]]:
        """(symbol, hits under A, hits under B), the largest differences first."""
        names = set(self.symbols[0]) | set(self.symbols[1])
        rows = [(n, self.symbols[0][n], self.symbols[1][n]) for n in names]
        rows = [r for r in rows if r[1] != r[2]]
        rows.sort(key=lambda r: (-abs(r[2] - r[1]), r[0]))
        return rows[:_TOP_SYMBOLS]

    def to_json(self, dns: str) -> dict[str, Any]:
        """The ``--json`` object (INTERFACE.md), plus problems and run facts."""
        sides = ["a", "b"] if self.against else ["a"]
        doc: dict[str, Any] = {"messages": self.messages, "errors": self.errors}
        for i, side in enumerate(sides):
            doc[side] = {
                "actions": dict(sorted(self.actions[i].items())),
                "symbols": dict(sorted(self.symbols[i].items())),
            }
        doc["changed"] = [
            {
                "path": r.name,
                "a": r.a,
                "b": r.b,
                "symbols_a": list(r.symbols_a),
                "symbols_b": list(r.symbols_b),
            }
            for r in sorted(self.changed, key=lambda r: r.name)
        ]
        doc["changed_total"] = self.changed_total
        doc["symbol_changes"] = [{"symbol": n, "a": a, "b": b} for n, a, b in self.symbol_changes()]
        doc["labels"] = {
            label: {
                side: {"flagged": counts[i][0], "total": counts[i][1]}
                for i, side in enumerate(sides)
            }
            for label, counts in sorted(self.labels.items())
        }
        doc["problems"] = [{"path": p, "error": e} for p, e in sorted(self.problems)]
        doc["dns"] = dns
        doc["interrupted"] = self.interrupted
        doc["seconds"] = round(self.seconds, 3)
        return doc

    def render(self, out: TextIO, dns: str) -> None:
        """The table for people."""
        sides = ["A", "B"] if self.against else ["A"]
        state = " (interrupted: partial)" if self.interrupted else ""
        rate = self.messages / self.seconds if self.seconds > 0 else 0.0
        print(
            f"replayed {self.messages} messages, {self.errors} skipped, dns {dns}, "
            f"{self.seconds:.1f} s ({rate:.0f} msg/s){state}",
            file=out,
        )
        print("", file=out)
        print(f"{'action':<12}" + "".join(f"{s:>10}" for s in sides), file=out)
        for action in [a.value for a in Action]:
            counts = [self.actions[i][action] for i in range(len(sides))]
            print(f"{action:<12}" + "".join(f"{c:>10}" for c in counts), file=out)
        if self.labels:
            print("", file=out)
            print(f"{'label':<12}" + "".join(f"{s + ' flagged':>22}" for s in sides), file=out)
            for label, pairs in sorted(self.labels.items()):
                cells = "".join(
                    f"{f'{c[0]}/{c[1]} ({100 * c[0] / c[1] if c[1] else 0:.1f}%)':>22}"
                    for c in pairs[: len(sides)]
                )
                what = "detection" if label == "spam" else "false positives"
                print(f"{label:<12}{cells}   {what}", file=out)
        if self.against:
            print("", file=out)
            print(f"changed: {self.changed_total} messages", file=out)
            for r in sorted(self.changed, key=lambda r: r.name)[:50]:
                print(f"  {r.name}: {r.a} -> {r.b}", file=out)
                gone = sorted(set(r.symbols_a) - set(r.symbols_b))
                new = sorted(set(r.symbols_b) - set(r.symbols_a))
                if gone or new:
                    print(f"      -{','.join(gone) or '-'} +{','.join(new) or '-'}", file=out)
            if self.changed_total > 50:
                print(f"  ... and {self.changed_total - 50} more (--json lists them)", file=out)
            moved = self.symbol_changes()
            if moved:
                print("", file=out)
                print("symbols whose hits changed most (A -> B):", file=out)
                for name, a, b in moved:
                    print(f"  {name:<30} {a:>7} -> {b:<7} ({b - a:+d})", file=out)
        if self.problems:
            print("", file=out)
            print(f"skipped {self.errors}:", file=out)
            for name, reason in sorted(self.problems)[:20]:
                print(f"  {name}: {reason}", file=out)
            if self.errors > 20:
                print(f"  ... and {self.errors - 20} more (--json lists them)", file=out)


# --- the run -------------------------------------------------------------------


def _quarantine_items(config: Config, label: str) -> Iterator[Item | Problem]:
    """Every quarantined message of ``config``'s store, newest first, page by page."""
    from gateway.quarantine import QuarantineError, QuarantineFilter, open_quarantine

    loop = asyncio.new_event_loop()
    store = open_quarantine(config.quarantine, config.base_dir)
    try:
        cursor: str | None = None
        while True:
            try:
                page = loop.run_until_complete(
                    store.search(QuarantineFilter(), limit=_QUARANTINE_PAGE, cursor=cursor)
                )
            except QuarantineError as exc:
                yield Problem(mailsource.QUARANTINE, f"cannot list the quarantine: {exc}")
                return
            for held in page.items:
                yield Item(f"{mailsource.QUARANTINE}{held.id}", "quarantine", held.id, label)
            if page.next is None:
                return
            cursor = page.next
    finally:
        loop.run_until_complete(store.close())
        loop.close()


def items_of(sources: Sequence[Source], config: Config) -> Iterator[Item | Problem]:
    """:func:`mailsource.walk`, with ``quarantine:`` read from config A's store."""
    limit = config.server.max_message_size
    for source in sources:
        if source.path == mailsource.QUARANTINE:
            yield from _quarantine_items(config, source.label)
        else:
            yield from mailsource.walk([source], limit)


def _batches(items: Iterator[Item | Problem], summary: Summary) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        if isinstance(item, Problem):
            summary.problem(item.name, item.reason)
            continue
        batch.append(item)
        if len(batch) >= _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


class _Progress:
    """One status line on a terminal, redrawn at most twice a second."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.on = stream.isatty()
        self.started = time.monotonic()
        self._last = 0.0

    def update(self, summary: Summary, force: bool = False) -> None:
        now = time.monotonic()
        if not self.on or (not force and now - self._last < 0.5):
            return
        self._last = now
        rate = summary.messages / max(now - self.started, 1e-9)
        self.stream.write(
            f"\rreplay: {summary.messages} messages, {summary.errors} skipped, "
            f"{summary.changed_total} changed, {rate:.0f} msg/s "
        )
        self.stream.flush()

    def done(self) -> None:
        if self.on:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _worker(setup: ReplaySetup, tasks: Any, results: Any) -> None:
    """A worker process: build the engines, evaluate batches until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # and stops us with SIGTERM
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s %(message)s")
    loop = asyncio.new_event_loop()
    replayer = Replayer(setup)
    try:
        loop.run_until_complete(replayer.open())
    except Exception as exc:
        results.put(("fatal", f"{type(exc).__name__}: {exc}"))
        return
    try:
        while True:
            task = tasks.get()
            if task is None:
                break
            batch_id, items = task
            results.put(("rows", batch_id, loop.run_until_complete(replayer.evaluate(items))))
    finally:
        loop.run_until_complete(replayer.close())
        loop.close()


def _run_inline(
    setup: ReplaySetup, batches: Iterator[list[Item]], summary: Summary, progress: _Progress
) -> None:
    async def go() -> None:
        replayer = Replayer(setup)
        await replayer.open()
        try:
            # The listing runs in a thread: it walks directories, and ``quarantine:``
            # drives its own event loop, which cannot run inside this one.
            while (batch := await asyncio.to_thread(next, batches, None)) is not None:
                for row in await replayer.evaluate(batch):
                    summary.add(row)
                progress.update(summary)
        finally:
            await replayer.close()

    asyncio.run(go())


def _run_parallel(
    setup: ReplaySetup,
    jobs: int,
    batches: Iterator[list[Item]],
    summary: Summary,
    progress: _Progress,
) -> None:
    # fork where there is one: the workers start with the policy modules the config
    # check imported (0.6 s of CPU each under spawn). Nothing in this process holds
    # a thread or an event loop yet: the quarantine listing opens its loop later.
    methods = multiprocessing.get_all_start_methods()
    ctx: Any = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    tasks: Any = ctx.Queue()
    results: Any = ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(setup, tasks, results)) for _ in range(jobs)]
    for w in workers:
        w.daemon = True
        w.start()
    pending: dict[int, list[Item]] = {}
    next_id = 0
    try:
        source = iter(batches)
        exhausted = False
        while True:
            while not exhausted and len(pending) < jobs * _IN_FLIGHT:
                batch = next(source, None)
                if batch is None:
                    exhausted = True
                    break
                pending[next_id] = batch
                tasks.put((next_id, batch))
                next_id += 1
            if exhausted and not pending:
                break
            try:
                message = results.get(timeout=1.0)
            except queue.Empty:
                dead = [w for w in workers if not w.is_alive()]
                if dead:
                    raise ReplayError(
                        f"a replay worker exited (code {dead[0].exitcode}); "
                        f"{sum(len(b) for b in pending.values())} messages not evaluated"
                    ) from None
                continue
            if message[0] == "fatal":
                raise ReplayError(f"a replay worker could not start: {message[1]}")
            _, batch_id, rows = message
            pending.pop(batch_id, None)
            for row in rows:
                summary.add(row)
            progress.update(summary)
    finally:
        for _ in workers:
            with contextlib.suppress(Exception):
                tasks.put(None)
        deadline = time.monotonic() + (0.0 if pending else 10.0)
        for w in workers:
            w.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.is_alive():
                w.terminate()
                w.join(timeout=5.0)
        tasks.cancel_join_thread()
        results.cancel_join_thread()


def check_configs(setup: ReplaySetup, *, preload: bool = False) -> Config:
    """Config A (returned) and B load and their policy tables are valid; else ReplayError.

    With ``preload``, each policy's process-wide set-up is done here, in the parent,
    so the workers forked next start with it instead of each repeating it.
    """
    from gateway.engine import Engine

    first: Config | None = None
    for path in filter(None, (setup.config_a, setup.config_b)):
        try:
            config = load_config(path)
            plan = Engine.make_plan(config)
        except ConfigError as exc:
            raise ReplayError("\n".join(exc.problems)) from None
        if preload:
            Engine.preload(plan)
        first = first or config
    assert first is not None
    return first


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def replay(
    setup: ReplaySetup,
    sources: Sequence[Source],
    *,
    jobs: int = 1,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    as_json: bool = False,
) -> int:
    """Run the replay and print its report; 0, or 130 when interrupted (partial report)."""
    config = check_configs(setup, preload=jobs > 1)
    summary = Summary(against=setup.config_b is not None)
    progress = _Progress(err)
    started = time.monotonic()
    batches = _batches(items_of(sources, config), summary)
    code = 0
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops like Ctrl-C
    try:
        if jobs <= 1:
            _run_inline(setup, batches, summary, progress)
        else:
            _run_parallel(setup, jobs, batches, summary, progress)
    except KeyboardInterrupt:
        summary.interrupted = True
        code = 130
    except ReplayError as exc:  # a worker died or could not start: report what was done
        summary.problem("replay", str(exc))
        summary.interrupted = True
        print(f"gateway: {exc}", file=err)
        code = 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        summary.seconds = time.monotonic() - started
        progress.done()
    if as_json:
        print(json.dumps(summary.to_json(setup.dns), ensure_ascii=False), file=out)
    else:
        summary.render(out, setup.dns)
    return code
