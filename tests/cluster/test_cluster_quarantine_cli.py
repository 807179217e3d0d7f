"""`quarantine list/show/release/delete` behave the same on every node (PostgreSQL).

tests/integration/test_quarantine_cluster.py covers list, show and release on B
of mail quarantined through A against the machine's server; this adds delete
across nodes, identical listings and filters on both nodes, a release on A of
mail quarantined through B, and two nodes releasing one message at once
(delivered exactly once); a DSN without password plus libpq's PGPASSWORD (as
the compose stack runs it), and no password in any error. The PostgreSQL
servers are throwaway ones (conftest).
"""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gateway.testing.harness import GatewayProcess, write_config
from gateway.testing.sink import SinkServer

ROOT = Path(__file__).resolve().parents[2]


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "quarantine", *args, "--config", str(config)],
        capture_output=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def listing(config: Path, *filters: str) -> list[dict[str, Any]]:
    listed = cli(config, "list", "--json", *filters)
    assert listed.returncode == 0, listed.stderr
    items: list[dict[str, Any]] = json.loads(listed.stdout)
    return items


def quarantine_through(port: int, sender: str) -> None:
    data = (
        f"From: {sender}\r\nTo: x@example.org\r\nSubject: hold\r\n\r\nQUARANTINE-ME\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(sender, ["x@example.org"], data)  # raises unless 250


def test_every_quarantine_command_sees_the_same_store_from_either_node(
    tmp_path: Path, sink: SinkServer, pg_server: Any, node_overrides: Any
) -> None:
    rules = tmp_path / "quarantine.toml"
    rules.write_text(
        '[[rule]]\nname = "TEST_QUARANTINE_ME"\ntype = "body"\npattern = "QUARANTINE-ME"\n'
        'score = 12.0\ndescription = "test marker: scores into the quarantine band"\n'
    )
    overrides = node_overrides(
        {"rules": {"builtin": False, "files": [str(rules)]}},
        {"quarantine.backend": "postgresql", "quarantine.dsn": pg_server.dsn},
    )
    with (
        GatewayProcess(overrides, workdir=tmp_path / "a") as node_a,
        GatewayProcess(overrides, workdir=tmp_path / "b") as node_b,
    ):
        a, b = node_a.config_path, node_b.config_path
        for port, sender in (
            (node_a.smtp_port, "one@sender.test"),
            (node_a.smtp_port, "two@sender.test"),
            (node_b.smtp_port, "three@sender.test"),
            (node_a.smtp_port, "four@sender.test"),
        ):
            quarantine_through(port, sender)
        assert sink.messages == []

        # list: the same items, newest first, and the same filters and paging on both nodes.
        on_a, on_b = listing(a), listing(b)
        assert on_a == on_b
        assert [i["mail_from"] for i in on_b] == [
            "four@sender.test",
            "three@sender.test",
            "two@sender.test",
            "one@sender.test",
        ]
        ids = {i["mail_from"]: i["id"] for i in on_b}
        assert [i["id"] for i in listing(b, "--from", "TWO@sender.test")] == [
            ids["two@sender.test"]
        ]
        assert listing(a, "--limit", "2", "--offset", "1") == on_b[1:3]

        # show: the same bytes from either node.
        shown_a = cli(a, "show", ids["one@sender.test"])
        shown_b = cli(b, "show", ids["one@sender.test"])
        assert shown_a.returncode == 0 and shown_a.stdout == shown_b.stdout
        assert shown_b.stdout.endswith(b"\r\n\r\nQUARANTINE-ME\r\n")

        # delete on B what came through A: gone for A too; a second delete says so.
        deleted = cli(b, "delete", ids["one@sender.test"])
        assert deleted.returncode == 0, deleted.stderr
        assert ids["one@sender.test"] not in {i["id"] for i in listing(a)}
        again = cli(a, "delete", ids["one@sender.test"])
        assert again.returncode == 1
        assert b"no quarantined message with id" in again.stderr

        # release on A what came through B.
        released = cli(a, "release", ids["three@sender.test"])
        assert released.returncode == 0, released.stderr
        (delivered,) = sink.wait_for(1)
        assert delivered.mail_from == "three@sender.test"

        # A and B release the same message at once: it is delivered exactly once.
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda c: cli(c, "release", ids["two@sender.test"]), (a, b)))
        assert sorted(r.returncode for r in results) == [0, 1], results
        assert [m.mail_from for m in sink.messages] == ["three@sender.test", "two@sender.test"]
        assert [i["mail_from"] for i in listing(b)] == ["four@sender.test"]


def test_a_dsn_without_password_works_with_pgpassword_and_failures_never_show_it(
    tmp_path: Path, sink: SinkServer, pg_server_with_password: Any, node_overrides: Any
) -> None:
    """The compose stack keeps the password out of the config (libpq reads PGPASSWORD);
    Kubernetes puts it in the DSN from a Secret. Either way an error never prints it."""
    password = "s3cret-for-tests"  # conftest.PG_PASSWORD
    rules = tmp_path / "quarantine.toml"
    rules.write_text(
        '[[rule]]\nname = "TEST_QUARANTINE_ME"\ntype = "body"\npattern = "QUARANTINE-ME"\n'
        'score = 12.0\ndescription = "test marker: scores into the quarantine band"\n'
    )
    policies = {"rules": {"builtin": False, "files": [str(rules)]}}
    dsn = pg_server_with_password.dsn  # postgresql://postgres@127.0.0.1:PORT/postgres
    overrides = node_overrides(
        policies, {"quarantine.backend": "postgresql", "quarantine.dsn": dsn}
    )
    with GatewayProcess(overrides, workdir=tmp_path / "a", env={"PGPASSWORD": password}) as node:
        quarantine_through(node.smtp_port, "one@sender.test")
        env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
        listed = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "quarantine",
                "list",
                "--json",
                "--config",
                str(node.config_path),
            ],
            capture_output=True,
            timeout=60,
            cwd=ROOT,
            env={**env, "PGPASSWORD": password},
            check=False,
        )
        assert listed.returncode == 0, listed.stderr
        assert [i["mail_from"] for i in json.loads(listed.stdout)] == ["one@sender.test"]
        refused = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "quarantine",
                "list",
                "--config",
                str(node.config_path),
            ],
            capture_output=True,
            timeout=60,
            cwd=ROOT,
            env=env,
            check=False,
        )
        assert refused.returncode == 1 and b"127.0.0.1" in refused.stderr, refused.stderr

    wrong = "wr0ng-" + password
    inline = dsn.replace("postgres@", f"postgres:{wrong}@")
    config = write_config(
        node_overrides(policies, {"quarantine.backend": "postgresql", "quarantine.dsn": inline}),
        tmp_path / "b",
    )
    failed = subprocess.run(
        [sys.executable, "-m", "gateway", "quarantine", "list", "--config", str(config)],
        capture_output=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert failed.returncode == 1
    assert b"127.0.0.1" in failed.stderr and wrong.encode() not in failed.stderr + failed.stdout
