"""Shared derived content (gateway/content.py): text parts, HTML, links, URLs, domains."""

from __future__ import annotations

import base64
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import content
from gateway.api import (
    URLSource,
    body_text,
    html_links,
    normalize_url,
    registrable_domain,
    text_parts,
    urls,
)
from gateway.testing.context import make_context


def mime(*parts: str, subtype: str = "mixed") -> str:
    body = "".join(f"--B\n{p}\n" for p in parts)
    head = f"From: a@example.net\nMIME-Version: 1.0\nContent-Type: multipart/{subtype}; boundary=B"
    return f"{head}\n\n{body}--B--\n"


def test_html_is_rendered_without_script_style_and_with_block_breaks() -> None:
    ctx = make_context(
        "From: a@example.net\nContent-Type: text/html\n\n"
        "<html><head><title>T</title><style>p{}</style></head><body>"
        "V<b>i</b>agra<p>second</p><script>alert(1)</script><div>third</div></body></html>"
    )
    (part,) = text_parts(ctx)
    assert part.is_html
    assert [line for line in part.text.split("\n") if line] == ["Viagra", "second", "third"]
    assert "<b>" in part.raw_html


def test_html_alternative_of_a_plain_part_is_left_out_of_body_text() -> None:
    ctx = make_context(
        mime(
            "Content-Type: text/plain\n\nplain words",
            "Content-Type: text/html\n\n<p>html words</p>",
            subtype="alternative",
        )
    )
    parts = text_parts(ctx)
    assert [(p.is_html, p.alternative) for p in parts] == [(False, False), (True, True)]
    assert body_text(ctx) == "plain words"


def test_attachments_are_skipped_and_charsets_decoded() -> None:
    ctx = make_context(
        mime(
            "Content-Type: text/plain; charset=iso-8859-1\n"
            "Content-Transfer-Encoding: quoted-printable\n\nCaf=E9",
            'Content-Type: text/plain\nContent-Disposition: attachment; filename="a.txt"\n\nsecret',
            "Content-Type: text/plain; charset=x-no-such-charset\n\nplain",
        )
    )
    assert [p.text for p in text_parts(ctx)] == ["Café", "plain"]


def _unlabelled(body: bytes, ctype: str = "text/plain") -> bytes:
    return b"From: a@example.net\r\nContent-Type: " + ctype.encode() + b"\r\n\r\n" + body


@pytest.mark.parametrize(
    ("text", "codec", "ctype"),
    [
        (
            "お世話になっております。本日は特別なご案内をお送りします。無料で登録できます。",
            "shift_jis",
            "text/plain",
        ),
        (
            "Здравствуйте! Предлагаем вам уникальную возможность заработать деньги дома. "
            "Звоните нам сегодня, количество мест ограничено. Подробности на сайте.",
            "koi8-r",
            "text/plain",
        ),
        (
            "您好。我们公司专业提供各种发票。价格优惠。欢迎来电咨询。",
            "gb2312",
            "text/plain; charset=us-ascii",
        ),
    ],
)
def test_unlabelled_8bit_text_gets_its_charset_guessed(text: str, codec: str, ctype: str) -> None:
    """Undeclared 8-bit text decoded as UTF-8 would be replacement characters."""
    (part,) = text_parts(make_context(_unlabelled(text.encode(codec), ctype)))
    assert part.text == text and "\ufffd" not in part.text


def test_unlabelled_utf8_stays_utf8_even_when_the_sample_cuts_a_character() -> None:
    text = "x" * (content.GUESS_SAMPLE - 1) + "é" * 10
    (part,) = text_parts(make_context(_unlabelled(text.encode())))
    assert part.charset == "utf-8" and part.text == text
    (part,) = text_parts(make_context(_unlabelled(b"plain ascii")))
    assert part.charset == "utf-8"


def test_charset_guesses_are_bounded_per_message() -> None:
    """Hostile input: many unlabelled 8-bit parts cost at most MAX_GUESSES guesses."""
    koi8 = "Здравствуйте! Предлагаем вам уникальную возможность заработать деньги дома. "
    body = (koi8 * 3).encode("koi8-r").decode("latin-1")
    n = content.MAX_GUESSES + 2
    parts = text_parts(
        make_context(mime(*[f"Content-Type: text/plain\n\n{body}"] * n).encode("latin-1"))
    )
    assert [p.charset for p in parts[: content.MAX_GUESSES]] == ["koi8-r"] * content.MAX_GUESSES
    assert {p.charset for p in parts[content.MAX_GUESSES :]} == {"utf-8"}


def test_decoded_text_is_bounded_and_marked_truncated() -> None:
    big = base64.encodebytes(b"x" * (content.MAX_PART_TEXT + 1000)).decode()
    ctx = make_context(f"From: a@example.net\nContent-Transfer-Encoding: base64\n\n{big}")
    (part,) = text_parts(ctx)
    assert part.truncated and len(part.text) == content.MAX_PART_TEXT


def test_parts_visited_are_bounded() -> None:
    many = [f"Content-Type: text/plain\n\npart {i}" for i in range(content.MAX_PARTS * 2)]
    parts = text_parts(make_context(mime(*many)))
    assert 0 < len(parts) < content.MAX_PARTS


