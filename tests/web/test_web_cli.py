"""``gateway web hash-password`` / ``new-token``: hashes the config accepts and verifies."""

from __future__ import annotations

import io

import pytest

from gateway.__main__ import main
from gateway.config import WebConfig
from gateway.web.hashes import verify_secret


def test_hash_password_reads_stdin_and_prints_a_hash_the_config_accepts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse battery\n"))
    assert main(["web", "hash-password"]) == 0
    hashed = capsys.readouterr().out.strip()
    assert verify_secret("correct horse battery", hashed)
    assert not verify_secret("correct horse", hashed)
    WebConfig(admin_password_hash=hashed)  # validates


def test_hash_password_refuses_a_short_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["web", "hash-password"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "8 to 1024 bytes" in out.err


def test_new_token_prints_a_token_and_its_hash(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["web", "new-token"]) == 0
    lines = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines()[:2])
    assert verify_secret(lines["token"].strip(), lines["hash"].strip())
