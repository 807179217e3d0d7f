"""A trainable statistical classifier: token probabilities combined with Fisher's method.

Why this classifier: it is the one SpamBayes settled on after years of
measured comparisons and the one SpamAssassin's Bayes uses (Gary Robinson's
"A Statistical Approach to the Spam Problem", 2003):

1. Per token, the ratio of the spam and ham *message* frequencies, shrunk
   towards 0.5 for rarely seen tokens (Robinson's f(w) with strength
   ``unknown_word_strength``): one sighting is weak evidence.
2. Only the ``max_clues`` tokens farthest from 0.5 (and at least
   ``min_strength`` away) are used: most words say nothing.
3. Fisher's inverse chi-square combines them twice, once testing "these
   probabilities are not spammy", once "not hammy"; the indicator is
   ``(S - H + 1) / 2``. Unlike naive-Bayes products it does not saturate at
   0 or 1 on long messages, and it says "unsure" (near 0.5) when the
   message carries strong evidence both ways, which is what keeps false
   positives rare.

The probability becomes one of SpamAssassin's buckets ``BAYES_00``,
``_05``, ``_20``, ``_40``, ``_50``, ``_60``, ``_80``, ``_95``, ``_99``, plus
``BAYES_999`` on top of ``BAYES_99`` from 99.9% (as in SpamAssassin); the
symbol's detail carries the probability. Counts live in
the gateway's state store (``services.state``: local SQLite, or Redis shared
by every node), as (spam, ham) message counts per hashed token in table
``bayes`` plus a totals row; learned message ids in ``bayes_seen`` make
re-learning a message a no-op and learning it as the other class a move.

With ``logistic = true`` (off by default) a second learner, logistic
regression over the same hashed tokens (policies/_logistic.py), is retrained
by ``gateway learn`` (:meth:`BayesPolicy.retrain`) and the bucket's
probability is the average of the two; the detail says both.

Auto-learn (off by default, SpamAssassin's ``bayes_auto_learn``): after the
verdict, a message that scored at least ``autolearn_spam_score`` is learned
as spam and one below ``autolearn_ham_score`` as ham, in the background
(:meth:`BayesPolicy.after_verdict`, :func:`autolearn_decision`). As in
SpamAssassin the score leaves out the classifier's own symbols, spam also
needs ``autolearn_min_header_points`` and ``autolearn_min_body_points``,
and the classifier must not strongly disagree. A verdict that an action
floor (GTUBE, a blocked attachment, DMARC, a temporary failure) or an
allow/block list decided teaches nothing about content and is not learned;
nor is a message already learned (a manual ``learn`` is never overridden).
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import hashlib
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from email.message import EmailMessage
from typing import TypeVar

from gateway.api import (
    AutoLearn,
    Context,
    OptionError,
    Policy,
    Result,
    Services,
    StateStore,
    StateUnavailableError,
    Symbol,
    SymbolDef,
    VerdictView,
)
from policies._logistic import Model, TrainingOptions, decode_message, encode_message, train
from policies._tokens import TokenizerOptions, hash_token, message_tokens

__all__ = [
    "BayesOptions",
    "BayesPolicy",
    "autolearn_decision",
    "buckets",
    "chi2q",
    "explain_clues",
    "fisher",
    "shown_clues",
    "spam_probability",
    "strongest_clues",
]

log = logging.getLogger("policies.bayes")
_K = TypeVar("_K")

TOTALS_KEY = "!totals"  # not 16 hex characters: never a token hash
MODEL_KEY = "!logistic"  # (version of the stored logistic model, 0), beside the totals
MODEL_BLOB = "logistic"
LEARN_BATCH = 500  # messages per state-store round trip while learning
RETRAIN_BATCH = 1_000  # stored training messages fetched per round trip

_PARSER = email.parser.BytesParser(policy=email.policy.default)

# (upper bound of the probability, symbol); SpamAssassin's bucket names.
_BUCKETS: tuple[tuple[float, str], ...] = (
    (0.01, "BAYES_00"),
    (0.05, "BAYES_05"),
    (0.20, "BAYES_20"),
    (0.40, "BAYES_40"),
    (0.60, "BAYES_50"),
    (0.80, "BAYES_60"),
    (0.95, "BAYES_80"),
    (0.99, "BAYES_95"),
    (math.inf, "BAYES_99"),
)
ALMOST_CERTAIN = 0.999  # BAYES_999 comes on top of BAYES_99 from here, as in SpamAssassin

# SpamAssassin's AutoLearnThreshold: no learning as spam when the classifier's own
# points say ham (below -1.0), nor as ham when they say spam (above 1.0).
LEARNER_SAID_HAM = Decimal("-1.0")
LEARNER_SAID_SPAM = Decimal("1.0")
# Symbol families that count as body points for auto-learn (SpamAssassin's body,
# rawbody, uri and full rules); META_ counts for neither; every other family,
# from SPF to DNSBL, counts as header points.
BODY_FAMILIES = ("BODY_", "RAW_", "URI_", "HTML_", "MIME_", "ATTACH_")
NEITHER_FAMILIES = ("META_",)
_STEPPED_ASIDE = frozenset({"BAYES_UNAVAILABLE", "POLICY_ERROR", "POLICY_TIMEOUT"})
_INCOMPLETE = frozenset({"POLICY_ERROR", "POLICY_TIMEOUT", "MIME_TOO_COMPLEX", "MIME_UNPARSEABLE"})
# A check that could not answer (DNSBL_TEMPFAIL, RATELIMIT_UNAVAILABLE, SPF_TEMPERROR):
# the score is missing its evidence, so it says little either way.
_MISSED_SUFFIXES = ("_TEMPFAIL", "_TEMPERROR", "_UNAVAILABLE")


@dataclass(frozen=True, slots=True)
class BayesOptions:
    table: str = "bayes"  # state-store table of token counts; "<table>_seen" holds learned ids
    min_spam: int = 200  # messages of each class learned before the classifier speaks
    min_ham: int = 200
    max_clues: int = 150  # strongest tokens combined (SpamBayes max_discriminators)
    min_strength: float = 0.1  # |f(w) - 0.5| below this is no evidence
    unknown_word_strength: float = 0.6  # Robinson's s: weight of the 0.5 prior
    bigrams: bool = False  # also word pairs (more tokens, no gain on our benchmark)
    html_tags: bool = False  # also HTML tag names (more spam caught, more newsletters too)
    max_tokens: int = 3_000  # distinct tokens per message, a bound for hostile input
    state_timeout: float = 2.0  # seconds for one state-store call before stepping aside
    autolearn: bool = False  # learn from the gateway's own confident verdicts
    autolearn_spam_score: float = 12.0  # score without BAYES_* at or above which: spam
    autolearn_ham_score: float = 0.1  # score without BAYES_* below which: ham
    autolearn_min_header_points: float = 3.0  # spam needs this much from header symbols
    autolearn_min_body_points: float = 3.0  # ... and this much from body symbols
    autolearn_skip_policies: tuple[str, ...] = ("lists",)  # a symbol of these: never learned
    autolearn_max_pending: int = 100  # background learns at once; more are skipped (counted)
    logistic: bool = False  # also a logistic model over the tokens, averaged in (docs/quality.md)
    # A retrain fits at most this many learned messages (a sample by message hash): bounded
    # memory (~3 KB each) and time however long the site has been learning.
    logistic_max_messages: int = 20_000

    def __post_init__(self) -> None:
        if not self.table or not self.table.replace("_", "").isalnum():
            raise OptionError("table", f'must be letters, digits and "_", got "{self.table}"')
        for key in ("min_spam", "min_ham"):
            if getattr(self, key) < 1:
                raise OptionError(key, f"must be at least 1, got {getattr(self, key)}")
        if not 1 <= self.max_clues <= 1000:
            raise OptionError("max_clues", f"must be 1..1000, got {self.max_clues}")
        if not 0.0 <= self.min_strength < 0.5:
            raise OptionError("min_strength", f"must be 0.0 <= x < 0.5, got {self.min_strength}")
        if self.unknown_word_strength <= 0:
            raise OptionError(
                "unknown_word_strength", f"must be > 0, got {self.unknown_word_strength}"
            )
        if not 10 <= self.max_tokens <= 100_000:
            raise OptionError("max_tokens", f"must be 10..100000, got {self.max_tokens}")
        if self.state_timeout <= 0:
            raise OptionError("state_timeout", f"must be > 0 seconds, got {self.state_timeout}")
        if self.autolearn_ham_score >= self.autolearn_spam_score:
            raise OptionError(
                "autolearn_ham_score",
                f"must be below autolearn_spam_score ({self.autolearn_spam_score}), "
                f"got {self.autolearn_ham_score}",
            )
        if not 2 <= self.logistic_max_messages <= 1_000_000:
            raise OptionError(
                "logistic_max_messages", f"must be 2..1000000, got {self.logistic_max_messages}"
            )
        if not 1 <= self.autolearn_max_pending <= 100_000:
            raise OptionError(
                "autolearn_max_pending", f"must be 1..100000, got {self.autolearn_max_pending}"
            )


# -- the mathematics (pure functions) ------------------------------------------


def chi2q(x2: float, v: int) -> float:
    """P(chi-square with ``v`` (even) degrees of freedom >= ``x2``), computed in log space.

    The series ``sum_{i < v/2} e^-m m^i / i!`` (m = x2/2) underflows in plain
    floats once m passes ~745, which long messages reach; log-sum-exp does not.
    """
    if x2 <= 0.0:
        return 1.0
    m = x2 / 2.0
    log_m = math.log(m)
    logs = [-m + i * log_m - math.lgamma(i + 1) for i in range(v // 2)]
    top = max(logs)
    total = top + math.log(sum(math.exp(t - top) for t in logs))
    return min(math.exp(total), 1.0)


def token_probability(
    spam: int, ham: int, nspam: int, nham: int, strength: float, prior: float = 0.5
) -> float:
    """Robinson's f(w): the spam probability of one token, shrunk towards ``prior``."""
    spam, ham = min(spam, nspam), min(ham, nham)  # counts can drift past totals on Redis races
    if spam + ham == 0:
        return prior
    spam_ratio = spam / nspam
    ham_ratio = ham / nham
    p = spam_ratio / (spam_ratio + ham_ratio)
    n = spam + ham
    return (strength * prior + n * p) / (strength + n)


