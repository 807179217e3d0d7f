"""End to end: smtplib -> the real gateway (subprocess) with the shipped attachment policy -> sink.

The policy table is read from ``config.example.toml`` itself, so these tests
prove the shipped default: executables anywhere are refused with a 550 that
names the file, encrypted archives and macro documents are quarantined (250,
never delivered), clean documents are relayed byte for byte.
"""

from __future__ import annotations

import importlib.util
import json
import os
import smtplib
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import GatewayProcess, loopback_overrides
from gateway.testing.sink import SinkServer

_REPO = Path(__file__).resolve().parents[2]


def _builders() -> ModuleType:
    """The real-file builders shared with the pure policy tests."""
    path = _REPO / "tests" / "policies" / "test_attachments_builders.py"
    spec = importlib.util.spec_from_file_location("attachment_builders", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


B = _builders()
OCTET = "application/octet-stream"


def shipped_attachments_table() -> dict[str, Any]:
    with (_REPO / "config.example.toml").open("rb") as fh:
        table: dict[str, Any] = tomllib.load(fh)["policies"]["attachments"]
    return table


@pytest.fixture(scope="module")
def gateway(module_sink: SinkServer, dns_server: DNSServer) -> Iterator[GatewayProcess]:
    overrides = loopback_overrides(
        module_sink, dns_server, {"policies": {"attachments": shipped_attachments_table()}}
    )
    with GatewayProcess(overrides) as gw:
        yield gw


def send(port: int, data: bytes) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.sender.test")
        try:
            client.sendmail("alice@sender.test", ["bob@example.org"], data)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error.decode()
        return 250, ""


def quarantined(gw: GatewayProcess) -> list[dict[str, Any]]:
    cfg = gw.config_path
    listed = subprocess.run(
        [sys.executable, "-m", "gateway", "quarantine", "list", "--json", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ),
    )
    assert listed.returncode == 0, listed.stderr
    items: list[dict[str, Any]] = json.loads(listed.stdout)
    return items


BLOCKED = [
    ("exe", ("setup.exe", B.pe_bytes(), OCTET), "setup.exe"),
    ("double extension", ("invoice.pdf.exe", B.pe_bytes(), OCTET), "invoice.pdf.exe"),
    ("PE disguised as pdf", ("invoice.pdf", B.pe_bytes(), "application/pdf"), "invoice.pdf"),
    ("ELF disguised as jpg", ("photo.jpg", B.elf_bytes(), "image/jpeg"), "photo.jpg"),
    (
        "exe in a zip in a zip",
        ("docs.zip", B.nested_zip(2, "setup.exe", B.pe_bytes()), OCTET),
        "docs.zip > level1.zip > setup.exe",
    ),
    ("scr in tar.gz", ("x.tar.gz", B.tar_gz_bytes({"evil.scr": B.pe_bytes()}), OCTET), "evil.scr"),
    ("bat in 7z", ("x.7z", B.sevenzip_bytes({"run.bat": b"@echo off\r\n"}), OCTET), "run.bat"),
]


@pytest.mark.parametrize(("label", "attachment", "named"), BLOCKED, ids=[b[0] for b in BLOCKED])
def test_executables_are_refused_with_550_naming_the_file(
    label: str,
    attachment: tuple[str, bytes, str],
    named: str,
    gateway: GatewayProcess,
    fresh_sink: SinkServer,
) -> None:
    code, text = send(gateway.smtp_port, B.message(attachment))
    assert code == 550, (label, text)
    assert text.startswith("5.7.1 Message rejected: attachment ")
    assert named in text
    assert fresh_sink.messages == []


QUARANTINED = [
    ("ZipCrypto zip", ("secret.zip", B.zipcrypto_bytes("a.pdf", B.pdf_bytes()), OCTET)),
    ("encrypted 7z", ("secret.7z", B.sevenzip_bytes({"a.pdf": B.pdf_bytes()}, "pw"), OCTET)),
    ("docm", ("report.docm", B.docm_bytes(), OCTET)),
    ("doc with VBA", ("report.doc", B.ole_bytes(), "application/msword")),
]


@pytest.mark.parametrize(("label", "attachment"), QUARANTINED, ids=[q[0] for q in QUARANTINED])
def test_encrypted_archives_and_macros_are_quarantined_not_delivered(
    label: str,
    attachment: tuple[str, bytes, str],
    gateway: GatewayProcess,
    fresh_sink: SinkServer,
) -> None:
    code, text = send(gateway.smtp_port, B.message(attachment, subject=label))
    assert code == 250, text
    reason = f"attachment {attachment[0]}: "
    held = [i for i in quarantined(gateway) if any(r.startswith(reason) for r in i["reasons"])]
    assert len(held) == 1, held
    assert held[0]["mail_from"] == "alice@sender.test"
    assert fresh_sink.messages == []


CLEAN = [
    ("pdf", ("invoice.pdf", B.pdf_bytes(), "application/pdf")),
    ("png", ("photo.png", B.png_bytes(), "image/png")),
    (
        "zip of pdf and png",
        ("docs.zip", B.zip_bytes({"a.pdf": B.pdf_bytes(), "b.png": B.png_bytes()}), OCTET),
    ),
    ("docx", ("report.docx", B.docm_bytes(macros=False), OCTET)),
    ("2 MB pdf", ("big.pdf", B.pdf_bytes(2_000_000), "application/pdf")),
]


@pytest.mark.parametrize(("label", "attachment"), CLEAN, ids=[c[0] for c in CLEAN])
def test_clean_documents_are_relayed_byte_exact(
    label: str,
    attachment: tuple[str, bytes, str],
    gateway: GatewayProcess,
    fresh_sink: SinkServer,
) -> None:
    data = B.message(attachment, subject=label)
    code, text = send(gateway.smtp_port, data)
    assert code == 250, text
    (got,) = fresh_sink.wait_for(1)
    assert got.data.endswith(data)
    assert b"X-Spam-Status: No" in got.data[: len(got.data) - len(data)]


def test_archive_bomb_is_refused_quickly(gateway: GatewayProcess, fresh_sink: SinkServer) -> None:
    bomb = B.zip_bytes({"zeros.bin": b"\0" * 20_000_000})
    code, text = send(gateway.smtp_port, B.message(("bomb.zip", bomb, OCTET)))
    assert code == 550 and "bomb.zip" in text and "ratio" in text
    assert fresh_sink.messages == []
