from __future__ import annotations

import functools
import os
import select
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import cast

import pytest
import trio

from relayd.capture import CaptureFeedRuntime
from relayd.datapath import DataPlane, Why, data_threads_alive, run_stoppable
from relayd.netif import GroupReceiver
from relayd.notify import STATE_WAIT, Notifier, monotonic_usec, socket_address
from relayd.pyplane import PLANE
from tests.helpers.emit_standin import feed_config, groups_for


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(2.0)
        try:
            yield sock, path
        finally:
            sock.close()


async def test_nothing_without_notify_socket() -> None:
    n = Notifier({})
    assert not n.enabled
    assert not await n.ready("x")
    assert not n.watchdog()
    assert n.watchdog_interval is None
    assert n.sent == 0
    assert not Notifier({"NOTIFY_SOCKET": ""}).enabled


async def test_ready_status_and_reloading(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    assert await n.ready("2 feeds\nhealthy")
    assert sock.recv(4096) == b"READY=1\nSTATUS=2 feeds healthy"
    before = monotonic_usec()
    assert await n.reloading()
    lines = sock.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= monotonic_usec()
    assert n.status("ok")
    assert sock.recv(4096) == b"STATUS=ok"
    assert await n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    n.close()


async def test_abstract_namespace_address() -> None:
    assert socket_address("@relayd/notify") == "\0relayd/notify"
    assert socket_address("/run/x") == "/run/x"
    name = f"relayd-test-{os.getpid()}-{os.urandom(4).hex()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    try:
        sock.bind("\0" + name)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert await n.ready()
        assert sock.recv(100) == b"READY=1"
        n.close()
    finally:
        sock.close()


async def test_send_failure_is_not_fatal() -> None:
    with tempfile.TemporaryDirectory() as d:
        n = Notifier({"NOTIFY_SOCKET": os.path.join(d, "nobody-listens")})
        assert n.enabled
        assert not await n.ready()
        n.close()


def _interval(env: dict[str, str]) -> float | None:
    n = Notifier(env)
    try:
        return n.watchdog_interval
    finally:
        n.close()


def test_watchdog_interval_and_pid() -> None:
    env = {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "10000000"}
    assert _interval(env) == 5.0
    assert _interval({**env, "WATCHDOG_PID": str(os.getpid())}) == 5.0
    assert _interval({**env, "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert _interval({**env, "WATCHDOG_USEC": "junk"}) is None
    assert _interval({"WATCHDOG_USEC": "1000"}) is None


async def test_watchdog_task_pings_at_half_interval(
    notify_socket: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock
) -> None:
    # Trio's virtual clock: the count is exact, whatever the load on the machine.
    sock, path = notify_socket
    sock.setblocking(False)
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})  # ping every 50 ms
    with trio.move_on_after(0.33):
        await n.run_watchdog()
    got = []
    while True:
        try:
            got.append(sock.recv(100))
        except BlockingIOError:
            break
    assert set(got) == {b"WATCHDOG=1"}
    assert len(got) == 7  # at 0, 50, ... 300 ms
    n.close()


async def test_state_changes_wait_for_room_periodic_messages_do_not(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    # Fill the receiver's queue (net.unix.max_dgram_qlen, 10 by default).
    filled = 0
    while n.watchdog():
        filled += 1
        assert filled < 100_000
    assert not n.status("dropped, not waited for")
    # A reader makes room after a moment: READY waits for it instead of being lost.
    reader = threading.Timer(0.2, lambda: sock.recv(100))
    reader.start()
    t0 = time.monotonic()
    pings = 0

    async def loop_runs() -> None:  # the event loop is not blocked while READY waits
        nonlocal pings
        while True:
            await trio.sleep(0.01)
            pings += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop_runs)
        assert await n.ready()
        nursery.cancel_scope.cancel()
    assert 0.1 < time.monotonic() - t0 < 1.0
    assert pings >= 5
    reader.join()
    got = [sock.recv(100) for _ in range(filled)]
    assert got[-1] == b"READY=1"
    assert set(got[:-1]) == {b"WATCHDOG=1"}
    n.close()


async def test_a_blocked_event_loop_stops_the_pings(
    notify_socket: tuple[socket.socket, str],
) -> None:
    """What makes systemd's watchdog useful: the pings come from the event loop, so while it
    is stuck none are sent."""
    sock, path = notify_socket
    arrivals: list[float] = []

    def read() -> None:
        sock.settimeout(0.5)
        while True:
            try:
                sock.recv(100)
            except TimeoutError:
                return
            arrivals.append(time.monotonic())

    reader = threading.Thread(target=read)
    reader.start()
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "40000"})  # ping every 20 ms
    async with trio.open_nursery() as nursery:
        nursery.start_soon(n.run_watchdog)
        await trio.sleep(0.2)
        stuck_from = time.monotonic()
        time.sleep(0.4)  # a blocking call in the event loop
        stuck_until = time.monotonic()
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    reader.join()
    n.close()
    during = [t for t in arrivals if stuck_from + 0.01 < t < stuck_until - 0.01]
    assert during == []
    assert len([t for t in arrivals if t < stuck_from]) >= 5
    assert len([t for t in arrivals if t > stuck_until]) >= 5


