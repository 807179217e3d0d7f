"""Bayes auto-learn: the decision (SpamAssassin's thresholds), the policy's learning and
the engine's background running of it (bounded, drained, never raising).

The decision is a pure function of the verdict and every policy's result; the
learning goes to the real local state store (SQLite in tmp_path).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path

import pytest

from gateway import metrics
from gateway.api import Action, OptionError, Result, Services, StateUnavailableError, Symbol
from gateway.config import config_from_mapping
from gateway.engine import Engine, Envelope
from gateway.state import ClosableStateStore
from gateway.testing import NoDNS, make_context
from gateway.testing.training import training_message
from gateway.verdict import ScoredSymbol, Verdict
from policies.bayes import TOTALS_KEY, BayesOptions, BayesPolicy, autolearn_decision

ON = BayesOptions(autolearn=True)


def scored(name: str, score: float, policy: str) -> ScoredSymbol:
    return ScoredSymbol(name, Decimal(repr(score)).quantize(Decimal("0.01")), policy, "", "")


def verdict(*symbols: ScoredSymbol, forced_by: str | None = None) -> Verdict:
    total = sum((s.score for s in symbols), Decimal("0.00"))
    return Verdict(Action.RELAY, total, Decimal("5.00"), symbols, "", forced_by, ())


def results(*names: str, forced: str = "") -> dict[str, Result]:
    out = {name: Result() for name in ("bayes", *names)}
    if forced:
        out[forced] = Result(force=Action.REJECT, reason="by design")
    return out


HDR = scored("HDR_SPAMMY", 6.0, "rules")
BODY = scored("BODY_SPAMMY", 7.0, "rules")


@pytest.mark.parametrize(
    ("symbols", "label", "why"),
    [
        ((HDR, BODY), "spam", "score 13.00 without bayes"),
        ((HDR, BODY, scored("BAYES_20", -0.3, "bayes")), "spam", ">= 12.0"),
        ((), "ham", "< 0.1"),
        ((scored("BAYES_99", 5.0, "bayes"),), "no", "the classifier says spam"),
        ((HDR,), "no", "between 0.1 and 12.0"),
        # The classifier's own points never push a message over the threshold.
        ((HDR, scored("BODY_X", 5.0, "rules"), scored("BAYES_99", 5.0, "bayes")), "no", "between"),
        ((scored("HDR_A", 13.0, "heuristics"),), "no", "too few body points"),
        ((scored("URI_A", 13.0, "urls"),), "no", "too few header points"),
        ((HDR, scored("META_X", 10.0, "rules"), scored("RAW_Y", 1.0, "rules")), "no", "body"),
        ((HDR, BODY, scored("BAYES_00", -5.0, "bayes")), "no", "the classifier says ham"),
        ((HDR, BODY, scored("DNSBL_TEMPFAIL", 0.0, "dnsbl")), "no", "evidence incomplete"),
    ],
)
def test_decision_follows_spamassassin_thresholds_without_the_classifier_s_own_points(
    symbols: tuple[ScoredSymbol, ...], label: str, why: str
) -> None:
    got, detail = autolearn_decision(
        verdict(*symbols), results("rules"), policy="bayes", options=ON
    )
    assert (got, why in detail) == (label, True), detail


def test_a_verdict_decided_by_an_action_floor_or_a_list_is_never_learned() -> None:
    gtube = verdict(HDR, BODY, scored("GTUBE", 20.0, "rules"))
    label, detail = autolearn_decision(gtube, results(forced="rules"), policy="bayes", options=ON)
    assert (label, detail) == ("no", "action floor from rules")
    by_score = verdict(HDR, BODY, forced_by="scores.BODY_SPAMMY")
    label, detail = autolearn_decision(by_score, results("rules"), policy="bayes", options=ON)
    assert (label, detail) == ("no", "action floor from scores.BODY_SPAMMY")
    allowed = verdict(HDR, BODY, scored("ALLOWLIST_CLIENT", -100.0, "lists"))
    label, detail = autolearn_decision(allowed, results("lists"), policy="bayes", options=ON)
    assert (label, detail) == ("no", "allow/block list hit: ALLOWLIST_CLIENT")


def test_a_classifier_that_stepped_aside_is_unavailable() -> None:
    down = {"bayes": Result(symbols=(Symbol("BAYES_UNAVAILABLE"),))}
    label, _ = autolearn_decision(verdict(HDR, BODY), down, policy="bayes", options=ON)
    assert label == "unavailable"


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"autolearn_ham_score": 12.0}, "autolearn_ham_score"),
        ({"autolearn_max_pending": 0}, "autolearn_max_pending"),
    ],
)
def test_invalid_autolearn_options_name_the_key(options: Mapping[str, object], key: str) -> None:
    with pytest.raises(OptionError) as err:
        BayesOptions(**options)  # type: ignore[arg-type]
    assert err.value.key == key


# -- the policy ------------------------------------------------------------------


async def started(store: object, **options: object) -> BayesPolicy:
    policy = BayesPolicy(BayesOptions(**options))  # type: ignore[arg-type]
    await policy.start(Services(NoDNS(), store, "mx.example.org", Path(".")))  # type: ignore[arg-type]
    return policy


SPAM = training_message(True, 1, random.Random(1))


async def test_autolearn_is_off_by_default(state: ClosableStateStore) -> None:
    policy = await started(state)
    ctx = make_context(SPAM, results=results("rules"))
    assert policy.after_verdict(ctx, verdict(HDR, BODY)) is None


async def test_learning_as_spam_adds_the_message_s_tokens_once(state: ClosableStateStore) -> None:
    policy = await started(state, autolearn=True)
    ctx = make_context(SPAM, results=results("rules"))
    await policy.check(ctx)  # the tokens are memoized for after_verdict
    decision = policy.after_verdict(ctx, verdict(HDR, BODY))
    assert decision is not None and decision.label == "spam" and decision.learn is not None
    assert await decision.learn() is True
    assert await decision.learn() is False  # the same message again: known
    counts = await state.get_many("bayes", [TOTALS_KEY, *ctx.memo(policy._hashed_tokens)])
    assert counts.pop(TOTALS_KEY) == (1, 0)
    assert counts and set(counts.values()) == {(1, 0)}


async def test_autolearn_never_overrides_a_manual_learn(state: ClosableStateStore) -> None:
    policy = await started(state, autolearn=True)
    assert await policy.learn([SPAM], spam=False) == 1  # an admin said: ham
    decision = policy.after_verdict(
        make_context(SPAM, results=results("rules")), verdict(HDR, BODY)
    )
    assert decision is not None and decision.learn is not None
    assert await decision.learn() is False
    assert (await state.get_many("bayes", [TOTALS_KEY]))[TOTALS_KEY] == (0, 1)


# -- the engine: background, bounded, drained ------------------------------------

RULES = """
[[rule]]
name = "HDR_AUTOLEARN_TEST"
type = "header"
header = "Subject"
pattern = 'learn-me'
score = 6.0
description = "test header rule"

