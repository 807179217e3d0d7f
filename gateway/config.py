"""TOML -> frozen dataclasses; every problem reported with its dotted key.

Every default here is also written out in ``config.example.toml``. Relative
paths are resolved against the directory of the config file, so a config and
its rule files can travel together.
"""

from __future__ import annotations

import grp
import ipaddress
import math
import pwd
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from gateway.api import Action, OptionError
from gateway.cpus import usable_cpus
from gateway.schema import Problems, Range, SchemaError, build

Port = Annotated[int, Range(1, 65535)]

__all__ = [
    "ActionsConfig",
    "ArcSealConfig",
    "Config",
    "ConfigError",
    "DNSConfig",
    "DmarcReportsConfig",
    "LogConfig",
    "MetricsConfig",
    "MilterConfig",
    "PipelineConfig",
    "QuarantineConfig",
    "RelayConfig",
    "ServerConfig",
    "StateConfig",
    "WebConfig",
    "load_config",
    "parse_hostport",
]


class ConfigError(SchemaError):
    """The config file is missing, not TOML, or has invalid values."""


def parse_hostport(value: str, *, default_port: int | None = None) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); ValueError says what is wrong."""
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f'must be "host:port" with IPv6 in brackets, got "{value}"')
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        raise ValueError(f'IPv6 addresses must be in brackets, e.g. "[::1]:25", got "{value}"')
    else:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ValueError(f'must be "host:port", got "{value}"')
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f'port must be an integer 1..65535, got "{port_text}"')
    if not host:
        raise ValueError(f'host is missing in "{value}"')
    return host, int(port_text)


def _check_hostport(key: str, value: str, *, allow_port_zero: bool = False) -> None:
    if allow_port_zero and value.rstrip().endswith(":0"):
        value = value.rstrip()[:-2] + ":1"
    try:
        parse_hostport(value)
    except ValueError as exc:
        raise OptionError(key, str(exc)) from None


def _check_networks(key: str, values: tuple[str, ...]) -> None:
    for i, net in enumerate(values):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise OptionError(f"{key}[{i}]", f'not an IP network, got "{net}"') from None


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise OptionError(key, f"must be greater than 0, got {value}")


def _check_account(user: str, group: str) -> None:
    """``server.user`` / ``server.group`` must name existing accounts."""
    if group and not user:
        raise OptionError("group", "needs server.user as well (dropping only the group keeps root)")
    if user:
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise OptionError("user", f'no such user "{user}"; create it or fix the name') from None
    if group:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise OptionError(
                "group", f'no such group "{group}"; create it or fix the name'
            ) from None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = "0.0.0.0:25"
    hostname: str = field(default_factory=socket.getfqdn)
    accepted_domains: tuple[str, ...] = ()
    max_message_size: int = 26_214_400
    proxy_protocol: bool = False
    proxy_trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    proxy_header_timeout: float = 5.0  # seconds a trusted proxy has to send the PROXY header
    # Connections one trusted proxy may hold open at once (awaiting the header or in a
    # session): every client behind it shares its address, so it gets its own, larger budget.
    proxy_max_connections: int = 1000
    # Peers allowed to send Postfix's XFORWARD (the MTA in front, on this host).
    xforward_trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    max_sessions: int = 500
    max_sessions_per_ip: int = 20
    max_recipients: int = 100
    command_timeout: float = 300.0  # RFC 5321 §4.5.3.2.7: server timeout, 5 minutes
    data_timeout: float = 600.0
    max_command_length: int = 2048
    tls_cert: str = ""
    tls_key: str = ""
    # Pre-forked processes sharing the listener: a number, or "auto" (one per usable CPU).
    workers: int | Literal["auto"] = "auto"
    drain_timeout: float = 30.0  # seconds SIGTERM waits for in-flight sessions
    max_data_memory: int = 104_857_600  # bytes of message data held across all sessions
    user: str = ""  # drop to this user after binding the listener (empty = stay as started)
    group: str = ""  # and this group (empty = the user's primary group)

    def __post_init__(self) -> None:
        if self.listen:  # empty: no SMTP listener (a milter-only node)
            _check_hostport("listen", self.listen, allow_port_zero=True)
        _check_account(self.user, self.group)
        if not self.hostname or " " in self.hostname:
            raise OptionError("hostname", f'must be a host name, got "{self.hostname}"')
        if not self.accepted_domains:
            raise OptionError(
                "accepted_domains",
                "must list at least one domain; the gateway accepts mail only for these",
            )
        for i, dom in enumerate(self.accepted_domains):
            if not dom or "@" in dom or " " in dom:
                raise OptionError(f"accepted_domains[{i}]", f'not a domain, got "{dom}"')
        object.__setattr__(
            self,
            "accepted_domains",
            tuple(d.lower().rstrip(".") for d in self.accepted_domains),
        )
        if self.max_message_size < 1024:
            raise OptionError(
                "max_message_size", f"must be at least 1024, got {self.max_message_size}"
            )
        _check_networks("proxy_trusted_networks", self.proxy_trusted_networks)
        _check_networks("xforward_trusted_networks", self.xforward_trusted_networks)
        _positive("proxy_header_timeout", self.proxy_header_timeout)
        if self.proxy_max_connections < self.max_sessions_per_ip:
            raise OptionError(
                "proxy_max_connections",
                "must be at least max_sessions_per_ip "
                f"({self.max_sessions_per_ip}): every client behind a proxy shares it, "
                f"got {self.proxy_max_connections}",
            )
        if self.workers != "auto" and self.workers < 1:
            raise OptionError("workers", f'must be at least 1 or "auto", got {self.workers}')
        for key in ("max_sessions", "max_sessions_per_ip", "max_recipients"):
            if getattr(self, key) < 1:
                raise OptionError(key, f"must be at least 1, got {getattr(self, key)}")
        _positive("command_timeout", self.command_timeout)
        _positive("data_timeout", self.data_timeout)
        _positive("drain_timeout", self.drain_timeout)
        if self.max_data_memory < self.max_message_size:
            raise OptionError(
                "max_data_memory",
                f"must be at least max_message_size ({self.max_message_size}), "
                f"got {self.max_data_memory}",
            )
        if self.max_command_length < 512:  # RFC 5321 §4.5.3.1.4
            raise OptionError("max_command_length", "must be at least 512 (RFC 5321 §4.5.3.1.4)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise OptionError("tls_cert", "tls_cert and tls_key must be set together")

    @property
    def worker_count(self) -> int:
        """``workers``, with "auto" resolved now (affinity mask and cgroup CPU quota)."""
        if self.workers == "auto":
            return usable_cpus()
        return self.workers


@dataclass(frozen=True, slots=True)
class RelayConfig:
    host: str = "127.0.0.1"
    port: Port = 10026
    timeout: float = 60.0
    tls: Literal["off", "opportunistic", "required"] = "off"
    tls_verify: bool = True
    helo: str = ""
    pool_size: int = 8
    max_connections: int = 50
    verify_recipients: bool = True  # ask the downstream at RCPT time (MAIL, RCPT, RSET)
    xforward: bool = True  # pass the client on with XFORWARD when the downstream offers it

    def __post_init__(self) -> None:
        if not self.host:
            raise OptionError("host", "must not be empty")
        _positive("timeout", self.timeout)
        if self.pool_size < 1:
            raise OptionError("pool_size", f"must be at least 1, got {self.pool_size}")
        if self.max_connections < self.pool_size:
            raise OptionError(
                "max_connections",
                f"must be at least pool_size ({self.pool_size}), got {self.max_connections}",
            )


@dataclass(frozen=True, slots=True)
class DNSConfig:
    nameservers: tuple[str, ...] = ()
    timeout: float = 3.0
    cache_size: int = 10_000
    min_ttl: float = 0.0
    max_ttl: float = 86_400.0
    negative_ttl: float = 300.0  # RFC 2308 cap when the SOA gives none

    def __post_init__(self) -> None:
        for i, ns in enumerate(self.nameservers):
            try:
                host, _ = parse_hostport(ns, default_port=53)
                ipaddress.ip_address(host)
            except ValueError:
                raise OptionError(
                    f"nameservers[{i}]", f'must be "ip" or "ip:port" ("[v6]:port"), got "{ns}"'
                ) from None
        _positive("timeout", self.timeout)
        if self.cache_size < 0:
            raise OptionError("cache_size", f"must be 0 or more, got {self.cache_size}")


@dataclass(frozen=True, slots=True)
class ActionsConfig:
    add_header: float = 5.0
    quarantine: float = 10.0
    reject: float = 15.0
    # "observe": verdicts are computed, logged and counted, the mail is relayed anyway
    # (hard protections still act: docs/observe.md).
    mode: Literal["enforce", "observe"] = "enforce"

    def __post_init__(self) -> None:
        if not self.add_header <= self.quarantine <= self.reject:
            raise OptionError(
                "add_header",
                "thresholds must satisfy add_header <= quarantine <= reject, got "
                f"{self.add_header}, {self.quarantine}, {self.reject}",
            )

    def for_score(self, score: float) -> Action:
        if score >= self.reject:
            return Action.REJECT
        if score >= self.quarantine:
            return Action.QUARANTINE
        if score >= self.add_header:
            return Action.ADD_HEADER
        return Action.RELAY


@dataclass(frozen=True, slots=True)
class QuarantineConfig:
    backend: Literal["local", "postgresql"] = "local"
    path: str = "/var/lib/gateway/quarantine"
    dsn: str = ""
    retention_days: int = 30
    # Seconds between the running gateway's purges of messages past retention_days
    # (0 = never: purge with `gateway quarantine purge` from cron instead).
    purge_interval: float = 3600.0
    # A release trains the classifier as ham, "delete as spam" as spam (docs/web.md).
    learn_on_release: bool = True

    def __post_init__(self) -> None:
        if self.backend == "postgresql" and not self.dsn.startswith(
            ("postgresql://", "postgres://")
        ):
            raise OptionError(
                "dsn", 'backend "postgresql" needs dsn = "postgresql://user@host:5432/db"'
            )
        if self.retention_days < 1:
            raise OptionError("retention_days", f"must be at least 1, got {self.retention_days}")
        if not (math.isfinite(self.purge_interval) and self.purge_interval >= 0):
            raise OptionError(
                "purge_interval",
                f"must be 0 (never) or a number of seconds, got {self.purge_interval}",
            )


_HHMM = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")


@dataclass(frozen=True, slots=True)
class WebConfig:
    """The quarantine web UI, REST API and digests (docs/web.md)."""

    listen: str = ""  # "host:port"; empty = off
    base_url: str = ""  # where people reach the UI, for digest links; empty = http://listen
    admin_password_hash: str = ""  # `gateway web hash-password`; empty = no admin login
    api_token_hashes: tuple[str, ...] = ()  # bearer tokens, hashed the same way
    link_key_file: str = ""  # HMAC key for digest links; empty = one kept in the quarantine
    link_expiry_days: int = 7
    session_timeout: float = 28_800.0  # seconds an admin session lasts (8 hours)
    tls_cert: str = ""  # PEM certificate: serve HTTPS; empty = plain HTTP (loopback, proxy)
    tls_key: str = ""
    allow_list: str = "ALLOWLIST_SENDER"  # symbol of the [[policies.lists.lists]] to allow into
    block_list: str = "BLOCKLIST_SENDER"  # ... and to block into
    digest_time: str = ""  # "HH:MM" (UTC) for the daily digest the gateway sends; empty = none
    digest_from: str = ""  # From: of digests; empty = postmaster@<first accepted domain>

    def __post_init__(self) -> None:
        from gateway.web.hashes import HashError, check_hash

        if self.listen:
            _check_hostport("listen", self.listen, allow_port_zero=True)
        if self.base_url and not re.match(r"^https?://[^\s/?#]+(/[^\s?#]*)?$", self.base_url):
            raise OptionError(
                "base_url", f'must be "https://host[:port][/path]", got "{self.base_url}"'
            )
        try:
            if self.admin_password_hash:
                check_hash(self.admin_password_hash)
        except HashError as exc:
            raise OptionError("admin_password_hash", str(exc)) from None
        for i, hashed in enumerate(self.api_token_hashes):
            try:
                check_hash(hashed)
            except HashError as exc:
                raise OptionError(f"api_token_hashes[{i}]", str(exc)) from None
        if not 1 <= self.link_expiry_days <= 365:
            raise OptionError(
                "link_expiry_days", f"must be 1..365 days, got {self.link_expiry_days}"
            )
        if not (math.isfinite(self.session_timeout) and 60 <= self.session_timeout <= 2_592_000):
            raise OptionError(
                "session_timeout", f"must be 60..2592000 seconds, got {self.session_timeout}"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise OptionError("tls_cert", "tls_cert and tls_key must be set together")
        if self.digest_time and not _HHMM.match(self.digest_time):
            raise OptionError("digest_time", f'must be "HH:MM" (UTC), got "{self.digest_time}"')
        if self.digest_from and not re.match(r"^[^@\s<>]+@[^@\s<>]+$", self.digest_from):
            raise OptionError("digest_from", f'must be an address, got "{self.digest_from}"')


@dataclass(frozen=True, slots=True)
class StateConfig:
    backend: Literal["local", "redis"] = "local"
    url: str = ""
    path: str = "/var/lib/gateway/state.sqlite"
    key_prefix: str = "gateway:"

    def __post_init__(self) -> None:
        if self.backend == "redis" and not self.url.startswith(
            ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")
        ):
            raise OptionError(
                "url",
                'backend "redis" needs url = "redis://host:6379/0" (or redis+sentinel://, '
                "redis+cluster://)",
            )


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9325"

    def __post_init__(self) -> None:
        if self.listen:
            _check_hostport("listen", self.listen, allow_port_zero=True)


@dataclass(frozen=True, slots=True)
class MilterConfig:
    """The milter front end (Postfix ``smtpd_milters``); docs/milter.md."""

    listen: str = ""  # "host:port" or "unix:/absolute/path"; empty = off
    max_connections: int = 1000  # MTA connections at once (Postfix: one per SMTP session)

    def __post_init__(self) -> None:
        text = self.listen.strip()
        if text.startswith("unix:"):
            if not text[len("unix:") :].startswith("/"):
                raise OptionError("listen", f'must be "unix:/absolute/path", got "{self.listen}"')
        elif text:
            _check_hostport("listen", text, allow_port_zero=True)
        if self.max_connections < 1:
            raise OptionError("max_connections", f"must be at least 1, got {self.max_connections}")


_SELECTOR = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*$")
_DOMAIN = re.compile(
    r"^(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9-]{2,63}$"
)


@dataclass(frozen=True, slots=True)
class ArcSealConfig:
    """ARC sealing of relayed mail (RFC 8617); docs/arc.md."""

    enabled: bool = False
    domain: str = ""  # d= of our seals; the key is published at <selector>._domainkey.<domain>
    selector: str = ""
    private_key: str = ""  # path to a PEM RSA private key
    # dkimpy's ARC signer signs rsa-sha256 only (ed25519-sha256 is not offered yet).
    algorithm: Literal["rsa-sha256"] = "rsa-sha256"

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        for key in ("domain", "selector", "private_key"):
            if not getattr(self, key):
                raise OptionError(key, "is required when arc_seal.enabled = true (docs/arc.md)")
        if not _DOMAIN.match(self.domain.rstrip(".")):
            raise OptionError("domain", f'must be a DNS domain name, got "{self.domain}"')
        if not _SELECTOR.match(self.selector):
            raise OptionError(
                "selector", f'must be a DNS label such as "arc2026", got "{self.selector}"'
            )


_ADDR_SPEC = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9.-]{1,253}$")


@dataclass(frozen=True, slots=True)
class DmarcReportsConfig:
    """DMARC aggregate reports to the domains whose mail we evaluated (docs/dmarc-reports.md)."""

    enabled: bool = False
    org_name: str = ""  # <org_name> of the reports: who we are
    email: str = ""  # From: of the report mail and <email> of the reports
    interval: int = 86_400  # seconds per report; divides a UTC day (RFC 7489 §7.2: daily)
    send_delay: float = 300.0  # seconds after an interval ends before its reports go out
    max_report_size: int = 10_485_760  # bytes of the gzip'd report; larger ones are not sent
    max_per_destination_per_day: int = 50  # report mails to one rua address per UTC day
    max_rows_per_domain: int = 10_000  # distinct rows per domain per interval; the rest counted
    max_domains: int = 10_000  # distinct policy domains per interval; the rest counted
    exclude_domains: tuple[str, ...] = ()  # policy domains (and subdomains) never reported to
    # Where the rows live: "state" = the [state] backend (SQLite locally, Redis in a
    # cluster, so the cluster reports once); "local" = [state]'s SQLite file even
    # when [state] is Redis (one report per node).
    store: Literal["state", "local"] = "state"
    retention_days: int = 7  # rows of intervals that could not be sent are kept this long

    def __post_init__(self) -> None:
        if self.interval < 3600 or 86_400 % self.interval:
            raise OptionError(
                "interval",
                f"must divide a day into whole intervals (86400, 43200, ... 3600), "
                f"got {self.interval}",
            )
        if self.send_delay < 0 or self.send_delay >= self.interval:
            raise OptionError(
                "send_delay", f"must be 0 or more and less than interval, got {self.send_delay}"
            )
        for key in ("max_report_size", "max_per_destination_per_day", "max_rows_per_domain"):
            if getattr(self, key) < 1:
                raise OptionError(key, f"must be at least 1, got {getattr(self, key)}")
        if not 1 <= self.max_domains <= 1_000_000:
            raise OptionError("max_domains", f"must be 1..1000000, got {self.max_domains}")
        if not 1 <= self.retention_days <= 366:
            raise OptionError("retention_days", f"must be 1..366, got {self.retention_days}")
        for i, d in enumerate(self.exclude_domains):
            if not _DOMAIN.match(d.rstrip(".")):
                raise OptionError(f"exclude_domains[{i}]", f'must be a domain name, got "{d}"')
        if not self.enabled:
            return
        if not self.org_name.strip() or not self.org_name.isprintable():
            raise OptionError(
                "org_name", 'is required when dmarc_reports.enabled = true, e.g. "Example Org"'
            )
        if not _ADDR_SPEC.match(self.email) or not _DOMAIN.match(self.email.rpartition("@")[2]):
            raise OptionError(
                "email",
                'must be the reports\' sender address, e.g. "dmarc-noreply@example.org", '
                f'got "{self.email}"',
            )

    @property
    def receiver_domain(self) -> str:
        """Our domain as report file names and subjects give it (RFC 7489 §7.2.1.1)."""
        return self.email.rpartition("@")[2].lower()


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    policy_timeout: float = 10.0
    on_policy_error: Literal["tempfail", "relay"] = "tempfail"
    # Nested multiparts cost the stdlib parser superlinear time: past this many
    # multipart containers only the header is parsed and the message is quarantined.
    max_mime_containers: int = 200

    def __post_init__(self) -> None:
        _positive("policy_timeout", self.policy_timeout)
        if self.max_mime_containers < 1:
            raise OptionError(
                "max_mime_containers", f"must be at least 1, got {self.max_mime_containers}"
            )


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


@dataclass(frozen=True, slots=True)
class _Root:
    server: ServerConfig
    relay: RelayConfig = field(default_factory=RelayConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    actions: ActionsConfig = field(default_factory=ActionsConfig)
    quarantine: QuarantineConfig = field(default_factory=QuarantineConfig)
    state: StateConfig = field(default_factory=StateConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    log: LogConfig = field(default_factory=LogConfig)
    web: WebConfig = field(default_factory=WebConfig)
    milter: MilterConfig = field(default_factory=MilterConfig)
    arc_seal: ArcSealConfig = field(default_factory=ArcSealConfig)
    dmarc_reports: DmarcReportsConfig = field(default_factory=DmarcReportsConfig)
    policies: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    scores: Mapping[str, float | str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated config. ``policies`` keeps each raw table for the registry."""

    server: ServerConfig
    relay: RelayConfig
    dns: DNSConfig
    actions: ActionsConfig
    quarantine: QuarantineConfig
    state: StateConfig
    metrics: MetricsConfig
    pipeline: PipelineConfig
    log: LogConfig
    policies: Mapping[str, Mapping[str, Any]]
    scores: Mapping[str, float | Action]
    path: Path
    base_dir: Path
    web: WebConfig = field(default_factory=WebConfig)
    milter: MilterConfig = field(default_factory=MilterConfig)
    arc_seal: ArcSealConfig = field(default_factory=ArcSealConfig)
    dmarc_reports: DmarcReportsConfig = field(default_factory=DmarcReportsConfig)

    def resolve_path(self, value: str) -> Path:
        """A config path, relative ones taken from the config file's directory."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p


_ACTION_NAMES = [a.value for a in Action]


def config_from_mapping(
    data: Mapping[str, Any], path: Path, problems: Problems | None = None
) -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    problems = problems or Problems()
    if "server" not in data:
        problems.add("server", "is required (at least server.accepted_domains)")
        raise ConfigError(problems.lines)
    root = build(_Root, data, "", problems)
    scores: dict[str, float | Action] = {}
    for name, value in dict(data.get("scores", {}) or {}).items():
        key = f"scores.{name}"
        if isinstance(value, bool):
            problems.add(key, f"must be a number or an action name, got {value!r}")
        elif isinstance(value, int | float):
            scores[name] = float(value)
        elif isinstance(value, str) and value in _ACTION_NAMES:
            scores[name] = Action(value)
        else:
            problems.add(
                key, f"must be a number or one of {', '.join(_ACTION_NAMES)}, got {value!r}"
            )
    for name, table in dict(data.get("policies", {}) or {}).items():
        if not isinstance(table, dict):
            problems.add(f"policies.{name}", f"must be a table, e.g. [policies.{name}]")
    if root is not None and not root.server.listen and not root.milter.listen:
        problems.add(
            "server.listen",
            "is empty and so is milter.listen: nothing would take mail; set one of them",
        )
    if problems.lines or root is None:
        raise ConfigError(problems.lines)
    return Config(
        server=root.server,
        relay=root.relay,
        dns=root.dns,
        actions=root.actions,
        quarantine=root.quarantine,
        state=root.state,
        metrics=root.metrics,
        pipeline=root.pipeline,
        log=root.log,
        policies={k: dict(v) for k, v in dict(data.get("policies", {}) or {}).items()},
        scores=scores,
        path=path,
        base_dir=path.parent.resolve(),
        web=root.web,
        milter=root.milter,
        arc_seal=root.arc_seal,
        dmarc_reports=root.dmarc_reports,
    )


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read and validate a TOML config file. ``overrides`` maps dotted keys to values."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{p}: no such file; pass --config PATH to a TOML config"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{p}: cannot read: {exc}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{p}: not valid TOML: {exc}"]) from None
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config_from_mapping(data, p)
