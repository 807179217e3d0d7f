"""Fuzz the parse-and-policy path: Engine.evaluate with every shipped policy.

Hypothesis builds hostile messages (random headers, encoded words, MIME trees
with random boundaries, transfer encodings and charsets, bare CR/LF, NULs,
8-bit bytes) and evaluates them with the policies ``config.example.toml``
enables, DNS from the local test server. Every message must get a verdict;
no policy may fail (outcome "error") or time out. Bounded for CI by
``max_examples``. A failing example is written to ``cases/`` by hand as a
``.eml`` file; every file there is replayed by the regression test below.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rel_support import ZONES, sender_zone

from gateway.api import Services
from gateway.config import load_config
from gateway.dns import CachingResolver
from gateway.engine import Engine, Envelope, Evaluation
from gateway.state import open_state
from gateway.testing.dnsserver import DNSServer
from gateway.testing.harness import write_config

CASES = Path(__file__).parent / "cases"


class ShippedEngine:
    """An Engine with the shipped policies on its own event loop (reused across examples)."""

    def __init__(self, workdir: Path, dns: DNSServer) -> None:
        path = write_config({"dns.nameservers": [dns.address], "dns.timeout": 1.0}, workdir)
        self.config = load_config(path)
        self.loop = asyncio.new_event_loop()
        self.state = open_state(self.config.state, self.config.base_dir)
        services = Services(
            resolver=CachingResolver(self.config.dns),
            state=self.state,
            hostname=self.config.server.hostname,
            config_dir=self.config.base_dir,
        )
        self.engine = Engine(self.config, Engine.make_plan(self.config), services)
        self.loop.run_until_complete(self.engine.start())

    def evaluate(self, raw: bytes) -> Evaluation:
        envelope = Envelope(
            client_ip="192.0.2.10",
            helo="fuzz.sender.test",
            mail_from="fuzz@sender.test",
            rcpt_to=("user@example.org",),
            queue_id="FUZZQUEUEID",
            received_at=datetime.now(UTC),
        )
        return self.loop.run_until_complete(
            asyncio.wait_for(self.engine.evaluate(envelope, raw), 30)
        )

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.close())
        self.loop.run_until_complete(self.state.close())
        self.loop.close()


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShippedEngine]:
    with DNSServer(sender_zone(), zones=ZONES) as dns:
        engine = ShippedEngine(tmp_path_factory.mktemp("fuzz"), dns)
        try:
            yield engine
        finally:
            engine.close()


def _check(evaluation: Evaluation) -> None:
    failed = [(r.name, r.outcome) for r in evaluation.run.runs if r.outcome != "ok"]
    assert failed == [], failed
    assert evaluation.action is not None


# --- strategies -----------------------------------------------------------------

_junk = st.binary(max_size=40) | st.sampled_from(
    [
        b"\r",
        b"\n",
        b"\r\n",
        b"\x00",
        b"\xff\xfe",
        b"=?",
        b"?=",
        b"=?utf-8?b?",
        b"=?x?q?=ZZ",
        b"--",
        b";",
        b'"',
        b"\\",
        b"\t",
        b" ",
        b"=\r\n",
        b"http://",
        b"<a href=",
        b"%ZZ",
    ]
)
_text = st.lists(_junk, max_size=12).map(b"".join)
_name = st.sampled_from(
    [
        b"Subject",
        b"From",
        b"To",
        b"Cc",
        b"Reply-To",
        b"Date",
        b"Message-ID",
        b"Received",
        b"Content-Type",
        b"Content-Transfer-Encoding",
        b"Content-Disposition",
        b"DKIM-Signature",
        b"ARC-Seal",
        b"Authentication-Results",
        b"List-Unsubscribe",
        b"X-Mailer",
        b"MIME-Version",
    ]
) | st.binary(min_size=1, max_size=12)
_ctype = st.sampled_from(
    [
        b"text/plain",
        b"text/html",
        b"multipart/mixed",
        b"multipart/alternative",
        b"message/rfc822",
        b"application/zip",
        b"application/octet-stream",
        b"image/png",
        b"application/x-msdownload",
        b"multipart/",
        b"text/plain; charset=utf-7",
        b"text/plain; charset=x-zq-unknown",
        b'text/html; charset="iso-2022-jp"',
    ]
)
_cte = st.sampled_from([b"base64", b"quoted-printable", b"7bit", b"8bit", b"binary", b"x-zq"])


@st.composite
def _part(draw: st.DrawFn, depth: int = 0) -> bytes:
    ctype = draw(_ctype)
    headers = [b"Content-Type: " + ctype]
    if draw(st.booleans()):
        headers.append(b"Content-Transfer-Encoding: " + draw(_cte))
    if draw(st.booleans()):
        fname = draw(st.sampled_from([b"a.exe", b"r.pdf", b"x.zip", b"=?utf-8?q?e=2Eexe?=", b""]))
        headers.append(b'Content-Disposition: attachment; filename="' + fname + b'"')
    if ctype.startswith(b"multipart") and depth < 4:
        boundary = draw(st.sampled_from([b"b", b"bb", b"=_", b"", b"b" * 80]))
        headers[0] += b'; boundary="' + boundary + b'"'
        children = draw(st.lists(_part(depth + 1), max_size=3))
        body = b"".join(b"--" + boundary + b"\r\n" + c + b"\r\n" for c in children)
        if draw(st.booleans()):
            body += b"--" + boundary + b"--\r\n"
    else:
        body = draw(_text)
    return b"\r\n".join(headers) + b"\r\n\r\n" + body


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    fields = draw(st.lists(st.tuples(_name, _text), max_size=12))
    head = b"".join(n + b": " + v + b"\r\n" for n, v in fields)
    head += b"From: <a@sender.test>\r\n" if draw(st.booleans()) else b""
    return head + draw(_part())


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
@given(messages())
def test_every_hostile_message_gets_a_verdict_without_policy_errors(
    shipped: ShippedEngine, raw: bytes
) -> None:
    _check(shipped.evaluate(raw))


@pytest.mark.parametrize("case", sorted(CASES.glob("*.eml")), ids=lambda p: p.name)
def test_kept_fuzz_cases_get_a_verdict_without_policy_errors(
    shipped: ShippedEngine, case: Path
) -> None:
    _check(shipped.evaluate(case.read_bytes()))
