"""Rule-file engine: loading, errors that name file/rule/problem, reloads, bounded regexes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from gateway.api import Action, OptionError, Services
from gateway.testing.context import NoDNS, make_context
from policies.rules import RulesOptions, RulesPolicy, _parse_expression

MSG = """From: alice@example.net
To: bob@example.org
Subject: Cheap watches here

Buy a watch today from our shop.
"""


def rule(name: str, **fields: object) -> str:
    """A [[rule]] table; score 1 and a description unless given (None leaves a key out)."""
    table: dict[str, object] = {"name": name, "score": 1, "description": "x", **fields}
    lines = ["[[rule]]"]
    for key, value in table.items():
        if value is not None:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def services(config_dir: Path) -> Services:
    return Services(resolver=NoDNS(), state=None, hostname="mx", config_dir=config_dir)  # type: ignore[arg-type]


async def started(tmp_path: Path, text: str, **opts: object) -> RulesPolicy:
    (tmp_path / "local.toml").write_text(text)
    policy = RulesPolicy(RulesOptions(files=("local.toml",), **opts))  # type: ignore[arg-type]
    await policy.start(services(tmp_path))
    return policy


async def load_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(OptionError) as err:
        await started(tmp_path, text)
    return str(err.value)


async def test_operator_rules_of_every_family_fire_with_evidence(tmp_path: Path) -> None:
    policy = await started(
        tmp_path,
        """
[[rule]]
name = "LOCAL_SUBJ_WATCH"
type = "header"
header = "Subject"
pattern = '(?i)watch'
score = 1.5
description = "watches in the subject"

[[rule]]
name = "LOCAL_NO_LIST_ID"
type = "header"
header = "List-Id"
exists = false
score = 0.1
description = "not a list"

[[rule]]
name = "LOCAL_BODY_SHOP"
type = "body"
pattern = 'our shop'
score = 1.0
description = "shop"

[[rule]]
name = "LOCAL_RAW_TO"
type = "raw"
pattern = '(?m)^To: bob@'
score = 0.1
description = "raw"

[[rule]]
name = "LOCAL_NOT_URGENT"
type = "body"
pattern = 'urgent'
negate = true
score = 0.0
description = "no urgency"

[[rule]]
name = "LOCAL_META"
type = "meta"
expression = "LOCAL_SUBJ_WATCH && (LOCAL_BODY_SHOP || !LOCAL_NO_LIST_ID) && !__NEVER"
score = 2.0
description = "both"

[[rule]]
name = "__NEVER"
type = "body"
pattern = 'zzzzzz'
description = "sub-rule"
""",
        builtin=False,
    )
    result = await policy.check(make_context(MSG))
    got = {s.name: s.detail for s in result.symbols}
    assert set(got) == {
        "LOCAL_SUBJ_WATCH",
        "LOCAL_NO_LIST_ID",
        "LOCAL_BODY_SHOP",
        "LOCAL_RAW_TO",
        "LOCAL_NOT_URGENT",
        "LOCAL_META",
    }
    assert got["LOCAL_SUBJ_WATCH"] == "Subject: watch"
    assert got["LOCAL_BODY_SHOP"] == "our shop"
    # A meta says its expression and the evidence of what it names that fired.
    assert got["LOCAL_META"] == (
        "LOCAL_SUBJ_WATCH && (LOCAL_BODY_SHOP || !LOCAL_NO_LIST_ID) && !__NEVER <- "
        "LOCAL_SUBJ_WATCH: Subject: watch; LOCAL_BODY_SHOP: our shop; "
        "LOCAL_NO_LIST_ID: List-Id absent"
    )
    symbols = policy.rule_symbols()
    assert symbols["LOCAL_META"].score == 2.0
    assert "__NEVER" not in symbols  # sub-rules are never symbols
    assert result.force is None


async def test_operator_file_overrides_a_shipped_rule_and_disable_removes_one(
    tmp_path: Path,
) -> None:
    policy = await started(
        tmp_path,
        """
