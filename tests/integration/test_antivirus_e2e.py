"""End to end: smtplib -> the real gateway (subprocess) with the antivirus policy -> real clamd.

The ``[policies.antivirus]`` table is the shipped one from ``config.example.toml``
(enabled, pointed at the test clamd). EICAR is refused with a 550 that names
the signature, a clean message is relayed byte for byte, and with clamd down
mail is deferred (451) and ``/readyz`` says why until clamd is back.
"""

from __future__ import annotations

import importlib.util
import smtplib
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gateway.testing.clamd import EICAR, ThrowawayClamd
from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import GatewayProcess, loopback_overrides
from gateway.testing.sink import SinkServer

_REPO = Path(__file__).resolve().parents[2]
OCTET = "application/octet-stream"


def _builders() -> ModuleType:
    path = _REPO / "tests" / "policies" / "test_attachments_builders.py"
    spec = importlib.util.spec_from_file_location("attachment_builders", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


B = _builders()


def antivirus_table(address: str) -> dict[str, Any]:
    with (_REPO / "config.example.toml").open("rb") as fh:
        table: dict[str, Any] = tomllib.load(fh)["policies"]["antivirus"]
    return {**table, "enabled": True, "address": address}


def send(port: int, data: bytes) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.sender.test")
        try:
            client.sendmail("alice@sender.test", ["bob@example.org"], data)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error.decode()
        return 250, ""


def readyz(gw: GatewayProcess) -> tuple[int, str]:
    url = f"http://127.0.0.1:{gw.metrics_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_ready(gw: GatewayProcess, status: int, timeout: float = 20.0) -> str:
    end = time.monotonic() + timeout
    while True:
        code, body = readyz(gw)
        if code == status:
            return body
        assert time.monotonic() < end, f"/readyz stayed {code} {body!r}, wanted {status}"
        time.sleep(0.1)


@pytest.fixture
def clamd(tmp_path: Path) -> Iterator[ThrowawayClamd]:
    with ThrowawayClamd(tmp_path / "clamd") as server:
        yield server


@pytest.fixture
def gateway(
    clamd: ThrowawayClamd, module_sink: SinkServer, dns_server: DNSServer
) -> Iterator[GatewayProcess]:
    overrides = loopback_overrides(
        module_sink, dns_server, {"policies": {"antivirus": antivirus_table(clamd.address)}}
    )
    with GatewayProcess(overrides) as gw:
        yield gw


def test_eicar_is_refused_with_550_naming_the_signature(
    gateway: GatewayProcess, fresh_sink: SinkServer
) -> None:
    code, text = send(gateway.smtp_port, B.message(("eicar.zip", B.zip_bytes({"e": EICAR}), OCTET)))
    assert code == 550
    assert text == "5.7.1 Message rejected: message contains a virus (Eicar-Test.UNOFFICIAL)"
    assert fresh_sink.messages == []


def test_clean_message_is_relayed_byte_exact_and_readyz_is_green(
    gateway: GatewayProcess, fresh_sink: SinkServer
) -> None:
    data = B.message(("invoice.pdf", B.pdf_bytes(), "application/pdf"))
    assert send(gateway.smtp_port, data) == (250, "")
    (got,) = fresh_sink.wait_for(1)
    assert got.data.endswith(data)
    assert wait_ready(gateway, 200) == "ready\n"


def test_clamd_down_defers_mail_with_451_and_readyz_says_why_until_it_is_back(
    clamd: ThrowawayClamd, gateway: GatewayProcess, fresh_sink: SinkServer
) -> None:
    clamd.stop()
    code, text = send(gateway.smtp_port, B.message(text="hello\n"))
    assert code == 451
    assert text == "4.7.1 Message deferred: virus scanner unavailable; try again later"
    assert fresh_sink.messages == []
    body = wait_ready(gateway, 503)
    assert body.startswith("not ready: antivirus: cannot connect to clamd at 127.0.0.1:")
    clamd.start()
    wait_ready(gateway, 200)
    assert send(gateway.smtp_port, B.message(text="hello again\n")) == (250, "")
    assert len(fresh_sink.wait_for(1)) == 1
