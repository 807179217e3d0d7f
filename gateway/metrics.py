"""Every Prometheus metric, defined once, and the small HTTP endpoint that serves them.

Labels carry closed sets only (actions, policy and symbol names, reply codes):
never addresses, hosts or subjects, which would leak mail data and blow up
the series count. The endpoint is a minimal HTTP/1.1 server on the gateway's
own event loop: GET ``/metrics`` (Prometheus text), ``/healthz`` (the process
answers) and ``/readyz`` (the gateway can take mail: 200, else 503 + reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from gateway.api import Action
from gateway.config import parse_hostport

__all__ = [
    "ARC_SEALED",
    "AUTH_RESULTS",
    "AUTOLEARN",
    "BUILD_INFO",
    "CONFIG_RELOADS",
    "DMARC_REPORTS",
    "DMARC_REPORT_RECORDS",
    "DNS_QUERIES",
    "MESSAGES",
    "MESSAGE_SIZE",
    "MILTER_CONNECTIONS",
    "MILTER_ERRORS",
    "OBSERVED_ACTIONS",
    "POLICY_DURATION",
    "POLICY_RUNS",
    "PROXY_CONNECTIONS",
    "PROXY_CONNECTION_LIMIT",
    "QUARANTINE_MESSAGES",
    "QUARANTINE_PURGED",
    "REGISTRY",
    "RELAY_DURATION",
    "RELAY_FAILURES",
    "REPLIES",
    "SESSIONS_ACTIVE",
    "SESSIONS_REFUSED",
    "SYMBOLS",
    "HTTPEndpoint",
    "export_policies",
    "label",
    "record_action",
    "set_renderer",
    "start_http",
    "zero",
]

log = logging.getLogger("gateway.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)

MESSAGES = Counter(
    "gateway_messages",
    "Messages by final action (relay, add_header, quarantine, reject, tempfail) and front end",
    ["action", "frontend"],
    registry=REGISTRY,
)
OBSERVED_ACTIONS = Counter(
    "gateway_observed_actions",
    "Observe mode: the action each message would have had, by observed policy "
    '("all" in [actions] mode = "observe"); beside gateway_messages_total, what did happen',
    ["action", "policy"],
    registry=REGISTRY,
)
CAPPED_ACTIONS = Counter(
    "gateway_capped_actions",
    "Messages whose score would have decided a stronger action, held at a policy's ceiling "
    "(an allow list's max_action), by the action held at and the policy",
    ["action", "policy"],
    registry=REGISTRY,
)
AUTH_RESULTS = Counter(
    "gateway_auth_results",
    "Authentication results (RFC 8601) by method and result",
    ["method", "result"],
    registry=REGISTRY,
)
POLICY_DURATION = Histogram(
    "gateway_policy_duration_seconds",
    "Time each policy took per message",
    ["policy"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
POLICY_RUNS = Counter(
    "gateway_policy_runs",
    "Policy runs by outcome (ok, error, timeout)",
    ["policy", "outcome"],
    registry=REGISTRY,
)
SYMBOLS = Counter(
    "gateway_symbols",
    "Symbols emitted, by symbol name",
    ["symbol"],
    registry=REGISTRY,
)
SESSIONS_ACTIVE = Gauge(
    "gateway_smtp_sessions_active",
    "SMTP sessions currently open",
    registry=REGISTRY,
)
SESSIONS_REFUSED = Counter(
    "gateway_smtp_sessions_refused",
    "SMTP sessions refused at connect, by reason",
    ["reason"],
    registry=REGISTRY,
)
PROXY_CONNECTIONS = Gauge(
    "gateway_smtp_proxy_connections",
    "Connections open from trusted PROXY-protocol proxies, by state (awaiting_header, session)",
    ["state"],
    registry=REGISTRY,
)
PROXY_CONNECTION_LIMIT = Gauge(
    "gateway_smtp_proxy_connection_limit",
    "server.proxy_max_connections: connections one trusted proxy may hold open at once"
    " (all workers together; 0 with server.proxy_protocol off)",
    registry=REGISTRY,
)
REPLIES = Counter(
    "gateway_smtp_replies",
    "SMTP replies sent, by stage (connect, helo, mail, rcpt, data) and code",
    ["stage", "code"],
    registry=REGISTRY,
)
RELAY_FAILURES = Counter(
    "gateway_relay_failures",
    "Failed hand-offs to the downstream MTA (unreachable, timeout, tempfail, permfail, tls)",
    ["reason"],
    registry=REGISTRY,
)
RELAY_DURATION = Histogram(
    "gateway_relay_duration_seconds",
    "Time to hand a message to the downstream MTA",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=REGISTRY,
)
MESSAGE_SIZE = Histogram(
    "gateway_message_size_bytes",
    "Size of received messages",
    buckets=(1e3, 4e3, 16e3, 64e3, 256e3, 1e6, 4e6, 16e6, 64e6),
    registry=REGISTRY,
)
ARC_SEALED = Counter(
    "gateway_arc_sealed",
    "Messages ARC-sealed on the way out (result=sealed|skipped|failed, cv= of the seal)",
    ["result", "cv"],
    registry=REGISTRY,
)
DMARC_REPORT_RECORDS = Counter(
    "gateway_dmarc_report_records",
    "Messages recorded for DMARC aggregate reports "
    "(outcome=stored|dropped (a cap)|excluded|failed (store, DNS)|overload)",
    ["outcome"],
    registry=REGISTRY,
)
DMARC_REPORTS = Counter(
    "gateway_dmarc_reports",
    "DMARC aggregate reports by outcome (sent|failed|skipped) and reason, per destination",
    ["outcome", "reason"],
    registry=REGISTRY,
)
QUARANTINE_MESSAGES = Gauge(
    "gateway_quarantine_messages",
    "Messages currently held in quarantine",
    registry=REGISTRY,
)
QUARANTINE_PURGED = Counter(
    "gateway_quarantine_purged",
    "Quarantined messages removed by the scheduled purge (past quarantine.retention_days)",
    registry=REGISTRY,
)
QUARANTINE_PURGE_FAILURES = Counter(
    "gateway_quarantine_purge_failures",
    "Scheduled quarantine purges that failed (log: quarantine_purge_failed; retried next interval)",
    registry=REGISTRY,
)
DNS_QUERIES = Counter(
    "gateway_dns_queries",
    "DNS lookups by result (hit, miss, nxdomain, temperror)",
    ["result"],
    registry=REGISTRY,
)
CONFIG_RELOADS = Counter(
    "gateway_config_reloads",
    "Config reloads (SIGHUP) by result (ok, invalid)",
    ["result"],
    registry=REGISTRY,
)
AUTOLEARN = Counter(
    "gateway_autolearn",
    "Messages a policy chose to learn from its verdict (bayes autolearn), by class (spam, ham)"
    " and result (learned, known: learned before, failed, skipped: too many pending)",
    ["policy", "class", "result"],
    registry=REGISTRY,
)
QUARANTINE_LEARNED = Counter(
    "gateway_quarantine_learned",
    "Quarantined messages the classifier learned from a person's decision"
    " (quarantine.learn_on_release), by class: ham (released), spam (deleted as spam)",
    ["as"],
    registry=REGISTRY,
)
WEB_LOGINS = Counter(
    "gateway_web_logins",
    "Admin logins to the web UI, by result: ok, wrong (password), limited (too many failures),"
    " expired (the login form's token did not match)",
    ["result"],
    registry=REGISTRY,
)
QUARANTINE_DIGESTS = Counter(
    "gateway_quarantine_digests",
    "Quarantine digest mails handed to the relay, by outcome (sent, failed)",
    ["outcome"],
    registry=REGISTRY,
)
WEB_LINKS = Counter(
    "gateway_web_links",
    "Digest links opened to act, by outcome: release, delete (done), tampered, expired, gone"
    " (refused: damaged or forged, past expiry, used or no longer held)",
    ["outcome"],
    registry=REGISTRY,
)
WEB_ACTIONS = Counter(
    "gateway_web_actions",
    "Quarantine decisions taken through the web UI and REST API, by action",
    ["action"],
    registry=REGISTRY,
)
MILTER_CONNECTIONS = Gauge(
    "gateway_milter_connections_active",
    "Milter connections from the MTA currently open (Postfix opens one per SMTP session)",
    registry=REGISTRY,
)
MILTER_ERRORS = Counter(
    "gateway_milter_errors",
    "Milter connections closed or refused by the gateway, by reason (oversized, truncated,"
    " malformed, unknown_command, out_of_order, negotiation, timeout, max_connections,"
    " draining, internal)",
    ["reason"],
    registry=REGISTRY,
)
BUILD_INFO = Gauge(
    "gateway_build_info",
    "Always 1; the version label says which gateway is running",
    ["version"],
    registry=REGISTRY,
)


def _version() -> str:
    try:
        return version("gateway")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


BUILD_INFO.labels(version=_version()).set(1)


_LABEL_LIMIT = 64


def label(value: str) -> str:
    """Bound label values a plugin controls (auth result words) to printable ASCII."""
    clean = "".join(c if 33 <= ord(c) < 127 else "_" for c in value)
    return clean[:_LABEL_LIMIT] or "none"


def record_action(action: str, frontend: str = "smtp") -> None:
    """One message's final action, counted once the hand-off decided it."""
    MESSAGES.labels(action=action, frontend=frontend).inc()


