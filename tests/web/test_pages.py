"""The admin pages over HTTP: login, CSRF, the login limit, escaping, actions through forms."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.quarantine import HeldSymbol, QuarantineStore
from gateway.testing.quarantine import held_item
from gateway.testing.sink import SinkServer, make_self_signed
from gateway.testing.web import PASSWORD, ServedWeb, login, served_web

XSS = "<script>alert('x')</script><img src=x onerror=alert(1)>"
RAW = (
    f'From: "{XSS}" <evil@bad.test>\r\nSubject: {XSS}\r\nContent-Type: text/html\r\n\r\n'
    f"<p>Hi</p>{XSS}<iframe src=//evil.test></iframe>\r\n"
).encode()


async def put(store: QuarantineStore, **fields: object) -> str:
    item = held_item(
        len(RAW),
        symbols=(HeldSymbol("BAYES_99", 5.0, "bayes", f"detail {XSS}"),),
        **fields,
    )
    await store.put(item, RAW)
    return item.id


async def test_pages_need_a_login_and_a_wrong_password_is_refused(web: ServedWeb) -> None:
    async with web.client(token=None) as http:
        async with http.get(web.url("/"), allow_redirects=False) as r:
            assert r.status == 303
            assert r.headers["Location"].startswith("/login?next=")
        async with http.get(web.url("/login")) as r:
            form_token = re.search(r'name="csrf_token" value="([^"]+)"', await r.text())
        assert form_token is not None
        async with http.post(
            web.url("/login"), data={"password": "guess", "csrf_token": form_token.group(1)}
        ) as r:
            assert r.status == 401
            assert "Wrong password" in await r.text()
        assert "gw_session" not in {c.key for c in http.cookie_jar}
        # The login form without its token: refused before the password is looked at.
        async with http.post(web.url("/login"), data={"password": PASSWORD}) as r:
            assert r.status == 403
        await login(http, web)
        async with http.get(web.url("/")) as r:
            assert r.status == 200


async def test_session_cookie_is_httponly_and_strict(web: ServedWeb) -> None:
    async with web.client(token=None) as http:
        async with http.get(web.url("/login")) as r:
            token = re.search(r'name="csrf_token" value="([^"]+)"', await r.text())
        assert token is not None
        async with http.post(
            web.url("/login"),
            data={"password": PASSWORD, "csrf_token": token.group(1), "next": "//evil.test/"},
            allow_redirects=False,
        ) as r:
            assert r.status == 303
            assert r.headers["Location"] == "/"  # never an open redirect
            cookie = r.cookies["gw_session"]
            assert cookie["httponly"] and cookie["samesite"] == "Strict"


async def test_failed_logins_are_rate_limited(web: ServedWeb) -> None:
    async with web.client(token=None) as http:
        statuses = []
        for password in ["nope"] * 6 + [PASSWORD]:
            async with http.get(web.url("/login")) as r:
                token = re.search(r'name="csrf_token" value="([^"]+)"', await r.text())
            assert token is not None
            async with http.post(
                web.url("/login"), data={"password": password, "csrf_token": token.group(1)}
            ) as r:
                statuses.append(r.status)
                if r.status == 429:
                    assert int(r.headers["Retry-After"]) > 0
    assert statuses == [401] * 5 + [429, 429]  # even the right password, until the window ends


async def test_state_changes_without_the_csrf_token_are_refused(
    web: ServedWeb, store: QuarantineStore, sink: SinkServer
) -> None:
    ident = await put(store)
    async with web.client(token=None) as http:
        csrf = await login(http, web)
        for data in ({"action": "release"}, {"action": "release", "csrf_token": "forged"}):
            async with http.post(web.url(f"/m/{ident}/act"), data=data) as r:
                assert r.status == 403
        async with http.post(
            web.url(f"/api/v1/quarantine/{ident}/release"), json={}
        ) as r:  # the API with the session cookie: CSRF header needed too
            assert r.status == 403
        assert await store.get(ident) is not None and not sink.messages
        async with http.post(
            web.url(f"/m/{ident}/act"), data={"action": "release", "csrf_token": csrf}
        ) as r:
            assert r.status == 200
            assert f"Released {ident}" in await r.text()
    assert len(sink.wait_for(1)) == 1
    assert await store.get(ident) is None


async def test_hostile_subject_names_and_bodies_are_shown_escaped(
    web: ServedWeb, store: QuarantineStore
) -> None:
    ident = await put(store)
    async with web.client(token=None) as http:
        await login(http, web)
        for path in ("/", f"/m/{ident}"):
            async with http.get(web.url(path)) as r:
                page = await r.text()
                assert "default-src 'none'" in r.headers["Content-Security-Policy"]
            assert "<script>alert" not in page and "<img src=x" not in page, path
            assert "&lt;script&gt;alert(" in page, path
            assert "<iframe src=//evil" not in page, path
        async with http.get(web.url(f"/m/{ident}/html")) as r:
            assert r.headers["Content-Security-Policy"].startswith("sandbox;")
            assert "default-src 'none'" in r.headers["Content-Security-Policy"]
            assert "<p>Hi</p>" in await r.text()  # the HTML itself, only ever sandboxed


async def test_bulk_actions_and_search(web: ServedWeb, store: QuarantineStore) -> None:
    a = await put(store, mail_from="one@a.test")
    b = await put(store, mail_from="two@b.test")
    c = await put(store, mail_from="three@c.test")
    async with web.client(token=None) as http:
        csrf = await login(http, web)
        async with http.get(web.url("/?sender=two@b.test")) as r:
            page = await r.text()
        assert b in page and a not in page and c not in page
        async with http.post(
            web.url("/bulk"),
            data=[("csrf_token", csrf), ("action", "delete"), ("id", a), ("id", c)],
        ) as r:
            assert "Deleted 2 of 2." in await r.text()
    assert [i.id for i in await store.list()] == [b]


async def test_logout_ends_the_session(web: ServedWeb) -> None:
    async with web.client(token=None) as http:
        csrf = await login(http, web)
        async with http.post(web.url("/logout"), data={"csrf_token": csrf}) as r:
            assert r.url.path == "/login"
        async with http.get(web.url("/"), allow_redirects=False) as r:
            assert r.status == 303


async def test_over_https_the_session_cookie_is_secure(
    store: QuarantineStore, sink: SinkServer, tmp_path: Path
) -> None:
    cert, key = make_self_signed(tmp_path, "127.0.0.1")
    tls = {"web.tls_cert": str(cert), "web.tls_key": str(key)}
    async with served_web(store, sink, tmp_path, tls) as web, web.client(token=None) as http:
        assert web.url("/").startswith("https://")
        async with http.get(web.url("/login")) as r:
            token = re.search(r'name="csrf_token" value="([^"]+)"', await r.text())
            assert r.cookies["gw_login"]["secure"]
        assert token is not None
        async with http.post(
            web.url("/login"),
            data={"password": PASSWORD, "csrf_token": token.group(1)},
            allow_redirects=False,
        ) as r:
            assert r.status == 303
            cookie = r.cookies["gw_session"]
            assert cookie["secure"] and cookie["httponly"] and cookie["samesite"] == "Strict"
