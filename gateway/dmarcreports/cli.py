"""``gateway dmarc-report preview|send``: look at the reports, or send what is due now.

``preview`` prints the XML of every report not yet sent (the interval in
progress too), one document after the other; ``--domain`` picks one policy
domain. ``send`` does what the schedule in ``gateway run`` does (under the same
lease, so it never races a running gateway) and prints one line per outcome;
exit 1 when a report failed. ``--now`` sends as if it were that time (catching
up, tests).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import TextIO

from gateway.api import StateUnavailableError
from gateway.config import Config, ConfigError, load_config

__all__ = ["add_parser", "run"]


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    rep = sub.add_parser(
        "dmarc-report", parents=[common], help="DMARC aggregate reports: preview or send now"
    )
    rsub = rep.add_subparsers(dest="rcommand", required=True, metavar="ACTION")
    preview = rsub.add_parser(
        "preview", parents=[common], help="print the XML of the reports not sent yet"
    )
    preview.add_argument("--domain", default=None, help="only this policy domain")
    send = rsub.add_parser("send", parents=[common], help="send the reports that are due")
    send.add_argument(
        "--now",
        type=float,
        default=None,
        metavar="EPOCH",
        help="send as if it were this UNIX time (default: now)",
    )


def _when(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%MZ")


async def run(args: argparse.Namespace, out: TextIO) -> int:
    from gateway.dmarcreports.sender import ReportSender
    from gateway.dmarcreports.store import open_report_store
    from gateway.dns import CachingResolver
    from gateway.relay import Relay

    try:
        config: Config = load_config(args.config)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 1
    if not config.dmarc_reports.enabled:
        print(
            "gateway: dmarc_reports.enabled is false in this config: nothing is recorded "
            "or sent (docs/dmarc-reports.md)",
            file=sys.stderr,
        )
        return 2
    store = open_report_store(config)
    resolver = CachingResolver(config.dns)
    relay = Relay(config.relay, config.server.hostname)
    sender = ReportSender(lambda: config, store, lambda: resolver, lambda: relay)
    try:
        if args.rcommand == "preview":
            reports = await sender.reports(args.domain)
            if not reports:
                print("no DMARC report rows recorded (or all sent)", file=sys.stderr)
            for _report, xml in reports:
                out.write(xml.decode("utf-8"))
            return 0
        outcomes = await sender.send_due(args.now)
    except StateUnavailableError as exc:
        print(f"gateway: cannot reach the report store: {exc}", file=sys.stderr)
        return 1
    finally:
        await relay.close()
        await store.close()
    for o in outcomes:
        when = _when(o.interval) if o.interval else "-"
        where = o.destination or "-"
        detail = f" ({o.detail})" if o.detail else ""
        print(f"{o.outcome} {o.reason} {o.domain or '-'} {where} {when}{detail}", file=out)
    if not outcomes:
        print("nothing due", file=out)
    return 1 if any(o.outcome == "failed" for o in outcomes) else 0
