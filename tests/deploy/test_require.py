"""gateway.testing.require: a missing prerequisite skips locally and fails under CI=true."""

from __future__ import annotations

import pytest

from gateway.testing.require import require, require_tool


def test_missing_prerequisite_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no such tool"):
        require(False, "no such tool")


def test_missing_prerequisite_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"required in CI \(CI=true\): no such tool"):
        require(False, "no such tool")


def test_missing_tool_names_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"definitely-absent-tool not found \(apt"):
        require_tool("definitely-absent-tool", "apt-get install it")


def test_present_prerequisite_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    require(True, "unused")
    assert require_tool("sh").endswith("/sh")