def spam_probability(
    counts: Iterable[tuple[int, int]],
    nspam: int,
    nham: int,
    *,
    strength: float = 0.6,
    min_strength: float = 0.1,
    max_clues: int = 150,
) -> tuple[float, int]:
    """(spam probability 0..1, number of clues used) from per-token (spam, ham) counts."""
    keyed = dict(enumerate(counts))
    found = strongest_clues(
        keyed, nspam, nham, strength=strength, min_strength=min_strength, max_clues=max_clues
    )
    return fisher([f for f, _ in found]), len(found)


def strongest_clues(
    counts: Mapping[_K, tuple[int, int]],
    nspam: int,
    nham: int,
    *,
    strength: float,
    min_strength: float,
    max_clues: int,
) -> list[tuple[float, _K]]:
    """The clues the classifier combines: (f(w), token), farthest from 0.5 first."""
    if nspam <= 0 or nham <= 0:
        return []
    clues = [
        (f, key)
        for key, (s, h) in counts.items()
        if abs((f := token_probability(s, h, nspam, nham, strength)) - 0.5) >= min_strength
    ]
    clues.sort(key=lambda clue: abs(clue[0] - 0.5), reverse=True)
    return clues[:max_clues]


def fisher(clues: Sequence[float]) -> float:
    """Fisher's combination of token probabilities: ``(S - H + 1) / 2``; 0.5 with no clues."""
    if not clues:
        return 0.5
    n = len(clues)
    ln_ham = sum(math.log(max(f, 1e-300)) for f in clues)
    ln_spam = sum(math.log(max(1.0 - f, 1e-300)) for f in clues)
    spamminess = 1.0 - chi2q(-2.0 * ln_spam, 2 * n)
    hamminess = 1.0 - chi2q(-2.0 * ln_ham, 2 * n)
    return (spamminess - hamminess + 1.0) / 2.0


