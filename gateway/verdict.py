"""Symbols + scores + thresholds + forced floors -> the verdict and its headers.

Each symbol's score is rounded to hundredths *before* summing, so the numbers
shown in ``X-Spam-Symbols`` add up exactly to ``score=`` in ``X-Spam-Status``.

Observe mode (docs/observe.md): the verdict is computed in full (the
*observed* action), then again with the symbols and floors of observed
policies (every policy, in ``[actions] mode = "observe"``) left out: that is
the *enforced* action. Hard protections (:data:`HARD_SYMBOLS`, the gateway's
own findings, policies that declare ``observable = False``) always act.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

import authres

from gateway.api import Action, AuthResult, SymbolDef
from gateway.config import ActionsConfig
from gateway.pipeline import PipelineRun

__all__ = [
    "HARD_SYMBOLS",
    "OBSERVE_ALL",
    "Observe",
    "ScoredSymbol",
    "Verdict",
    "decide",
    "fold_header",
    "verdict_headers",
]

# Findings that act even when observed: the test string operators send to check the
# path end to end, and checks that could not finish (a crash is never an unscanned relay).
HARD_SYMBOLS = frozenset(
    {
        "GTUBE",
        "AV_VIRUS",  # clamd found malware (or the EICAR test file): never relayed on trial
        "POLICY_ERROR",
        "POLICY_TIMEOUT",
        "MIME_UNPARSEABLE",
        "MIME_TOO_COMPLEX",
    }
)
OBSERVE_ALL = "all"  # the ``policy`` label of global observe mode


@dataclass(frozen=True, slots=True)
class Observe:
    """What is observed only: every policy (``everything``) or the named ones.

    ``hard`` names policies that are never observed (``Policy.observable = False``)
    and ``gateway``, the engine's own findings.
    """

    everything: bool = False
    policies: frozenset[str] = frozenset()
    hard: frozenset[str] = frozenset({"gateway"})

    @property
    def active(self) -> bool:
        return self.everything or bool(self.policies)

    def observes(self, policy: str) -> bool:
        if policy in self.hard:
            return False
        return self.everything or policy in self.policies


ENFORCE = Observe()

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
    # Observe mode: the action with every policy acting (None when nothing is observed),
    # what decided it, the score that counted for ``action``, and per observed policy
    # the action it alone would have added (policy "all" in global observe mode).
    observed: Action | None = None
    observed_forced_by: str | None = None
    observed_reason: str = ""
    enforced_score: Decimal | None = None
    observed_by_policy: tuple[tuple[str, Action], ...] = ()
    # The policy whose ceiling (``Result.cap``) held ``action`` below what the score
    # decided, when no floor raised it again: counted in gateway_capped_actions_total.
    held_by: str | None = None

    @property
    def counted_score(self) -> Decimal:
        """The score that counted for ``action``: without observed policies' symbols."""
        return self.score if self.enforced_score is None else self.enforced_score

    @property
    def is_spam(self) -> bool:
        """Spam as the enforced action sees it: an observed policy never flags mail."""
        return self.counted_score >= self.required or self.action in (
            Action.ADD_HEADER,
            Action.QUARANTINE,
            Action.REJECT,
        )

    def symbol_names(self) -> list[str]:
        return sorted(s.name for s in self.symbols)

    def enforced(self, observe: Observe) -> EnforcedView:
        """The verdict without the observed policies' symbols: what auto-learning may
        judge. A policy on trial must not train the classifier, or its mistakes would
        change enforced scores later (docs/observe.md)."""
        kept = tuple(s for s in self.symbols if not observe.observes(s.policy))
        return EnforcedView(self.action, self.counted_score, kept, self.forced_by)


@dataclass(frozen=True, slots=True)
class EnforcedView:
    """A :class:`gateway.api.VerdictView` of the enforced part of a verdict."""

    action: Action
    score: Decimal
    symbols: tuple[ScoredSymbol, ...]
    forced_by: str | None


_Floor = tuple[Action, str, str, str, bool]  # (action, forced_by, reason, owner, hard)
_Cap = tuple[Action, str]  # (ceiling of the score's action, owner)


