"""Hostile input: the spam policies and content extraction never raise and stay fast."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import content
from gateway.api import Policy
from gateway.testing.context import make_context
from policies.heuristics import HeuristicsOptions, HeuristicsPolicy
from policies.lists import ListsOptions, ListsPolicy
from policies.rules import RulesOptions, RulesPolicy
from policies.urls import URLOptions, URLPolicy

POLICIES: list[Policy] = [
    RulesPolicy(RulesOptions()),
    HeuristicsPolicy(HeuristicsOptions()),
    URLPolicy(URLOptions()),
    ListsPolicy(ListsOptions()),
]


async def check_all(raw: bytes | str) -> set[str]:
    ctx = make_context(raw)
    content.body_text(ctx)
    content.urls(ctx)
    found: set[str] = set()
    for policy in POLICIES:
        found |= {s.name for s in (await policy.check(ctx)).symbols}
    return found


HEADER_LINES = st.sampled_from(
    [
        b"From: ",
        b"To: ",
        b"Reply-To: ",
        b"Subject: ",
        b"Date: ",
        b"Received: x; ",
        b"Content-Type: ",
        b"Content-Transfer-Encoding: ",
        b"Content-Disposition: ",
        b"Message-ID: ",
        b"",
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(HEADER_LINES, st.binary(max_size=80)), max_size=12),
    st.binary(max_size=600),
)
async def test_arbitrary_bytes_never_raise(headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    raw = b"".join(name + value.replace(b"\n", b" ") + b"\r\n" for name, value in headers)
    await check_all(raw + b"\r\n" + body)


async def test_absurd_dates_and_addresses_are_findings_not_crashes() -> None:
    raw = (
        "Received: from x by y; Mon, 99 Foo 99999 99:99:99 +9999\n"
        "Received: from x by y; Tue, 31 Dec 9999 23:59:59 +0000\n"
        'From: "\\"<>@@@" <@@@>, =?utf-8?b?////?= <a@[300.1.1.1]>\n'
        "Reply-To: ;;;,,,<<<>>>\n"
        "To: " + ", ".join(f"u{i}@example.org" for i in range(5000)) + "\n"
        "Date: Tue, 01 Jan 0001 00:00:00 +0000\n"
        "Subject: =?x-unknown?q?=FF=FE?=\n"
        'Content-Type: multipart/mixed; boundary=""\n\n--\n--\n'
    )
    found = await check_all(raw)
    assert "HDR_MANY_RECIPIENTS" in found


async def test_deep_nesting_and_many_parts_stay_bounded_and_fast() -> None:
    depth = 300
    head = "".join(
        f"Content-Type: multipart/mixed; boundary=b{i}\n\n--b{i}\n" for i in range(depth)
    )
    tail = "".join(f"\n--b{i}--\n" for i in reversed(range(depth)))
    raw = "From: a@example.net\n" + head + "Content-Type: text/plain\n\ndeep" + tail
    started = time.process_time()
    await check_all(raw)
    wide = "From: a@example.net\nContent-Type: multipart/mixed; boundary=B\n\n" + "".join(
        f"--B\nContent-Type: text/html\n\n<p>part {i} http://h{i}.example.com/</p>\n"
        for i in range(3000)
    )
    await check_all(wide + "--B--\n")
    assert time.process_time() - started < 3.0


async def test_huge_html_and_text_are_cut_not_choked_on() -> None:
    html = "<div>" * 50_000 + "word " * 200_000 + "<a href='http://x.example.com/'>x</a>" * 5000
    raw = "From: a@example.net\nContent-Type: text/html\n\n" + html
    started = time.process_time()
    await check_all(raw)
    assert time.process_time() - started < 3.0


async def test_pathological_html_falls_back_to_a_linear_renderer() -> None:
    """Deep nesting makes HTML tree building quadratic; unclosed scripts must not either."""
    cases = [
        "<div>" * 50_000 + "deep <a href='http://deep.example.com/'>link</a>",
        "<script>" * 50_000,
        "<div>" * 2_000 + "<style>p{}</style>visible",
    ]
    started = time.process_time()
    texts = []
    for html in cases:
        ctx = make_context("From: a@example.net\nContent-Type: text/html\n\n" + html)
        texts.append(content.body_text(ctx))
        content.urls(ctx)
    assert time.process_time() - started < 1.0
    assert "deep link" in texts[0] and texts[1] == "" and texts[2] == "visible"