CLUES_SHOWN = 3  # strongest tokens named per side in the detail
_CLUE_CHARS = 40  # characters of one token shown


def explain_clues(shown: tuple[list[str], list[str]], plain: Mapping[str, str]) -> str:
    """``spammiest: subject:free, money:4; hammiest: hdr:in-reply-to:yes``.

    Why a verdict is what it is, in the message's own tokens (``shown``: the
    spam- and ham-side hashes from :func:`shown_clues`; ``plain``: hash ->
    token): an operator looking at a newsletter flagged at ``BAYES_95`` sees
    which words and links carried it. Only this message's tokens are shown,
    where the message itself is (``scan``, the quarantine).
    """
    spammy, hammy = shown
    sides = []
    for label, keys in (("spammiest", spammy), ("hammiest", hammy)):
        if keys:
            names = ", ".join(_printable(plain.get(k, k))[:_CLUE_CHARS] for k in keys)
            sides.append(f"{label}: {names}")
    return "; ".join(sides)


def shown_clues(clues: Sequence[tuple[float, _K]]) -> tuple[list[_K], list[_K]]:
    """The strongest :data:`CLUES_SHOWN` spam-side and ham-side tokens of ``clues``."""
    spammy: list[_K] = []
    hammy: list[_K] = []
    for f, key in clues:
        side = spammy if f > 0.5 else hammy
        if len(side) < CLUES_SHOWN:
            side.append(key)
        if len(spammy) == len(hammy) == CLUES_SHOWN:
            break
    return spammy, hammy


