"""Malware scanning with clamd: the raw message in one ``zINSTREAM``.

One stream per message, the message as received: clamd decodes MIME
(base64, quoted-printable, uuencode) and opens archives itself, with its own
limits, so a single round trip covers every part. Measured against one stream
per part in docs/performance.md. Only when clamd finds something are the parts
sent again one by one, to name the file in the symbol's detail.

A finding forces ``on_virus`` (default reject: ``550 5.7.1 ... message contains
a virus (<signature>)``). When clamd cannot answer, ``on_error`` decides:
``tempfail`` (the default) defers the message, so no unscanned mail gets
through unless the admin chooses ``accept``. A message over
``max_stream_size`` (keep it at or below clamd's ``StreamMaxLength``) is not
sent and gets ``AV_SKIPPED_TOO_LARGE``, with ``on_too_large`` deciding.
"""

from __future__ import annotations

import asyncio
import logging
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Literal

from gateway.api import Action, Context, OptionError, Policy, Result, Symbol, SymbolDef
from policies._clamd import (
    ClamdAddress,
    ClamdClient,
    ClamdError,
    ClamdTimeoutError,
    ScanReply,
    Verdict,
    parse_address,
)
from policies._mime_walk import walk_message

__all__ = ["AntivirusOptions", "AntivirusPolicy"]

log = logging.getLogger("gateway.policies.antivirus")

_FORCE: dict[str, Action | None] = {
    "reject": Action.REJECT,
    "quarantine": Action.QUARANTINE,
    "add_header": Action.ADD_HEADER,
    "tempfail": Action.TEMPFAIL,
    "accept": None,
    "score": None,
}
_LOCATE_DEPTH = 20
_PING_TIMEOUT = 2.0  # well inside /readyz's own 5 s, so its 503 names clamd


@dataclass(frozen=True, slots=True)
class AntivirusOptions:
    """``[policies.antivirus]``; sizes in bytes, times in seconds."""

    address: str = "127.0.0.1:3310"  # or "unix:/run/clamav/clamd.ctl"
    connect_timeout: float = 1.0
    read_timeout: float = 5.0  # sending the message and waiting for the verdict
    max_stream_size: int = 26_214_400  # Debian's StreamMaxLength 25M = server.max_message_size
    max_connections: int = 10  # scans in flight to clamd at once (its MaxThreads is 10)
    locate_parts: int = 50  # after a find, parts rescanned one by one to name the file
    on_virus: Literal["reject", "quarantine", "add_header", "score"] = "reject"
    on_error: Literal["tempfail", "accept"] = "tempfail"
    on_too_large: Literal["accept", "quarantine", "reject"] = "accept"
    _address: ClamdAddress = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "_address", parse_address(self.address))
        except ValueError as exc:
            raise OptionError("address", str(exc)) from None
        for key in ("connect_timeout", "read_timeout"):
            if getattr(self, key) <= 0:
                raise OptionError(key, "must be a number of seconds > 0")
        for key in ("max_stream_size", "max_connections"):
            if getattr(self, key) < 1:
                raise OptionError(key, "must be at least 1")
        if self.locate_parts < 0:
            raise OptionError("locate_parts", "must be 0 (do not locate) or more")