# --- exported at zero from start-up -------------------------------------------


def zero(metric: Counter | Gauge | Histogram, **values: Iterable[str]) -> None:
    """Export ``metric`` at zero for every combination of ``values`` (one iterable per label).

    A labelled series exists only once it was incremented, so on a healthy
    gateway a dashboard panel shows "No data" and a ``rate()`` alert cannot tell
    zero from "not scraped". Call this where a metric's label values are
    known: at import for closed sets (below, and next to the code that counts),
    at start for what the enabled policies declare (:func:`export_policies`).
    ``tests/deploy/test_deploy_metrics.py`` checks that every series the
    shipped dashboard and alert rules read is there on a fresh gateway.
    """
    names = tuple(metric._labelnames)
    if set(values) != set(names):
        raise ValueError(
            f"metrics.zero({metric._name}): its labels are {names}, values given for "
            f"{tuple(values)}; give values for every label"
        )
    for combo in itertools.product(*(tuple(values[n]) for n in names)):
        metric.labels(*combo)


zero(MESSAGES, action=[a.value for a in Action], frontend=("smtp", "milter"))
zero(OBSERVED_ACTIONS, action=[a.value for a in Action], policy=("all",))
zero(CONFIG_RELOADS, result=("ok", "invalid"))
zero(DNS_QUERIES, result=("hit", "miss", "nxdomain", "temperror"))
zero(ARC_SEALED, result=("sealed", "skipped", "failed"), cv=("none", "pass", "fail", "temperror"))
zero(DMARC_REPORT_RECORDS, outcome=("stored", "dropped", "excluded", "failed", "overload"))
zero(DMARC_REPORTS, outcome=("sent",), reason=("ok",))
zero(DMARC_REPORTS, outcome=("failed",), reason=("relay",))
zero(QUARANTINE_LEARNED, **{"as": ("ham", "spam")})
zero(QUARANTINE_DIGESTS, outcome=("sent", "failed"))
zero(WEB_LINKS, outcome=("release", "delete", "tampered", "expired", "gone"))
zero(WEB_LOGINS, result=("ok", "wrong", "limited", "expired"))
zero(
    WEB_ACTIONS,
    action=("release", "delete", "delete_spam", "allow_sender", "block_sender"),
)

