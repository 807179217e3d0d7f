"""``gateway run`` serves the web app on ``web.listen``, in one process, with its headers."""

from __future__ import annotations

import json
import smtplib
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.testing.harness import GatewayProcess
from gateway.testing.sink import SinkServer
from gateway.testing.web import TOKEN, web_overrides

GatewayFactory = Callable[..., GatewayProcess]


def fetch(port: int, path: str) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def test_web_listen_serves_the_app_with_a_strict_content_security_policy(
    make_gateway: GatewayFactory, sink: SinkServer
) -> None:
    gw = make_gateway(sink, {"web.listen": "127.0.0.1:0"})
    assert gw.web_port
    status, headers = fetch(gw.web_port, "/r/no-such-link")
    assert status == 403  # the recipient page refusing a link we did not sign
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_web_is_off_by_default(make_gateway: GatewayFactory, sink: SinkServer) -> None:
    gw = make_gateway(sink)
    assert gw.web_port == 0
    assert gw.wait_for_event("gateway_started")["web_port"] is None  # type: ignore[index]


def test_with_workers_one_process_serves_the_web(
    make_gateway: GatewayFactory, sink: SinkServer
) -> None:
    gw = make_gateway(sink, {"web.listen": "127.0.0.1:0", "server.workers": 2})
    status, _ = fetch(gw.web_port, "/r/x")
    assert status == 403
    for _ in range(2):  # both workers up
        assert gw.wait_for_event("gateway_started", match={"worker": 1}) is not None
    started = gw.events("gateway_started")
    assert sorted(bool(e["web_port"]) for e in started) == [False, True]


SPAM = (
    b"From: Deals <deals@shop.test>\r\nTo: bob@example.org\r\nSubject: deals\r\n\r\n"
    b"QUARANTINE-ME now\r\n"
)


def test_release_and_allow_reloads_every_worker_and_the_sender_gets_through(
    make_gateway: GatewayFactory, sink: SinkServer, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[rule]]\nname = "TEST_QUARANTINE_ME"\ntype = "body"\npattern = "QUARANTINE-ME"\n'
        'score = 12.0\ndescription = "test marker"\n'
    )
    allow = tmp_path / "allow.txt"
    allow.write_text("")
    overrides = {
        **web_overrides(sink),
        "server.workers": 2,
        "relay.verify_recipients": False,
        "policies.rules": {"builtin": False, "files": [str(rules)]},
        "policies.lists.lists": [
            {
                "file": str(allow),
                "symbol": "ALLOWLIST_SENDER",
                "score": -100.0,
                "authenticated": False,
            }
        ],
    }
    gw = make_gateway(sink, overrides)
    assert gw.wait_for_event("gateway_started", match={"worker": 1}) is not None
    with smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=30) as client:
        client.sendmail("deals@shop.test", ["bob@example.org"], SPAM)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    listed = api(gw.web_port, "/api/v1/quarantine", headers=auth)
    [item] = listed["items"]
    done = api(
        gw.web_port,
        f"/api/v1/quarantine/{item['id']}/release",
        {"allow_sender": True},
        headers=auth,
    )
    assert done["listed"] == "deals@shop.test"
    assert len(sink.wait_for(1)) == 1
    assert gw.wait_for_event("config_reloaded", after=1) is not None  # both workers reloaded
    with smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=30) as client:
        for _ in range(4):  # both workers take connections: each must know the new entry
            client.sendmail("deals@shop.test", ["bob@example.org"], SPAM)
    assert len(sink.wait_for(5)) == 5
    assert api(gw.web_port, "/api/v1/quarantine", headers=auth)["items"] == []


def api(
    port: int,
    path: str,
    body: dict[str, object] | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        headers={**(headers or {}), "Content-Type": "application/json"},
        method="POST" if data is not None else "GET",
    )
    with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 -- our loopback URL
        return dict(json.loads(r.read()))
