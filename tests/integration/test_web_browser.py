"""End to end in a real headless browser: log in, find a held message, read why, release it.

Debian's chromium (/usr/bin/chromium) driven by Playwright; no browser is ever
downloaded. The gateway is a real ``gateway run`` subprocess that quarantined
the message from a real SMTP client, on the local and the PostgreSQL
quarantine; the release reaches the test downstream (SinkServer). With
``GATEWAY_SCREENSHOTS=docs/img`` the list and message pages are saved there
(``make screenshots``).
"""

from __future__ import annotations

import email
import email.message
import email.policy
import http.server
import os
import re
import smtplib
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.testing.harness import GatewayProcess
from gateway.testing.postgres import throwaway_schema
from gateway.testing.require import require, require_tool
from gateway.testing.services import free_port
from gateway.testing.sink import SinkServer
from gateway.testing.web import PASSWORD, web_overrides

GatewayFactory = Callable[..., GatewayProcess]

XSS_SUBJECT = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> Cheap pills'


def spam(tracker: str) -> bytes:
    """A held message whose HTML tries to run script and to load a tracking pixel."""
    return (
        'From: "Pill <b>Shop</b>" <offers@pills.test>\r\nTo: bob@example.org\r\n'
        f"Subject: {XSS_SUBJECT}\r\nContent-Type: text/html\r\n\r\n"
        "<p>QUARANTINE-ME best prices</p><script>window.__xss=3</script>"
        "<script>document.body.insertAdjacentHTML('beforeend', '<b id=ran>ran</b>')</script>"
        f'<img src="{tracker}/pixel.gif"><img src=x onerror="window.top.__xss=4">\r\n'
    ).encode()


class _Tracker(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:
        _Tracker.hits.append(self.path)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def tracker() -> Iterator[str]:
    """A web server on loopback that records every request: a tracking pixel's host."""
    _Tracker.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Tracker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


RULES = (
    '[[rule]]\nname = "TEST_QUARANTINE_ME"\ntype = "body"\npattern = "QUARANTINE-ME"\n'
    'score = 12.0\ndescription = "test marker: scores into the quarantine band"\n'
)


@pytest.fixture
def browser() -> Iterator[Any]:
    chromium = require_tool("chromium", "apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "playwright not installed (pip install -e '.[dev]')")
        raise
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(params=["local", "postgresql"])
def backend(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    if request.param == "local":
        yield {}
    else:
        with throwaway_schema() as dsn:
            yield {"quarantine.backend": "postgresql", "quarantine.dsn": dsn}


def test_log_in_find_read_why_release_and_it_arrives(
    make_gateway: GatewayFactory,
    sink: SinkServer,
    browser: Any,
    backend: dict[str, Any],
    tracker: str,
    tmp_path: Path,
) -> None:
    message = spam(tracker)
    rules = tmp_path / "quarantine-me.toml"
    rules.write_text(RULES)
    overrides = {
        **web_overrides(sink),
        **backend,
        "relay.verify_recipients": False,
        "policies.rules": {"builtin": False, "files": [str(rules)]},
    }
    gw = make_gateway(sink, overrides)
    with smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=30) as client:
        client.sendmail("offers@pills.test", ["bob@example.org"], message)
    assert sink.messages == []  # held, not relayed

    page = browser.new_page(viewport={"width": 1280, "height": 800})
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    base = f"http://127.0.0.1:{gw.web_port}"
    page.goto(f"{base}/")
    assert page.url.startswith(f"{base}/login")
    page.fill("input[name=password]", "not the password")
    page.click("button[type=submit]")
    assert "Wrong password" in page.inner_text("main")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")

    # The list: the hostile subject shows as text and runs nothing.
    page.fill("input[name=q]", "pills")
    page.click("form.search button[type=submit]")
    link = page.locator("td.subject a")
    assert link.count() == 1
    assert link.inner_text() == XSS_SUBJECT
    assert page.evaluate("typeof window.__xss") == "undefined"
    shots = os.environ.get("GATEWAY_SCREENSHOTS")
    if shots and not backend:
        Path(shots).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(shots) / "web-list.png"))

    # One message: why it was held.
    link.click()
    assert page.inner_text("h1.subject") == XSS_SUBJECT
    symbols = page.inner_text("table.symbols")
    assert "TEST_QUARANTINE_ME" in symbols and "12.00" in symbols
    assert "QUARANTINE-ME best prices" in page.inner_text("pre.body")
    assert page.locator("pre.body script, pre.body img").count() == 0
    assert page.locator("iframe").count() == 1  # ours, below: sandboxed
    assert page.locator("iframe").get_attribute("sandbox") == ""
    assert page.evaluate("typeof window.__xss") == "undefined"
    # The HTML view: sandboxed, its script never runs, nothing is fetched from elsewhere.
    page.click("details.html summary")
    frame = page.frame_locator("details.html iframe")
    assert frame.locator("p").first.inner_text() == "QUARANTINE-ME best prices"
    assert frame.locator("#ran").count() == 0
    assert page.evaluate("typeof window.__xss") == "undefined"
    [inner] = [f for f in page.frames if f.url.endswith("/html")]
    inner.wait_for_load_state("load")  # after every image it was allowed to load
    assert _Tracker.hits == []
    if shots and not backend:
        page.screenshot(path=str(Path(shots) / "web-message.png"), full_page=True)

    # Release: it arrives downstream, byte-exact under the prepended header fields.
    page.click("button[value=release]")
    assert "Released" in page.inner_text("p.notice")
    [got] = sink.wait_for(1)
    assert got.rcpt_tos == ("bob@example.org",)
    assert got.data.endswith(message)
    assert page.locator("td.subject a").count() == 0
    assert dialogs == []
    assert _Tracker.hits == []


