"""Releases and "delete as spam" teach the classifier (``quarantine.learn_on_release``).

A person who releases a quarantined message says it is ham; one who deletes
it as spam confirms the verdict. Each message teaches once, whatever happens
after: the first decision wins, on every node, through a quarantine setting
(``learned:<id>``, created once), so a message released to one recipient and
deleted as spam by another is learned as ham only. The CLI, the REST API and
digest links all call :func:`learn_decision`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Mapping
from typing import Protocol, cast

from gateway import metrics
from gateway.quarantine import QuarantineStore

__all__ = ["Learner", "learn_decision", "learner_of"]

log = logging.getLogger("gateway.learning")


class Learner(Protocol):
    """The classifier's training call (:meth:`policies.bayes.BayesPolicy.learn`)."""

    async def learn(self, messages: Iterable[bytes], spam: bool) -> int: ...


def learner_of(policies: Mapping[str, object]) -> Learner | None:
    """The classifier among a pipeline's policies, None when bayes is off."""
    policy = policies.get("bayes")
    return cast(Learner, policy) if policy is not None and hasattr(policy, "learn") else None


async def learn_decision(
    store: QuarantineStore,
    learner: Learner | None,
    id: str,
    raw: bytes,
    *,
    spam: bool,
    enabled: bool = True,
) -> bool:
    """Train ``learner`` on ``raw`` (the stored message) unless this message taught before.

    True when it was learned now. A classifier that fails (state store down) is
    logged and not retried: the decision itself (release, delete) already
    happened and must not be undone by training.
    """
    if not enabled or learner is None:
        return False
    kind = "spam" if spam else "ham"
    mine = f"{kind}:{secrets.token_hex(8)}".encode()
    if await store.setting(f"learned:{id}", mine) != mine:
        return False  # an earlier decision on this message taught already
    try:
        await learner.learn([raw], spam)
    except Exception as exc:
        log.warning(
            "quarantine_learn_failed",
            extra={"id": id, "as": kind, "error": f"{type(exc).__name__}: {exc}"},
        )
        return False
    metrics.QUARANTINE_LEARNED.labels(kind).inc()
    log.info("quarantine_learned", extra={"id": id, "as": kind})
    return True
