"""Signed recipient links: what lets a digest's reader release or delete without logging in.

A link is ``<payload>.<mac>``, both base64url: the payload names the action,
the quarantine id, the expiry (Unix seconds) and the recipient; the MAC is
HMAC-SHA256 over it with the link key, compared in constant time. So a link
is bound to one message, one recipient and one action, and stops working at
its expiry. It acts only while that recipient still waits for the message
(a recipient of the item's ``rcpt_tos``): after a release or delete for them
the same link is refused (single use), and the store's claim keeps two nodes
from acting on one message at once. :func:`mark_used` records the use, so a
replay is told apart from a message gone for another reason.

The key: ``web.link_key_file`` (created 0600 on first start when missing;
refused when others can read it), or, when that is empty, 32 random bytes
kept in the quarantine (``setting("web.link_key")``): every node of a
cluster sharing PostgreSQL signs and checks with the same key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from gateway.config import WebConfig
from gateway.quarantine import QuarantineItem, QuarantineStore, valid_id

__all__ = [
    "ACTIONS",
    "Link",
    "LinkError",
    "LinkExpired",
    "LinkGone",
    "LinkKeyError",
    "LinkTampered",
    "authorize",
    "link_key",
    "mark_used",
    "sign",
    "verify",
]

Action = Literal["release", "delete"]
ACTIONS: tuple[Action, ...] = ("release", "delete")

_VERSION = "1"
_KEY_BYTES = 32
_MAX_LINK = 2048  # characters: a longer "link" is not one of ours, refuse before decoding
_SETTING_KEY = "web.link_key"


class LinkError(Exception):
    """A link that does not authorise anything; ``status`` is the HTTP status to answer."""

    status = 400


class LinkTampered(LinkError):
    """Malformed, or not signed with our key: altered, truncated or forged."""

    status = 403


class LinkExpired(LinkError):
    status = 410


class LinkGone(LinkError):
    """Valid, but the message is no longer held for that recipient (used, released, purged)."""

    status = 410

    def __init__(self, message: str, *, used: str = "") -> None:
        super().__init__(message)
        self.used = used  # what the earlier use of this link did, when it was one


class LinkKeyError(Exception):
    """The key file cannot be read, created, or is readable by others."""


@dataclass(frozen=True, slots=True)
class Link:
    action: Action
    id: str
    rcpt: str
    expires: int  # Unix seconds

    @property
    def expires_at(self) -> datetime:
        return datetime.fromtimestamp(self.expires, UTC)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest()


def sign(key: bytes, action: Action, id: str, rcpt: str, expires: int) -> str:
    """The token for one action on one message for one recipient, valid until ``expires``."""
    if action not in ACTIONS or not valid_id(id) or not rcpt:
        raise ValueError(f"cannot sign {action!r} for {id!r} / {rcpt!r}")
    payload = "|".join((_VERSION, action, id, str(int(expires)), rcpt)).encode()
    return f"{_b64(payload)}.{_b64(_mac(key, payload))}"


def verify(key: bytes, token: str, now: float | None = None) -> Link:
    """The link ``token`` stands for; LinkTampered or LinkExpired when it authorises nothing."""
    if len(token) > _MAX_LINK or token.count(".") != 1:
        raise LinkTampered("this link is damaged or was not issued by this gateway")
    body, mac = token.split(".")
    try:
        payload, given = _unb64(body), _unb64(mac)
    except (binascii.Error, ValueError):
        raise LinkTampered("this link is damaged or was not issued by this gateway") from None
    # One spelling per link: the last base64 character carries unused bits, so an
    # altered link could otherwise decode to the same bytes and still verify.
    if _b64(payload) != body or _b64(given) != mac:
        raise LinkTampered("this link is damaged or was not issued by this gateway")
    if not hmac.compare_digest(_mac(key, payload), given):
        raise LinkTampered("this link is damaged or was not issued by this gateway")
    # Signed by us, so well-formed unless the format changed: still parse defensively.
    parts = payload.decode("utf-8", "replace").split("|", 4)
    if len(parts) != 5 or parts[0] != _VERSION or parts[1] not in ACTIONS:
        raise LinkTampered("this link is from an incompatible version of the gateway")
    _, action, id, expires, rcpt = parts
    if not valid_id(id) or not expires.isdigit():
        raise LinkTampered("this link is damaged or was not issued by this gateway")
    link = Link(action, id, rcpt, int(expires))  # type: ignore[arg-type]
    if (time.time() if now is None else now) >= link.expires:
        raise LinkExpired(
            f"this link expired on {link.expires_at:%Y-%m-%d %H:%M} UTC; "
            "the next digest has fresh links"
        )
    return link


def _used_name(link: Link) -> str:
    digest = hashlib.sha256(f"{link.id}|{link.rcpt.lower()}".encode()).hexdigest()[:32]
    return f"link-used:{digest}"


async def authorize(store: QuarantineStore, link: Link) -> tuple[QuarantineItem, bytes]:
    """The message ``link`` may act on, still held for its recipient; LinkGone otherwise."""
    got = await store.get(link.id)
    if got is not None and link.rcpt.lower() in {r.lower() for r in got[0].rcpt_tos}:
        return got
    # Past this point the link can never act again (a recipient is never added back,
    # ids are never reused), so reading the use marker (which creates it) is safe.
    used = (await store.setting(_used_name(link), b"")).decode("utf-8", "replace")
    if used:
        raise LinkGone("this link was used already", used=used)
    raise LinkGone("this message is no longer in quarantine for you")


async def mark_used(store: QuarantineStore, link: Link, what: str) -> None:
    """Record that ``link``'s recipient acted (``what``: e.g. "released at ..."), for replays."""
    await store.setting(_used_name(link), what.encode())


async def link_key(config: WebConfig, base_dir: Path, store: QuarantineStore) -> bytes:
    """The HMAC key: from ``link_key_file`` (created when missing), else kept in the quarantine."""
    if not config.link_key_file:
        return await store.setting(_SETTING_KEY, secrets.token_bytes(_KEY_BYTES))
    return await asyncio.to_thread(_key_from_file, config.link_key_file, base_dir)


def _key_from_file(name: str, base_dir: Path) -> bytes:
    path = Path(name).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.exists():
        _create_key_file(path)
    try:
        if path.stat().st_mode & 0o077:
            raise LinkKeyError(
                f"web.link_key_file: {path} is readable by others; chmod 600 it "
                "(anyone with the key can release quarantined mail)"
            )
        text = path.read_text("ascii").strip()
        key = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LinkKeyError(
            f"web.link_key_file: {path} must hold a hex key (at least {_KEY_BYTES} bytes): {exc}"
        ) from None
    if len(key) < _KEY_BYTES:
        raise LinkKeyError(
            f"web.link_key_file: {path} holds {len(key)} bytes, at least {_KEY_BYTES} needed; "
            f"write one with: openssl rand -hex {_KEY_BYTES} > {path}"
        )
    return key


def _create_key_file(path: Path) -> None:
    """A new random key at ``path``, 0600, atomically: a process racing us reads a whole key."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(_KEY_BYTES) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):  # another process was first: keep theirs
            os.link(tmp, path)
    except OSError as exc:
        raise LinkKeyError(f"web.link_key_file: cannot create {path}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
