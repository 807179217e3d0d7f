"""Fixtures shared by the policy tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import StateConfig
from gateway.state import ClosableStateStore, open_state


@pytest.fixture
async def state(tmp_path: Path) -> ClosableStateStore:
    """A local (SQLite) state store in the test's directory, closed afterwards."""
    store = open_state(StateConfig(path=str(tmp_path / "state.sqlite")), tmp_path)
    yield store  # type: ignore[misc]
    await store.close()