async def test_a_state_change_gives_up_after_its_wait_on_trios_clock(
    notify_socket: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock
) -> None:
    """Nobody makes room: READY is given up after STATE_WAIT seconds of Trio's clock (here a
    virtual one that jumps while the retries sleep, so no real second passes)."""
    _sock, path = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    while n.watchdog():  # fill the receiver's queue
        pass
    started = trio.current_time()
    assert not await n.ready()
    assert trio.current_time() - started >= STATE_WAIT
    n.close()


class _Wedged:
    """A capture socket whose first batch wedges the thread in the feed's pass over it
    (``frames`` never returns until ``release`` is set); after it, the receiver waits for the
    stop pipe (a wait by design)."""

    def __init__(self, stop_fd: int) -> None:
        self._stop_fd = stop_fd
        self.entered = threading.Event()
        self.release = threading.Event()
        self.waiting = threading.Event()
        self._calls = 0
        self.first = 1
        self.count = self.payload_bytes = self.sent = self.send_err = self.err = 0
        self.claimed = False
        self.drops: int | None = None

    def next(self) -> Why:
        self._calls += 1
        if self._calls == 1:
            self.count = 1
            return Why.FULL
        self.count = 0
        if self._calls == 2:
            return Why.EMPTY
        self.waiting.set()
        select.select([self._stop_fd], [], [])
        return Why.STOPPED

    def frames(self) -> bytes:
        self.entered.set()
        self.release.wait()
        return b"x"

    def done(self) -> None:
        pass


async def test_a_wedged_data_thread_stops_the_pings(
    notify_socket: tuple[socket.socket, str],
) -> None:
    """The watchdog pings only while every data-path thread moves or waits by design: a
    receive thread stuck in a batch stops them, and they come back once it moves again."""
    sock, path = notify_socket
    sock.setblocking(False)
    feed = CaptureFeedRuntime(feed_config(groups_for(20000, 1), [1]))
    wedged: list[_Wedged] = []

    class Plane:
        claim_word = PLANE.claim_word

        def capture_numbering(self, seq: int) -> object:
            return seq

        def capture_receiver(
            self,
            _sock: socket.socket,
            _port: int,
            stop_fd: int,
            _numbering: object,
            _claim: object,
            _upstream: object = None,
            *,
            busy_poll: float = 0.0,
            hold: float = 0.0,
        ) -> _Wedged:
            wedged.append(_Wedged(stop_fd))
            return wedged[0]

    checks: list[bool] = []

    def alive() -> bool:
        checks.append(data_threads_alive())
        return checks[-1]

    def pings() -> int:
        got = 0
        while True:
            try:
                assert sock.recv(100) == b"WATCHDOG=1"
            except BlockingIOError:
                return got
            got += 1

    receiver = cast(GroupReceiver, SimpleNamespace(sock=None, port=1))
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "40000"})  # a check every 20 ms
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(n.run_watchdog, alive)
            drain = functools.partial(
                feed.receive.drain, cast(DataPlane, Plane()), receiver, lambda: None
            )
            nursery.start_soon(run_stoppable, drain)
            while not (wedged and wedged[0].entered.is_set()):
                await trio.sleep(0.01)
            start = len(checks)
            while len(checks) < start + 8:
                await trio.sleep(0.01)
            stuck = checks[start + 1 :]  # the first may still see the turn that led here
            pinged_so_far, checked_alive = pings(), checks.count(True)
            wedged[0].release.set()
            while not wedged[0].waiting.is_set():
                await trio.sleep(0.01)
            start = len(checks)
            while len(checks) < start + 3:
                await trio.sleep(0.01)
            after = checks[start:]
            nursery.cancel_scope.cancel()
    n.close()
    assert not any(stuck)
    assert pinged_so_far == checked_alive  # a ping for each check that found all alive
    assert all(after)
    assert pings() >= 1
