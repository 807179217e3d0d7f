"""Allow and block lists: file format, DMARC-authenticated matches, IP networks, floors."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.api import Action, AuthResult, OptionError, Result, Services
from gateway.testing.context import NoDNS, make_context
from policies.lists import ListsOptions, ListSpec, ListsPolicy, parse_list

MSG = "From: Alice <alice@partner.example.com>\nTo: bob@example.org\nSubject: hi\n\nhello\n"


def dmarc(result: str, domain: str = "partner.example.com") -> dict[str, Result]:
    auth = AuthResult("dmarc", result, properties=(("header.from", domain),))
    return {"dmarc": Result(auth=(auth,))}


async def policy(tmp_path: Path, *specs: tuple[str, str, dict[str, object]]) -> ListsPolicy:
    lists = []
    for name, text, kw in specs:
        (tmp_path / name).write_text(text)
        lists.append(ListSpec(file=name, **kw))  # type: ignore[arg-type]
    p = ListsPolicy(ListsOptions(lists=tuple(lists)))
    await p.start(Services(resolver=NoDNS(), state=None, hostname="mx", config_dir=tmp_path))  # type: ignore[arg-type]
    return p


ALLOW = {"symbol": "ALLOWLIST_SENDER", "score": -20.0, "description": "allowlisted"}
BLOCK = {"symbol": "BLOCKLIST_SENDER", "score": 20.0, "action": "reject", "authenticated": False}


async def test_allowlisted_domain_matches_only_with_dmarc_pass(tmp_path: Path) -> None:
    p = await policy(tmp_path, ("allow.txt", "# partners\nexample.com  # and subdomains\n", ALLOW))
    passed = await p.check(make_context(MSG, results=dmarc("pass")))
    assert [(s.name, s.detail) for s in passed.symbols] == [
        ("ALLOWLIST_SENDER", "From alice@partner.example.com (example.com), DMARC pass")
    ]
    assert (await p.check(make_context(MSG, results=dmarc("fail")))).symbols == ()
    assert (await p.check(make_context(MSG))).symbols == ()  # dmarc disabled: no trust
    other = dmarc("pass", domain="elsewhere.example.net")
    assert (await p.check(make_context(MSG, results=other))).symbols == ()
    assert p.rule_symbols()["ALLOWLIST_SENDER"].score == -20.0


async def test_unauthenticated_list_matches_mail_from_or_from(tmp_path: Path) -> None:
    p = await policy(tmp_path, ("block.txt", "bad@spam.example.net\n", BLOCK))
    result = await p.check(make_context(MSG, mail_from="bad@spam.example.net"))
    assert [s.name for s in result.symbols] == ["BLOCKLIST_SENDER"]
    assert result.force is Action.REJECT
    assert (await p.check(make_context(MSG))).symbols == ()


async def test_client_networks_v4_and_v6(tmp_path: Path) -> None:
    p = await policy(tmp_path, ("nets.txt", "192.0.2.0/24\n2001:db8::/32\n198.51.100.7\n", BLOCK))
    for ip in ("192.0.2.55", "2001:db8::1", "198.51.100.7"):
        result = await p.check(make_context(MSG, client_ip=ip))
        assert [s.name for s in result.symbols] == ["BLOCKLIST_SENDER"], ip
    assert (await p.check(make_context(MSG, client_ip="198.51.100.8"))).symbols == ()
    assert (await p.check(make_context(MSG, client_ip=None))).symbols == ()


def test_list_file_entries_and_errors() -> None:
    entries = parse_list("User@Example.COM\n@exact.example.org\nexample.net\n10.0.0.0/8\n", "f")
    assert entries.match_address("user@example.com") == "user@example.com"
    assert entries.match_address("x@mail.example.net") == "example.net"
    assert entries.match_address("x@exact.example.org") == "@exact.example.org"
    assert entries.match_address("x@sub.exact.example.org") == ""
    assert entries.match_address("x@notexample.net") == ""
    with pytest.raises(ValueError, match=r"f:2: 'not a domain!' is not an address, domain"):
        parse_list("ok.example.com\nnot a domain!\n", "f")


async def test_missing_list_file_names_the_option_and_the_file(tmp_path: Path) -> None:
    p = ListsPolicy(ListsOptions(lists=(ListSpec(file="gone.txt", symbol="X", score=1.0),)))
    with pytest.raises(OptionError, match=r"lists\[0\].file: .*gone.txt: no such file"):
        await p.start(Services(resolver=NoDNS(), state=None, hostname="mx", config_dir=tmp_path))  # type: ignore[arg-type]


def test_list_options_validate_the_symbol() -> None:
    with pytest.raises(OptionError, match="UPPER_SNAKE"):
        ListSpec(file="a.txt", symbol="lower", score=1.0)


def test_lists_runs_after_dmarc_when_enabled_and_alone_without_it() -> None:
    from gateway.registry import plan_policies
    from gateway.schema import Problems

    problems = Problems()
    plan = plan_policies({"lists": {}, "dmarc": {}, "spf": {}, "dkim": {}}, problems)
    order = [p.name for p in plan.policies]
    assert not problems.lines
    assert order.index("lists") > order.index("dmarc")
    alone = plan_policies({"lists": {}}, problems)
    assert not problems.lines
    assert [p.name for p in alone.policies] == ["lists"]


async def test_the_pipeline_hands_lists_the_dmarc_result(tmp_path: Path) -> None:
    """A stand-in dmarc policy passes; the pipeline gives lists its result (after_optional)."""
    from gateway.api import Context, Policy
    from gateway.pipeline import Pipeline
    from gateway.registry import plan_policies
    from gateway.schema import Problems

    class PassingDMARC(Policy):
        name = "dmarc"

        async def check(self, ctx: Context) -> Result:
            return dmarc("pass")["dmarc"]

    (tmp_path / "allow.txt").write_text("partner.example.com\n")
    problems = Problems()
    tables = {"dmarc": {}, "lists": {"lists": [{"file": "allow.txt", **ALLOW}]}}
    plan = plan_policies(tables, problems, available={"dmarc": PassingDMARC, "lists": ListsPolicy})
    assert not problems.lines
    pipeline = Pipeline(plan, default_timeout=5.0)
    await pipeline.start(
        Services(resolver=NoDNS(), state=None, hostname="mx", config_dir=tmp_path)  # type: ignore[arg-type]
    )
    run = await pipeline.run(make_context(MSG))
    assert [s.name for s in run.results["lists"].symbols] == ["ALLOWLIST_SENDER"]
