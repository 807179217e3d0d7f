"""Rate limits per client IP, sender domain and recipient, on the local and Redis stores."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio

from gateway.api import Action, Services
from gateway.state import LocalState, RedisState
from gateway.testing import NoDNS, make_context
from gateway.testing.require import require
from policies.ratelimit import RateLimitOptions, RateLimitPolicy

MSG = "From: a@sender.test\nSubject: hi\n\nhello\n"


async def policy(state: object, **options: object) -> RateLimitPolicy:
    p = RateLimitPolicy(RateLimitOptions(**options))  # type: ignore[arg-type]
    await p.start(Services(NoDNS(), state, "mx.example.org", Path()))  # type: ignore[arg-type]
    return p


@pytest.fixture
async def local_state(tmp_path: Path) -> AsyncIterator[LocalState]:
    state = LocalState(tmp_path / "state.sqlite")
    yield state
    await state.close()


async def test_client_ip_over_its_limit_is_deferred_with_a_readable_reason(
    local_state: LocalState,
) -> None:
    p = await policy(local_state, client_ip_limit=2, sender_domain_limit=0, recipient_limit=0)
    ctx = make_context(MSG, client_ip="192.0.2.7")
    assert (await p.check(ctx)).force is None
    assert (await p.check(ctx)).force is None
    third = await p.check(ctx)
    assert third.force is Action.TEMPFAIL
    assert [s.name for s in third.symbols] == ["RATELIMIT_CLIENT_IP"]
    assert third.reason == "rate limit: client 192.0.2.7 exceeded 2 messages per 3600 seconds"
    other = await p.check(make_context(MSG, client_ip="192.0.2.8"))
    assert other.force is None


async def test_sender_domain_and_recipient_limits_count_separately(local_state: LocalState) -> None:
    p = await policy(local_state, client_ip_limit=0, sender_domain_limit=1, recipient_limit=5)
    first = make_context(MSG, mail_from="x@Sender.TEST", rcpt_to=("u@example.org",))
    assert (await p.check(first)).symbols == ()
    second = await p.check(make_context(MSG, mail_from="y@sender.test", rcpt_to=("v@example.org",)))
    assert [s.name for s in second.symbols] == ["RATELIMIT_SENDER_DOMAIN"]
    assert second.symbols[0].detail == "sender domain sender.test: 2 in 3600s"


async def test_exempt_networks_are_never_limited(local_state: LocalState) -> None:
    p = await policy(local_state, client_ip_limit=1, sender_domain_limit=0, recipient_limit=0)
    for _ in range(3):
        assert (await p.check(make_context(MSG, client_ip="127.0.0.1"))).force is None


async def test_an_unreachable_store_steps_aside_and_mail_flows() -> None:
    dead = RedisState("redis://127.0.0.1:1/0", "gw-test:")
    p = await policy(dead)
    result = await p.check(make_context(MSG))
    assert result.force is None
    assert [s.name for s in result.symbols] == ["RATELIMIT_UNAVAILABLE"]
    await dead.close()


async def _redis_up() -> bool:
    client = redis.asyncio.Redis(host="127.0.0.1", port=6379, socket_timeout=1)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


async def test_two_nodes_on_one_redis_share_the_limit() -> None:
    require(await _redis_up(), "Redis on 127.0.0.1:6379 is not reachable")
    prefix = f"gw-test-{secrets.token_hex(4)}:"
    a = RedisState("redis://127.0.0.1:6379/0", prefix)
    b = RedisState("redis://127.0.0.1:6379/0", prefix)
    try:
        opts = {"client_ip_limit": 3, "sender_domain_limit": 0, "recipient_limit": 0}
        node_a, node_b = await policy(a, **opts), await policy(b, **opts)
        ctx = make_context(MSG, client_ip="198.51.100.9")
        results = [await node.check(ctx) for node in (node_a, node_b, node_a, node_b)]
        assert [r.force for r in results] == [None, None, None, Action.TEMPFAIL]
    finally:
        client = redis.asyncio.Redis(host="127.0.0.1", port=6379)
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
        await a.close()
        await b.close()
