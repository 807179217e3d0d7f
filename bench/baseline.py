"""The do-nothing relay the gateway is measured against: aiosmtpd -> aiosmtplib.

No parsing, no policies, no headers: it hands each message to the downstream
over a small pool of reused connections, and answers DATA only after the
downstream accepted it, like the gateway. This is the floor of what a Python
SMTP proxy costs on this machine. It runs on uvloop when installed, as the
gateway does (``--loop asyncio`` for the stock loop).
"""

from __future__ import annotations

import argparse
import asyncio

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.testing.sink import LongLineSMTP


class Forward:
    def __init__(self, host: str, port: int, pool: int = 16) -> None:
        self.host, self.port = host, port
        self.idle: list[aiosmtplib.SMTP] = []
        self.pool = pool

    async def _client(self) -> aiosmtplib.SMTP:
        while self.idle:
            c = self.idle.pop()
            if c.is_connected:
                return c
        c = aiosmtplib.SMTP(hostname=self.host, port=self.port, timeout=60, start_tls=False)
        await c.connect()
        return c

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        client = await self._client()
        try:
            await client.sendmail(
                envelope.mail_from or "", envelope.rcpt_tos, envelope.original_content or b""
            )
        except (aiosmtplib.SMTPException, OSError):
            client.close()
            return "451 4.4.1 downstream failed"
        if len(self.idle) < self.pool:
            self.idle.append(client)
        else:
            client.close()
        return "250 2.0.0 Ok"


async def serve(port: int, relay_port: int) -> None:
    loop = asyncio.get_running_loop()
    handler = Forward("127.0.0.1", relay_port)
    server = await loop.create_server(
        lambda: LongLineSMTP(handler, data_size_limit=None, enable_SMTPUTF8=True), "127.0.0.1", port
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--relay-port", type=int, required=True)
    ap.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="uvloop",
        help="event loop; uvloop (when installed) as the gateway uses it, so the comparison "
        "measures the gateway's work, not the loop",
    )
    args = ap.parse_args()
    factory = asyncio.new_event_loop
    if args.loop == "uvloop":
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args.port, args.relay_port))


if __name__ == "__main__":
    main()
