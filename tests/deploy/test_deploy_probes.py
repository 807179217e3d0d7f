"""The probes the Dockerfile and Kubernetes manifests use mean what they promise.

/healthz: the process serves (liveness: restart when it fails). /readyz: the
config is loaded and the downstream answers (readiness: no traffic while it
fails). A real gateway process, a real downstream that goes away and comes back.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import GatewayProcess
from gateway.testing.sink import SinkServer


def get(port: int, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_status(port: int, path: str, status: int, timeout: float = 20.0) -> str:
    end = time.monotonic() + timeout
    while True:
        code, body = get(port, path)
        if code == status:
            return body
        assert time.monotonic() < end, f"{path} stayed {code} {body!r}, wanted {status}"
        time.sleep(0.1)


def test_readyz_follows_the_downstream_while_healthz_stays_up() -> None:
    with (
        DNSServer(zones=("example.org",)) as dns,
        SinkServer() as sink,
        GatewayProcess({"relay.port": sink.port, "dns.nameservers": [dns.address]}) as gw,
    ):
        assert gw.metrics_port
        assert get(gw.metrics_port, "/healthz") == (200, "ok\n")
        wait_status(gw.metrics_port, "/readyz", 200)
        sink.stop()  # the downstream MTA goes away
        reason = wait_status(gw.metrics_port, "/readyz", 503)
        assert reason.strip(), "a 503 from /readyz must say why"
        assert get(gw.metrics_port, "/healthz")[0] == 200, "liveness must not follow the downstream"
        sink.start()  # and comes back on the same port
        wait_status(gw.metrics_port, "/readyz", 200)
