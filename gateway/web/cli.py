"""``gateway web hash-password`` and ``gateway web new-token``: secrets for the config.

``hash-password`` reads the secret on standard input (never an argument:
arguments show in ``ps`` and shell history) and prints its hash for
``web.admin_password_hash`` or ``web.api_token_hashes``. ``new-token`` makes
a random bearer token and prints it with its hash: the token goes to the
script, the hash into the config.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import secrets
import sys
from typing import TextIO

from gateway.web.hashes import MAX_SECRET, hash_secret

__all__ = ["add_parser", "run"]

_MIN_PASSWORD = 8


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    web = sub.add_parser("web", help="secrets for the web UI and REST API (no --config needed)")
    wsub = web.add_subparsers(dest="wcommand", required=True, metavar="ACTION")
    wsub.add_parser(
        "hash-password",
        help="read a password (or token) on stdin, print its hash for the [web] config",
    )
    wsub.add_parser("new-token", help="print a new random API token and its hash")


def _read_secret(stdin: TextIO) -> str:
    if stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise ValueError("the two passwords differ; nothing printed")
        return first
    return stdin.readline().rstrip("\r\n")


async def run(args: argparse.Namespace, out: TextIO) -> int:
    if args.wcommand == "new-token":
        token = secrets.token_urlsafe(32)
        hashed = await asyncio.to_thread(hash_secret, token)
        print(f"token: {token}", file=out)
        print(f"hash:  {hashed}", file=out)
        print("Give the token to the script (Authorization: Bearer <token>);", file=out)
        print("add the hash to web.api_token_hashes.", file=out)
        return 0
    try:
        secret = _read_secret(sys.stdin)
    except ValueError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    if len(secret) < _MIN_PASSWORD or len(secret.encode()) > MAX_SECRET:
        print(
            f"gateway: the password must be {_MIN_PASSWORD} to {MAX_SECRET} bytes long "
            "(one line on stdin)",
            file=sys.stderr,
        )
        return 2
    print(await asyncio.to_thread(hash_secret, secret), file=out)
    return 0
