"""The CLI as operators use it: ``python -m gateway ...`` in a subprocess."""

from __future__ import annotations

import asyncio
import json
import mailbox
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.__main__ import _auth_json
from gateway.api import AuthResult
from gateway.config import QuarantineConfig
from gateway.quarantine import QuarantineItem, new_id, open_quarantine
from gateway.testing.dnsserver import DNSServer
from gateway.testing.sink import SinkServer

ROOT = Path(__file__).resolve().parents[2]
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
HAM = b"From: a@b.test\r\nTo: x@example.org\r\nSubject: lunch\r\n\r\nSee you at noon.\r\n"


def gateway(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        cwd=ROOT,
    )


def write_config(tmp_path: Path, extra: str = "", relay_port: int = 10026) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:0"
hostname = "mx.example.org"
accepted_domains = ["example.org"]

[relay]
port = {relay_port}
timeout = 5.0

[dns]
nameservers = ["127.0.0.1:1"]
timeout = 0.5

[quarantine]
path = "quarantine"

[state]
path = "state.sqlite"

[metrics]
listen = "127.0.0.1:0"

{extra}
"""
    )
    return path


# --- check-config -------------------------------------------------------------


def test_check_config_reports_every_problem_with_its_dotted_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[server]\naccepted_domains = ["example.org"]\nlistne = "x"\n'
        '[relay]\nport = "abc"\n[policies.nope]\n[scores]\nX = "maybe"\n'
    )
    out = gateway("check-config", "--config", str(path))
    assert out.returncode == 1
    lines = out.stdout.decode().splitlines()
    assert any(line.startswith("relay.port: must be an integer 1..65535") for line in lines)
    assert any(line.startswith("server.listne:") and "listen" in line for line in lines)
    assert any(line.startswith("scores.X:") for line in lines)
    assert len(lines) >= 3


def test_check_config_reports_core_and_policy_problems_in_one_run(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[server]\naccepted_domains = ["example.org"]\n[relay]\nport = 0\n'
        "[policies.rules]\nmax_txt = 5000\n"
    )
    out = gateway("check-config", "--config", str(path))
    assert out.returncode == 1
    lines = out.stdout.decode().splitlines()
    assert any(line.startswith("relay.port:") for line in lines)
    assert any(line.startswith("policies.rules.max_txt:") for line in lines)


def test_check_config_reports_policy_tables_and_unknown_score_symbols(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        "[policies.rules]\nmax_text = 5\n[policies.rulez]\n[scores]\nGTUBEE = 3.0\n",
    )
    out = gateway("check-config", "--config", str(path))
    assert out.returncode == 1
    text = out.stdout.decode()
    assert "policies.rules.max_text: must be at least 1024" in text
    assert 'policies.rulez: no such policy installed (did you mean "rules"?)' in text


def test_check_config_names_unknown_score_symbols_with_a_suggestion(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[policies.rules]\n[scores]\nGTUBEE = 3.0\n")
    out = gateway("check-config", "--config", str(path))
    assert out.returncode == 1
    assert out.stdout.decode().startswith("scores.GTUBEE: no enabled policy declares this symbol")
    assert '(did you mean "GTUBE"?)' in out.stdout.decode()


def test_check_config_reports_a_broken_rule_file_under_its_policy(tmp_path: Path) -> None:
    (tmp_path / "local.toml").write_text('[[rule]]\nname = "BAD"\ntype = "body"\npattern = "(("\n')
    path = write_config(tmp_path, '[policies.rules]\nfiles = ["local.toml"]\n')
    out = gateway("check-config", "--config", str(path))
    assert out.returncode == 1
    assert out.stdout.decode().startswith("policies.rules.files:")


def test_check_config_exits_zero_and_says_ok_on_a_valid_config(tmp_path: Path) -> None:
    out = gateway("check-config", "--config", str(write_config(tmp_path, "[policies.rules]\n")))
    assert out.returncode == 0, out.stdout + out.stderr
    assert b"OK (policies: rules)" in out.stdout


def test_missing_config_file_and_bad_usage_have_distinct_exit_codes(tmp_path: Path) -> None:
    missing = gateway("check-config", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 1
    assert b"no such file" in missing.stdout
    assert gateway().returncode == 2
    assert gateway("frobnicate", "--config", "x").returncode == 2
    assert gateway("scan", "--config", "x").returncode == 2  # FILE missing


# --- scan -----------------------------------------------------------------------


def test_scan_json_has_the_interface_shape_and_the_reject_reply(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[policies.rules]\n")
    message = HAM.replace(b"See you at noon.", GTUBE.encode())
    out = gateway(
        "scan",
        "--config",
        str(path),
        "--ip",
        "192.0.2.1",
        "--helo",
        "mx.b.test",
        "--mail-from",
        "a@b.test",
        "--rcpt",
        "x@example.org",
        "--json",
        "-",
        stdin=message,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert set(doc) >= {"action", "score", "symbols", "auth", "smtp_reply", "headers"}
    assert doc["action"] == "reject"
    assert doc["score"] == 20.0
    assert doc["symbols"][0] | {"description": ""} == {
        "name": "GTUBE",
        "score": 20.0,
        "policy": "rules",
        "detail": doc["symbols"][0]["detail"],
        "description": "",
    }
    assert doc["smtp_reply"].startswith("550 5.7.")
    assert doc["auth"] == {
        "spf": "none",
        "spf_helo": "none",
        "dkim": [],
        "dmarc": {"result": "none", "policy": "none", "domain": ""},
    }
    assert any(h.startswith("X-Spam-Status: Yes, score=20.00") for h in doc["headers"])


def test_scan_human_output_explains_each_symbol(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[policies.rules]\n")
    msg = tmp_path / "m.eml"
    msg.write_bytes(HAM.replace(b"See you at noon.", GTUBE.encode()))
    out = gateway("scan", "--config", str(path), str(msg))
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert "Action:     reject" in text
    assert "GTUBE" in text and "rules" in text and "rejected as spam by design" in text
    assert "SMTP reply: 550 5.7." in text


def test_scan_relays_ham_and_previews_the_queued_reply(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[policies.rules]\n")
    out = gateway("scan", "--config", str(path), "--json", "-", stdin=HAM)
    doc = json.loads(out.stdout)
    assert doc["action"] == "relay" and doc["smtp_reply"].startswith("250 ")


def test_scan_refuses_a_message_over_max_message_size(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    out = gateway("scan", "--config", str(path), "-", stdin=HAM + b"x" * 26_214_400)
    assert out.returncode == 1
    assert b"552" in out.stderr


def test_auth_json_maps_rfc8601_results_to_the_interface_fields() -> None:
    auth = (
        AuthResult("spf", "pass", properties=(("smtp.mailfrom", "b.test"),)),
        AuthResult("spf", "softfail", properties=(("smtp.helo", "mx.b.test"),)),
        AuthResult("dkim", "none", reason="message not signed"),
        AuthResult("dkim", "pass", properties=(("header.d", "b.test"), ("header.s", "s1"))),
        AuthResult("dkim", "fail", properties=(("header.d", "c.test"), ("header.s", "s2"))),
        AuthResult(
            "dmarc", "fail", properties=(("header.from", "b.test"), ("policy.dmarc", "reject"))
        ),
    )
    assert _auth_json(auth) == {
        "spf": "pass",
        "spf_helo": "softfail",
        "dkim": [
            {"domain": "b.test", "selector": "s1", "result": "pass"},
            {"domain": "c.test", "selector": "s2", "result": "fail"},
        ],
        "dmarc": {"result": "fail", "policy": "reject", "domain": "b.test"},
    }


# --- symbols ---------------------------------------------------------------------


def test_symbols_shows_effective_scores_and_where_they_came_from(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, '[policies.rules]\n[scores]\nGTUBE = 7.5\nPOLICY_ERROR = "reject"\n'
    )
    out = gateway("symbols", "--config", str(path), "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["GTUBE"]["score"] == 7.5 and rows["GTUBE"]["source"] == "[scores] override"
    assert rows["POLICY_ERROR"]["source"] == "[scores] override: forces reject"
    assert rows["POLICY_TIMEOUT"]["source"] == "default"
    rule_sourced = [r for r in rows.values() if r["source"] == "rule file"]
    assert rule_sourced and all(r["policy"] == "rules" for r in rule_sourced)
    human = gateway("symbols", "--config", str(path)).stdout.decode()
    assert "GTUBE" in human and "[scores] override" in human


# --- quarantine ------------------------------------------------------------------


def _quarantine(tmp_path: Path, count: int = 1) -> list[QuarantineItem]:
    async def fill() -> list[QuarantineItem]:
        store = open_quarantine(QuarantineConfig(path="quarantine"), tmp_path)
        items = []
        for i in range(count):
            it = QuarantineItem(
                id=new_id(),
                queue_id=f"Q{i}",
                received_at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=i),
                client_ip="192.0.2.1",
                helo="mx.b.test",
                mail_from=f"s{i}@b.test",
                rcpt_tos=("x@example.org", "y@example.org"),
                size=len(HAM),
                score=12.0,
                action="quarantine",
                reasons=("spam score 12.00 (X)", "X=12.00"),
                headers=("X-Spam-Flag: YES", "X-Spam-Status: Yes, score=12.00\r\n\ttests=X"),
            )
            await store.put(it, HAM)
            items.append(it)
        await store.close()
        return items

    return asyncio.run(fill())


def test_quarantine_list_json_show_and_delete(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    items = _quarantine(tmp_path, 3)
    out = gateway("quarantine", "list", "--json", "--config", str(path))
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert [d["id"] for d in listed] == [it.id for it in reversed(items)]
    assert set(listed[0]) >= {
        "id",
        "received_at",
        "mail_from",
        "rcpt_tos",
        "size",
        "score",
        "reasons",
    }
    assert listed[0]["rcpt_tos"] == ["x@example.org", "y@example.org"]
    filtered = gateway("quarantine", "list", "--json", "--from", "s1@b.test", "--config", str(path))
    assert [d["id"] for d in json.loads(filtered.stdout)] == [items[1].id]
    human = gateway("quarantine", "list", "--config", str(path)).stdout.decode()
    assert items[0].id in human and "<s0@b.test>" in human

    show = gateway("quarantine", "show", items[0].id, "--config", str(path))
    assert show.returncode == 0 and show.stdout == HAM

    assert gateway("quarantine", "delete", items[0].id, "--config", str(path)).returncode == 0
    again = gateway("quarantine", "delete", items[0].id, "--config", str(path))
    assert again.returncode == 1 and b"no quarantined message" in again.stderr
    assert gateway("quarantine", "show", "../etc/passwd", "--config", str(path)).returncode == 1


def test_quarantine_release_delivers_identical_bytes_and_envelope_then_removes(
    tmp_path: Path,
) -> None:
    (item,) = _quarantine(tmp_path)
    with SinkServer() as sink:
        path = write_config(tmp_path, relay_port=sink.port)
        out = gateway("quarantine", "release", item.id, "--config", str(path))
        assert out.returncode == 0, out.stderr
        (delivered,) = sink.wait_for(1)
    assert delivered.mail_from == item.mail_from
    assert delivered.rcpt_tos == item.rcpt_tos
    assert delivered.data == b"".join(h.encode() + b"\r\n" for h in item.headers) + HAM
    listed = gateway("quarantine", "list", "--json", "--config", str(path))
    assert json.loads(listed.stdout) == []


def test_failed_release_keeps_the_message_and_says_why(tmp_path: Path) -> None:
    (item,) = _quarantine(tmp_path)
    with SinkServer() as sink:
        sink.data_reply = "451 4.3.0 busy, try later"
        path = write_config(tmp_path, relay_port=sink.port)
        out = gateway("quarantine", "release", item.id, "--config", str(path))
    assert out.returncode == 1
    assert b"kept in quarantine" in out.stderr and b"451" in out.stderr
    listed = gateway("quarantine", "list", "--json", "--config", str(path))
    assert [d["id"] for d in json.loads(listed.stdout)] == [item.id]


def test_release_with_downstream_down_keeps_the_message(tmp_path: Path) -> None:
    (item,) = _quarantine(tmp_path)
    sink = SinkServer().start()
    port = sink.port
    sink.close()
    path = write_config(tmp_path, relay_port=port)
    out = gateway("quarantine", "release", item.id, "--config", str(path))
    assert out.returncode == 1 and b"kept in quarantine" in out.stderr
    assert gateway("quarantine", "show", item.id, "--config", str(path)).stdout == HAM


def test_quarantine_purge_removes_messages_past_retention(tmp_path: Path) -> None:
    _quarantine(tmp_path, 2)  # received 2026-01-01, far older than 30 days by now
    path = write_config(tmp_path)
    out = gateway("quarantine", "purge", "--config", str(path))
    assert out.returncode == 0 and b"purged 2" in out.stdout


# --- learn -----------------------------------------------------------------------


def test_learn_without_the_bayes_policy_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "m.eml").write_bytes(HAM)
    path = write_config(tmp_path)
    out = gateway("learn", "spam", "--config", str(path), str(tmp_path / "m.eml"))
    assert out.returncode == 2
    assert b"bayes policy is not enabled" in out.stderr


def test_learn_reads_files_directories_and_mbox_and_skips_known_messages(tmp_path: Path) -> None:
    corpus = tmp_path / "spam"
    (corpus / "cur").mkdir(parents=True)
    for i in range(3):
        (corpus / "cur" / f"{i}.eml").write_bytes(
            HAM.replace(b"lunch", b"offer %d" % i).replace(b"noon", b"cheap pills %d" % i)
        )
    box = mailbox.mbox(tmp_path / "spam.mbox")
    for i in range(2):
        box.add(f"From: s@b.test\nSubject: mbox {i}\nMessage-ID: <m{i}@b.test>\n\nbuy now {i}\n")
    box.flush()
    box.close()
    path = write_config(tmp_path, "[policies.bayes]\n")
    out = gateway("learn", "spam", "--config", str(path), str(corpus), str(tmp_path / "spam.mbox"))
    assert out.returncode == 0, out.stderr
    assert b"learned 5 of 5 messages as spam" in out.stdout
    again = gateway("learn", "spam", "--config", str(path), str(corpus))
    assert b"learned 0 of 3 messages as spam" in again.stdout
    missing = gateway("learn", "ham", "--config", str(path), str(tmp_path / "nope"))
    assert missing.returncode == 1 and b"no such file" in missing.stderr


def test_scan_json_auth_comes_from_the_spf_and_dmarc_policies_over_real_dns(
    tmp_path: Path,
) -> None:
    zone = {
        "b.test": [("TXT", "v=spf1 ip4:192.0.2.1 -all")],
        "_dmarc.b.test": [("TXT", "v=DMARC1; p=reject")],
        "mx.b.test": [("A", "192.0.2.1")],
    }
    with DNSServer(zone, zones=["test"]) as dns_server:
        path = write_config(tmp_path, "[policies.spf]\n[policies.dkim]\n[policies.dmarc]\n")
        text = path.read_text().replace('"127.0.0.1:1"', f'"{dns_server.address}"')
        path.write_text(text.replace("timeout = 0.5", "timeout = 3.0"))
        args = ["scan", "--config", str(path), "--json", "--helo", "mx.b.test"]
        good = gateway(*args, "--ip", "192.0.2.1", "--mail-from", "a@b.test", "-", stdin=HAM)
        bad = gateway(*args, "--ip", "198.51.100.9", "--mail-from", "a@b.test", "-", stdin=HAM)
    assert good.returncode == 0, good.stderr
    auth = json.loads(good.stdout)["auth"]
    assert auth["spf"] == "pass"
    assert auth["spf_helo"] in ("none", "neutral")  # mx.b.test publishes no SPF record
    assert auth["dkim"] == []
    assert auth["dmarc"] == {"result": "pass", "policy": "reject", "domain": "b.test"}
    doc = json.loads(bad.stdout)
    assert doc["auth"]["spf"] == "fail"
    assert doc["auth"]["dmarc"]["result"] == "fail"
    assert doc["action"] == "reject" and doc["smtp_reply"].startswith("550 5.7.")


def test_release_of_a_message_another_release_holds_is_refused(tmp_path: Path) -> None:
    (item,) = _quarantine(tmp_path)

    async def claim() -> None:
        store = open_quarantine(QuarantineConfig(path="quarantine"), tmp_path)
        assert await store.claim(item.id)
        await store.close()

    asyncio.run(claim())
    with SinkServer() as sink:
        path = write_config(tmp_path, relay_port=sink.port)
        out = gateway("quarantine", "release", item.id, "--config", str(path))
        assert out.returncode == 1 and b"being released by another command" in out.stderr
        assert sink.messages == []


def test_config_may_come_before_the_command_or_from_the_environment(tmp_path: Path) -> None:
    path = str(write_config(tmp_path))
    assert gateway("--config", path, "check-config").returncode == 0
    assert gateway("--config", path, "quarantine", "list").returncode == 0
    assert gateway("quarantine", "--config", path, "list").returncode == 0
    env_run = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config"],
        capture_output=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "GATEWAY_CONFIG": path},
    )
    assert env_run.returncode == 0, env_run.stderr
    missing = gateway("check-config")
    assert missing.returncode == 2 and b"--config" in missing.stderr
    assert not (tmp_path / "quarantine").exists()  # listing an empty store creates nothing
