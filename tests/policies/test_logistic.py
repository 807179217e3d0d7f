"""The classifier's second learner (policies/_logistic.py): pure functions, no store."""

from __future__ import annotations

import random

from policies._logistic import Model, TrainingOptions, decode_message, encode_message, train
from policies._tokens import hash_token


def _message(rng: random.Random, spam: bool) -> list[str]:
    own = ["viagra", "winner", "cash", "offer", "click"] if spam else ["patch", "review", "build"]
    shared = ["the", "and", "you", "today", "list", "mail", "info", "time"]
    words = rng.sample(own, 2) + rng.sample(shared, 4)
    return [hash_token(w) for w in words]


def test_training_messages_round_trip_and_garbage_is_refused() -> None:
    tokens = [hash_token("a"), hash_token("b"), hash_token("a")]
    decoded = decode_message(encode_message(tokens, spam=True))
    assert decoded is not None
    ids, spam = decoded
    assert spam is True and sorted(ids) == sorted({int(t, 16) for t in tokens})
    assert decode_message(b"") is None and decode_message(b"\x01abc") is None


def test_a_trained_model_separates_the_classes_and_round_trips() -> None:
    rng = random.Random(3)
    data = [(_message(rng, i % 3 == 0), i % 3 == 0) for i in range(300)]  # unbalanced 1:2
    messages = [m for m in (decode_message(encode_message(t, s)) for t, s in data) if m]
    model = train(messages, TrainingOptions())
    spam_p = [model.probability(t) for t, s in data if s]
    ham_p = [model.probability(t) for t, s in data if not s]
    assert min(spam_p) > 0.8 and max(ham_p) < 0.2
    copy = Model.decode(model.encode())
    assert copy is not None and copy.messages == 300
    assert abs(copy.probability(data[0][0]) - model.probability(data[0][0])) < 1e-4
    assert model.probability([]) == 0.5
    assert Model.decode(b"short") is None


def test_training_is_deterministic_and_needs_both_classes() -> None:
    rng = random.Random(4)
    data = [(_message(rng, i % 2 == 0), i % 2 == 0) for i in range(60)]
    messages = [m for m in (decode_message(encode_message(t, s)) for t, s in data) if m]
    assert (
        train(messages, TrainingOptions()).encode() == train(messages, TrainingOptions()).encode()
    )
    only_spam = [m for m in messages if m[1]]
    assert train(only_spam, TrainingOptions()).weights == {}