_POLICY_OUTCOMES = ("ok", "error", "timeout")
_CEILINGS = ("relay", "add_header", "quarantine")  # the actions a Result.cap may hold at
_AUTOLEARN_CLASSES = ("spam", "ham")
_AUTOLEARN_RESULTS = ("learned", "known", "failed", "skipped")


def export_policies(
    policies: Iterable[str],
    symbols: Iterable[str],
    auth: Mapping[str, Iterable[str]],
    learners: Iterable[str] = (),
    observed: Iterable[str] = (),
    capping: Iterable[str] = (),
) -> None:
    """Zero series for one configuration's policies (at start and after a reload).

    ``policies``: the enabled policy names (latency, outcomes); ``symbols``: every
    symbol they may emit; ``auth``: RFC 8601 method -> the results it may report
    (``Policy.auth_results``); ``learners``: policies that auto-learn;
    ``observed``: policies in observe mode (``observe = true``); ``capping``:
    policies that may hold the score's action at a ceiling (``Policy.may_cap``).
    """
    for name in observed:
        zero(OBSERVED_ACTIONS, action=[a.value for a in Action], policy=(name,))
    for name in capping:
        zero(CAPPED_ACTIONS, action=_CEILINGS, policy=(name,))
    for name in policies:
        POLICY_DURATION.labels(policy=name)
        zero(POLICY_RUNS, policy=(name,), outcome=_POLICY_OUTCOMES)
    for symbol in symbols:
        SYMBOLS.labels(symbol=label(symbol))
    for method, results in auth.items():
        zero(AUTH_RESULTS, method=(label(method),), result=[label(r) for r in results])
    for name in learners:
        zero(AUTOLEARN, policy=(name,), **{"class": _AUTOLEARN_CLASSES}, result=_AUTOLEARN_RESULTS)


