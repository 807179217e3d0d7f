"""Score invariants of the shipped spam heuristics, and the allowlist interplay."""

from __future__ import annotations

from pathlib import Path

from gateway.api import Action, Services, SymbolDef
from gateway.config import config_from_mapping
from gateway.engine import Engine, Envelope
from gateway.testing.context import NoDNS
from policies.dnsbl import DNSBLOptions, DNSBLPolicy
from policies.heuristics import HeuristicsPolicy
from policies.lists import RECOMMENDED_ALLOW_SCORE
from policies.rules import RulesOptions, RulesPolicy
from policies.urls import URLPolicy

REJECT = 15.0


def shipped_symbols() -> dict[str, SymbolDef]:
    out: dict[str, SymbolDef] = {}
    out.update(RulesPolicy(RulesOptions()).rule_symbols())
    out.update(HeuristicsPolicy.symbols)
    out.update(URLPolicy.symbols)
    dnsbl = DNSBLPolicy(DNSBLOptions())
    out.update(dnsbl.symbols)
    out.update(dnsbl.rule_symbols())
    return out


def forced_rules() -> set[str]:
    return {r.name for r in RulesPolicy(RulesOptions()).ruleset.rules if r.action is not None}


def test_no_single_shipped_symbol_reaches_the_reject_threshold() -> None:
    """Only GTUBE (a forced test rule) may reject alone; every heuristic needs company."""
    assert forced_rules() == {"GTUBE"}
    too_strong = {
        name: d.score
        for name, d in shipped_symbols().items()
        if d.score >= REJECT and name not in forced_rules()
    }
    assert too_strong == {}


def test_every_shipped_symbol_is_described_and_upper_snake() -> None:
    for name, d in shipped_symbols().items():
        assert name.isupper() and " " not in name, name
        assert d.description, name


def content_heuristics() -> dict[str, SymbolDef]:
    out: dict[str, SymbolDef] = dict(RulesPolicy(RulesOptions()).rule_symbols())
    out.update(HeuristicsPolicy.symbols)
    out.update(URLPolicy.symbols)
    return out


SPAMMY = """Received: from x.example.net by mx.example.org; Tue, 20 Aug 2002 10:00:00 +0000
From: "PayPal ceo@other.example.com" <a@xn--pypal-4ve.com>
Reply-To: collect@elsewhere.example.com
To: undisclosed-recipients:;
Subject: FREE MONEY $$$ ACT NOW!!
Date: Fri, 30 Aug 2002 10:00:00 +0000
MIME-Version: 1.0
Content-Type: text/html

<p>Dear Friend, financial freedom! Order now. This is not spam. Click here
<a href="http://3325256711/x">https://www.paypal.com/</a> <a href="http://bit.ly/x">y</a>
To be removed from our list reply with remove in the subject. Verify your account.</p>
"""


async def _allowlisted(
    tmp_path: Path, raw: bytes, scores: dict[str, object] | None = None
) -> dict[str, tuple[Action, set[str], str]]:
    """(action, symbols, reason) of ``raw`` from an unlisted and an allowlisted client."""
    (tmp_path / "allow.txt").write_text("192.0.2.10\n")
    allow = {
        "file": "allow.txt",
        "symbol": "ALLOWLIST_CLIENT",
        "score": RECOMMENDED_ALLOW_SCORE,
        "max_action": "add_header",
        "authenticated": False,
    }
    tables: dict[str, dict[str, object]] = {
        "rules": {},
        "heuristics": {},
        "urls": {},
        "lists": {"lists": [allow]},
    }
    config = config_from_mapping(
        {
            "server": {"accepted_domains": ["example.org"]},
            "policies": tables,
            "scores": scores or {},
        },
        tmp_path / "gateway.toml",
    )
    services = Services(resolver=NoDNS(), state=None, hostname="mx", config_dir=tmp_path)  # type: ignore[arg-type]
    engine = Engine(config, Engine.make_plan(config), services)
    await engine.start()
    out = {}
    for ip in ("198.51.100.1", "192.0.2.10"):
        ev = await engine.evaluate(Envelope(ip, "x", "a@b.example", ("u@example.org",), "Q"), raw)
        out[ip] = (ev.action, {s.name for s in ev.verdict.symbols}, ev.verdict.reason)
    return out


async def test_an_allowlisted_client_is_not_rejected_however_spammy(tmp_path: Path) -> None:
    raw = SPAMMY.replace("\n", "\r\n").encode()
    out = await _allowlisted(tmp_path, raw)
    action, names, _ = out["198.51.100.1"]
    assert action is Action.REJECT  # without the allowlist the heuristics add up
    assert len(names) > 10
    action, names, _ = out["192.0.2.10"]
    assert "ALLOWLIST_CLIENT" in names
    assert action is Action.RELAY


async def test_the_allowlist_ceiling_holds_whatever_the_heuristics_sum_to(tmp_path: Path) -> None:
    """Not a sum that stays below 115 while nobody adds a rule: with every heuristic
    that fires scored 100, the allowlisted client's mail is marked, not rejected."""
    raw = SPAMMY.replace("\n", "\r\n").encode()
    fired = (await _allowlisted(tmp_path, raw))["198.51.100.1"][1]
    boosted: dict[str, object] = {n: 100.0 for n in fired if n in content_heuristics()}
    out = await _allowlisted(tmp_path, raw, boosted)
    action, names, reason = out["192.0.2.10"]
    assert "ALLOWLIST_CLIENT" in names
    assert action is Action.ADD_HEADER
    assert "held at add_header by policy lists" in reason
    assert out["198.51.100.1"][0] is Action.REJECT


async def test_a_forced_rule_still_applies_above_the_allowlist_ceiling(tmp_path: Path) -> None:
    gtube = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
    raw = SPAMMY.replace("Order now.", gtube).replace("\n", "\r\n").encode()
    action, names, _ = (await _allowlisted(tmp_path, raw))["192.0.2.10"]
    assert {"ALLOWLIST_CLIENT", "GTUBE"} <= names
    assert action is Action.REJECT


def test_every_shipped_symbol_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "policies" / "spam.md").read_text()
    missing = sorted(n for n in shipped_symbols() if f"`{n}`" not in doc)
    assert missing == []