[[rule]]
name = "BODY_AUTOLEARN_TEST"
type = "body"
pattern = 'learn-me'
score = 7.0
description = "test body rule"
"""


def spam_message(n: int) -> bytes:
    return (
        f"From: a@deals.example\r\nTo: b@example.org\r\nSubject: learn-me {n}\r\n"
        f"Message-ID: <{n}@deals.example>\r\n\r\nlearn-me now\r\n"
    ).encode()


def envelope(n: int) -> Envelope:
    return Envelope("192.0.2.1", "h.example.net", "a@deals.example", ("b@example.org",), f"Q{n}")


async def make_engine(tmp_path: Path, store: object, **bayes: object) -> Engine:
    (tmp_path / "rules.toml").write_text(RULES)
    config = config_from_mapping(
        {
            "server": {"hostname": "mx.example.org", "accepted_domains": ["example.org"]},
            "policies": {
                "bayes": {"autolearn": True, **bayes},
                "rules": {"files": ["rules.toml"], "builtin": False},
            },
        },
        tmp_path / "gateway.toml",
    )
    services = Services(NoDNS(), store, "mx.example.org", tmp_path)  # type: ignore[arg-type]
    engine = Engine(config, Engine.make_plan(config), services)
    await engine.start()
    return engine


def autolearn_count(cls: str, result: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "gateway_autolearn_total", {"policy": "bayes", "class": cls, "result": result}
    )
    return value or 0.0


async def test_evaluate_alone_learns_nothing_and_close_drains_started_learning(
    tmp_path: Path, state: ClosableStateStore
) -> None:
    engine = await make_engine(tmp_path, state)
    evaluation = await engine.evaluate(envelope(1), spam_message(1))
    assert [(n, d.label) for n, d in evaluation.autolearn] == [("bayes", "spam")]
    assert TOTALS_KEY not in await state.get_many("bayes", [TOTALS_KEY])  # scan stops here
    before = autolearn_count("spam", "learned")
    fields = engine.learn_from(evaluation)
    assert fields["autolearn"] == "spam" and "13.00" in fields["autolearn_detail"]
    await engine.close()  # waits for the learning
    assert (await state.get_many("bayes", [TOTALS_KEY]))[TOTALS_KEY] == (1, 0)
    assert autolearn_count("spam", "learned") == before + 1


class WritesFail:
    """Reads answer (the check works), writes fail: the store went down in between."""

    def __init__(self, store: ClosableStateStore, hang: bool = False) -> None:
        self.store, self.hang = store, hang

    async def get_many(self, table: str, keys: list[str]) -> dict[str, tuple[int, int]]:
        return await self.store.get_many(table, keys)

    async def incr_many(self, table: str, deltas: Mapping[str, tuple[int, int]]) -> None:
        if self.hang:
            await asyncio.sleep(3600)
        raise StateUnavailableError("redis://state.example:6379 refused the connection")

    async def hit(self, key: str, window: float, now: float | None = None) -> int:
        raise StateUnavailableError("down")


async def test_a_failed_learn_is_logged_and_counted_never_raised(
    tmp_path: Path, state: ClosableStateStore, caplog: pytest.LogCaptureFixture
) -> None:
    engine = await make_engine(tmp_path, WritesFail(state))
    before = autolearn_count("spam", "failed")
    with caplog.at_level(logging.WARNING, logger="gateway.engine"):
        evaluation = await engine.evaluate(envelope(2), spam_message(2))
        assert engine.learn_from(evaluation)["autolearn"] == "spam"
        await engine.close()
    failed = [r for r in caplog.records if r.getMessage() == "message_autolearn_failed"]
    assert len(failed) == 1 and "refused" in failed[0].error  # type: ignore[attr-defined]
    assert failed[0].queue_id == "Q2"  # type: ignore[attr-defined]
    assert autolearn_count("spam", "failed") == before + 1


async def test_learns_beyond_the_pending_cap_are_skipped_and_counted(
    tmp_path: Path, state: ClosableStateStore
) -> None:
    engine = await make_engine(
        tmp_path, WritesFail(state, hang=True), autolearn_max_pending=2, state_timeout=0.5
    )
    before = autolearn_count("spam", "skipped")
    labels = []
    for n in range(4):
        evaluation = await engine.evaluate(envelope(n), spam_message(n))
        labels.append(engine.learn_from(evaluation))
    assert [f["autolearn"] for f in labels] == ["spam", "spam", "unavailable", "unavailable"]
    assert "2 learns pending" in labels[2]["autolearn_detail"]
    assert autolearn_count("spam", "skipped") == before + 2
    await engine.close()  # the hanging writes end at state_timeout
    assert TOTALS_KEY not in await state.get_many("bayes", [TOTALS_KEY])
