"""The running gateway: listener, current config generation, DATA hand-off, reload, drain.

``python -m gateway run`` calls :func:`run`. The reply to DATA is decided
here, and only after the message is safe: relayed and accepted by the
downstream, or durably in quarantine. Anything else is a 4xx (or the
downstream's own 5xx), never a 2xx.

SIGHUP builds a new :class:`~gateway.engine.Engine` from the re-read config
and policy files and swaps it in; sessions already evaluating finish on the
old one. An invalid new config is logged and the old one stays in force.
SIGTERM/SIGINT stop accepting, let in-flight messages finish (bounded by
``server.drain_timeout``) and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import grp
import ipaddress
import logging
import os
import pwd
import signal
import socket
import ssl
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import logs, metrics, replies, sharedlimits, workers
from gateway.api import DNSError
from gateway.arcseal import ARCSealer, load_sealer
from gateway.budget import DataBudget
from gateway.config import Config, ConfigError, load_config, parse_hostport
from gateway.dmarcreports.recorder import ReportRecorder
from gateway.dmarcreports.schedule import ReportScheduler
from gateway.dmarcreports.sender import ReportSender
from gateway.dmarcreports.store import open_report_store
from gateway.engine import Engine, services_for
from gateway.handoff import Delivery, Outcome, RelayDelivery, Submission, downstream_reply, hand_off
from gateway.milter.frontend import MilterFrontend
from gateway.milter.server import MilterListener, parse_listen
from gateway.quarantine import QuarantineError, QuarantineStore, open_quarantine
from gateway.relay import Relay, RelayError
from gateway.replies import Reply
from gateway.retention import RetentionPurger
from gateway.smtp import GatewaySMTP, ListenerSettings, SessionLimits, Transaction
from gateway.state import ClosableStateStore, open_state
from gateway.web.digest_schedule import DigestSchedule
from gateway.web.links import LinkKeyError

if TYPE_CHECKING:
    from gateway.web.server import WebServer

__all__ = [
    "Gateway",
    "RunningGateway",
    "StartupError",
    "drop_privileges",
    "run",
    "serve",
    "start",
]

log = logging.getLogger("gateway.server")

_RELOAD_GRACE = 5.0  # seconds between retiring a generation's relay and closing it
_GAUGE_REFRESH = 30.0  # seconds between recounts of the quarantine for its gauge
_RDNS_TIMEOUT = 2.0  # seconds for the client's PTR + forward lookups (at most dns.timeout)


# --- one config generation ----------------------------------------------------


@dataclass(slots=True)
class Generation:
    """A config, its engine and the services built for it."""

    config: Config
    engine: Engine
    relay: Relay
    settings: ListenerSettings
    sealer: ARCSealer | None = None  # [arc_seal] on: seals what is relayed (docs/arc.md)
    reports: ReportRecorder | None = None  # [dmarc_reports] on (docs/dmarc-reports.md)
    inflight: int = 0
    retired: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)


def _listener_settings(config: Config) -> ListenerSettings:
    server = config.server
    if server.tls_cert:
        server = replace(
            server,
            tls_cert=str(config.resolve_path(server.tls_cert)),
            tls_key=str(config.resolve_path(server.tls_key)),
        )
    return ListenerSettings.from_config(server, verify_recipients=config.relay.verify_recipients)


def _listen_address(listen: str) -> tuple[str, int]:
    text = listen.strip()
    if text.endswith(":0"):
        host, _ = parse_hostport(text[:-2] + ":1")
        return host, 0
    return parse_hostport(text)


def _same_ip(text: str, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(text) == addr
    except ValueError:
        return False


class Gateway:
    """What the SMTP sessions talk to (``gateway.smtp.Backend``)."""

    def __init__(self, generation: Generation, state: ClosableStateStore) -> None:
        self.gen = generation
        self.state = state
        self.quarantine: QuarantineStore = open_quarantine(
            generation.config.quarantine, generation.config.base_dir
        )
        self.limits = SessionLimits()
        metrics.PROXY_CONNECTION_LIMIT.set_function(self._proxy_connection_limit)
        self.budget = DataBudget(generation.config.server.max_data_memory)
        self.sessions: set[GatewaySMTP] = set()
        self._draining = False
        self._retired: list[Generation] = []
        self._reloading = asyncio.Lock()
        self._all_closed = asyncio.Event()
        self._deliveries = 0  # hand-offs running, even for sessions already gone
        self._no_deliveries = asyncio.Event()
        self._no_deliveries.set()
        self._relay = RelayDelivery()

    def _proxy_connection_limit(self) -> float:
        server = self.gen.config.server
        return server.proxy_max_connections if server.proxy_protocol else 0

    # -- Backend ---------------------------------------------------------------

    @property
    def settings(self) -> ListenerSettings:
        return self.gen.settings

    @property
    def draining(self) -> bool:
        return self._draining

    def session_opened(self, session: GatewaySMTP) -> None:
        self.sessions.add(session)

    def session_closed(self, session: GatewaySMTP) -> None:
        self.sessions.discard(session)
        if self._draining and not self.sessions:
            self._all_closed.set()

    async def verify_recipient(self, mail_from: str, rcpt: str) -> Reply | None:
        """RCPT-time check with the downstream: its 5xx is ours, a 4xx or silence is 451 4.4.1."""
        try:
            code, text = await self.gen.relay.verify_recipient(mail_from, rcpt)
        except RelayError as exc:
            if exc.permanent and exc.code is not None:
                return downstream_reply(exc.code, exc.text, "5.1.1")
            log.info("recipient_unverified", extra={"rcpt": rcpt, "reply": exc.text})
            return replies.RELAY_UNAVAILABLE
        except Exception:
            log.exception("recipient_verify_failed", extra={"rcpt": rcpt})
            return replies.RELAY_UNAVAILABLE
        if 200 <= code < 300:
            return None
        if 500 <= code < 600:
            return downstream_reply(code, text, "5.1.1")
        return replies.RELAY_UNAVAILABLE

    async def client_name(self, ip: str) -> str:
        """Forward-confirmed reverse DNS (FCrDNS): the PTR name only if it maps back to ``ip``."""
        resolver = self.gen.engine.services.resolver
        try:
            addr = ipaddress.ip_address(ip)
            async with asyncio.timeout(min(_RDNS_TIMEOUT, self.gen.config.dns.timeout)):
                ptr = await resolver.query(addr.reverse_pointer, "PTR")
                for name in ptr.records[:3]:
                    rdtype = "A" if addr.version == 4 else "AAAA"
                    forward = await resolver.query(name, rdtype)
                    if any(_same_ip(a, addr) for a in forward.records):
                        return name.rstrip(".")
        except (TimeoutError, ValueError, DNSError):
            pass
        except Exception:
            log.debug("rdns_failed", exc_info=True)
        return ""

    async def deliver(self, tx: Transaction) -> Reply:
        """Evaluate, then relay / quarantine / refuse; the reply to DATA."""
        sub = Submission(
            tx.envelope,
            tx.raw,
            "smtp",
            prepend=(tx.received,),
            log_fields={
                "via": tx.via,  # the MTA that passed the client on with XFORWARD, if any
                "upstream_queue_id": tx.upstream_queue_id,  # its queue id (XFORWARD IDENT)
            },
            relay_client=tx.client,
        )
        return (await self.hand_off(sub, self._relay)).reply

    async def hand_off(self, sub: Submission, delivery: Delivery) -> Outcome:
        """:func:`gateway.handoff.hand_off` on the current generation, counted for drain
        and reload (a retired generation closes only when its last message is settled)."""
        gen = self.gen
        gen.inflight += 1
        self._deliveries += 1
        self._no_deliveries.clear()
        try:
            return await hand_off(gen, self.quarantine, sub, delivery)
        finally:
            gen.inflight -= 1
            self._deliveries -= 1
            if self._deliveries == 0:
                self._no_deliveries.set()
            if gen.retired and gen.inflight == 0:
                gen.closed.set()

    # -- readiness, reload, drain ---------------------------------------------

    async def ready(self) -> tuple[bool, str]:
        if self._draining:
            return False, "shutting down"
        for policy in self.gen.engine.pipeline.policies.values():
            problem = await policy.ready()
            if problem is not None:
                return False, problem
        if not self.gen.config.server.listen:
            return True, ""  # milter only: Postfix delivers; [relay] serves releases alone
        if await self.gen.relay.check():
            return True, ""
        return False, "downstream relay does not answer"

    async def reload(self, path: Path) -> bool:
        """Re-read config and policies; swap in a new engine, or keep the old one and say why."""
        async with self._reloading:
            try:
                new = await build_generation(path, self.state)
            except ConfigError as exc:
                metrics.CONFIG_RELOADS.labels(result="invalid").inc()
                log.error("config_reload_invalid", extra={"problems": list(exc.problems)})
                return False
            except Exception as exc:
                metrics.CONFIG_RELOADS.labels(result="invalid").inc()
                log.error(
                    "config_reload_invalid",
                    extra={"problems": [f"{type(exc).__name__}: {exc}"]},
                )
                return False
            old = self.gen
            self.gen = new
            self.budget.limit = new.config.server.max_data_memory
            if new.config.server.listen != old.config.server.listen:
                log.warning(
                    "config_listen_changed",
                    extra={"detail": "server.listen takes effect on restart"},
                )
            for key, was, now in (
                ("milter.listen", old.config.milter.listen, new.config.milter.listen),
                ("web.listen", old.config.web.listen, new.config.web.listen),
            ):
                if was != now:
                    log.warning(
                        "config_listen_changed", extra={"detail": f"{key} takes effect on restart"}
                    )
            old.retired = True
            if old.inflight == 0:
                old.closed.set()
            self._retired.append(old)
            asyncio.get_running_loop().create_task(self._close_when_idle(old))
            metrics.CONFIG_RELOADS.labels(result="ok").inc()
            log.info(
                "config_reloaded",
                extra={"policies": [p.name for p in new.engine.plan.policies]},
            )
            return True

    async def _close_when_idle(self, gen: Generation) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(gen.config.server.command_timeout):
                await gen.closed.wait()
        await asyncio.sleep(_RELOAD_GRACE)
        await _close_generation(gen)
        with contextlib.suppress(ValueError):
            self._retired.remove(gen)

    async def drain(self, grace: float) -> None:
        """Refuse new sessions, close idle ones with 421, let messages in flight finish."""
        self._draining = True
        for session in list(self.sessions):
            session.shutdown()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                if self.sessions:
                    await self._all_closed.wait()
                await self._no_deliveries.wait()
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
        if self.sessions:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for gen in [*self._retired, self.gen]:
            await _close_generation(gen)
        with contextlib.suppress(Exception):
            await self.quarantine.close()
        with contextlib.suppress(Exception):
            await self.state.close()


async def _close_generation(gen: Generation) -> None:
    with contextlib.suppress(Exception):
        await gen.engine.close()
    with contextlib.suppress(Exception):
        await gen.relay.close()
    if gen.reports is not None:
        await gen.reports.close()  # never raises; pending recordings bounded


async def build_generation(path: Path, state: ClosableStateStore | None) -> Generation:
    """Load and validate the config, plan and start the policies; raises ConfigError."""
    config = await asyncio.to_thread(load_config, path)
    sealer = await asyncio.to_thread(load_sealer, config)  # before anything needs closing
    plan = Engine.make_plan(config)
    if state is None:
        state = open_state(config.state, config.base_dir)
    engine = Engine(config, plan, services_for(config, state))
    await engine.start()
    unknown = engine.unknown_score_keys()
    if unknown:
        await engine.close()
        raise ConfigError(
            [f"scores.{k}: no enabled policy declares this symbol" for k in sorted(unknown)]
        )
    settings = _listener_settings(config)
    relay = Relay(config.relay, config.server.hostname)
    reports = None
    if config.dmarc_reports.enabled:
        store = open_report_store(config)
        reports = ReportRecorder(config.dmarc_reports, store, engine.services.resolver)
    return Generation(config, engine, relay, settings, sealer, reports)


# --- the process ----------------------------------------------------------------


def drop_privileges(config: Config) -> None:
    """Become ``server.user`` / ``server.group``; StartupError when that fails or leaves
    the quarantine or state directory unwritable (the gateway would answer 451 forever)."""
    server = config.server
    if not server.user:
        return
    try:
        account = pwd.getpwnam(server.user)
        gid = grp.getgrnam(server.group).gr_gid if server.group else account.pw_gid
    except KeyError as exc:
        raise StartupError([f"server.user/server.group: no such account: {exc}"], 1) from None
    if (os.getuid(), os.getgid()) != (account.pw_uid, gid):
        if os.geteuid() != 0:
            raise StartupError(
                [
                    f"server.user: switching to {server.user!r} needs root; start the gateway "
                    "as root (to bind port 25) or leave server.user empty"
                ],
                1,
            )
        os.setgroups([])
        os.setgid(gid)
        os.setuid(account.pw_uid)
    problems = [
        f"{key}: {where} is not writable by user {server.user!r}; "
        f"chown it to {server.user} or choose another path"
        for key, where in _writable_paths(config)
        if not _writable(where)
    ]
    if problems:
        raise StartupError(problems, 1)
    log.info("privileges_dropped", extra={"uid": os.getuid(), "gid": os.getgid()})


def _writable_paths(config: Config) -> list[tuple[str, Path]]:
    out = []
    if config.quarantine.backend == "local":
        out.append(("quarantine.path", config.resolve_path(config.quarantine.path)))
    if config.state.backend == "local":
        state = config.resolve_path(config.state.path)
        out.append(("state.path", state))
    return out


def _writable(path: Path) -> bool:
    """``path`` (file or directory) can be written or created, and so can its directory."""
    try:
        if path.exists() and not os.access(path, os.W_OK):
            return False
        probe = path if path.is_dir() else path.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
    except OSError:  # a directory on the way that this user cannot even search
        return False
    return os.access(probe, os.W_OK | os.X_OK)


class StartupError(Exception):
    """The gateway could not start; ``problems`` are lines for the operator."""

    def __init__(self, problems: list[str], exit_code: int = 2) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.exit_code = exit_code


class RunningGateway:
    """A started gateway in the current event loop (``serve`` and in-process tests)."""

    def __init__(
        self,
        gateway: Gateway,
        listener: asyncio.Server | None,
        endpoint: metrics.HTTPEndpoint | None,
        path: Path,
        milter: MilterListener | None = None,
        web: WebServer | None = None,
    ) -> None:
        self.gateway = gateway
        self.web = web  # the web UI and REST API (web.listen; the only process or worker 0)
        self.web_port = web.port if web is not None else None
        self.listener = listener  # None: server.listen = "" (a milter-only node)
        self.milter = milter
        self.endpoint = endpoint
        self.path = path
        self.smtp_port = int(listener.sockets[0].getsockname()[1]) if listener else 0
        self.milter_port = milter.port if milter is not None else None
        self.metrics_port = endpoint.port if endpoint is not None else None
        self.share: workers.MetricsShare | None = None  # metrics across server.workers
        self._gauges: asyncio.Task[None] | None = None
        self.purger: RetentionPurger | None = None
        self.digests: DigestSchedule | None = None
        self.reports: ReportScheduler | None = None  # DMARC aggregate reports, when enabled

    def start_housekeeping(self, *, purge: bool = True) -> None:
        """Keep gauges other processes change (``quarantine release/delete``) current;
        with ``purge``, enforce ``quarantine.retention_days`` and send the daily digests
        at ``web.digest_time`` (one process per gateway)."""
        self._gauges = asyncio.get_running_loop().create_task(self._refresh_gauges())
        if purge:
            self.purger = RetentionPurger(
                self.gateway.quarantine, lambda: self.gateway.gen.config.quarantine
            )
            self.purger.start()
            self.digests = DigestSchedule(self.gateway.quarantine, lambda: self.gateway.gen.config)
            self.digests.start()
            # Idle while dmarc_reports.enabled is false; the store connects on first use.
            gateway = self.gateway
            sender = ReportSender(
                lambda: gateway.gen.config,
                open_report_store(gateway.gen.config),
                lambda: gateway.gen.engine.services.resolver,
                lambda: gateway.gen.relay,
            )
            self.reports = ReportScheduler(sender, lambda: gateway.gen.config)
            self.reports.start()

    async def _refresh_gauges(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                metrics.QUARANTINE_MESSAGES.set(await self.gateway.quarantine.count())
            await asyncio.sleep(_GAUGE_REFRESH)

    @property
    def config(self) -> Config:
        return self.gateway.gen.config

    async def reload(self) -> bool:
        reloaded = await self.gateway.reload(self.path)
        if reloaded and self.purger is not None:
            self.purger.reconfigured()
        if reloaded and self.digests is not None:
            self.digests.reconfigured()
        if reloaded and self.reports is not None:
            self.reports.reconfigured()
        return reloaded

    async def stop(self, grace: float | None = None) -> None:
        """Stop listening, drain in-flight sessions, close every service."""
        if self.listener is not None:
            self.listener.close()
        if self._gauges is not None:
            self._gauges.cancel()
        grace = self.config.server.drain_timeout if grace is None else grace
        waits = [self.gateway.drain(grace)]
        if self.milter is not None:
            waits.append(self.milter.stop(grace))
        if self.purger is not None:  # its batch in progress ends while sessions drain
            waits.append(self.purger.stop())
        if self.digests is not None:
            waits.append(self.digests.stop())
        if self.reports is not None:
            waits.append(self.reports.stop())
        await asyncio.gather(*waits)
        if self.reports is not None:
            with contextlib.suppress(Exception):
                await self.reports.sender.store.close()
        if self.share is not None:
            await self.share.stop()
        if self.endpoint is not None:
            await self.endpoint.close()
        if self.web is not None:
            await self.web.close()
        await self.gateway.close()


async def _reload_everywhere(gateway: Gateway, path: Path, worker: int | None) -> None:
    """After the web changed a policy file: this process, or every worker (via the supervisor)."""
    if worker is None:
        await gateway.reload(path)
    else:
        os.kill(os.getppid(), signal.SIGHUP)  # the supervisor passes it on to every worker


async def _start_web(gateway: Gateway, path: Path, worker: int | None) -> WebServer:
    """The web UI and REST API over this gateway's quarantine and current generation."""
    from gateway.learning import learner_of
    from gateway.web.context import WebContext
    from gateway.web.links import link_key
    from gateway.web.server import start_web, tls_context

    config = gateway.gen.config
    ctx = WebContext(
        config=lambda: gateway.gen.config,
        quarantine=gateway.quarantine,
        link_key=await link_key(config.web, config.base_dir, gateway.quarantine),
        learner=lambda: learner_of(gateway.gen.engine.pipeline.policies),
        reload=functools.partial(_reload_everywhere, gateway, path, worker),
    )
    host, port = _listen_address(config.web.listen)
    return await start_web(ctx, host, port, tls_context(config))