def _printable(token: str) -> str:
    return token if token.isprintable() else "".join(c if c.isprintable() else "?" for c in token)


def buckets(probability: float) -> tuple[str, ...]:
    """The BAYES_* symbols of a probability: one bucket, plus BAYES_999 above 99.9%."""
    name = next(name for upper, name in _BUCKETS if probability < upper)
    return (name, "BAYES_999") if probability >= ALMOST_CERTAIN else (name,)


# -- auto-learn (a pure decision) -------------------------------------------------


def autolearn_decision(
    verdict: VerdictView,
    results: Mapping[str, Result],
    *,
    policy: str,
    options: BayesOptions,
) -> tuple[str, str]:
    """(label, why): ``spam`` or ``ham`` to learn, else ``no`` or ``unavailable``.

    ``results`` are every policy's results; ``policy`` is the classifier's own
    name, whose symbols are left out of the score as in SpamAssassin.
    """
    own = results.get(policy)
    if own is None or any(s.name in _STEPPED_ASIDE for s in own.symbols):
        return "unavailable", "the classifier did not run on this message"
    floors = sorted(name for name, r in results.items() if r.force is not None)
    if verdict.forced_by is not None and verdict.forced_by not in floors:
        floors.append(verdict.forced_by)
    if floors:
        return "no", "action floor from " + ", ".join(floors)
    skip = set(options.autolearn_skip_policies)
    listed = sorted(s.name for s in verdict.symbols if s.policy in skip)
    if listed:
        return "no", "allow/block list hit: " + ", ".join(listed)
    incomplete = sorted(
        s.name
        for s in verdict.symbols
        if s.policy != policy and (s.name in _INCOMPLETE or s.name.endswith(_MISSED_SUFFIXES))
    )
    if incomplete:
        return "no", "evidence incomplete: " + ", ".join(incomplete)
    zero = Decimal("0.00")
    learner = sum((s.score for s in verdict.symbols if s.policy == policy), zero)
    others = [s for s in verdict.symbols if s.policy != policy]
    score = sum((s.score for s in others), zero)
    body = sum((s.score for s in others if s.name.startswith(BODY_FAMILIES)), zero)
    header = sum(
        (s.score for s in others if not s.name.startswith(BODY_FAMILIES + NEITHER_FAMILIES)),
        zero,
    )
    spam_at = Decimal(repr(options.autolearn_spam_score))
    ham_below = Decimal(repr(options.autolearn_ham_score))
    facts = f"score {score} without {policy} (header {header}, body {body}, {policy} {learner})"
    if score >= spam_at:
        if header < Decimal(repr(options.autolearn_min_header_points)):
            return "no", f"{facts}: too few header points for spam"
        if body < Decimal(repr(options.autolearn_min_body_points)):
            return "no", f"{facts}: too few body points for spam"
        if learner < LEARNER_SAID_HAM:
            return "no", f"{facts}: the classifier says ham"
        return "spam", f"{facts} >= {spam_at}"
    if score < ham_below:
        if learner > LEARNER_SAID_SPAM:
            return "no", f"{facts}: the classifier says spam"
        return "ham", f"{facts} < {ham_below}"
    return "no", f"{facts} between {ham_below} and {spam_at}"


# -- the policy -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Learnable:
    key: str  # hashed message id
    tokens: tuple[str, ...]  # hashed tokens