[[rule]]
name = "SUBJ_FREE"
type = "header"
header = "Subject"
pattern = 'watches'
score = 0.7
description = "operator's own version"
""",
        disable=("GTUBE",),
    )
    symbols = policy.rule_symbols()
    assert symbols["SUBJ_FREE"].score == 0.7
    assert "GTUBE" not in symbols
    result = await policy.check(make_context(MSG))
    assert {s.name for s in result.symbols} == {"SUBJ_FREE"}


async def test_forced_action_rule_sets_the_floor_and_reason(tmp_path: Path) -> None:
    raw = MSG.replace(
        "Buy a watch", "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
    )
    policy = RulesPolicy(RulesOptions())
    await policy.start(services(tmp_path))
    result = await policy.check(make_context(raw))
    assert result.force is Action.REJECT
    assert "GTUBE" in result.reason


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[rule]]\nname = 'bad name'\n", "local.toml: rule bad name: name must be UPPER_SNAKE"),
        (
            rule("R1", type="body", pattern="(a)\\1"),
            "rule R1: pattern '(a)\\\\1' is not a valid RE2 expression",
        ),
        (
            rule("R2", type="body", pattern="(?<=a)b"),
            "look-around are not supported",
        ),
        (rule("R3", type="bogus"), "rule R3: type must be one of header, body"),
        (
            rule("R4", type="body", pattern="x", score=None),
            "rule R4: score must be a number",
        ),
        (
            rule("R5", type="body", pattern="x", description=None),
            "rule R5: description must be a non-empty string",
        ),
        (
            rule("R6", type="meta", expression="A &&"),
            "rule R6: bad expression: expression ends too early",
        ),
        (
            rule("R7", type="meta", expression="NOPE"),
            "rule R7: expression names NOPE, which no rule file defines",
        ),
        (
            rule("M1", type="meta", expression="M2") + rule("M2", type="meta", expression="M1"),
            "meta rules form a cycle: M1 -> M2 -> M1",
        ),
        (
            rule("R8", type="body", pattern="x") + rule("R8", type="body", pattern="y"),
            "rule R8: defined twice in this file",
        ),
        (
            rule("R9", type="body", pattern="x", socre=2),
            "rule R9: unknown key 'socre'",
        ),
        (
            rule("R10", type="header", pattern="x"),
            'rule R10: header rules need header = "Field-Name"',
        ),
        (
            rule("R11", type="body", pattern="x", action="explode"),
            "rule R11: action must be one of add_header, quarantine, reject",
        ),
        ("[[rule]\nname = 'X'\n", "local.toml: not valid TOML"),
        ("rules = 1\n", "unknown top-level key 'rules'"),
    ],
)
async def test_load_errors_name_the_file_the_rule_and_the_problem(
    tmp_path: Path, text: str, expected: str
) -> None:
    message = await load_error(tmp_path, text)
    assert message.startswith("files: ")
    assert str(tmp_path / "local.toml") in message
    assert expected in message


async def test_missing_rule_file_is_a_clear_error(tmp_path: Path) -> None:
    policy = RulesPolicy(RulesOptions(files=("nope.toml",)))
    with pytest.raises(OptionError, match=r"nope.toml: no such file; fix policies.rules.files"):
        await policy.start(services(tmp_path))


async def test_absolute_path_errors_show_at_construction_for_check_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        "[[rule]]\nname = 'R'\ntype = 'body'\npattern = '('\nscore = 1\ndescription = 'x'\n"
    )
    with pytest.raises(OptionError, match="rule R: pattern"):
        RulesPolicy(RulesOptions(files=(str(bad),)))


async def test_a_new_policy_instance_rereads_changed_files_as_a_reload_does(
    tmp_path: Path,
) -> None:
    text = rule("LOCAL_{n}", type="body", pattern="watch")
    first = await started(tmp_path, text.format(n="ONE"), builtin=False)
    second = await started(tmp_path, text.format(n="TWO"), builtin=False)
    assert set(first.rule_symbols()) == {"LOCAL_ONE"}
    assert set(second.rule_symbols()) == {"LOCAL_TWO"}
    # A broken edit fails the new instance and leaves the running one intact.
    with pytest.raises(OptionError):
        await started(
            tmp_path,
            rule("X", type="body", pattern="["),
        )
    assert {s.name for s in (await first.check(make_context(MSG))).symbols} == {"LOCAL_ONE"}


async def test_hostile_input_against_a_catastrophic_pattern_stays_linear(tmp_path: Path) -> None:
    """(a+)+$ backtracks exponentially in Python's re; RE2 runs it in linear time."""
    policy = await started(
        tmp_path,
        rule("EVIL", type="body", pattern="(a+)+$")
        + rule("EVIL_RAW", type="raw", pattern="(x+x+)+y"),
        builtin=False,
    )
    raw = "From: a@example.net\nSubject: x\n\n" + ("a" * 200_000 + "!\n") + ("x" * 100_000)
    started_at = time.process_time()
    result = await policy.check(make_context(raw))
    assert time.process_time() - started_at < 0.5
    assert {s.name for s in result.symbols} == set()


