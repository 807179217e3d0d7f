"""A throwaway PostgreSQL schema for a test, on the machine's server (or ``GATEWAY_TEST_PG``).

The DSN it yields points ``search_path`` at a fresh schema (dropped afterwards)
and names the test in ``application_name``, so a test can find its own
connections. Unreachable PostgreSQL skips the test locally and fails it under
``CI=true`` (``gateway.testing.require``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from urllib.parse import quote

from gateway.testing.require import require

__all__ = ["ADMIN_DSN", "schema_dsn", "throwaway_schema"]

ADMIN_DSN = os.environ.get("GATEWAY_TEST_PG", "postgresql://127.0.0.1:5432/test")


def schema_dsn(schema: str) -> str:
    """``ADMIN_DSN`` with ``search_path`` set to ``schema``."""
    return f"{ADMIN_DSN}?options={quote(f'-c search_path={schema}')}&application_name={schema}"


@contextlib.contextmanager
def throwaway_schema() -> Iterator[str]:
    """Create a schema, yield its DSN, drop it with everything in it."""
    import psycopg

    try:
        admin = psycopg.connect(ADMIN_DSN, connect_timeout=3, autocommit=True)
    except psycopg.Error as exc:
        require(False, f"PostgreSQL at {ADMIN_DSN} unreachable: {exc}")
        raise  # not reached: require() skipped or failed the test
    schema = f"gwtest_{secrets.token_hex(6)}"
    try:
        admin.execute(f'CREATE SCHEMA "{schema}"'.encode())
        yield schema_dsn(schema)
    finally:
        with contextlib.suppress(psycopg.Error):
            admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'.encode())
        admin.close()