async def start(
    config_path: Path | str,
    *,
    setup_logging: bool = False,
    sock: socket.socket | None = None,
    worker: int | None = None,
    milter_sock: socket.socket | None = None,
) -> RunningGateway:
    """Load the config, start policies, listener and metrics; raises StartupError.

    ``sock`` and ``milter_sock`` are listening sockets inherited from the
    supervisor when ``server.workers`` > 1; only worker 0 serves the metrics endpoint.
    """
    path = Path(config_path)
    try:
        config = await asyncio.to_thread(load_config, path)
    except ConfigError as exc:
        raise StartupError(list(exc.problems)) from None
    if setup_logging:
        logs.setup_logging(config.log)
    state = open_state(config.state, config.base_dir)
    try:
        gen = await build_generation(path, state)
    except ConfigError as exc:
        with contextlib.suppress(Exception):
            await state.close()
        raise StartupError(list(exc.problems)) from None
    gateway = Gateway(gen, state)
    table = sharedlimits.current()
    if table is not None and worker is not None:
        # Pre-forked: the limits and the data budget hold for all workers together.
        gateway.limits = sharedlimits.SharedSessionLimits(table, worker)
        gateway.budget = sharedlimits.SharedDataBudget(table, worker, config.server.max_data_memory)
    loop = asyncio.get_running_loop()
    try:
        listener = await _smtp_listener(loop, gateway, config.server.listen, sock)
    except OSError as exc:
        await gateway.close()
        raise StartupError(
            [f"server.listen: cannot listen on {config.server.listen}: {exc}"], 1
        ) from None
    milter = None
    if config.milter.listen:
        milter = MilterListener(MilterFrontend(gateway), config.milter.max_connections)
        try:
            await milter.start(config.milter.listen, sock=milter_sock)
        except OSError as exc:
            if listener is not None:
                listener.close()
            await gateway.close()
            raise StartupError(
                [f"milter.listen: cannot listen on {config.milter.listen}: {exc}"], 1
            ) from None

    def close_listeners() -> None:
        if listener is not None:
            listener.close()
        if milter is not None and milter.server is not None:
            milter.server.close()

    endpoint = None
    if config.metrics.listen and not worker:
        try:
            endpoint = await metrics.start_http(config.metrics.listen, gateway.ready)
        except OSError as exc:
            close_listeners()
            await gateway.close()
            raise StartupError(
                [f"metrics.listen: cannot listen on {config.metrics.listen}: {exc}"], 1
            ) from None
    web = None
    if config.web.listen and not worker:  # one process serves the web: see gateway/web/server.py
        try:
            web = await _start_web(gateway, path, worker)
        except (OSError, ssl.SSLError, LinkKeyError, QuarantineError) as exc:
            close_listeners()
            if endpoint is not None:
                await endpoint.close()
            await gateway.close()
            raise StartupError(
                [f"web.listen: cannot serve on {config.web.listen}: {exc}"], 1
            ) from None
    try:
        drop_privileges(config)  # sockets are bound: port 25 needed root, nothing else does
    except StartupError:
        close_listeners()
        if endpoint is not None:
            await endpoint.close()
        if web is not None:
            await web.close()
        await gateway.close()
        raise
    running = RunningGateway(gateway, listener, endpoint, path, milter, web)
    running.start_housekeeping(purge=not worker)  # one purging process: the only one or worker 0
    if worker is not None:
        running.share = workers.MetricsShare.for_worker(metrics.REGISTRY, worker)
        if running.share is not None:
            running.share.start()
            if worker == 0:
                metrics.set_renderer(running.share.render_fresh)
    log.info(
        "gateway_started",
        extra={
            "listen": config.server.listen,
            "smtp_port": running.smtp_port or None,
            "milter": config.milter.listen or None,
            "milter_port": running.milter_port,
            "metrics_port": running.metrics_port,
            "web_port": running.web_port,
            "policies": [p.name for p in gen.engine.plan.policies],
            "hostname": config.server.hostname,
            "worker": worker,
            "pid": os.getpid(),
        },
    )
    return running