def test_results_are_computed_once_per_message() -> None:
    ctx = make_context("From: a@example.net\n\nhttp://example.com/")
    assert text_parts(ctx) is text_parts(ctx)
    assert urls(ctx) is urls(ctx)


@pytest.mark.parametrize(
    ("raw", "url", "host"),
    [
        ("HTTP://WWW.Example.COM/a", "http://www.example.com/a", "www.example.com"),
        ("http://bücher.example/x", "http://xn--bcher-kva.example/x", "xn--bcher-kva.example"),
        (
            "http://example.com/%7Euser/%2Fpath%41",
            "http://example.com/~user/%2Fpath" + "A",
            "example.com",
        ),
        ("www.example.org/page", "http://www.example.org/page", "www.example.org"),
        ("http://ex%61mple.com/", "http://example.com/", "example.com"),
        ("http://example.com.:8080/x", "http://example.com:8080/x", "example.com"),
        ("http://[2001:DB8::1]/x", "http://[2001:db8::1]/x", "2001:db8::1"),
        ("http://0xC0.0xA8.1.1/", "http://192.168.1.1/", "192.168.1.1"),
        (
            "https://www.google.com/url?q=https://target.example/p&sa=D",
            "https://target.example/p",
            "target.example",
        ),
        ("https://t.co/abc", "https://t.co/abc", "t.co"),
    ],
)
def test_urls_are_normalized(raw: str, url: str, host: str) -> None:
    u = normalize_url(raw)
    assert u is not None and u.url == url and u.host == host


def test_numeric_ips_redirectors_and_userinfo_are_flagged() -> None:
    ip = normalize_url("http://3232235777/")
    assert ip is not None and ip.host == "192.168.1.1" and ip.obfuscated_ip and ip.is_ip
    red = normalize_url("https://www.google.com/url?q=http://x.example.net/")
    assert red is not None and red.redirector == "www.google.com"
    user = normalize_url("http://bank.example.com@evil.example.net/")
    assert user is not None and user.userinfo and user.host == "evil.example.net"


@pytest.mark.parametrize(
    "raw", ["mailto:a@example.com", "javascript:alert(1)", "cid:x", "http://", "http://[::1/"]
)
def test_other_schemes_and_garbage_are_not_urls(raw: str) -> None:
    assert normalize_url(raw) is None


def test_urls_come_from_text_href_src_and_form_with_link_text() -> None:
    ctx = make_context(
        mime(
            "Content-Type: text/plain\n\n"
            "See http://text.example.com/a, or (www.paren.example.com).",
            'Content-Type: text/html\n\n<a href="http://href.example.com/">Click <b>here</b></a>'
            '<img src="http://img.example.com/p.png"><form action="http://form.example.com/post"></form>'
            '<a href="mailto:x@example.com">mail</a>',
        )
    )
    got = {(u.host, u.source, u.text) for u in urls(ctx)}
    assert got == {
        ("text.example.com", URLSource.TEXT, ""),
        ("www.paren.example.com", URLSource.TEXT, ""),
        ("href.example.com", URLSource.HREF, "Click here"),
        ("img.example.com", URLSource.SRC, ""),
        ("form.example.com", URLSource.FORM, ""),
    }
    assert [link.tag for link in html_links(ctx)] == ["a", "img", "form", "a"]


def test_url_and_link_counts_are_bounded_and_fast_on_hostile_html() -> None:
    links = "".join(f'<a href="http://h{i}.example.com/">x</a>' for i in range(20_000))
    ctx = make_context(
        f"From: a@example.net\nContent-Type: text/html\n\n<html><body>{links}</body></html>"
    )
    started = time.process_time()
    found = urls(ctx)
    assert time.process_time() - started < 1.0
    assert len(found) == content.MAX_URLS
    assert len(html_links(ctx)) == content.MAX_LINKS


@pytest.mark.parametrize(
    ("host", "domain"),
    [
        ("a.b.example.co.uk", "example.co.uk"),
        ("WWW.Example.COM.", "example.com"),
        ("192.0.2.1", "192.0.2.1"),
        ("localhost", "localhost"),
        ("example", "example"),
    ],
)
def test_registrable_domain_uses_the_bundled_public_suffix_list(host: str, domain: str) -> None:
    assert registrable_domain(host) == domain


def test_repeated_bare_urls_cost_little() -> None:
    text = "http://same.example.com/ " * 40_000
    ctx = make_context(f"From: a@example.net\n\n{text}")
    started = time.process_time()
    assert [u.host for u in urls(ctx)] == ["same.example.com"]
    assert time.process_time() - started < 0.5


def test_stray_8bit_bytes_in_base64_do_not_hide_the_body() -> None:
    body = base64.encodebytes(b"hidden spam words here").decode()
    raw = (
        b"From: a@example.net\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + body[:8].encode()
        + b"\xff\xfe"
        + body[8:].encode()
    )
    assert body_text(make_context(raw)) == "hidden spam words here"


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet=" \t\r\n\f\v\xa0ab.", max_size=80))
def test_squeeze_collapses_white_space_as_the_plain_pattern_does(text: str) -> None:
    """Every run of spaces, tabs, CR, FF, VT and NBSP becomes one space; blank lines one."""
    plain = re.sub(r"[ \t\r\f\v\xa0]+", " ", text.replace("\r\n", "\n"))
    assert content._squeeze(text) == re.sub(r"\n\s*\n+", "\n\n", plain).strip()
