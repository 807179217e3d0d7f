"""``gateway run`` serves the web app on ``web.listen``, in one process, with its headers."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable

from gateway.testing.harness import GatewayProcess
from gateway.testing.sink import SinkServer

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
    status, headers = fetch(gw.web_port, "/r/no-such-page")
    assert status == 404
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
    assert status == 404
    for _ in range(2):  # both workers up
        assert gw.wait_for_event("gateway_started", match={"worker": 1}) is not None
    started = gw.events("gateway_started")
    assert sorted(bool(e["web_port"]) for e in started) == [False, True]
