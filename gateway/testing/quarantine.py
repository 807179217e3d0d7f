"""Quarantine records for tests: one place for the defaults, any field overridden."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

from gateway.quarantine import QuarantineItem, new_id

__all__ = ["held_item"]


def held_item(size: int, **fields: Any) -> QuarantineItem:
    """The record of a quarantined message of ``size`` bytes, fresh id, received now."""
    base = QuarantineItem(
        id=new_id(),
        queue_id="Q1",
        received_at=datetime.now(UTC),
        client_ip="192.0.2.7",
        helo="mx.b.test",
        mail_from="a@b.test",
        rcpt_tos=("x@example.org",),
        size=size,
        score=12.0,
        action="quarantine",
        reasons=("spam score 12.00 (X)", "X=12.00"),
        headers=("X-Spam-Flag: YES",),
    )
    return dataclasses.replace(base, **fields)
