"""Project-wide test settings.

Every server a test starts binds an ephemeral loopback port: several suites
run in parallel on one machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout (where config.example.toml lives)."""
    return REPO