# --- the HTTP endpoint ------------------------------------------------------

Ready = Callable[[], Awaitable[tuple[bool, str]]]

_MAX_REQUEST_HEAD = 8192  # bytes of request line + headers we are willing to read
_REQUEST_TIMEOUT = 10.0  # seconds for a scraper to send its request
_READY_TIMEOUT = 5.0  # seconds for the readiness probe to decide
_MAX_CLIENTS = 64  # concurrent connections; scrapers and probes need a handful


class HTTPEndpoint:
    """A running ``/metrics`` ``/healthz`` ``/readyz`` server; ``port`` is the bound port."""

    def __init__(self, server: asyncio.Server, ready: Ready) -> None:
        self._server = server
        self._ready = ready
        sock = server.sockets[0].getsockname()
        self.host: str = sock[0]
        self.port: int = sock[1]

    async def close(self) -> None:
        self._server.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                await self._server.wait_closed()


_renderer: Callable[[], Awaitable[bytes]] | None = None


def set_renderer(render: Callable[[], Awaitable[bytes]] | None) -> None:
    """Replace what /metrics serves: worker 0 of ``server.workers`` serves all workers'."""
    global _renderer
    _renderer = render


async def start_http(listen: str, ready: Ready) -> HTTPEndpoint:
    """Serve metrics on ``listen`` ("host:port", port 0 picks a free one).

    ``ready()`` answers /readyz: ``(True, "")`` when the gateway can take mail,
    else ``(False, reason)``.
    """
    host, port = _parse_listen(listen)
    active = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active
        if active >= _MAX_CLIENTS:  # a flood of idle sockets must not pile up
            writer.close()
            return
        active += 1
        try:
            await _serve_one(reader, writer, ready)
        except Exception:  # a broken scraper must never take the endpoint down
            log.debug("metrics_request_failed", exc_info=True)
        finally:
            active -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host, port, limit=_MAX_REQUEST_HEAD)
    return HTTPEndpoint(server, ready)


def _parse_listen(listen: str) -> tuple[str, int]:
    text = listen.strip()
    if text.endswith(":0"):
        host, _ = parse_hostport(text[:-2] + ":1")
        return host, 0
    return parse_hostport(text)


async def _serve_one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ready: Ready
) -> None:
    try:
        async with asyncio.timeout(_REQUEST_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        await _respond(writer, 400, "bad request\n")
        return
    method, target = parts[0], parts[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        await _respond(writer, 405, "only GET\n", extra=(("Allow", "GET, HEAD"),))
        return
    head_only = method == "HEAD"
    if target == "/metrics":
        body = await _renderer() if _renderer is not None else generate_latest(REGISTRY)
        await _respond(writer, 200, body, content_type=CONTENT_TYPE_LATEST, head_only=head_only)
    elif target == "/healthz":
        await _respond(writer, 200, "ok\n", head_only=head_only)
    elif target == "/readyz":
        try:
            async with asyncio.timeout(_READY_TIMEOUT):
                ok, reason = await ready()
        except TimeoutError:
            ok, reason = False, "readiness check timed out"
        except Exception as exc:
            ok, reason = False, f"readiness check failed: {type(exc).__name__}"
        if ok:
            await _respond(writer, 200, "ready\n", head_only=head_only)
        else:
            await _respond(writer, 503, f"not ready: {reason}\n", head_only=head_only)
    else:
        await _respond(writer, 404, "not found; try /metrics, /healthz or /readyz\n")


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS[503] = "Service Unavailable"


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: str | bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    extra: tuple[tuple[str, str], ...] = (),
    head_only: bool = False,
) -> None:
    data = body.encode("utf-8") if isinstance(body, str) else body
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(data)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in extra),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if not head_only:
        writer.write(data)
    async with asyncio.timeout(_REQUEST_TIMEOUT):
        await writer.drain()
