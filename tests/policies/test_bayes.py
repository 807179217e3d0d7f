"""The statistical classifier: tokenizer, the mathematics, learning and classifying.

Policy tests are pure calls with small generated messages (never the
development corpus) and the real local state store (SQLite in tmp_path).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.api import OptionError, Services, StateUnavailableError
from gateway.config import StateConfig
from gateway.state import ClosableStateStore, open_state
from gateway.testing import NoDNS, make_context
from policies._tokens import TokenizerOptions, hash_token, message_tokens
from policies.bayes import (
    TOTALS_KEY,
    BayesOptions,
    BayesPolicy,
    buckets,
    chi2q,
    spam_probability,
    token_probability,
)

SPAM_WORDS = [
    "viagra",
    "mortgage",
    "winner",
    "cash",
    "offer",
    "free",
    "click",
    "guaranteed",
    "million",
    "credit",
    "refinance",
    "unsubscribe",
    "casino",
    "pills",
    "discount",
    "limited",
    "urgent",
    "bonus",
    "lottery",
    "prize",
    "investment",
]
HAM_WORDS = [
    "meeting",
    "patch",
    "kernel",
    "review",
    "lunch",
    "tomorrow",
    "release",
    "branch",
    "commit",
    "build",
    "agenda",
    "minutes",
    "draft",
    "thanks",
    "regards",
    "compiler",
    "debugger",
    "benchmark",
    "changelog",
    "mailing",
]
NEUTRAL = [
    "the",
    "and",
    "for",
    "you",
    "this",
    "that",
    "with",
    "have",
    "from",
    "your",
    "will",
    "about",
    "there",
]


def make_message(rng: random.Random, spam: bool, n: int) -> bytes:
    words = SPAM_WORDS if spam else HAM_WORDS
    body = " ".join(
        rng.choice(words) if rng.random() < 0.6 else rng.choice(NEUTRAL) for _ in range(40)
    )
    subject = " ".join(rng.choice(words) for _ in range(3))
    sender = "deals@promo.example" if spam else "dev@project.example"
    return (
        f"From: {sender}\r\nTo: user@example.org\r\nSubject: {subject}\r\n"
        f"Message-ID: <{'s' if spam else 'h'}{n}@gen.example>\r\n"
        f"Date: Mon, 1 Jul 2024 10:00:00 +0000\r\n\r\n{body}\r\n"
    ).encode()


async def started(state: object, **options: object) -> BayesPolicy:
    policy = BayesPolicy(BayesOptions(**options))  # type: ignore[arg-type]
    await policy.start(Services(NoDNS(), state, "mx.example.org", Path(".")))  # type: ignore[arg-type]
    return policy


async def trained(state: object, n: int = 30, **options: object) -> BayesPolicy:
    options = {"min_spam": 10, "min_ham": 10, **options}
    policy = await started(state, **options)
    rng = random.Random(5)
    assert await policy.learn((make_message(rng, True, i) for i in range(n)), spam=True) == n
    assert await policy.learn((make_message(rng, False, i) for i in range(n)), spam=False) == n
    return policy


def symbol(result: object) -> tuple[str, str]:
    """The bucket symbol (BAYES_999 rides on BAYES_99 with the same detail)."""
    sym = result.symbols[0]  # type: ignore[attr-defined]
    return sym.name, sym.detail


# -- mathematics ----------------------------------------------------------------


def test_chi2q_matches_the_closed_form_for_two_degrees_of_freedom() -> None:
    for x2 in (0.5, 4.0, 30.0):
        assert chi2q(x2, 2) == pytest.approx(math.exp(-x2 / 2))
    assert chi2q(0.0, 10) == 1.0


def test_chi2q_does_not_underflow_on_long_messages() -> None:
    """x2/2 beyond 745 underflows exp() in plain floats; the log-space series does not."""
    assert 0.0 <= chi2q(3000.0, 300) < 1e-100
    assert chi2q(200.0, 300) == pytest.approx(1.0, abs=1e-4)
    assert chi2q(300.0, 300) == pytest.approx(0.489, abs=0.01)  # just under the mean
    assert 0.0 < chi2q(1600.0, 1000) < 1.0


def test_token_probability_is_shrunk_towards_one_half_for_rare_tokens() -> None:
    assert token_probability(0, 0, 100, 100, 0.45) == 0.5
    once = token_probability(1, 0, 100, 100, 0.45)
    often = token_probability(50, 0, 100, 100, 0.45)
    assert 0.5 < once < often < 1.0
    assert once == pytest.approx((0.45 * 0.5 + 1.0) / 1.45)
    # class sizes are normalised: 10/100 spam vs 10/1000 ham is spammy
    assert token_probability(10, 10, 100, 1000, 0.45) > 0.85


def test_spam_probability_is_near_one_for_spam_clues_and_near_zero_for_ham_clues() -> None:
    spam, n = spam_probability([(90, 1)] * 20, 100, 100)
    ham, _ = spam_probability([(1, 90)] * 20, 100, 100)
    assert spam > 0.999 and n == 20
    assert ham < 0.001


def test_spam_probability_is_unsure_when_strong_evidence_points_both_ways() -> None:
    """Fisher combining says 'unsure' instead of letting one side win outright."""
    p, n = spam_probability([(90, 1)] * 20 + [(1, 90)] * 20, 100, 100)
    assert 0.4 < p < 0.6 and n == 40


def test_spam_probability_ignores_weak_tokens_and_keeps_the_strongest_clues() -> None:
    assert spam_probability([(50, 50)] * 30, 100, 100) == (0.5, 0)
    _, n = spam_probability([(90, 1)] * 400, 100, 100, max_clues=150)
    assert n == 150
    assert spam_probability([], 0, 0) == (0.5, 0)


@pytest.mark.parametrize(
    ("p", "names"),
    [
        (0.0, ("BAYES_00",)),
        (0.0099, ("BAYES_00",)),
        (0.01, ("BAYES_05",)),
        (0.1, ("BAYES_20",)),
        (0.3, ("BAYES_40",)),
        (0.5, ("BAYES_50",)),
        (0.7, ("BAYES_60",)),
        (0.8, ("BAYES_80",)),
        (0.97, ("BAYES_95",)),
        (0.995, ("BAYES_99",)),
        (0.999, ("BAYES_99", "BAYES_999")),
        (1.0, ("BAYES_99", "BAYES_999")),
    ],
)
def test_buckets_map_probabilities_to_spamassassin_symbols(
    p: float, names: tuple[str, ...]
) -> None:
    """As in SpamAssassin, BAYES_999 comes on top of BAYES_99."""
    assert buckets(p) == names


def test_the_classifier_alone_never_flags_and_no_bucket_comes_near_reject() -> None:
    score = {name: d.score for name, d in BayesPolicy.symbols.items()}
    assert score["BAYES_99"] + score["BAYES_999"] < 5.0  # another policy must agree
    order = ["BAYES_00", "BAYES_05", "BAYES_20", "BAYES_40", "BAYES_50", "BAYES_60"]
    order += ["BAYES_80", "BAYES_95", "BAYES_99"]
    assert [score[n] for n in order] == sorted(score[n] for n in order)
    assert score["BAYES_00"] < 0 < score["BAYES_60"]
    assert score["BAYES_95"] < score["BAYES_99"]


# -- tokenizer --------------------------------------------------------------------

SAMPLE = (
    "Received: from relay.collector.example ([203.0.113.9]) by mx.collector.example\r\n"
    "Return-Path: <bounce@list.example>\r\n"
    "Delivered-To: someone@collector.example\r\n"
    'From: "Cheap Pills" <offers12345@pharma.example.com>\r\n'
    "Reply-To: orders@elsewhere.example\r\n"
    "To: victim@example.org\r\n"
    "Subject: FREE PILLS NOW!!!\r\n"
    "X-Mailer: Microsoft Outlook Express 6.00\r\n"
    "Content-Type: text/plain; charset=iso-8859-1\r\n"
    "\r\n"
    "Buy now at http://www.shop.pharma.example.com/buy?id=1 or mail sales@pharma.example.com\r\n"
    "Supercalifragilisticexpialidocious deals!\r\n"
)


def tokens_of(raw: str, **options: object) -> list[str]:
    return message_tokens(make_context(raw), TokenizerOptions(**options))  # type: ignore[arg-type]


def test_tokens_cover_subject_sender_urls_mailer_and_body_words() -> None:
    toks = set(tokens_of(SAMPLE))
    expected = {
        "subject:free",
        "subject:pills",
        "subject:!!!",
        "subject:ALLCAPS",
        "from:domain:pharma.example.com",
        "from:name:cheap",
        "from:local-digits:5",
        "reply-to:other-domain",
        "url:example.com",
        "url:path:buy",
        "mailer:microsoft outlook",
        "charset:iso-8859-1",
        "ctype:text/plain",
        "hdr:in-reply-to:no",
        "hdr:x-mailer:yes",
        "buy",
        "deals!",
        "email:example.com",
        "skip:s 30",
        "body:plain",
    }
    assert expected <= toks


def test_amounts_of_money_become_their_order_of_magnitude() -> None:
    body = "Earn $5,000 a week, or \u00a3 45.50 a day, from $0.99 - US$25,000,000 waiting. 30$ no"
    head = "From: a@b.example\r\nSubject: hi\r\nContent-Type: text/plain; charset=utf-8\r\n"
    raw = f"{head}\r\n{body}\r\n"
    money = {t for t in tokens_of(raw) if t.startswith("money:")}
    assert money == {"money:4", "money:2", "money:1", "money:>6"}


def test_tokens_leave_out_the_delivery_path_and_recipient_addresses() -> None:
    """Received, Return-Path, Delivered-To and To addresses describe the collector, not the mail."""
    joined = " ".join(tokens_of(SAMPLE))
    for leak in ("collector", "203.0.113.9", "bounce", "victim", "list.example"):
        assert leak not in joined


def test_bigrams_and_html_tags_are_opt_in() -> None:
    html = (
        "From: a@b.example\r\nSubject: hi\r\nContent-Type: text/html\r\n\r\n"
        "<html><body><font color=red>big money fast</font></body></html>\r\n"
    )
    plain = set(tokens_of(html))
    assert "money" in plain and not any(t.startswith(("bi:", "html:")) for t in plain)
    extra = set(tokens_of(html, bigrams=True, html_tags=True))
    assert {"bi:big money", "bi:money fast", "html:<font", "html:<body"} <= extra


def test_tokens_are_distinct_and_bounded_for_hostile_input() -> None:
    words = " ".join(f"w{i:07d}" for i in range(20_000))
    toks = tokens_of(f"From: a@b.example\r\nSubject: x\r\n\r\n{words}\r\n", max_tokens=500)
    assert len(toks) == 500 == len(set(toks))


def test_token_hashes_are_sixteen_hex_characters_and_stable() -> None:
    h = hash_token("subject:free")
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == hash_token("subject:free") != hash_token("subject:fre")
    assert len(TOTALS_KEY) != 16


# -- options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"min_spam": 0}, "min_spam"),
        ({"table": "bad table"}, "table"),
        ({"max_clues": 0}, "max_clues"),
        ({"min_strength": 0.5}, "min_strength"),
        ({"state_timeout": 0}, "state_timeout"),
        ({"max_tokens": 1}, "max_tokens"),
    ],
)
def test_invalid_options_name_the_key(options: Mapping[str, object], key: str) -> None:
    with pytest.raises(OptionError) as info:
        BayesOptions(**options)  # type: ignore[arg-type]
    assert info.value.key == key


# -- learning and classifying -----------------------------------------------------


async def test_learned_spam_scores_high_and_learned_ham_scores_low(
    state: ClosableStateStore,
) -> None:
    policy = await trained(state)
    rng = random.Random(99)
    name, detail = symbol(await policy.check(make_context(make_message(rng, True, 1000))))
    assert name == "BAYES_99"
    assert float(detail.split()[0]) >= 0.99 and "clues" in detail
    name, _ = symbol(await policy.check(make_context(make_message(rng, False, 1000))))
    assert name == "BAYES_00"


async def test_classifier_stays_silent_until_it_has_learned_enough(
    state: ClosableStateStore,
) -> None:
    policy = await trained(state, n=5)
    name, detail = symbol(
        await policy.check(make_context(make_message(random.Random(1), True, 77)))
    )
    assert name == "BAYES_UNTRAINED"
    assert detail == "learned 5 spam, 5 ham; needs 10 and 10"
    assert BayesPolicy.symbols["BAYES_UNTRAINED"].score == 0.0


async def test_learning_a_message_twice_counts_it_once_and_relearning_moves_it(
    state: ClosableStateStore,
) -> None:
    policy = await started(state)
    msg = make_message(random.Random(3), True, 1)
    assert await policy.learn([msg, msg], spam=True) == 1
    assert await policy.learn([msg], spam=True) == 0
    assert (await state.get_many("bayes", [TOTALS_KEY]))[TOTALS_KEY] == (1, 0)
    assert await policy.learn([msg], spam=False) == 1
    assert (await state.get_many("bayes", [TOTALS_KEY]))[TOTALS_KEY] == (0, 1)
    subject = hash_token("from:domain:promo.example")
    assert (await state.get_many("bayes", [subject]))[subject] == (0, 1)


async def test_learning_three_thousand_messages_takes_well_under_a_minute(
    state: ClosableStateStore,
) -> None:
    policy = await started(state)
    rng = random.Random(11)
    messages = [make_message(rng, i % 2 == 0, i) for i in range(3000)]
    began = time.perf_counter()
    learned = await policy.learn(messages[::2], spam=True)
    learned += await policy.learn(messages[1::2], spam=False)
    elapsed = time.perf_counter() - began
    assert learned == 3000
    assert elapsed < 20.0, f"learning 3000 messages took {elapsed:.1f}s"


class BrokenStore:
    """A state store that is down (Redis unreachable, disk gone)."""

    async def incr_many(self, table: str, deltas: Mapping[str, tuple[int, int]]) -> None:
        raise StateUnavailableError("redis://state.example:6379 refused the connection")

    async def get_many(self, table: str, keys: list[str]) -> dict[str, tuple[int, int]]:
        raise StateUnavailableError("redis://state.example:6379 refused the connection")

    async def hit(self, key: str, window: float, now: float | None = None) -> int:
        raise StateUnavailableError("down")


class HangingStore(BrokenStore):
    async def get_many(self, table: str, keys: list[str]) -> dict[str, tuple[int, int]]:
        await asyncio.sleep(3600)
        return {}


async def test_unreachable_state_store_makes_the_classifier_step_aside_with_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = await started(BrokenStore())
    with caplog.at_level(logging.WARNING, logger="policies.bayes"):
        name, detail = symbol(await policy.check(make_context(SAMPLE)))
    assert name == "BAYES_UNAVAILABLE"
    assert "refused" in detail
    assert BayesPolicy.symbols["BAYES_UNAVAILABLE"].score == 0.0
    assert any(r.getMessage() == "bayes_state_unavailable" for r in caplog.records)
    with pytest.raises(StateUnavailableError):
        await policy.learn([SAMPLE.encode()], spam=True)


async def test_a_state_store_that_does_not_answer_is_treated_as_unavailable() -> None:
    policy = await started(HangingStore(), state_timeout=0.2)
    began = time.perf_counter()
    name, detail = symbol(await policy.check(make_context(SAMPLE)))
    assert name == "BAYES_UNAVAILABLE" and "0.2s" in detail
    assert time.perf_counter() - began < 2.0


async def test_tokens_are_stored_hashed_never_as_text(tmp_path: Path) -> None:
    import sqlite3

    store = open_state(StateConfig(path=str(tmp_path / "s.sqlite")), tmp_path)
    policy = await started(store)
    await policy.learn([SAMPLE.encode()], spam=True)
    await store.close()
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        keys = [k for (k,) in db.execute("SELECT key FROM counters WHERE tbl = 'bayes'")]
    assert TOTALS_KEY in keys
    assert all(len(k) == 16 for k in keys if k != TOTALS_KEY)


async def test_tokens_learned_on_one_node_count_on_another_through_redis() -> None:
    """Two gateways sharing one Redis (state.backend = "redis") share what was learned."""
    import os
    import secrets

    import redis.asyncio

    from gateway.state import RedisState

    url = os.environ.get("GATEWAY_TEST_REDIS", "redis://127.0.0.1:6379/0")
    client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=3)
    try:
        await client.ping()
    except (redis.RedisError, OSError) as exc:
        await client.aclose()
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis at {url} unreachable: {exc}")
        pytest.skip(f"Redis at {url} unreachable: {exc}")
    prefix = f"test-bayes-{secrets.token_hex(4)}:"
    learner, reader = RedisState(url, prefix), RedisState(url, prefix)
    try:
        await trained(learner)
        node_b = await started(reader, min_spam=10, min_ham=10)
        message = make_message(random.Random(99), True, 1000)
        name, _ = symbol(await node_b.check(make_context(message)))
        assert name == "BAYES_99"
    finally:
        await learner.close()
        await reader.close()
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


# -- hostile input ------------------------------------------------------------------


def test_tokenizer_is_bounded_on_deep_nesting_many_parts_and_huge_headers() -> None:
    """A hostile message costs about what a normal one does and never raises."""
    nested = "".join(
        f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n' for i in range(300)
    )
    many = "".join(f"X-Filler-{i}: {'y' * 50}\r\n" for i in range(5000))
    huge = "Subject: " + "A" * 500_000 + "\r\n"
    for raw in (
        f"From: a@b.example\r\n{nested}body\r\n",
        f"From: a@b.example\r\n{many}\r\nbody\r\n",
        f"From: a@b.example\r\n{huge}\r\nbody\r\n",
        "From: =?bogus-charset?B?////?= <x@y.example>\r\nSubject: =?utf-8?Q?=FF=FE?=\r\n\r\n",
    ):
        began = time.perf_counter()
        toks = tokens_of(raw)
        assert toks and len(toks) <= 3000
        assert time.perf_counter() - began < 2.0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_tokenizer_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    toks = message_tokens(make_context(raw), TokenizerOptions())
    assert len(toks) == len(set(toks)) <= 3000


async def test_learning_garbage_and_empty_messages_does_not_fail(
    state: ClosableStateStore,
) -> None:
    policy = await started(state)
    nested = "".join(
        f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n' for i in range(2000)
    )
    garbage = [b"", b"\x00\xff\xfe not a message", nested.encode()]
    assert await policy.learn(garbage, spam=True) == 3


async def test_the_logistic_model_is_trained_by_retrain_and_averaged_in(
    state: ClosableStateStore,
) -> None:
    """``logistic = true``: learned messages are kept, ``retrain`` fits and stores the model,
    and every classifying process picks it up by its version (docs/quality.md, round 4)."""
    policy = await trained(state, logistic=True)
    assert len(await state.blob_keys("bayes_msgs")) == 60
    spam = make_message(random.Random(9), True, 999)
    before = {s.name: s.detail for s in (await policy.check(make_context(spam))).symbols}
    assert "logistic" not in next(iter(before.values()))  # no model until a retrain
    said = await policy.retrain()
    assert said is not None and said.startswith("logistic model trained on 30 spam and 30 ham")
    other = await started(state, min_spam=10, min_ham=10, logistic=True)  # another node
    for p in (policy, other):
        result = await p.check(make_context(spam))
        (name, *_), detail = [s.name for s in result.symbols], result.symbols[0].detail
        assert name in ("BAYES_95", "BAYES_99") and "logistic" in detail, detail
    await policy.retrain()  # a new version: re-read once
    assert "logistic" in (await other.check(make_context(spam))).symbols[0].detail


async def test_a_retrain_fits_a_bounded_sample_of_what_was_learned(
    state: ClosableStateStore,
) -> None:
    """However long a site learns, one retrain reads at most logistic_max_messages."""
    policy = await trained(state, logistic=True, logistic_max_messages=40)
    said = await policy.retrain()
    assert said is not None and ", a sample of 60 kept" in said, said
    found = re.search(r"trained on (\d+) spam and (\d+) ham", said)
    assert found is not None, said
    spam, ham = int(found[1]), int(found[2])
    assert spam + ham == 40 and spam >= 10 and ham >= 10
    with pytest.raises(OptionError, match="logistic_max_messages"):
        BayesOptions(logistic_max_messages=1)


async def test_the_logistic_model_waits_for_enough_of_both_classes_and_is_off_by_default(
    state: ClosableStateStore,
) -> None:
    policy = await started(state, min_spam=10, min_ham=10, logistic=True)
    rng = random.Random(6)
    await policy.learn((make_message(rng, True, i) for i in range(12)), spam=True)
    said = await policy.retrain()
    assert said == "logistic model not trained: 12 spam and 0 ham kept, needs 10 and 10"
    off = await trained(state, table="plain")
    assert await off.retrain() is None
    assert await state.blob_keys("plain_msgs") == []
    assert (
        "logistic" not in (await off.check(make_context(b"Subject: x\r\n\r\nhi"))).symbols[0].detail
    )