async def _smtp_listener(
    loop: asyncio.AbstractEventLoop, gateway: Gateway, listen: str, sock: socket.socket | None
) -> asyncio.Server | None:
    """The SMTP listener, or None when ``server.listen`` is empty (a milter-only node)."""
    if not listen:
        return None
    if sock is not None:
        return await loop.create_server(
            lambda: GatewaySMTP(gateway, gateway.limits, gateway.budget), sock=sock, backlog=1024
        )
    host, port = _listen_address(listen)
    return await loop.create_server(
        lambda: GatewaySMTP(gateway, gateway.limits, gateway.budget),
        host or None,
        port,
        reuse_address=True,
        backlog=1024,
    )


async def serve(
    config_path: Path,
    *,
    sock: socket.socket | None = None,
    worker: int | None = None,
    milter_sock: socket.socket | None = None,
) -> int:
    """The body of ``python -m gateway run``: serve until SIGTERM/SIGINT, then drain; exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[bool]] = set()
    running: RunningGateway | None = None

    def on_hup() -> None:
        if running is None:
            return  # still starting: the config being loaded is the newest anyway
        task = loop.create_task(running.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    # Handlers go in before "gateway_started" is logged: a supervisor may signal right after.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        try:
            running = await start(
                config_path, setup_logging=True, sock=sock, worker=worker, milter_sock=milter_sock
            )
        except StartupError as exc:
            for line in exc.problems:
                print(line, file=sys.stderr)
            return exc.exit_code
        await stop.wait()
        log.info("gateway_stopping", extra={"sessions": len(running.gateway.sessions)})
        await running.stop()
        for task in reloads:
            task.cancel()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("gateway_stopped")
    return 0


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def run(config_path: Path | str) -> int:
    """Synchronous entry point; uses uvloop when it is installed.

    With ``server.workers`` > 1 this process becomes a supervisor: it binds
    the listening socket once and forks that many workers sharing it.
    """
    path = Path(config_path)
    try:
        config = load_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 2
    count = config.server.worker_count
    if count <= 1:
        return _run_loop(serve(path))
    return _supervise(path, config, count)


_RESPAWN_DELAY = 1.0  # seconds before a crashed worker is replaced


def _bind(where: tuple[str, int] | Path) -> socket.socket:
    """A listening socket the workers share (TCP, or a Unix socket for the milter)."""
    if isinstance(where, Path):
        with contextlib.suppress(FileNotFoundError):
            if where.is_socket():
                where.unlink()  # left by a previous run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(where))
        os.chmod(where, 0o666)  # noqa: S103 -- access is the directory's business
        sock.listen(1024)
    else:
        host, port = where
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=1024)
    sock.setblocking(False)
    return sock


def _supervise(path: Path, config: Config, count: int) -> int:
    """Pre-fork: one shared listening socket, ``count`` workers, signals forwarded.

    Each worker is a whole gateway (own event loop, engine, relay pool);
    session limits and the data memory budget hold for all of them together
    (``gateway/sharedlimits.py``), and only worker 0 serves the metrics
    endpoint, with every worker's counts (``gateway/workers.py``).
    """
    logs.setup_logging(config.log)
    sock = milter_sock = None
    try:
        if config.server.listen:
            sock = _bind(_listen_address(config.server.listen))
        if config.milter.listen:
            milter_sock = _bind(parse_listen(config.milter.listen))
    except OSError as exc:
        key, listen = (
            ("milter.listen", config.milter.listen)
            if sock is not None or not config.server.listen
            else ("server.listen", config.server.listen)
        )
        print(f"{key}: cannot listen on {listen}: {exc}", file=sys.stderr)
        if sock is not None:
            sock.close()
        return 1
    # Before forking: every worker writes its metrics there, and counts its sessions
    # and message bytes in one table, so the limits hold for the whole gateway.
    workers.prepare_share_dir(config.server.user, config.server.group)
    table = sharedlimits.create(count, config.server.max_sessions)
    supervisor = os.getpid()
    children: dict[int, int] = {}
    stopping = False

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        if os.getpid() != supervisor:
            return  # a freshly forked worker before it installed its own handlers
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                code = _run_loop(serve(path, sock=sock, worker=index, milter_sock=milter_sock))
            finally:
                os._exit(code)
        children[pid] = index

    # SIGUSR1: worker 0 asks every worker for a metrics snapshot (gateway/workers.py).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, forward)
    log.info("supervisor_started", extra={"workers": count, "setting": config.server.workers})
    for index in range(count):
        spawn(index)
    exit_code = 0
    while children:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        index = children.pop(pid, -1)
        code = os.waitstatus_to_exitcode(status)
        if index < 0:
            continue
        if stopping:
            exit_code = max(exit_code, code)
            continue
        if code == 2:  # the config became invalid before the worker could start
            log.error("worker_failed_to_start", extra={"worker": index})
            stopping = True
            exit_code = 2
            forward(signal.SIGTERM, None)
            continue
        log.error("worker_exited", extra={"worker": index, "exit_code": code})
        table.reset_worker(index)  # its sessions and message bytes are gone with it
        time.sleep(_RESPAWN_DELAY)
        if not stopping:
            spawn(index)
    for bound in (sock, milter_sock):
        if bound is not None:
            bound.close()
    where = parse_listen(config.milter.listen) if config.milter.listen else None
    if isinstance(where, Path):
        with contextlib.suppress(OSError):
            where.unlink()
    workers.remove_share_dir()
    log.info("supervisor_stopped", extra={"exit_code": exit_code})
    return exit_code