class BayesPolicy(Policy):
    """Scores a message by what the classifier learned from mail marked spam or ham."""

    name = "bayes"
    # Scores chosen on the benchmark (docs/quality.md): strong ham evidence
    # subtracts, spam evidence adds. The classifier never flags on its own
    # (BAYES_99 + BAYES_999 = 4.9, under add_header's 5.0): on senders it never
    # saw it is confidently wrong about commercial newsletters, so some other
    # policy must agree (issue 17, round 5). Nothing comes near reject (15.0).
    symbols = {
        "BAYES_00": SymbolDef(-1.5, "classifier: spam probability below 1%"),
        "BAYES_05": SymbolDef(-0.5, "classifier: spam probability 1% to 5%"),
        "BAYES_20": SymbolDef(-0.3, "classifier: spam probability 5% to 20%"),
        "BAYES_40": SymbolDef(0.0, "classifier: spam probability 20% to 40%"),
        "BAYES_50": SymbolDef(0.5, "classifier: unsure, spam probability 40% to 60%"),
        "BAYES_60": SymbolDef(2.5, "classifier: spam probability 60% to 80%"),
        "BAYES_80": SymbolDef(4.0, "classifier: spam probability 80% to 95%"),
        "BAYES_95": SymbolDef(4.3, "classifier: spam probability 95% to 99%"),
        "BAYES_99": SymbolDef(4.5, "classifier: spam probability 99% or more"),
        "BAYES_999": SymbolDef(
            0.4, "classifier: spam probability 99.9% or more (in addition to BAYES_99)"
        ),
        "BAYES_UNTRAINED": SymbolDef(
            0.0, "classifier: too few messages learned yet; learn with `gateway learn`"
        ),
        "BAYES_UNAVAILABLE": SymbolDef(
            0.0, "classifier: the state store could not be reached; the classifier stepped aside"
        ),
    }
    Options = BayesOptions

    def __init__(self, options: BayesOptions) -> None:
        super().__init__(options)
        self.options: BayesOptions = options
        self._tokenizer = TokenizerOptions(
            bigrams=options.bigrams, html_tags=options.html_tags, max_tokens=options.max_tokens
        )
        self._services: Services | None = None
        self._autolearning: set[str] = set()  # message keys being auto-learned right now
        self._model: Model | None = None  # the logistic model, as of _model_version
        self._model_version = 0
        self._model_lock = asyncio.Lock()

    async def start(self, services: Services) -> None:
        self._services = services

    @property
    def _state(self) -> StateStore:
        if self._services is None:
            raise RuntimeError("BayesPolicy.start(services) was not called")
        return self._services.state

    # -- classification -----------------------------------------------------

    async def check(self, ctx: Context) -> Result:
        opts = self.options
        tokens = ctx.memo(self._hashed_tokens)
        try:
            async with asyncio.timeout(opts.state_timeout):
                totals = [TOTALS_KEY, MODEL_KEY] if opts.logistic else [TOTALS_KEY]
                counts = await self._state.get_many(opts.table, [*totals, *tokens])
                version = counts.pop(MODEL_KEY, (0, 0))[0]
                if opts.logistic and version != self._model_version:
                    await self._load_model(version)
        except (StateUnavailableError, TimeoutError) as exc:
            reason = str(exc) or f"no answer within {opts.state_timeout}s"
            log.warning(
                "bayes_state_unavailable",
                extra={"policy": self.name, "queue_id": ctx.queue_id, "error": reason},
            )
            return Result(symbols=(Symbol("BAYES_UNAVAILABLE", detail=reason[:200]),))
        nspam, nham = counts.pop(TOTALS_KEY, (0, 0))
        if nspam < opts.min_spam or nham < opts.min_ham:
            detail = f"learned {nspam} spam, {nham} ham; needs {opts.min_spam} and {opts.min_ham}"
            return Result(symbols=(Symbol("BAYES_UNTRAINED", detail=detail),))
        found = strongest_clues(
            counts,
            nspam,
            nham,
            strength=opts.unknown_word_strength,
            min_strength=opts.min_strength,
            max_clues=opts.max_clues,
        )
        probability, clues = fisher([f for f, _ in found]), len(found)
        shown = shown_clues(found)
        why = explain_clues(shown, self._plain_of(ctx, {*shown[0], *shown[1]}))
        detail = f"{probability:.4f} ({clues} clues{'; ' + why if why else ''})"
        model = self._model if opts.logistic else None
        if model is not None and model.weights:
            alone, logistic = probability, model.probability(tokens)
            probability = (alone + logistic) / 2
            detail = (
                f"{probability:.4f} (Fisher {alone:.4f}, {clues} clues; logistic {logistic:.4f}"
                f"{'; ' + why if why else ''})"
            )
        return Result(symbols=tuple(Symbol(name, detail=detail) for name in buckets(probability)))

    async def _load_model(self, version: int) -> None:
        """Fetch the stored logistic model when its version changed (once, however many ask)."""
        async with self._model_lock:
            if version == self._model_version:
                return
            found = await self._state.get_blobs(f"{self.options.table}_model", [MODEL_BLOB])
            data = found.get(MODEL_BLOB)
            self._model = Model.decode(data) if data is not None else None
            self._model_version = version

    def _tokens(self, ctx: Context) -> list[str]:
        return message_tokens(ctx, self._tokenizer)

    def _hashed_tokens(self, ctx: Context) -> list[str]:
        """The message's hashed tokens, memoized per message for :meth:`after_verdict`."""
        return [hash_token(t) for t in ctx.memo(self._tokens)]

    def _plain_of(self, ctx: Context, wanted: set[str]) -> dict[str, str]:
        """hash -> token for the clues the detail names (the strongest of each side)."""
        hashed = ctx.memo(self._hashed_tokens)
        return {h: t for h, t in zip(hashed, ctx.memo(self._tokens), strict=True) if h in wanted}

    # -- auto-learn ---------------------------------------------------------

    def after_verdict(self, ctx: Context, verdict: VerdictView) -> AutoLearn | None:
        """Decide on auto-learning (see :func:`autolearn_decision`); learning runs later."""
        opts = self.options
        if not opts.autolearn:
            return None
        label, why = autolearn_decision(verdict, ctx.results, policy=self.name, options=opts)
        if label not in ("spam", "ham"):
            return AutoLearn(label, why)
        # Only the key and the (memoized) tokens are kept, not the message.
        message = _Learnable(
            _message_key(ctx.message, ctx.raw), tuple(ctx.memo(self._hashed_tokens))
        )

        async def learn() -> bool:
            return await self._autolearn(message, spam=label == "spam")

        return AutoLearn(
            label, why, learn, timeout=opts.state_timeout, max_pending=opts.autolearn_max_pending
        )

    async def _autolearn(self, message: _Learnable, spam: bool) -> bool:
        """Learn one message unless it was learned before, as either class."""
        if message.key in self._autolearning:
            return False  # the same message is being learned right now (a retry, a copy)
        self._autolearning.add(message.key)
        try:
            return await self._learn_batch([message], spam, move=False) > 0
        finally:
            self._autolearning.discard(message.key)

    # -- learning -----------------------------------------------------------

    async def learn(self, messages: Iterable[bytes], spam: bool) -> int:
        """Learn raw messages as spam (or ham); return how many changed the counts.

        A message already learned as the same class is skipped; one learned
        as the other class is moved. Writes go to the state store in batches
        of ``LEARN_BATCH`` messages. Raises StateUnavailableError.
        """
        changed = 0
        batch: list[_Learnable] = []
        for raw in messages:
            batch.append(self._learnable(raw))
            if len(batch) >= LEARN_BATCH:
                changed += await self._learn_batch(batch, spam)
                batch = []
        if batch:
            changed += await self._learn_batch(batch, spam)
        log.info("bayes_learned", extra={"policy": self.name, "spam": spam, "messages": changed})
        return changed

    async def retrain(self) -> str | None:
        """Fit the logistic model to the learned messages (at most ``logistic_max_messages``)
        and store it; what was done.

        ``gateway learn`` calls it after learning; auto-learned and released
        messages join the model at the next retrain. None when ``logistic``
        is off. Raises StateUnavailableError.
        """
        opts = self.options
        if not opts.logistic:
            return None
        table = f"{opts.table}_msgs"
        kept = await self._state.blob_keys(table)
        # Message keys are hashes: the first N in order are a sample of every age and class.
        keys = sorted(kept)[: opts.logistic_max_messages]
        messages = []
        for i in range(0, len(keys), RETRAIN_BATCH):
            found = await self._state.get_blobs(table, keys[i : i + RETRAIN_BATCH])
            messages += [m for m in map(decode_message, found.values()) if m is not None]
        nspam = sum(1 for _, spam in messages if spam)
        nham = len(messages) - nspam
        if nspam < opts.min_spam or nham < opts.min_ham:
            return (
                f"logistic model not trained: {nspam} spam and {nham} ham kept, "
                f"needs {opts.min_spam} and {opts.min_ham}"
            )
        started = time.perf_counter()
        model = await asyncio.to_thread(train, messages, TrainingOptions())
        await self._state.put_blobs(f"{opts.table}_model", {MODEL_BLOB: model.encode()})
        await self._state.incr_many(opts.table, {MODEL_KEY: (1, 0)})
        seconds = time.perf_counter() - started
        log.info(
            "bayes_logistic_trained",
            extra={"policy": self.name, "spam": nspam, "ham": nham, "seconds": round(seconds, 2)},
        )
        sample = f", a sample of {len(kept)} kept" if len(kept) > len(keys) else ""
        return (
            f"logistic model trained on {nspam} spam and {nham} ham{sample} "
            f"({len(model.weights)} tokens, {seconds:.1f}s)"
        )

    def _learnable(self, raw: bytes) -> _Learnable:
        message = _parse(raw)
        services = self._services
        if services is None:
            raise RuntimeError("BayesPolicy.start(services) was not called")
        ctx = Context(
            client_ip=None,
            helo="",
            mail_from="",
            rcpt_to=(),
            raw=raw,
            message=message,
            resolver=services.resolver,
        )
        tokens = tuple(hash_token(t) for t in message_tokens(ctx, self._tokenizer))
        return _Learnable(_message_key(message, raw), tokens)

    async def _learn_batch(
        self, batch: Sequence[_Learnable], spam: bool, *, move: bool = True
    ) -> int:
        table, seen_table = self.options.table, f"{self.options.table}_seen"
        seen = await self._state.get_many(seen_table, list({m.key for m in batch}))
        deltas: dict[str, list[int]] = {}
        seen_deltas: dict[str, tuple[int, int]] = {}
        mine = 0 if spam else 1  # index of the class being learned in a (spam, ham) pair

        def add(keys: Iterable[str], index: int, amount: int) -> None:
            for key in keys:
                pair = deltas.setdefault(key, [0, 0])
                pair[index] += amount

        changed = 0
        for m in batch:
            before = seen_deltas.get(m.key) or seen.get(m.key, (0, 0))
            if before[mine] > 0:
                continue  # already learned as this class
            if before[1 - mine] > 0:  # learned as the other class: move it
                if not move:
                    continue
                add((*m.tokens, TOTALS_KEY), 1 - mine, -1)
            add((*m.tokens, TOTALS_KEY), mine, 1)
            now = (1, 0) if spam else (0, 1)
            seen_deltas[m.key] = now
            changed += 1
        if not changed:
            return 0
        if self.options.logistic:  # the training set, before the counts: a retrain sees both
            await self._state.put_blobs(
                f"{table}_msgs",
                {m.key: encode_message(m.tokens, spam) for m in batch if m.key in seen_deltas},
            )
        await self._state.incr_many(
            table, {k: (v[0], v[1]) for k, v in deltas.items() if v != [0, 0]}
        )
        await self._state.incr_many(
            seen_table,
            {
                k: (now[0] - seen.get(k, (0, 0))[0], now[1] - seen.get(k, (0, 0))[1])
                for k, now in seen_deltas.items()
            },
        )
        return changed


def _parse(raw: bytes) -> EmailMessage:
    """Parse as the engine does (policy=default); a hopeless message is an empty one."""
    try:
        msg = _PARSER.parsebytes(raw)
    except Exception:  # the stdlib parser is lenient; this is the backstop
        msg = EmailMessage()
    assert isinstance(msg, EmailMessage)
    return msg


def _message_key(message: EmailMessage, raw: bytes) -> str:
    """A learned message's identity: its Message-ID, else a digest of its bytes."""
    try:
        msgid = str(message.get("message-id", "") or "").strip()
    except Exception:
        msgid = ""
    basis = ("id:" + msgid).encode() if msgid else raw
    return hashlib.blake2b(basis, digest_size=8).hexdigest()
