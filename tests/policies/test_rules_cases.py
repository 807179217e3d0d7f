"""Data-driven spam-policy cases: each case in tests/policies/cases/*.toml gives the
inputs, the raw message and the exact set of symbols the named policies emit.

    [[case]]
    name = "missing Date"
    policies = ["heuristics"]       # default: the file's [defaults] policies
    mail_from = "a@example.net"     # optional envelope: client_ip, helo, mail_from, rcpt_to
    expect = ["HDR_MISSING_DATE"]   # exact set; [] for a clean message
    raw = '''...'''                 # LF line endings are sent as CRLF
    [case.options.urls]             # optional per-policy options
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.api import Policy, Services
from gateway.registry import discover
from gateway.schema import Problems, build
from gateway.testing.context import NoDNS, make_context

CASES_DIR = Path(__file__).parent / "cases"


def _load_cases() -> list[Any]:
    out = []
    for path in sorted(CASES_DIR.glob("*.toml")):
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        defaults = data.get("defaults", {})
        for case in data["case"]:
            merged = {**defaults, **case}
            out.append(pytest.param(merged, id=f"{path.stem}: {case['name']}"))
    return out


async def _policy(name: str, options: dict[str, Any]) -> Policy:
    cls = discover()[name].load()
    problems = Problems()
    opts = build(cls.Options, options, f"policies.{name}", problems)
    assert not problems.lines, problems.lines
    policy: Policy = cls(opts)
    await policy.start(
        Services(resolver=NoDNS(), state=None, hostname="mx.example.org", config_dir=CASES_DIR)  # type: ignore[arg-type]
    )
    return policy


@pytest.mark.parametrize("case", _load_cases())
async def test_case_emits_exactly_the_expected_symbols(case: dict[str, Any]) -> None:
    ctx = make_context(
        case["raw"].lstrip("\n"),
        client_ip=case.get("client_ip", "192.0.2.10"),
        helo=case.get("helo", "mail.example.net"),
        mail_from=case.get("mail_from", "sender@example.net"),
        rcpt_to=tuple(case.get("rcpt_to", ["user@example.org"])),
    )
    found: set[str] = set()
    for name in case["policies"]:
        policy = await _policy(name, case.get("options", {}).get(name, {}))
        result = await policy.check(ctx)
        found |= {s.name for s in result.symbols}
    assert found == set(case["expect"]), case.get("description", case["name"])
