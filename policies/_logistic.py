"""The classifier's second learner: logistic regression over the same hashed tokens.

Why a second learner: Fisher's combination of per-token ratios (policies/bayes.py)
judges each token alone, so on senders it never saw it is confidently wrong in
both directions. A discriminative model weighs tokens against each other; the
average of the two probabilities caught more spam from unseen senders on the
development splits, and flagged one more hard-ham newsletter (docs/quality.md,
round 4), which is why it is off by default.

It needs several passes over the learned messages, not one online pass in
the order ``learn`` sees them (all spam, then all ham): each learned message's
hashed token set is kept in the state store (table ``<table>_msgs``, about 8
bytes per token, 2-3 KB a message) and ``gateway learn`` retrains the model
from them (:func:`train`; at most ``logistic_max_messages``, a sample by
message hash), then stores it as one byte string (table
``<table>_model``) with a version counter that classifying processes poll
cheaply alongside the token counts.

Training is plain SGD on the logistic loss, class-balanced (each class
weighs as much as the other whatever their counts), features scaled by
1/sqrt(tokens) so long and short messages weigh alike, a small L2 penalty,
10 shuffled epochs with a fixed seed (the same messages give the same model).
"""

from __future__ import annotations

import math
import random
import struct
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Model", "TrainingOptions", "decode_message", "encode_message", "train"]

_MESSAGE = struct.Struct("<B")  # label: 1 spam, 0 ham; then the tokens as uint64
_MODEL = struct.Struct("<Qd")  # messages trained on, bias; then tokens and weights
_CLAMP = 30.0  # |z| beyond this is certainty; math.exp would overflow far beyond


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-_CLAMP, min(_CLAMP, z))))


@dataclass(frozen=True, slots=True)
class TrainingOptions:
    epochs: int = 10
    rate: float = 1.0
    l2: float = 1e-5
    seed: int = 0


def encode_message(tokens: Iterable[str], spam: bool) -> bytes:
    """A learned message for the training set: its label and its hashed tokens."""
    ids = array("Q", sorted({int(t, 16) for t in tokens}))
    return _MESSAGE.pack(1 if spam else 0) + ids.tobytes()


def decode_message(data: bytes) -> tuple[array[int], bool] | None:
    """(tokens, spam) of a stored training message; None when it is not one."""
    if len(data) < _MESSAGE.size or (len(data) - _MESSAGE.size) % 8:
        return None
    (label,) = _MESSAGE.unpack_from(data)
    ids = array("Q")
    ids.frombytes(data[_MESSAGE.size :])
    return ids, label == 1


@dataclass(frozen=True, slots=True)
class Model:
    weights: dict[int, float]
    bias: float
    messages: int  # how many messages it was trained on

    def probability(self, tokens: Iterable[str]) -> float:
        ids = {int(t, 16) for t in tokens}
        if not ids:
            return 0.5
        get = self.weights.get
        return _sigmoid(self.bias + sum(get(i, 0.0) for i in ids) / math.sqrt(len(ids)))

    def encode(self) -> bytes:
        keys = array("Q", self.weights.keys())
        values = array("f", self.weights.values())
        return _MODEL.pack(self.messages, self.bias) + keys.tobytes() + values.tobytes()

    @classmethod
    def decode(cls, data: bytes) -> Model | None:
        body = len(data) - _MODEL.size
        if body < 0 or body % 12:
            return None
        messages, bias = _MODEL.unpack_from(data)
        n = body // 12
        keys, values = array("Q"), array("f")
        keys.frombytes(data[_MODEL.size : _MODEL.size + 8 * n])
        values.frombytes(data[_MODEL.size + 8 * n :])
        return cls(dict(zip(keys, values, strict=True)), bias, messages)


def train(messages: Sequence[tuple[array[int], bool]], options: TrainingOptions) -> Model:
    """Fit the model to every (tokens, spam) message; CPU-bound, run it in a thread."""
    nspam = sum(1 for _, spam in messages if spam)
    nham = len(messages) - nspam
    if not nspam or not nham:
        return Model({}, 0.0, len(messages))
    weigh = {True: len(messages) / (2 * nspam), False: len(messages) / (2 * nham)}
    weights: dict[int, float] = {}
    bias = 0.0
    order = list(range(len(messages)))
    rnd = random.Random(options.seed)
    rate, decay = options.rate, 1.0 - options.rate * options.l2
    for _ in range(options.epochs):
        rnd.shuffle(order)
        for i in order:
            ids, spam = messages[i]
            if not ids:
                continue
            scale = 1.0 / math.sqrt(len(ids))
            p = _sigmoid(bias + sum(weights.get(t, 0.0) for t in ids) * scale)
            g = ((1.0 if spam else 0.0) - p) * weigh[spam]
            step = rate * g * scale
            for t in ids:
                weights[t] = weights.get(t, 0.0) * decay + step
            bias += rate * g * 0.1
    return Model({t: w for t, w in weights.items() if w}, bias, len(messages))
