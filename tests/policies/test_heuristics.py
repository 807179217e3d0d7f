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


def test_the_recommended_allowlist_score_outweighs_every_shipped_heuristic_together() -> None:
    """Rules, header/structure heuristics and URL findings all at once (blocklist listings
    are reputation, not heuristics: they stay visible on allowlisted mail)."""
    heuristics = content_heuristics()
    positive = sum(d.score for n, d in heuristics.items() if d.score > 0 and n != "GTUBE")
    assert positive + RECOMMENDED_ALLOW_SCORE < REJECT


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


async def test_an_allowlisted_client_is_not_rejected_however_spammy(tmp_path: Path) -> None:
    (tmp_path / "allow.txt").write_text("192.0.2.10\n")
    allow = {
        "file": "allow.txt",
        "symbol": "ALLOWLIST_CLIENT",
        "score": RECOMMENDED_ALLOW_SCORE,
        "authenticated": False,
    }
    tables: dict[str, dict[str, object]] = {
        "rules": {},
        "heuristics": {},
        "urls": {},
        "lists": {"lists": [allow]},
    }
    config = config_from_mapping(
        {"server": {"accepted_domains": ["example.org"]}, "policies": tables},
        tmp_path / "gateway.toml",
    )
    services = Services(resolver=NoDNS(), state=None, hostname="mx", config_dir=tmp_path)  # type: ignore[arg-type]
    raw = SPAMMY.replace("\n", "\r\n").encode()

    async def evaluate(ip: str) -> tuple[Action, set[str]]:
        engine = Engine(config, Engine.make_plan(config), services)
        await engine.start()
        ev = await engine.evaluate(Envelope(ip, "x", "a@b.example", ("u@example.org",), "Q"), raw)
        return ev.action, {s.name for s in ev.verdict.symbols}

    action, names = await evaluate("198.51.100.1")
    assert action is Action.REJECT  # without the allowlist the heuristics add up
    assert len(names) > 10
    action, names = await evaluate("192.0.2.10")
    assert "ALLOWLIST_CLIENT" in names
    assert action is Action.RELAY


def test_every_shipped_symbol_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "policies" / "spam.md").read_text()
    missing = sorted(n for n in shipped_symbols() if f"`{n}`" not in doc)
    assert missing == []
