"""Observe mode in the verdict, the config and ``scan``: observed and enforced actions."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

from gateway.api import Action, Result, Symbol, SymbolDef
from gateway.config import ActionsConfig
from gateway.pipeline import PipelineRun, PolicyRun
from gateway.verdict import Observe, decide, verdict_headers
from tests.unit.test_cli import GTUBE, HAM, gateway, write_config

DECLARED = {
    "TRIAL_SPAM": ("trial", SymbolDef(7.0, "the trial policy thinks so")),
    "OLD_HIT": ("old", SymbolDef(2.0, "the old policy found something")),
    "GTUBE": ("rules", SymbolDef(20.0, "GTUBE test string")),
    "POLICY_ERROR": ("gateway", SymbolDef(0.0, "a policy failed")),
    "AV_VIRUS": ("antivirus", SymbolDef(0.0, "clamd found malware")),
}


def run(*results: tuple[str, Result]) -> PipelineRun:
    return PipelineRun(tuple(PolicyRun(name, res, 0.0, "ok") for name, res in results))


TRIAL_REJECTS = run(
    ("trial", Result(symbols=(Symbol("TRIAL_SPAM"),), force=Action.REJECT, reason="trial says no")),
    ("old", Result(symbols=(Symbol("OLD_HIT"),))),
)


def test_an_observed_policy_neither_scores_nor_forces_but_is_reported() -> None:
    v = decide(
        TRIAL_REJECTS,
        declared=DECLARED,
        overrides={},
        thresholds=ActionsConfig(),
        observe=Observe(policies=frozenset({"trial"})),
    )
    assert v.action is Action.RELAY
    assert v.enforced_score == Decimal("2.00")
    assert v.score == Decimal("9.00")  # the headers explain the whole computation
    assert v.observed is Action.REJECT
    assert v.observed_forced_by == "trial"
    assert v.observed_reason == "trial says no"
    assert v.observed_by_policy == (("trial", Action.REJECT),)
    assert not v.is_spam
    headers = verdict_headers(v, "mx.example.org")
    assert headers[-1] == "X-Spam-Action-Observed: reject"
    assert "X-Spam-Flag: YES" not in headers
    assert headers[1].startswith("X-Spam-Status: No, score=9.00 required=5.00")


def test_enforce_mode_adds_nothing() -> None:
    v = decide(TRIAL_REJECTS, declared=DECLARED, overrides={}, thresholds=ActionsConfig())
    assert v.action is Action.REJECT
    assert v.observed is None and v.observed_by_policy == ()
    assert not any(h.startswith("X-Spam-Action-Observed") for h in verdict_headers(v, "mx"))


def test_global_observe_reports_policy_all_and_relays() -> None:
    v = decide(
        TRIAL_REJECTS,
        declared=DECLARED,
        overrides={"OLD_HIT": Action.QUARANTINE},
        thresholds=ActionsConfig(),
        observe=Observe(everything=True),
    )
    assert v.action is Action.RELAY
    assert v.observed is Action.REJECT
    assert v.observed_by_policy == (("all", Action.REJECT),)


def test_hard_protections_act_in_observe_mode() -> None:
    gtube = run(
        ("rules", Result(symbols=(Symbol("GTUBE"),), force=Action.REJECT, reason="GTUBE")),
        ("trial", Result(symbols=(Symbol("TRIAL_SPAM"),))),
    )
    crashed = run(
        ("trial", Result(symbols=(Symbol("POLICY_ERROR"),), force=Action.TEMPFAIL, reason="x"))
    )
    limited = run(("ratelimit", Result(force=Action.TEMPFAIL, reason="rate limit")))
    everything = Observe(everything=True, hard=frozenset({"gateway", "ratelimit"}))
    virus = run(
        ("antivirus", Result(symbols=(Symbol("AV_VIRUS"),), force=Action.REJECT, reason="virus"))
    )
    cases = ((gtube, Action.REJECT), (crashed, Action.TEMPFAIL), (virus, Action.REJECT))
    for pipeline, action in cases:
        trial = frozenset({"rules", "trial", "antivirus"})
        for observe in (everything, Observe(policies=trial)):
            v = decide(
                pipeline,
                declared=DECLARED,
                overrides={},
                thresholds=ActionsConfig(),
                observe=observe,
            )
            assert v.action is action
    v = decide(
        limited, declared=DECLARED, overrides={}, thresholds=ActionsConfig(), observe=everything
    )
    assert v.action is Action.TEMPFAIL


def test_each_observed_policy_is_counted_with_what_it_alone_would_add() -> None:
    pipeline = run(
        ("trial", Result(symbols=(Symbol("TRIAL_SPAM"),))),
        ("old", Result(force=Action.QUARANTINE, reason="old says hold")),
    )
    v = decide(
        pipeline,
        declared=DECLARED,
        overrides={},
        thresholds=ActionsConfig(),
        observe=Observe(policies=frozenset({"trial", "old"})),
    )
    assert v.action is Action.RELAY
    assert v.observed is Action.QUARANTINE
    assert dict(v.observed_by_policy) == {"trial": Action.ADD_HEADER, "old": Action.QUARANTINE}


# --- config and CLI -------------------------------------------------------------


def test_check_config_refuses_a_bad_mode_and_observe_values(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[actions]\nmode = "shadow"\n[policies.rules]\nobserve = "yes"\n'
        "[policies.ratelimit]\nobserve = true\n",
    )
    out = gateway("check-config", "--config", str(path))
    assert out.returncode == 1
    text = out.stdout.decode()
    assert "actions.mode:" in text and "observe" in text
    assert "policies.rules.observe: must be true or false" in text
    path = write_config(tmp_path, "[policies.ratelimit]\nobserve = true\n")
    out = gateway("check-config", "--config", str(path))
    assert "policies.ratelimit.observe: ratelimit is a hard protection" in out.stdout.decode()
    path = write_config(tmp_path, '[actions]\nmode = "observe"\n[policies.rules]\nobserve = true\n')
    out = gateway("check-config", "--config", str(path))
    assert out.returncode == 0
    assert 'mode = "observe": nothing but hard protections acts' in out.stdout.decode()
    path = write_config(tmp_path, "[policies.rules]\nobserve = true\n")
    assert (
        "; observed only: rules)" in gateway("check-config", "--config", str(path)).stdout.decode()
    )


def test_scan_shows_the_enforced_and_the_observed_outcome(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[policies.rules]\nobserve = true\n")
    spam = HAM.replace(b"See you at noon.", f"x\r\n{GTUBE}".encode())
    out = gateway("scan", "--config", str(path), "-", stdin=HAM)
    assert out.returncode == 0, out.stderr
    assert "Observed:   relay" in out.stdout.decode()
    out = gateway("scan", "--config", str(path), "--json", "-", stdin=spam)
    doc = json.loads(out.stdout)
    assert doc["action"] == "reject"  # GTUBE is a hard protection
    assert doc["observed"]["action"] == "reject"
    assert doc["observed"]["by_policy"] == {"rules": "reject"}
    assert doc["headers"][-1] == "X-Spam-Action-Observed: reject"


def test_a_cap_holds_the_score_but_not_a_floor_and_only_while_its_policy_acts() -> None:
    declared = {**DECLARED, "ALLOWLIST_SENDER": ("lists", SymbolDef(-1.0, "allowlisted"))}
    spammy = ("trial", Result(symbols=(Symbol("TRIAL_SPAM", weight=3.0),)))  # 21.0: reject
    allow = ("lists", Result(symbols=(Symbol("ALLOWLIST_SENDER"),), cap=Action.ADD_HEADER))
    held = decide(run(spammy, allow), declared=declared, overrides={}, thresholds=ActionsConfig())
    assert held.action is Action.ADD_HEADER
    assert held.score == Decimal("20.00")
    assert held.reason.endswith("held at add_header by policy lists")
    assert held.held_by == "lists"  # counted in gateway_capped_actions_total
    gtube = ("rules", Result(symbols=(Symbol("GTUBE"),), force=Action.REJECT, reason="GTUBE"))
    forced = decide(run(gtube, allow), declared=declared, overrides={}, thresholds=ActionsConfig())
    assert forced.action is Action.REJECT and forced.forced_by == "rules"
    assert forced.held_by is None  # the floor decided, not the ceiling
    observed = decide(
        run(spammy, allow),
        declared=declared,
        overrides={},
        thresholds=ActionsConfig(),
        observe=Observe(policies=frozenset({"lists"})),
    )
    assert observed.action is Action.REJECT  # an observed list holds nothing back
    assert observed.held_by is None
    assert observed.observed is Action.ADD_HEADER
