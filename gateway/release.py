"""Releasing a quarantined message: one function for the CLI, the REST API and digest links.

A release claims the message first (two operators or nodes never deliver it
twice), relays the stored bytes with the stored headers prepended and the
original envelope (all recipients, or some), then removes what was delivered:
the whole message, or only those recipients (the others keep their copy).
A relay failure gives the claim back and leaves the message as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.config import Config
from gateway.headers import prepend
from gateway.quarantine import QuarantineError, QuarantineItem, QuarantineStore
from gateway.relay import Relay, RelayError
from gateway.xforward import Forwarded

__all__ = ["ReleaseBusy", "ReleaseError", "ReleaseFailed", "Released", "release"]

_CLAIM_SECONDS = 600.0  # a release holds its message this long at most (relay.timeout is 60 s)


class ReleaseError(Exception):
    """The release did not happen; the message is still in quarantine as it was."""


class ReleaseBusy(ReleaseError):
    """Another release holds the message right now (``hold`` seconds at most)."""

    def __init__(self, id: str, hold: float) -> None:
        super().__init__(f"{id} is being released by another command right now")
        self.hold = hold


class ReleaseFailed(ReleaseError):
    """The downstream did not take the message (``said``: its reply or the failure)."""

    def __init__(self, id: str, said: str) -> None:
        super().__init__(f"release of {id} failed: {said}")
        self.said = said


@dataclass(frozen=True, slots=True)
class Released:
    """The downstream took the message for ``accepted`` with ``reply``.

    ``remaining`` are the recipients still held; ``kept_error`` is set when the
    delivered copy could not be removed from quarantine (a second release would
    deliver twice: the caller tells someone).
    """

    accepted: tuple[str, ...]
    refused: tuple[str, ...]
    reply: tuple[int, str]
    remaining: tuple[str, ...]
    kept_error: str | None = None


async def release(
    config: Config,
    store: QuarantineStore,
    item: QuarantineItem,
    raw: bytes,
    rcpts: Sequence[str] | None = None,
) -> Released:
    """Deliver ``item`` to ``rcpts`` (default all of its recipients), then remove it for them.

    ``rcpts`` must be recipients of the item (the caller checks: a ValueError
    otherwise). Raises ReleaseBusy or ReleaseFailed; never leaves a claim held
    after a failure.
    """
    wanted = {r.lower() for r in rcpts} if rcpts is not None else None
    targets = tuple(r for r in item.rcpt_tos if wanted is None or r.lower() in wanted)
    if not targets or (wanted is not None and len(targets) < len(wanted)):
        raise ValueError(f"not recipients of {item.id}: {sorted(wanted or ())}")
    hold = max(_CLAIM_SECONDS, config.relay.timeout * 10)
    if not await store.claim(item.id, hold):
        raise ReleaseBusy(item.id, hold)
    relay = Relay(config.relay, config.server.hostname)
    # XFORWARD: what the stored envelope knows of the client (no name, port or protocol).
    client = Forwarded(
        addr=item.client_ip, helo=item.helo or None, ident=item.queue_id, source="REMOTE"
    )
    try:
        result = await relay.send(
            item.mail_from, targets, prepend(raw, list(item.headers)), client=client
        )
    except RelayError as exc:
        await store.unclaim(item.id)
        said = f"{exc.code} {exc.text}" if exc.code is not None else exc.text
        raise ReleaseFailed(
            item.id, f"downstream {config.relay.host}:{config.relay.port}: {said}"
        ) from None
    finally:
        await relay.close()
    accepted = tuple(result.accepted)
    refused = tuple(r for r in targets if r not in accepted)
    remaining: tuple[str, ...] = ()
    try:
        if len(targets) == len(item.rcpt_tos):
            await store.delete(item.id)
        else:
            remaining = await store.drop_recipients(item.id, targets) or ()
            await store.unclaim(item.id)  # the other recipients can be released now
    except QuarantineError as exc:
        return Released(accepted, refused, result.reply, remaining, kept_error=str(exc))
    return Released(accepted, refused, result.reply, remaining)
