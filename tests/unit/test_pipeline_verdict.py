"""The policy pipeline and the verdict: ordering, concurrency, failures, scores, floors."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest

from gateway.api import Action, AuthResult, Context, OptionError, Policy, Result, Symbol, SymbolDef
from gateway.config import ActionsConfig
from gateway.pipeline import Pipeline
from gateway.registry import plan_policies
from gateway.schema import Problems
from gateway.testing import make_context
from gateway.verdict import decide, verdict_headers

MSG = "From: a@example.net\nSubject: hi\n\nhello\n"


class Overlap:
    """How many sleeping policies were inside check() at once: concurrency without a clock."""

    now = 0
    most = 0

    @classmethod
    async def sleep(cls, seconds: float) -> None:
        cls.now += 1
        cls.most = max(cls.most, cls.now)
        try:
            await asyncio.sleep(seconds)
        finally:
            cls.now -= 1


@dataclass(frozen=True, slots=True)
class CountOptions:
    weight: float = 1.0
    label: str = "x"

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise OptionError("weight", f"must be 0 or more, got {self.weight}")


class First(Policy):
    name = "first"
    symbols = {"FIRST_HIT": SymbolDef(2.5, "first fired")}
    Options = CountOptions

    async def check(self, ctx: Context) -> Result:
        await Overlap.sleep(0.05)
        return Result(
            symbols=(Symbol("FIRST_HIT", weight=self.options.weight, detail="evidence"),),
            auth=(AuthResult("spf", "pass", properties=(("smtp.mailfrom", "example.net"),)),),
        )


class Second(Policy):
    name = "second"
    symbols = {"SECOND_SAW_FIRST": SymbolDef(1.25, "saw first's result")}
    after = ("first",)

    async def check(self, ctx: Context) -> Result:
        assert set(ctx.results) == {"first"}
        assert ctx.auth("spf")[0].result == "pass"
        return Result(symbols=(Symbol("SECOND_SAW_FIRST"),))


class Independent(Policy):
    name = "independent"
    symbols = {"INDEPENDENT": SymbolDef(0.1, "ran")}

    async def check(self, ctx: Context) -> Result:
        await Overlap.sleep(0.05)
        return Result(symbols=(Symbol("INDEPENDENT"),))


class Broken(Policy):
    name = "broken"

    async def check(self, ctx: Context) -> Result:
        raise RuntimeError("secret internal detail")


class Hangs(Policy):
    name = "hangs"

    async def check(self, ctx: Context) -> Result:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


class Forces(Policy):
    name = "forces"
    symbols = {"FORCED": SymbolDef(0.0, "forced quarantine")}

    async def check(self, ctx: Context) -> Result:
        return Result(symbols=(Symbol("FORCED"),), force=Action.QUARANTINE, reason="domain says so")


AVAILABLE: dict[str, Any] = {p.name: p for p in (First, Second, Independent, Broken, Hangs, Forces)}


def plan(tables: dict[str, dict[str, Any]]) -> Any:
    problems = Problems()
    result = plan_policies(tables, problems, available=AVAILABLE)
    assert problems.lines == []
    return result


async def run(tables: dict[str, dict[str, Any]], timeout: float = 1.0) -> Any:
    p = plan(tables)
    pipeline = Pipeline(p, default_timeout=timeout)
    return p, await pipeline.run(make_context(MSG))


def test_missing_dependency_is_a_config_error_that_says_how_to_fix_it() -> None:
    problems = Problems()
    plan_policies({"second": {}}, problems, available=AVAILABLE)
    assert problems.lines == [
        'policies.second: runs after "first", which is not enabled; add a [policies.first] '
        "table or set policies.second.enabled = false"
    ]


def test_unknown_policy_and_bad_options_are_reported_with_dotted_keys() -> None:
    problems = Problems()
    plan_policies(
        {"frist": {}, "first": {"weight": -1.0}, "independent": {"colour": 1}},
        problems,
        available=AVAILABLE,
    )
    assert problems.lines[0].startswith(
        'policies.frist: no such policy installed (did you mean "first"?)'
    )
    assert "policies.first.weight: must be 0 or more, got -1.0" in problems.lines
    assert "policies.independent.colour: unknown key" in problems.lines


def test_dependency_cycle_is_refused() -> None:
    class A(Policy):
        name = "a"
        after = ("b",)

    class B(Policy):
        name = "b"
        after = ("a",)

    problems = Problems()
    plan_policies({"a": {}, "b": {}}, problems, available={"a": A, "b": B})
    assert any("dependency cycle" in line for line in problems.lines)


def test_disabled_policy_is_not_run() -> None:
    p = plan({"first": {"enabled": False}, "independent": {}})
    assert [e.name for e in p.policies] == ["independent"]


async def test_dependents_see_results_and_independent_policies_run_concurrently() -> None:
    Overlap.most = 0
    _, result = await run({"second": {}, "first": {}, "independent": {}})
    assert {r.name for r in result.runs} == {"first", "second", "independent"}
    assert Overlap.most == 2  # first and independent were waiting at the same time


async def test_a_policy_that_raises_becomes_policy_error_with_a_tempfail_floor() -> None:
    _, result = await run({"broken": {}})
    (prun,) = result.runs
    assert prun.outcome == "error"
    assert prun.result.force is Action.TEMPFAIL
    assert prun.result.symbols == (Symbol("POLICY_ERROR", detail="broken: RuntimeError"),)
    assert "secret" not in prun.result.reason


async def test_a_policy_that_hangs_becomes_policy_timeout() -> None:
    _, result = await run({"hangs": {}}, timeout=0.1)
    (prun,) = result.runs
    assert prun.outcome == "timeout"
    assert prun.result.symbols[0].name == "POLICY_TIMEOUT"
    assert prun.result.force is Action.TEMPFAIL


async def test_scores_add_up_and_thresholds_choose_the_action() -> None:
    p, result = await run({"first": {"weight": 2.0}, "second": {}})
    v = decide(result, declared=p.symbols(), overrides={}, thresholds=ActionsConfig())
    assert v.score == Decimal("6.25")
    assert v.action is Action.ADD_HEADER
    headers = verdict_headers(v, "mx.example.org")
    assert headers[0] == (
        "Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=example.net"
    )
    assert headers[1] == (
        "X-Spam-Status: Yes, score=6.25 required=5.00 tests=FIRST_HIT,SECOND_SAW_FIRST"
    )
    assert headers[2] == "X-Spam-Symbols: FIRST_HIT=5.00, SECOND_SAW_FIRST=1.25"
    assert headers[3] == "X-Spam-Flag: YES"
    learned = verdict_headers(v, "mx.example.org", autolearn="spam")[1].replace("\r\n\t", " ")
    assert learned.endswith("tests=FIRST_HIT,SECOND_SAW_FIRST autolearn=spam")


async def test_score_overrides_may_be_numbers_or_actions() -> None:
    p, result = await run({"first": {}, "second": {}})
    v = decide(
        result,
        declared=p.symbols(),
        overrides={"FIRST_HIT": 0.5, "SECOND_SAW_FIRST": Action.REJECT},
        thresholds=ActionsConfig(),
    )
    assert v.score == Decimal("1.75")
    assert v.action is Action.REJECT
    assert v.forced_by == "scores.SECOND_SAW_FIRST"
    assert v.reason == "saw first's result"


async def test_forced_action_is_a_floor_that_a_higher_score_exceeds() -> None:
    p, result = await run({"forces": {}, "first": {"weight": 10.0}})
    v = decide(result, declared=p.symbols(), overrides={}, thresholds=ActionsConfig())
    assert v.action is Action.REJECT  # 25 points beat the quarantine floor
    assert v.forced_by is None
    v2 = decide(
        result, declared=p.symbols(), overrides={"FIRST_HIT": 0.0}, thresholds=ActionsConfig()
    )
    assert v2.action is Action.QUARANTINE
    assert v2.reason == "domain says so"


async def test_a_floor_at_the_scores_own_action_gives_its_reason() -> None:
    """A reject floor with a reject-worthy score says "virus X", not "spam score 25"."""
    p, result = await run({"forces": {}, "first": {"weight": 2.0}})
    v = decide(
        result,
        declared=p.symbols(),
        overrides={},
        thresholds=ActionsConfig(add_header=1.0, quarantine=2.0, reject=50.0),
    )
    assert v.action is Action.QUARANTINE
    assert (v.forced_by, v.reason) == ("forces", "domain says so")


@pytest.mark.parametrize(
    ("score", "action"),
    [
        (0.0, Action.RELAY),
        (5.0, Action.ADD_HEADER),
        (10.0, Action.QUARANTINE),
        (15.0, Action.REJECT),
    ],
)
def test_thresholds(score: float, action: Action) -> None:
    assert ActionsConfig().for_score(score) is action


def test_action_order_puts_tempfail_between_quarantine_and_reject() -> None:
    assert Action.QUARANTINE.at_least(Action.TEMPFAIL) is Action.TEMPFAIL
    assert Action.REJECT.at_least(Action.TEMPFAIL) is Action.REJECT
    assert Action.RELAY.at_least(None) is Action.RELAY


async def test_an_option_error_at_start_up_is_a_config_problem_naming_the_key() -> None:
    from pathlib import Path

    from gateway.api import Services
    from gateway.config import ConfigError
    from gateway.testing import NoDNS

    class NeedsFile(Policy):
        name = "needsfile"

        async def start(self, services: Services) -> None:
            raise OptionError("files", "rules.toml: no such file")

    problems = Problems()
    p = plan_policies({"needsfile": {}}, problems, available={"needsfile": NeedsFile})
    services = Services(NoDNS(), None, "mx", Path())  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        await Pipeline(p, default_timeout=1.0).start(services)
    assert info.value.problems == ["policies.needsfile.files: rules.toml: no such file"]
