"""A fast discarding downstream SMTP sink for the benchmark, in its own process.

Postfix's ``smtp-sink`` is used instead when installed (it is the faster
ceiling); this aiosmtpd sink is the fallback. ``--pipelining`` offers
PIPELINING (RFC 2920) in EHLO, as ``smtp-sink`` does unless ``-p``
(aiosmtpd reads pipelined commands in order either way).
"""

from __future__ import annotations

import argparse
import asyncio

from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.testing.sink import LongLineSMTP


class Discard:
    def __init__(self, pipelining: bool = False) -> None:
        self.pipelining = pipelining

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Ok"


async def serve(host: str, port: int, pipelining: bool = False) -> None:
    loop = asyncio.get_running_loop()
    handler = Discard(pipelining)
    server = await loop.create_server(
        lambda: LongLineSMTP(handler, data_size_limit=None, enable_SMTPUTF8=True), host, port
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--pipelining", action="store_true", help="offer PIPELINING in EHLO")
    args = ap.parse_args()
    asyncio.run(serve(args.host, args.port, args.pipelining))


if __name__ == "__main__":
    main()
