"""A fast discarding downstream SMTP sink for the benchmark, in its own process.

Postfix's ``smtp-sink`` is used instead when installed (it is the faster
ceiling); this aiosmtpd sink is the fallback.
"""

from __future__ import annotations

import argparse
import asyncio

from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.testing.sink import LongLineSMTP


class Discard:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Ok"


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: LongLineSMTP(Discard(), data_size_limit=None, enable_SMTPUTF8=True), host, port
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