def test_a_recipient_releases_through_a_digest_link_without_logging_in(
    make_gateway: GatewayFactory,
    sink: SinkServer,
    browser: Any,
    backend: dict[str, Any],
    tmp_path: Path,
) -> None:
    rules = tmp_path / "quarantine-me.toml"
    rules.write_text(RULES)
    port = free_port()
    overrides = {
        **web_overrides(sink),
        **backend,
        "web.listen": f"127.0.0.1:{port}",
        "relay.verify_recipients": False,
        "policies.rules": {"builtin": False, "files": [str(rules)]},
    }
    gw = make_gateway(sink, overrides)
    message = (
        b"From: Newsletter <news@shop.test>\r\nTo: bob@example.org\r\n"
        b"Subject: <script>window.__xss=1</script>Your invoice\r\n\r\nQUARANTINE-ME\r\n"
    )
    with smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=30) as client:
        client.sendmail("news@shop.test", ["bob@example.org"], message)
    cfg = str(gw.config_path)
    digest = subprocess.run(
        [sys.executable, "-m", "gateway", "quarantine", "digest", "--send", "--config", cfg],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert digest.returncode == 0, digest.stderr
    [mail] = sink.wait_for(1)
    assert mail.rcpt_tos == ("bob@example.org",)
    parsed = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    body = parsed.get_body(("plain",))
    assert body is not None
    [release] = re.findall(r"Release: (\S+)", body.get_content())
    assert release.startswith(f"http://127.0.0.1:{port}/r/")
    sink.clear()

    page = browser.new_page()
    # A tampered link (one character of the signature changed) is refused with a clear page.
    last = release[-1]
    page.goto(release[:-1] + ("A" if last != "A" else "B"))
    assert "This link cannot be used" in page.inner_text("h1")
    assert "damaged or was not issued" in page.inner_text("p.problem")
    # The real one: a confirmation first (a scanner following links releases nothing) ...
    page.goto(release)
    assert page.inner_text("h1.subject") == "<script>window.__xss=1</script>Your invoice"
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert sink.messages == []
    shots = os.environ.get("GATEWAY_SCREENSHOTS")
    if shots and not backend:
        Path(shots).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(shots) / "web-recipient.png"), full_page=True)
    # ... then the recipient's click releases it, with no login anywhere.
    page.click("button[value=release]")
    assert "on its way to bob@example.org" in page.inner_text("p.done")
    [got] = sink.wait_for(1)
    assert got.rcpt_tos == ("bob@example.org",) and got.data.endswith(message)
    page.goto(release)  # used: refused, and nothing is delivered twice
    assert "already released at" in page.inner_text("p.problem")
    assert len(sink.messages) == 1
