"""Rate limits per client IP, sender domain and recipient, counted in the shared state.

Sliding windows live in the ``[state]`` store, so with ``backend = "redis"``
every gateway node counts against the same limit. Past a limit the message is
deferred (451 4.7.1) with a text a sender's admin understands; a sender that
keeps retrying keeps being counted, as with Postfix's anvil. When the state
store is unreachable the policy steps aside with a symbol: mail keeps flowing.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from gateway.api import (
    Action,
    Context,
    OptionError,
    Policy,
    Result,
    Services,
    StateStore,
    StateUnavailableError,
    Symbol,
    SymbolDef,
)

log = logging.getLogger("gateway.policies.ratelimit")


@dataclass(frozen=True, slots=True)
class RateLimitOptions:
    # Messages allowed per window; 0 turns that limit off.
    client_ip_limit: int = 300
    client_ip_window: float = 3600.0
    sender_domain_limit: int = 1000
    sender_domain_window: float = 3600.0
    recipient_limit: int = 300
    recipient_window: float = 3600.0
    # Clients never limited (your own relays, monitoring).
    exempt_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")

    def __post_init__(self) -> None:
        for kind in ("client_ip", "sender_domain", "recipient"):
            if getattr(self, f"{kind}_limit") < 0:
                raise OptionError(f"{kind}_limit", "must be 0 (off) or more")
            if getattr(self, f"{kind}_window") <= 0:
                raise OptionError(f"{kind}_window", "must be a number of seconds > 0")
        for i, net in enumerate(self.exempt_networks):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise OptionError(f"exempt_networks[{i}]", f'not an IP network: "{net}"') from None


class RateLimitPolicy(Policy):
    name = "ratelimit"
    observable = False  # a flood is a protocol-level protection: it acts in observe mode too
    symbols = {
        "RATELIMIT_CLIENT_IP": SymbolDef(0.0, "client IP sent more messages than its limit (451)"),
        "RATELIMIT_SENDER_DOMAIN": SymbolDef(
            0.0, "sender domain sent more messages than its limit (451)"
        ),
        "RATELIMIT_RECIPIENT": SymbolDef(
            0.0, "recipient received more messages than its limit (451)"
        ),
        "RATELIMIT_UNAVAILABLE": SymbolDef(
            0.0, "the shared state store is unreachable; rate limits were not applied"
        ),
    }
    Options = RateLimitOptions

    def __init__(self, options: RateLimitOptions) -> None:
        super().__init__(options)
        self.options: RateLimitOptions = options
        self._exempt = [ipaddress.ip_network(n, strict=False) for n in options.exempt_networks]
        self._state: StateStore | None = None

    async def start(self, services: Services) -> None:
        self._state = services.state

    def _keys(self, ctx: Context) -> list[tuple[str, str, int, float, str]]:
        """(symbol, key, limit, window, what) for every limit that applies."""
        o = self.options
        out: list[tuple[str, str, int, float, str]] = []
        addr = ctx.client_address
        if o.client_ip_limit and addr is not None and not any(addr in n for n in self._exempt):
            out.append(
                (
                    "RATELIMIT_CLIENT_IP",
                    f"rl:ip:{addr}",
                    o.client_ip_limit,
                    o.client_ip_window,
                    f"client {addr}",
                )
            )
        domain = ctx.mail_from_domain
        if o.sender_domain_limit and domain:
            out.append(
                (
                    "RATELIMIT_SENDER_DOMAIN",
                    f"rl:from:{domain}",
                    o.sender_domain_limit,
                    o.sender_domain_window,
                    f"sender domain {domain}",
                )
            )
        if o.recipient_limit:
            for rcpt in dict.fromkeys(r.lower() for r in ctx.rcpt_to):
                out.append(
                    (
                        "RATELIMIT_RECIPIENT",
                        f"rl:rcpt:{rcpt}",
                        o.recipient_limit,
                        o.recipient_window,
                        f"recipient {rcpt}",
                    )
                )
        return out

    async def check(self, ctx: Context) -> Result:
        assert self._state is not None, "start() was not called"
        symbols: list[Symbol] = []
        reasons: list[str] = []
        try:
            for symbol, key, limit, window, what in self._keys(ctx):
                count = await self._state.hit(key, window)
                if count > limit:
                    symbols.append(Symbol(symbol, detail=f"{what}: {count} in {window:g}s"))
                    reasons.append(f"{what} exceeded {limit} messages per {window:g} seconds")
        except StateUnavailableError as exc:
            log.warning("ratelimit_state_unavailable", extra={"error": str(exc)})
            return Result(symbols=(Symbol("RATELIMIT_UNAVAILABLE", detail=type(exc).__name__),))
        if not symbols:
            return Result()
        return Result(
            symbols=tuple(symbols),
            force=Action.TEMPFAIL,
            reason="rate limit: " + "; ".join(reasons[:2]),
        )