@pytest.mark.parametrize(
    ("expression", "values", "expected"),
    [
        ("A && (B || !C)", {"A": True, "C": True}, False),
        ("A && (B || !C)", {"A": True}, True),
        ("!A || B && C", {"A": True, "B": True, "C": True}, True),
        ("!(A || B)", {}, True),
        ("!!A", {"A": True}, True),
        # SpamAssassin's counting metas: a name is 1 or 0, + adds, a comparison is 1 or 0.
        ("(A + B + C) >= 2", {"A": True, "C": True}, True),
        ("(A + B + C) >= 2", {"B": True}, False),
        ("A + B > 1", {"A": True, "B": True}, True),
        ("A + !B == 2", {"A": True}, True),
        ("(A + B) >= 1 && !C", {"B": True, "C": True}, False),
        ("A || B + C >= 2", {"B": True}, False),
        ("A + B", {"B": True}, True),
        ("A + B < 1", {}, True),
    ],
)
def test_meta_expressions_follow_boolean_precedence(
    expression: str, values: dict[str, bool], expected: bool
) -> None:
    expr, names = _parse_expression(expression)
    assert bool(expr(values)) is expected
    assert names <= {"A", "B", "C"}


async def test_a_counting_meta_rule_names_the_sub_rules_that_fired(tmp_path: Path) -> None:
    policy = await started(
        tmp_path,
        rule("__KIN", type="body", pattern="next of kin", score=None)
        + rule("__SUM", type="body", pattern="million", score=None)
        + rule("__OIL", type="body", pattern="crude oil", score=None)
        + rule("FRAUD_2", type="meta", expression="(__KIN + __SUM + __OIL) >= 2", score=2.5),
        builtin=False,
    )
    two = await policy.check(make_context("From: a@example.net\n\nnext of kin, 5 million"))
    assert [(s.name, s.detail) for s in two.symbols] == [("FRAUD_2", "2 of 3: __KIN, __SUM")]
    one = await policy.check(make_context("From: a@example.net\n\ncrude oil prices"))
    assert one.symbols == ()


@pytest.mark.parametrize(
    "bad",
    [
        "A &&& B",
        "__import__('os')",
        "A B",
        "(A",
        "A)",
        "",
        "A || ",
        "A + ",
        "A >= B",
        "2 >= A",
        "A >= 2 >= 1",
        "A >= 99999",
        "A * 2",
    ],
)
def test_meta_expressions_reject_anything_but_names_and_operators(bad: str) -> None:
    with pytest.raises(ValueError):
        _parse_expression(bad)


async def test_undecodable_bytes_in_headers_and_body_do_not_break_matching(tmp_path: Path) -> None:
    policy = await started(
        tmp_path,
        rule("LOCAL_SUBJ", type="header", header="Subject", pattern="caf")
        + rule("LOCAL_BODY", type="body", pattern="bytes"),
        builtin=False,
    )
    raw = b"From: a@example.net\r\nSubject: caf\xe9 \xff\xfe\r\n\r\nraw \xff bytes\r\n"
    result = await policy.check(make_context(raw))
    assert {s.name for s in result.symbols} == {"LOCAL_SUBJ", "LOCAL_BODY"}


def test_symbols_command_lists_shipped_and_operator_rules(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    example = Path(__file__).resolve().parents[2] / "config.example.toml"
    config = tmp_path / "gateway.toml"
    shutil.copy(example, config)
    (tmp_path / "local.toml").write_text(rule("LOCAL_LISTED", type="body", pattern="x", score=0.7))
    text = config.read_text().replace("files = []", 'files = ["local.toml"]', 1)
    config.write_text(text)
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "symbols", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "GTUBE" in out and "LOCAL_LISTED" in out and "0.70" in out