class AntivirusPolicy(Policy):
    name = "antivirus"
    symbols = {
        "AV_VIRUS": SymbolDef(20.0, "clamd found malware; detail: signature and part"),
        "AV_ERROR": SymbolDef(
            0.0, "clamd could not be reached, failed or refused the stream; not scanned"
        ),
        "AV_TIMEOUT": SymbolDef(0.0, "clamd did not answer within read_timeout; not scanned"),
        "AV_SKIPPED_TOO_LARGE": SymbolDef(0.0, "message over max_stream_size; not scanned"),
    }
    Options = AntivirusOptions

    def __init__(self, options: AntivirusOptions) -> None:
        super().__init__(options)
        self.options: AntivirusOptions = options
        self._client: ClamdClient | None = None

    @property
    def client(self) -> ClamdClient:
        # Created on first use, inside the running loop that owns its semaphore.
        if self._client is None:
            self._client = ClamdClient(
                self.options._address,
                connect_timeout=self.options.connect_timeout,
                read_timeout=self.options.read_timeout,
                limit=self.options.max_connections,
            )
        return self._client

    async def ready(self) -> str | None:
        """``zPING``: not ready when clamd is down and that would defer every message."""
        if self.options.on_error == "accept":
            return None  # mail flows unscanned by the admin's choice; the symbol says so
        try:
            async with asyncio.timeout(_PING_TIMEOUT):
                await self.client.ping()
        except TimeoutError:
            return f"antivirus: clamd at {self.options._address} did not answer PING"
        except ClamdError as exc:
            return f"antivirus: {exc}"
        return None

    async def check(self, ctx: Context) -> Result:
        opts = self.options
        if len(ctx.raw) > opts.max_stream_size:
            return self._too_large(
                f"{len(ctx.raw)} bytes, over max_stream_size {opts.max_stream_size}"
            )
        started = time.monotonic()
        try:
            reply = await self.client.scan(ctx.raw)
        except ClamdTimeoutError as exc:
            return self._failed("AV_TIMEOUT", str(exc), ctx)
        except ClamdError as exc:
            return self._failed("AV_ERROR", str(exc), ctx)
        if reply.verdict is Verdict.TOO_LARGE:
            # A config mismatch, not a property of the message: on_error, and loud.
            detail = (
                f"clamd refused {len(ctx.raw)} bytes as over its StreamMaxLength; "
                "keep max_stream_size at or below it"
            )
            return self._failed("AV_ERROR", detail, ctx)
        if reply.verdict is Verdict.CLEAN:
            return Result()
        signature = _shown(reply.signature)
        budget = opts.read_timeout - (time.monotonic() - started)
        where = await self._locate(ctx, reply, budget)
        log.info(
            "antivirus_found",
            extra={"queue_id": ctx.queue_id, "signature": signature, "part": where},
        )
        return Result(
            symbols=(Symbol("AV_VIRUS", detail=f"{signature} in {where}"),),
            force=_FORCE[opts.on_virus],
            reason=f"message contains a virus ({signature})",
        )

    async def _locate(self, ctx: Context, found: ScanReply, budget: float) -> str:
        """The first part clamd flags on its own, decoded; ``message`` when none alone is."""
        limit = self.options.locate_parts
        if limit == 0 or budget <= 0:
            return "message"
        walk = walk_message(ctx.message, ctx.raw, max_depth=_LOCATE_DEPTH, max_parts=limit)
        try:
            async with asyncio.timeout(budget):
                for part in walk.parts:
                    data = part.content(full=True).data
                    if not data:
                        continue
                    reply = await self.client.scan(data)
                    if reply.verdict is Verdict.FOUND:
                        return _shown(part.label)
        except (TimeoutError, ClamdError):
            pass  # the verdict stands on the whole-message scan; only the name is missing
        return "message"

    def _failed(self, symbol: str, detail: str, ctx: Context) -> Result:
        log.warning(
            "antivirus_unavailable",
            extra={"queue_id": ctx.queue_id, "symbol": symbol, "detail": detail},
        )
        force = _FORCE[self.options.on_error]
        reason = "virus scanner unavailable" if force is not None else ""
        return Result(symbols=(Symbol(symbol, detail=detail),), force=force, reason=reason)

    def _too_large(self, detail: str) -> Result:
        force = _FORCE[self.options.on_too_large]
        reason = "message too large to scan for viruses" if force is not None else ""
        return Result(
            symbols=(Symbol("AV_SKIPPED_TOO_LARGE", detail=detail),), force=force, reason=reason
        )


def _shown(text: str, limit: int = 120) -> str:
    """Printable, bounded: signatures and file names reach headers and SMTP replies."""
    out = "".join("?" if unicodedata.category(c) in ("Cc", "Cf") else c for c in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."