def decide(
    run: PipelineRun,
    *,
    declared: Mapping[str, tuple[str, SymbolDef]],
    overrides: Mapping[str, float | Action],
    thresholds: ActionsConfig,
    observe: Observe = ENFORCE,
) -> Verdict:
    """Weigh every symbol, apply thresholds, then raise to the strongest floor.

    With ``observe`` active, ``action`` is what the non-observed part decides and
    ``observed`` what everything would have decided.
    """
    scored: list[ScoredSymbol] = []
    floors: list[_Floor] = []
    caps: list[_Cap] = []
    auth: list[AuthResult] = []
    for prun in run.runs:
        res = prun.result
        auth.extend(res.auth)
        if res.cap is not None:
            caps.append((res.cap, prun.name))
        if res.force is not None:
            hard = any(sym.name in HARD_SYMBOLS for sym in res.symbols)
            reason = res.reason or f"policy {prun.name}"
            floors.append((res.force, prun.name, reason, prun.name, hard))
        for sym in res.symbols:
            _owner, sdef = declared.get(sym.name, (prun.name, SymbolDef(0.0, "undeclared symbol")))
            override = overrides.get(sym.name)
            if isinstance(override, Action):
                reason = sdef.description + (f": {sym.detail}" if sym.detail else "")
                hard = sym.name in HARD_SYMBOLS
                floors.append((override, f"scores.{sym.name}", reason, prun.name, hard))
                value = sdef.score * sym.weight
            elif override is not None:
                value = override
            else:
                value = sdef.score * sym.weight
            scored.append(
                ScoredSymbol(sym.name, _round(value), prun.name, sym.detail, sdef.description)
            )
    ordered = tuple(sorted(scored, key=lambda s: (-s.score, s.name)))
    full = _outcome(ordered, floors, caps, thresholds, lambda _policy: True)
    total = full[3]
    if not observe.active:
        action, forced_by, reason, _, held_by = full
        observed: Action | None = None
        enforced_score: Decimal | None = None
        by_policy: tuple[tuple[str, Action], ...] = ()
    else:
        action, forced_by, reason, enforced_score, held_by = _outcome(
            ordered, floors, caps, thresholds, lambda policy: not observe.observes(policy)
        )
        observed = full[0]
        if observe.everything:
            by_policy = ((OBSERVE_ALL, observed),)
        else:
            by_policy = tuple(
                (name, _outcome(ordered, floors, caps, thresholds, _alone(observe, name))[0])
                for name in sorted(observe.policies)
            )
    return Verdict(
        action=action,
        score=total,
        required=_round(thresholds.add_header),
        symbols=ordered,
        reason=_one_line(reason),
        forced_by=forced_by,
        auth=tuple(auth),
        observed=observed,
        observed_forced_by=full[1] if observed is not None else None,
        observed_reason=_one_line(full[2]) if observed is not None else "",
        enforced_score=enforced_score,
        observed_by_policy=by_policy,
        held_by=held_by,
    )


def _alone(observe: Observe, name: str) -> Callable[[str], bool]:
    """What acts when observed policy ``name`` alone were enforced."""
    return lambda policy: policy == name or not observe.observes(policy)


def _outcome(
    scored: tuple[ScoredSymbol, ...],
    floors: list[_Floor],
    caps: list[_Cap],
    thresholds: ActionsConfig,
    acts: Callable[[str], bool],
) -> tuple[Action, str | None, str, Decimal, str | None]:
    """(action, forced_by, reason, score, held_by) counting only what ``acts(policy)`` lets act.

    The score's action is held down to the lowest acting cap before the floors
    raise it: a cap limits what a sum of heuristics can do, never a forced floor.
    ``held_by`` names the cap's policy when it decided the outcome (no floor won).
    """
    counted = [s for s in scored if acts(s.policy)]
    total = sum((s.score for s in counted), Decimal("0.00"))
    action, forced_by, reason = thresholds.for_score(float(total)), None, ""
    held_by: str | None = None
    for cap, owner in caps:
        if acts(owner) and cap.rank < action.rank:
            action, held_by = cap, owner
    for floor, who, why, owner, hard in floors:
        if not (hard or acts(owner)):
            continue
        # A floor at the score's own action says more than a sum of scores ("virus X").
        tie = floor is action and forced_by is None and action is not Action.RELAY
        if floor.rank > action.rank or tie:
            action, forced_by, reason = floor, who, why
    if forced_by is None and action is not Action.RELAY:
        top = [s for s in counted if s.score > 0][:3]
        reason = f"spam score {total} (" + ", ".join(s.name for s in top) + ")"
        if held_by:
            reason += f", held at {action.value} by policy {held_by}"
    return action, forced_by, reason, total, held_by if forced_by is None else None


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
    if verdict.observed is not None:
        out.append(f"X-Spam-Action-Observed: {verdict.observed.value}")
    return out
