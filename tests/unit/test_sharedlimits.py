"""The limits table shared by pre-forked workers: exact counts, real processes, crash safety."""

from __future__ import annotations

import collections
import fcntl
import os
import signal
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sharedlimits import SharedCounters, SharedDataBudget, SharedSessionLimits

KEYS = [f"198.51.100.{i}" for i in range(6)]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 2), st.sampled_from(KEYS)),
        max_size=80,
    )
)
def test_counts_match_a_plain_counter_through_collisions_and_deletions(
    ops: list[tuple[bool, int, str]],
) -> None:
    """Eight slots for six keys: probe runs wrap around and deletions shift entries back."""
    table = SharedCounters(workers=3, slots=8)
    model: collections.Counter[tuple[int, str]] = collections.Counter()
    for acquire, worker, key in ops:
        total = sum(n for (_, k), n in model.items() if k == key)
        if acquire:
            assert table.acquire_key(worker, "ip", key, limit=3) is (total < 3)
            if total < 3:
                model[(worker, key)] += 1
        elif model[(worker, key)]:
            table.release_key(worker, "ip", key)
            model[(worker, key)] -= 1
        for k in KEYS:
            assert table.count("ip", k) == sum(n for (_, kk), n in model.items() if kk == k)
    for (worker, key), n in model.items():
        for _ in range(n):
            table.release_key(worker, "ip", key)
    assert all(not any(table._key_at(i)) for i in range(table.slots)), "entries left behind"


def test_sessions_are_limited_in_total_and_per_client_across_workers() -> None:
    table = SharedCounters(workers=2, slots=64)
    a, b = SharedSessionLimits(table, 0), SharedSessionLimits(table, 1)
    assert a.acquire("198.51.100.7", 3, 2) is None
    assert b.acquire("198.51.100.7", 3, 2) is None
    assert a.acquire("198.51.100.7", 3, 2) == "max_sessions_per_ip"  # two on two workers
    assert b.acquire("2001:db8::1", 3, 2) is None
    assert a.acquire("2001:db8::2", 3, 2) == "max_sessions"  # three in all
    b.release("198.51.100.7")
    assert a.acquire("2001:db8::2", 3, 2) is None  # the same /64 as ::1, one slot free
    assert table.count("ip", "2001:db8::/64") == 2
    assert table.sessions() == 3


def test_the_data_budget_is_one_for_all_workers() -> None:
    table = SharedCounters(workers=2, slots=64)
    a, b = SharedDataBudget(table, 0, 1000), SharedDataBudget(table, 1, 1000)
    assert a.take(600) and not b.take(600) and b.take(400)
    a.give(10_000)  # giving back more than taken returns only what it held
    assert table.data_used() == 400 and a.used == 0
    assert b.take(600)


def test_a_dead_workers_counts_are_cleared_and_the_others_kept() -> None:
    table = SharedCounters(workers=2, slots=64)
    for _ in range(2):
        assert table.acquire_session(0, "198.51.100.7", 100, 5) is None
    assert table.acquire_session(1, "198.51.100.7", 100, 5) is None
    assert table.acquire_key(0, "proxy", "127.0.0.1", 10)
    assert table.take_data(0, 500, 1000)
    table.reset_worker(0)
    assert table.count("ip", "198.51.100.7") == 1
    assert table.count("proxy", "127.0.0.1") == 0
    assert (table.sessions(), table.data_used()) == (1, 0)


def _fork(work: object) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            assert callable(work)
            code = work()
        finally:
            os._exit(code)
    return pid


def test_real_processes_racing_for_one_clients_slots_get_exactly_the_limit() -> None:
    table = SharedCounters(workers=4, slots=64)

    def worker(index: int) -> object:
        def run() -> int:
            return sum(
                table.acquire_session(index, "198.51.100.7", 1000, 20) is None for _ in range(50)
            )

        return run

    pids = [_fork(worker(i)) for i in range(4)]
    granted = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    assert sum(granted) == 20, granted
    assert table.count("ip", "198.51.100.7") == 20 and table.sessions() == 20


def test_a_worker_killed_while_holding_the_lock_does_not_wedge_the_others() -> None:
    table = SharedCounters(workers=2, slots=64)

    def hold_and_die() -> int:
        fcntl.lockf(table._fd, fcntl.LOCK_EX)
        os.kill(os.getpid(), signal.SIGKILL)
        return 0

    pid = _fork(hold_and_die)
    os.waitpid(pid, 0)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (table.sessions(), done.set()), daemon=True)
    thread.start()
    assert done.wait(10), "the lock of a dead process was not released"
