"""Skip a test when an external tool is missing locally, but never in CI.

Tests that drive real components (Postfix, promtool) cannot run everywhere. A
silent skip in CI would let the proof quietly disappear, so under ``CI=true``
(what ``.ci/run`` sees on the CI runner) a missing prerequisite fails the test
instead, with the same reason.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

__all__ = ["in_ci", "require", "require_root", "require_tool"]


def in_ci() -> bool:
    """True on the CI runner, where every test must actually run."""
    return os.environ.get("CI", "").lower() == "true"


def _missing(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"required in CI (CI=true): {reason}", pytrace=False)
    pytest.skip(reason)


def require(condition: object, reason: str) -> None:
    """Skip (locally) or fail (under CI=true) unless ``condition`` holds."""
    if not condition:
        _missing(reason)


def require_tool(name: str, hint: str = "") -> str:
    """Return the path of executable ``name``; skip/fail with an install hint when absent.

    Looks in ``PATH`` and then ``/usr/sbin`` and ``/sbin``, where Debian puts
    daemons such as ``postfix`` that a non-login root shell may not have.
    """
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        _missing(f"{name} not found{' (' + hint + ')' if hint else ''}")
    return path


def require_root(reason: str) -> None:
    """Skip/fail unless running as root (e.g. to start a Postfix master)."""
    require(hasattr(os, "geteuid") and os.geteuid() == 0, reason)
