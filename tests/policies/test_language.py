"""The language guess behind BODY_UNWANTED_LANGUAGE: bounded and never raising on odd text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import _language


def test_languages_are_told_apart() -> None:
    english = (
        "The minutes of Tuesday's meeting are on the wiki; please read them before Friday. " * 3
    )
    german = "Bitte lesen Sie die Unterlagen sorgfaeltig durch und melden Sie sich bei Fragen. " * 3
    guess_en, guess_de = _language.detect(english), _language.detect(german)
    assert guess_en is not None and guess_en.language == "en"
    assert guess_de is not None and guess_de.language == "de"
    assert 0.5 < guess_de.confidence <= 1.0


def test_short_text_is_not_judged() -> None:
    assert _language.detect("Hallo Bob, bis morgen!") is None
    assert _language.detect(" \r\n\t " * 500) is None


@pytest.mark.parametrize(
    "text",
    [
        "\ud800 lone surrogates from undecodable bytes " * 20,
        "a\x00b NUL bytes " * 40,
        "x" * 1_000_000,  # one huge word: only the first 3,000 characters are read
        "\u202e" * 500 + " bidi override " * 20,
    ],
)
def test_hostile_text_gets_an_answer_not_an_exception(text: str) -> None:
    guess = _language.detect(text)
    assert guess is None or 0.0 <= guess.confidence <= 1.0


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=400))
def test_any_text_is_judged_or_skipped(text: str) -> None:
    guess = _language.detect(text * 3)
    assert guess is None or (guess.language and 0.0 <= guess.confidence <= 1.0)
