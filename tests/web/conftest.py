"""Web tests: the app served on loopback over both quarantine backends and a real downstream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.quarantine import LocalQuarantine, PostgresQuarantine, QuarantineStore
from gateway.testing.postgres import throwaway_schema
from gateway.testing.sink import SinkServer
from gateway.testing.web import ServedWeb, served_web


@pytest.fixture
def sink() -> Iterator[SinkServer]:
    with SinkServer() as server:
        yield server


@pytest.fixture(params=["local", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QuarantineStore]:
    if request.param == "local":
        s: QuarantineStore = LocalQuarantine(tmp_path / "q")
        yield s
        await s.close()
    else:
        with throwaway_schema() as dsn:
            s = PostgresQuarantine(dsn)
            yield s
            await s.close()


@pytest.fixture
async def web(store: QuarantineStore, sink: SinkServer, tmp_path: Path) -> AsyncIterator[ServedWeb]:
    async with served_web(store, sink, tmp_path) as served:
        yield served
