"""Small generated spam and ham for classifier tests (never the corpus)."""

from __future__ import annotations

import random

__all__ = ["HAMMY", "SPAMMY", "training_message"]

SPAMMY = [
    "viagra",
    "casino",
    "lottery",
    "winner",
    "cash",
    "bonus",
    "prize",
    "guaranteed",
    "refinance",
    "discount",
]
HAMMY = [
    "kernel",
    "patch",
    "review",
    "branch",
    "commit",
    "changelog",
    "compiler",
    "debugger",
    "agenda",
    "minutes",
]


def training_message(
    spam: bool,
    n: int,
    rng: random.Random,
    *,
    sender: str | None = None,
    rcpt: str = "bob@example.org",
    domain: str = "test.example",
) -> bytes:
    """Message ``n`` of its class: 30 words from that class's vocabulary, unique Message-ID."""
    words = SPAMMY if spam else HAMMY
    body = " ".join(rng.choice(words) for _ in range(30))
    sender = sender or ("promo@deals.example" if spam else "dev@project.example")
    return (
        f"From: {sender}\r\nTo: {rcpt}\r\n"
        f"Subject: {' '.join(rng.choice(words) for _ in range(3))}\r\n"
        "Date: Mon, 01 Jul 2024 10:00:00 +0000\r\n"
        f"Message-ID: <{'s' if spam else 'h'}{n}@{domain}>\r\n\r\n{body}\r\n"
    ).encode()
