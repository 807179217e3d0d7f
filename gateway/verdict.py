"""Symbols + scores + thresholds + forced floors -> the verdict and its headers.

Each symbol's score is rounded to hundredths *before* summing, so the numbers
shown in ``X-Spam-Symbols`` add up exactly to ``score=`` in ``X-Spam-Status``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

import authres

from gateway.api import Action, AuthResult, SymbolDef
from gateway.config import ActionsConfig
from gateway.pipeline import PipelineRun

__all__ = ["ScoredSymbol", "Verdict", "decide", "fold_header", "verdict_headers"]

_CENT = Decimal("0.01")


def _round(value: float) -> Decimal:
    return Decimal(repr(value)).quantize(_CENT, rounding=ROUND_HALF_EVEN)


@dataclass(frozen=True, slots=True)
class ScoredSymbol:
    name: str
    score: Decimal
    policy: str
    detail: str
    description: str


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    score: Decimal
    required: Decimal
    symbols: tuple[ScoredSymbol, ...]
    reason: str
    forced_by: str | None
    auth: tuple[AuthResult, ...]

    @property
    def is_spam(self) -> bool:
        return self.score >= self.required or self.action in (
            Action.ADD_HEADER,
            Action.QUARANTINE,
            Action.REJECT,
        )

    def symbol_names(self) -> list[str]:
        return sorted(s.name for s in self.symbols)


def decide(
    run: PipelineRun,
    *,
    declared: Mapping[str, tuple[str, SymbolDef]],
    overrides: Mapping[str, float | Action],
    thresholds: ActionsConfig,
) -> Verdict:
    """Weigh every symbol, apply thresholds, then raise to the strongest floor."""
    scored: list[ScoredSymbol] = []
    floors: list[tuple[Action, str, str]] = []  # (action, forced_by, reason)
    auth: list[AuthResult] = []
    for prun in run.runs:
        res = prun.result
        auth.extend(res.auth)
        if res.force is not None:
            floors.append((res.force, prun.name, res.reason or f"policy {prun.name}"))
        for sym in res.symbols:
            _owner, sdef = declared.get(sym.name, (prun.name, SymbolDef(0.0, "undeclared symbol")))
            override = overrides.get(sym.name)
            if isinstance(override, Action):
                reason = sdef.description + (f": {sym.detail}" if sym.detail else "")
                floors.append((override, f"scores.{sym.name}", reason))
                value = sdef.score * sym.weight
            elif override is not None:
                value = override
            else:
                value = sdef.score * sym.weight
            scored.append(
                ScoredSymbol(sym.name, _round(value), prun.name, sym.detail, sdef.description)
            )
    total = sum((s.score for s in scored), Decimal("0.00"))
    by_score = thresholds.for_score(float(total))
    action, forced_by, reason = by_score, None, ""
    for floor, who, why in floors:
        # A floor at the score's own action says more than a sum of scores ("virus X").
        tie = floor is action and forced_by is None and action is not Action.RELAY
        if floor.rank > action.rank or tie:
            action, forced_by, reason = floor, who, why
    if forced_by is None and action is not Action.RELAY:
        top = sorted((s for s in scored if s.score > 0), key=lambda s: (-s.score, s.name))[:3]
        reason = f"spam score {total} (" + ", ".join(s.name for s in top) + ")"
    return Verdict(
        action=action,
        score=total,
        required=_round(thresholds.add_header),
        symbols=tuple(sorted(scored, key=lambda s: (-s.score, s.name))),
        reason=_one_line(reason),
        forced_by=forced_by,
        auth=tuple(auth),
    )


def _one_line(text: str, limit: int = 200) -> str:
    """Printable ASCII on one line: reasons end up in SMTP replies and headers."""
    if text.isascii() and text.isprintable():  # the common case, without a loop per character
        return text[:limit]
    clean = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    return clean[:limit]


def fold_header(name: str, value: str, width: int = 78) -> str:
    """``Name: value`` folded at spaces (RFC 5322 §2.2.3), no line over ``width`` if avoidable."""
    words = _one_line(value, limit=8000).split(" ")
    lines: list[str] = []
    line = f"{name}:"
    for word in words:
        if not word:
            continue
        if len(line) + 1 + len(word) > width and line.strip() and line != f"{name}:":
            lines.append(line)
            line = "\t" + word
        else:
            line = f"{line} {word}"
    lines.append(line)
    return "\r\n".join(lines)


def authentication_results(hostname: str, auth: tuple[AuthResult, ...]) -> str:
    """The RFC 8601 field value (without the name) for our authserv-id."""
    results = []
    for a in auth:
        props = []
        for key, value in a.properties:
            ptype, _, prop = key.partition(".")
            props.append(authres.AuthenticationResultProperty(ptype, prop, value))
        results.append(
            authres.AuthenticationResult(
                method=a.method, result=a.result, reason=a.reason or None, properties=props
            )
        )
    header = authres.AuthenticationResultsHeader(authserv_id=hostname, results=results)
    return str(header).partition(": ")[2]


def verdict_headers(verdict: Verdict, hostname: str, autolearn: str = "") -> list[str]:
    """Header fields to prepend on relayed mail, already folded, without CRLF at the end.

    ``autolearn`` (spam, ham, no, unavailable) ends ``X-Spam-Status`` as
    SpamAssassin's ``autolearn=`` does; empty when auto-learn is off.
    """
    flag = "Yes" if verdict.is_spam else "No"
    tests = ",".join(verdict.symbol_names()) or "none"
    status = f"{flag}, score={verdict.score} required={verdict.required} tests={tests}"
    if autolearn:
        status += f" autolearn={autolearn}"
    out = [
        fold_header("Authentication-Results", authentication_results(hostname, verdict.auth)),
        fold_header("X-Spam-Status", status),
    ]
    if verdict.symbols:
        listing = ", ".join(
            f"{s.name}={s.score}" for s in sorted(verdict.symbols, key=lambda s: s.name)
        )
        out.append(fold_header("X-Spam-Symbols", listing))
    if verdict.is_spam:
        out.append("X-Spam-Flag: YES")
    return out
