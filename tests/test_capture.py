"""The capture feed on loopback: real multicast on 127.0.0.1 into a real TCP peer speaking the
protocol (a small emit-side stand-in, so each test can make it misbehave on purpose). Every test
that captures datagrams runs twice, on the C and on the Python data path (the ``datapath``
fixture)."""

from __future__ import annotations

import functools
import logging
import os
import random
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import attrs
import pytest
import trio

from relayd import datapath, wire
from relayd.capture import BACKOFF_CAP, CaptureFeedRuntime, backoff_delay
from relayd.capture.link import Connect
from relayd.capture.receive import BATCH_HOLD, Receive
from relayd.capture.sites import Fanout
from relayd.capture.uplink import Uplink
from relayd.config import Endpoint
from relayd.datapath import Why
from relayd.logs import RateLimitedLogger
from relayd.netif import open_multicast_sender
from relayd.pyplane import PLANE
from relayd.replay import ReplayBuffer
from tests.helpers.emit_standin import Peer, feed_config, groups_for, serve, stop
from tests.helpers.loopback import FEED, LOOPBACK, per_group, wait_for

SO_RCVBUFFORCE = 33  # Linux; the socket module does not export it


def _base_port() -> int:
    return 20000 + (os.getpid() * 7 + random.randrange(1000)) % 20000


@pytest.fixture
def sender() -> Iterator[socket.socket]:
    sock = open_multicast_sender(LOOPBACK, 1, True, 4 * 1024 * 1024)
    yield sock
    sock.close()


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


def watch_states(nursery: trio.Nursery, feed: CaptureFeedRuntime) -> set[tuple[str, bool]]:
    """Every (state, healthy) ``feed.health()`` reports from now on, polled in ``nursery``."""
    seen: set[tuple[str, bool]] = set()

    async def watch() -> None:
        while True:
            health = feed.health()
            seen.add((health.state, health.healthy))
            await trio.sleep(0.01)

    nursery.start_soon(watch)
    return seen


def send_many(
    sock: socket.socket, targets: Sequence[tuple[str, int]], count: int, size: int = 100
) -> list[tuple[str, int, bytes]]:
    sent = []
    for i in range(count):
        group, port = targets[i % len(targets)]
        payload = i.to_bytes(4, "big") + bytes((i + j) & 0xFF for j in range(size - 4))
        while True:
            try:
                sock.sendto(payload, (group, port))
                break
            except BlockingIOError:
                pass
        sent.append((group, port, payload))
    return sent


@pytest.mark.usefixtures("datapath")
async def test_frames_are_byte_identical_and_numbered(
    nursery: trio.Nursery, sender: socket.socket
) -> None:
    server = await serve(nursery, Peer())
    base = _base_port()
    groups = [*groups_for(base, 3), ("239.255.11.1", base + 1)]
    feed = CaptureFeedRuntime(feed_config(groups, [server.port]))
    await nursery.start(feed.run)
    await wait_for(lambda: feed.connected)
    assert feed.health().detail["last_datagram_age_seconds"] is None  # none arrived yet
    sent = send_many(sender, groups, 500, size=300)
    await wait_for(lambda: len(server.peer.datagrams) >= 500)
    got = server.peer.datagrams
    assert [d.seq for d in got] == list(range(1, 501))
    # one socket per port: order holds per group (and per socket), not across sockets
    assert per_group([(str(IPv4Address(d.group)), d.port, d.payload) for d in got]) == per_group(
        sent
    )
    for frame, d in zip(server.peer.frames, got, strict=True):
        expected = wire.encode_datagram(d.seq, d.group, d.port, d.ts_ns, d.payload)
        assert frame == expected
    await wait_for(lambda: feed.replay.acked_seq == 500)
    await wait_for(lambda: len(feed.replay) == 0)
    samples = {(s.name, s.labels): s.value for s in feed.samples()}
    assert samples["capture_datagrams_in", (("feed", FEED),)] == 500
    assert samples["capture_frames_sent", (("feed", FEED),)] == 500
    assert samples["capture_connects", (("feed", FEED), ("result", "ok"))] == 1
    assert feed.health().healthy
    assert feed.health().state == "streaming"
    assert 0 <= feed.health().detail["last_datagram_age_seconds"] < 5


async def test_a_target_that_does_not_resolve_is_the_reason_shown(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_such_name(host: str, *args: object, **kwargs: object) -> object:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(trio.socket, "getaddrinfo", no_such_name)
    groups = groups_for(_base_port(), 1, third=17)
    config = feed_config(groups, [1], reconnect_budget=0.2)
    config = attrs.evolve(config, targets=(Endpoint("emit.example.invalid", 6000),))
    feed = CaptureFeedRuntime(config)
    await nursery.start(feed.run)
    await wait_for(lambda: not feed.health().healthy)
    health = feed.health()
    assert health.state == "disconnected"
    assert health.detail["last_error"] == (
        "emit.example.invalid:6000: cannot resolve: [Errno -2] Name or service not known"
    )


@pytest.mark.usefixtures("datapath")
async def test_more_than_twenty_groups(nursery: trio.Nursery, sender: socket.socket) -> None:
    server = await serve(nursery, Peer())
    groups = groups_for(_base_port(), 45, third=12)
    feed = CaptureFeedRuntime(feed_config(groups, [server.port]))
    await nursery.start(feed.run)
    assert len(feed.receivers) == 3
    await wait_for(lambda: feed.connected)
    sent = send_many(sender, groups, 450, size=50)
    await wait_for(lambda: len(server.peer.datagrams) >= 450)
    by_group = {(str(IPv4Address(d.group)), d.port) for d in server.peer.datagrams}
    assert by_group == set(groups)
    assert sorted(d.payload for d in server.peer.datagrams) == sorted(p for _, _, p in sent)


@pytest.mark.usefixtures("datapath")
async def test_resend_after_reconnect_to_a_new_host(
    nursery: trio.Nursery, sender: socket.socket
) -> None:
    """The first host reads but never ACKs, then dies; a new host on the same port gets
    everything again (welcome ACK 0) and later data too, in order, with no gap."""
    first = await serve(nursery, Peer(ack=False))
    groups = groups_for(_base_port(), 2, third=13)
    feed = CaptureFeedRuntime(feed_config(groups, [first.port]))
    await nursery.start(feed.run)
    await wait_for(lambda: feed.connected)
    send_many(sender, groups, 200)
    await wait_for(lambda: len(first.peer.datagrams) >= 200)
    port = first.port
    stop(first)
    await wait_for(lambda: not feed.connected)
    assert feed.health().state == "reconnecting"
    assert feed.health().healthy
    send_many(sender, groups, 100)  # captured while disconnected
    await trio.sleep(0.1)
    second = await serve(nursery, Peer(), port=port)
    await wait_for(lambda: len(second.peer.datagrams) >= 300)
    assert [d.seq for d in second.peer.datagrams] == list(range(1, 301))
    assert feed.uplink.resent_datagrams == 200
    await wait_for(lambda: feed.replay.acked_seq == 300)


@pytest.mark.usefixtures("datapath")
async def test_exact_resume_after_half_a_chunk_was_acknowledged(
    nursery: trio.Nursery, sender: socket.socket
) -> None:
    """Issue 14 item 1: the first host acknowledged part of a chunk, then died; a new host
    (welcome ACK 0) gets exactly the datagrams after that ACK: nothing acknowledged again."""
    first = await serve(nursery, Peer(ack=False))
    groups = groups_for(_base_port(), 1, third=15)
    feed = CaptureFeedRuntime(feed_config(groups, [first.port]))
    await nursery.start(feed.run)
    await wait_for(lambda: feed.connected)
    total = 0
    split = None
    while split is None and total < 5000:  # until some batch held more than one datagram
        send_many(sender, groups, 500)
        total += 500
        await wait_for(functools.partial(lambda n: len(first.peer.datagrams) >= n, total))
        split = next((c for c in feed.replay if c.datagrams > 1), None)
    assert split is not None
    acked = split.first_seq  # the chunk's first datagram only
    await first.peer.streams[0].send_all(wire.encode_ack(acked))
    await wait_for(lambda: feed.health().detail["acked_seq"] == acked)  # applies the ACKs
    port = first.port
    stop(first)
    await wait_for(lambda: not feed.connected)
    second = await serve(nursery, Peer(), port=port)
    await wait_for(lambda: len(second.peer.datagrams) >= total - acked)
    await trio.sleep(0.2)
    assert [d.seq for d in second.peer.datagrams] == list(range(acked + 1, total + 1))
    assert feed.uplink.resent_datagrams == total - acked


@pytest.mark.usefixtures("datapath")
async def test_reconnect_to_the_same_host_resumes_after_its_ack(
    nursery: trio.Nursery, sender: socket.socket
) -> None:
    peer = Peer()
    server = await serve(nursery, peer)
    groups = groups_for(_base_port(), 1, third=14)
    feed = CaptureFeedRuntime(feed_config(groups, [server.port]))
    await nursery.start(feed.run)
    await wait_for(lambda: feed.connected)
    send_many(sender, groups, 50)
    await wait_for(lambda: feed.replay.acked_seq == 50)
    for stream in peer.streams:  # the host drops the connection, keeps its memory
        await stream.aclose()
    await wait_for(lambda: peer.connections == 2 and feed.connected)
    send_many(sender, groups, 50)
    await wait_for(lambda: len(peer.datagrams) >= 100)
    assert [d.seq for d in peer.datagrams] == list(range(1, 101))


async def test_targets_fail_over_to_the_next_address(
    nursery: trio.Nursery, sender: socket.socket
) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens there: connection refused
    server = await serve(nursery, Peer())
    groups = groups_for(_base_port(), 1, third=15)
    feed = CaptureFeedRuntime(feed_config(groups, [dead_port, server.port]))
    await nursery.start(feed.run)
    await wait_for(lambda: feed.connected)
    assert feed.link.connects[Connect.OK] == 1


@pytest.mark.usefixtures("datapath")
async def test_refused_hello_keeps_retrying(nursery: trio.Nursery, sender: socket.socket) -> None:
    peer = Peer(refuse=int(wire.ErrorCode.WRONG_FEED))
    server = await serve(nursery, peer)
    groups = groups_for(_base_port(), 1, third=16)
    feed = CaptureFeedRuntime(feed_config(groups, [server.port], reconnect_budget=0.3))
    await nursery.start(feed.run)
    # The peer counts a HELLO before the capture side has read its ERROR: wait on the capture
    # side's own counts.
    await wait_for(
        lambda: (
            feed.link.errors_from_peer[int(wire.ErrorCode.WRONG_FEED)] >= 3
            and feed.link.connects[Connect.REFUSED] >= 3
        )
    )
    assert peer.hellos >= 3
    assert not feed.connected
    await trio.sleep(0.3)
    health = feed.health()
    assert not health.healthy
    assert health.state == "disconnected"
    assert "WRONG_FEED" in health.detail["last_error"]
    send_many(sender, groups, 10)
    await wait_for(lambda: feed.datagrams_in == 10)  # capture keeps running
    peer.refuse = 0
    await wait_for(lambda: len(peer.datagrams) == 10)
    assert feed.health().healthy


@pytest.mark.usefixtures("datapath")
async def test_replay_bound_when_the_peer_stops_reading(
    nursery: trio.Nursery, sender: socket.socket
) -> None:
    peer = Peer(read=False)
    server = await serve(nursery, peer)
    groups = groups_for(_base_port(), 4, third=17)
    bound = 1024 * 1024
    feed = CaptureFeedRuntime(
        feed_config(
            groups, [server.port], replay_max_bytes=bound, idle_timeout=30.0, ack_timeout=60.0
        )
    )
    await nursery.start(feed.run)
    await wait_for(lambda: feed.connected)
    total = 0
    for _ in range(40):  # ~ 40 * 300 * 1000 B = 12 MB into a stalled TCP connection
        send_many(sender, groups, 300, size=1000)
        total += 300
        await trio.sleep(0.01)
        assert feed.replay.total_bytes <= bound + 512 * 1024
    await wait_for(lambda: feed.datagrams_in + feed.kernel_drops >= total)
    assert feed.replay.dropped_datagrams > 0
    assert feed.replay.total_bytes <= bound + 512 * 1024
    by_reason = feed.health().detail["replay_dropped_by"]
    assert by_reason == {"bytes": feed.replay.dropped_datagrams, "age": 0}
    assert feed.connected  # the heartbeat keeps being skipped, the connection stays


@pytest.mark.usefixtures("datapath")
async def test_a_peer_that_heartbeats_but_never_reads_is_left_for_the_next_target(
    nursery: trio.Nursery, sender: socket.socket
) -> None:
    """Issue 13 item 6: the first target welcomes and heartbeats but never reads. The feed
    reports "stalled" (unhealthy), leaves it after ack_timeout, counts it, and the second
    target gets every datagram captured, in order, with nothing lost."""
    deaf = await serve(nursery, Peer(read=False, heartbeat=0.1))
    good = await serve(nursery, Peer())
    groups = groups_for(_base_port(), 2, third=16)
    # an idle_timeout a loaded machine's pauses do not reach: only the ACK stall moves on
    config = feed_config(groups, [deaf.port, good.port], ack_timeout=3.0, idle_timeout=5.0)
    feed = CaptureFeedRuntime(config)
    await nursery.start(feed.run)
    await wait_for(lambda: feed.connected)
    assert deaf.peer.hellos == 1
    # "stalled" lasts from half of ack_timeout to ack_timeout only: watched from the start, as
    # a slow machine can still be sending below when the feed has already moved on.
    seen = watch_states(nursery, feed)
    for _ in range(20):  # ~6 MB: more than the stalled connection's socket buffers take
        send_many(sender, groups, 300, size=1000)
        await trio.sleep(0.01)
    # all of it taken in: receive.seq below is final
    await wait_for(lambda: feed.datagrams_in + feed.kernel_drops >= 20 * 300, timeout=30)
    await wait_for(lambda: good.peer.hellos == 1, timeout=30)
    assert ("stalled", False) in seen  # reported, and unhealthy, before the feed moved on
    assert deaf.peer.hellos == 1
    await wait_for(lambda: feed.replay.acked_seq == feed.receive.seq, timeout=30)
    assert [d.seq for d in good.peer.datagrams] == list(range(1, feed.receive.seq + 1))
    assert feed.replay.dropped_datagrams == 0
    samples = {(s.name, s.labels): s.value for s in feed.samples()}
    assert samples["capture_ack_stalls", (("feed", FEED),)] == 1
    assert feed.health().state == "streaming"
    assert "no ACK progress" in feed.link.last_error


@pytest.mark.usefixtures("datapath")
async def test_a_new_session_counts_what_the_old_one_left_unacknowledged(
    nursery: trio.Nursery, sender: socket.socket
) -> None:
    """Issue 13 item 7: a capture feed restarted (reload, crash) starts a new session; the
    datagrams its predecessor held unacknowledged are counted lost, and the restart too."""
    peer = Peer(ack=False)
    server = await serve(nursery, peer)
    groups = groups_for(_base_port(), 1, third=19)
    config = feed_config(groups, [server.port])
    first = CaptureFeedRuntime(config)
    async with trio.open_nursery() as inner:
        await inner.start(first.run)
        await wait_for(lambda: first.connected)
        send_many(sender, groups, 100)
        await wait_for(lambda: len(peer.datagrams) >= 100)
        assert first.health().detail["session_restarts"] == 0
        inner.cancel_scope.cancel()
    second = CaptureFeedRuntime(config)
    second.open(first)  # what the supervisor does on a restart or a reload
    async with trio.open_nursery() as inner:
        await inner.start(second.run)
        await wait_for(lambda: peer.hellos == 2)
        detail = second.health().detail
        assert (detail["session_restarts"], detail["session_lost_datagrams"]) == (1, 100)
        assert detail["session"] != first.health().detail["session"]
        samples = {(s.name, s.labels): s.value for s in second.samples()}
        assert samples["capture_session_restarts", (("feed", FEED),)] == 1
        assert samples["capture_session_lost_datagrams", (("feed", FEED),)] == 100
        evicted = samples["capture_replay_evicted_datagrams", (("feed", FEED), ("reason", "age"))]
        assert evicted == 0
        inner.cancel_scope.cancel()
    third = CaptureFeedRuntime(config)  # the counts add up over the runtimes
    third.open(second)
    await nursery.start(third.run)
    detail = third.health().detail
    assert (detail["session_restarts"], detail["session_lost_datagrams"]) == (2, 100)


@pytest.mark.usefixtures("datapath")
async def test_a_clean_stop_takes_the_final_ack_so_the_loss_counted_is_exact(
    nursery: trio.Nursery, sender: socket.socket
) -> None:
    """The emit side emitted everything but had not ACKed it yet when the capture side
    stopped: the goodbye's final ACK trims the replay buffer, so the session loses nothing."""
    peer = Peer(ack=False, final_ack=True)
    server = await serve(nursery, peer)
    groups = groups_for(_base_port(), 1, third=20)
    config = feed_config(groups, [server.port])
    feed = CaptureFeedRuntime(config)
    async with trio.open_nursery() as inner:
        await inner.start(feed.run)
        await wait_for(lambda: feed.connected)
        send_many(sender, groups, 100)
        await wait_for(lambda: len(peer.datagrams) >= 100)
        assert feed.replay.unacked_datagrams == 100
        inner.cancel_scope.cancel()
    assert [e.code for e in peer.errors] == [wire.ErrorCode.SHUTTING_DOWN]
    assert feed.replay.acked_seq == 100
    assert feed.replay.unacked_datagrams == 0
    assert feed.unacked_at_end == 0
    successor = CaptureFeedRuntime(config)
    successor.open(feed)
    async with trio.open_nursery() as inner:
        await inner.start(successor.run)
        detail = successor.health().detail
        assert (detail["session_restarts"], detail["session_lost_datagrams"]) == (1, 0)
        inner.cancel_scope.cancel()


async def test_idle_peer_is_left_and_heartbeats_flow(
    nursery: trio.Nursery, sender: socket.socket
) -> None:
    """With nothing to send the feed sends HEARTBEATs; a peer that says nothing (no ACK, no
    heartbeat) for idle_timeout is left and the feed reconnects."""
    peer = Peer(ack=False)
    server = await serve(nursery, peer)
    groups = groups_for(_base_port(), 1, third=18)
    feed = CaptureFeedRuntime(
        feed_config(groups, [server.port], heartbeat_interval=0.05, idle_timeout=0.4)
    )
    await nursery.start(feed.run)
    await wait_for(lambda: feed.link.connects[Connect.OK] >= 2, timeout=5)
    assert peer.connections >= 2


async def test_stop_says_shutting_down(nursery: trio.Nursery, sender: socket.socket) -> None:
    peer = Peer()
    server = await serve(nursery, peer)
    groups = groups_for(_base_port(), 1, third=19)
    feed = CaptureFeedRuntime(feed_config(groups, [server.port]))
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            await feed.run()

    nursery.start_soon(run)
    await wait_for(lambda: feed.connected)
    feed.set_close_reason(int(wire.ErrorCode.FEED_REMOVED), "feed removed")
    scope.cancel()
    await wait_for(lambda: bool(peer.errors))
    assert peer.errors[0] == wire.Error(int(wire.ErrorCode.FEED_REMOVED), "feed removed")


def test_backoff_is_jittered_exponential_and_capped() -> None:
    rng = random.Random(1)
    assert backoff_delay(0, rng) == 0
    first = [backoff_delay(1, rng) for _ in range(100)]
    assert all(0.025 <= d <= 0.05 for d in first)
    assert len(set(first)) > 50
    assert all(0.05 <= backoff_delay(2, rng) <= 0.1 for _ in range(100))
    late = [backoff_delay(n, rng) for n in range(8, 40)]
    assert all(BACKOFF_CAP / 2 <= d <= BACKOFF_CAP for d in late)


@pytest.mark.usefixtures("datapath")
async def test_memory_stays_bounded_while_disconnected(
    nursery: trio.Nursery, sender: socket.socket
) -> None:
    groups = groups_for(_base_port(), 2, third=20)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    bound = 512 * 1024
    feed = CaptureFeedRuntime(feed_config(groups, [dead_port], replay_max_bytes=bound))
    await nursery.start(feed.run)
    for _ in range(20):
        send_many(sender, groups, 200, size=1200)
        await trio.sleep(0.01)
    await wait_for(lambda: feed.datagrams_in + feed.kernel_drops >= 4000)
    assert feed.replay.total_bytes <= bound + 512 * 1024
    assert feed.replay.dropped_datagrams >= 4000 - (bound + 512 * 1024) // 1226
    assert feed.link.connects[Connect.FAILED] >= 1


@pytest.mark.usefixtures("datapath")
def test_demo_relays_without_loss() -> None:
    """`relayd demo` on loopback: the relayed copies all arrive, nothing is relayed twice."""
    result = subprocess.run(
        [sys.executable, "-m", "relayd", "demo", "--duration", "2", "--rate", "2000"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    summary = result.stdout.split("summary:")[1]
    numbers = summary.split("sent ")[1].split()
    sent, relayed = int(numbers[0]), int(numbers[3].rstrip(","))
    assert sent > 2000
    assert relayed == sent
    assert "duplicates 0, unknown 0" in summary


@pytest.mark.usefixtures("datapath")
async def test_slow_emit_restart_is_picked_up_within_the_backoff_cap(
    nursery: trio.Nursery, sender: socket.socket
) -> None:
    """The emit side is gone for 3 s (longer than the backoff cap): the capture side keeps
    capturing, and connects again at most about BACKOFF_CAP after the listener is back."""
    first = await serve(nursery, Peer())
    groups = groups_for(_base_port(), 1, third=21)
    feed = CaptureFeedRuntime(feed_config(groups, [first.port], reconnect_budget=1.0))
    await nursery.start(feed.run)
    await wait_for(lambda: feed.connected)
    port = first.port
    stop(first)
    await wait_for(lambda: not feed.connected)
    send_many(sender, groups, 30)
    await trio.sleep(3.0)
    assert feed.health().state == "disconnected"
    assert feed.datagrams_in == 30
    back = trio.current_time()
    second = await serve(nursery, Peer(), port=port)
    await wait_for(lambda: feed.connected, timeout=BACKOFF_CAP + 2)
    assert trio.current_time() - back <= BACKOFF_CAP + 0.5
    await wait_for(lambda: len(second.peer.datagrams) == 30)
    assert feed.health().state == "streaming"


@pytest.mark.usefixtures("datapath")
async def test_authenticated_hello(
    nursery: trio.Nursery, sender: socket.socket, tmp_path: Path
) -> None:
    """With auth_key_file the HELLO carries the MAC the emit side checks; a wrong key is
    refused with AUTH_FAILED and retried."""
    key = b"0123456789abcdef0123456789abcdef"
    good = tmp_path / "good.key"
    good.write_bytes(key + b"\n")
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"f" * 32)
    groups = groups_for(_base_port(), 1, third=22)
    peer = Peer(keys=(key,))
    server = await serve(nursery, peer)
    refused = CaptureFeedRuntime(feed_config(groups, [server.port], auth_key_file=bad))
    await nursery.start(refused.run)
    await wait_for(lambda: refused.link.errors_from_peer[int(wire.ErrorCode.AUTH_FAILED)] >= 2)
    assert not refused.connected
    feed = CaptureFeedRuntime(feed_config(groups, [server.port], auth_key_file=good))
    await nursery.start(feed.run)
    await wait_for(lambda: feed.connected)
    send_many(sender, groups, 5)
    await wait_for(lambda: len(peer.datagrams) == 5)
    assert not refused.connected


@pytest.mark.usefixtures("datapath")
async def test_more_sockets_than_trio_has_threads(
    nursery: trio.Nursery, sender: socket.socket
) -> None:
    """More sockets (one port each) than Trio's default thread limiter holds (40): every
    group's datagrams arrive, the ACK reader runs (the replay buffer is acknowledged) and a
    thread on Trio's default limiter still runs (a reload reads the configuration there)."""
    server = await serve(nursery, Peer())
    base = _base_port()
    count = int(trio.to_thread.current_default_thread_limiter().total_tokens) + 5
    groups = [(f"239.255.14.{i + 1}", base + i) for i in range(count)]
    feed = CaptureFeedRuntime(feed_config(groups, [server.port]))
    await nursery.start(feed.run)
    assert len(feed.receivers) == count
    await wait_for(lambda: feed.connected)
    sent = send_many(sender, groups, count * 4, size=50)
    await wait_for(lambda: len(server.peer.datagrams) >= len(sent), timeout=30)
    by_group = {(str(IPv4Address(d.group)), d.port) for d in server.peer.datagrams}
    assert by_group == set(groups)
    await wait_for(lambda: feed.replay.acked_seq == len(sent), timeout=30)
    with trio.fail_after(30):
        assert await trio.to_thread.run_sync(lambda: "ran") == "ran"


@pytest.mark.usefixtures("datapath")
def test_sustained_input_does_not_hold_up_stop() -> None:
    """A receive thread whose socket never runs empty still stops when asked: after a full
    batch the data plane looks at the stop pipe before it takes the next one, not only once
    the socket is drained."""
    plane = datapath.select_plane()
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stop_r, stop_w = os.pipe()
    numbering = plane.capture_numbering(0)
    try:
        try:
            rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        except PermissionError:
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        rx.bind((str(LOOPBACK), 0))
        rx.setblocking(False)
        tx.connect(rx.getsockname())
        big = bytes(60000)
        for _ in range(datapath.CAPTURE_BATCH_SIZE // len(big) + 4):  # more than a batch
            tx.send(big)
        receiver = plane.capture_receiver(rx, 1, stop_r, numbering, None)
        try:
            assert receiver.next() == Why.FULL
            os.write(stop_w, b"x")
            assert receiver.next() == Why.STOPPED
            os.read(stop_r, 1)
            assert receiver.next() in (Why.FULL, Why.EMPTY)
            assert receiver.count > 0  # the socket had not run empty
        finally:
            receiver.done()
    finally:
        numbering.close()
        rx.close()
        tx.close()
        os.close(stop_r)
        os.close(stop_w)


def test_only_a_feed_of_one_site_holds_batches_open() -> None:
    """A receive thread asks the data plane for ``BATCH_HOLD`` when its feed streams to one
    site, and for no hold with several: the data plane writes a batch to the first site only,
    and the others get it from the Python pass, which a hold would delay."""
    limited = RateLimitedLogger(logging.getLogger("t"))
    holds: list[float] = []

    class Stopped:
        def next(self) -> Why:
            return Why.STOPPED

        def done(self) -> None:
            pass

        def frames(self) -> bytes:
            return b""

    class Plane:
        claim_word = PLANE.claim_word

        def capture_numbering(self, seq: int) -> object:
            return seq

        def capture_receiver(self, *_args: object, busy_poll: float, hold: float) -> Stopped:
            holds.append(hold)
            return Stopped()

    def uplink() -> Uplink:
        return Uplink("t", ReplayBuffer(1 << 20, 60.0), limited, cast(Any, Plane()))

    token = cast(Any, SimpleNamespace(run_sync_soon=lambda _fn: None))
    socket_ = cast(Any, SimpleNamespace(sock=None, port=1))
    for sites in (uplink(), Fanout([uplink(), uplink()])):
        Receive("feed", sites, limited).drain(cast(Any, Plane()), socket_, lambda: None, -1, token)
    assert holds == [BATCH_HOLD, 0.0]
    assert BATCH_HOLD > 0


@pytest.mark.usefixtures("datapath")
async def test_the_watchdog_judges_the_ack_reader_too(nursery: trio.Nursery) -> None:
    """Every data-path thread of a connected capture feed is judged by the watchdog: one
    receive thread per socket and the connection's ACK reader, each waiting by design while
    nothing arrives (the ACK reader used to be left out)."""
    server = await serve(nursery, Peer())
    groups = groups_for(_base_port(), 1, third=19)
    feed = CaptureFeedRuntime(feed_config(groups, [server.port]))
    await nursery.start(feed.run)
    await wait_for(lambda: feed.connected)

    def judged() -> list[datapath.Beat]:
        with datapath._beats_lock:
            return [b for b in datapath._beats if b.watched]

    await wait_for(lambda: len(judged()) == len(feed.receivers) + 1)
    assert all(beat.waiting for beat in judged())
    assert datapath.data_threads_alive()


async def test_the_latency_mode_is_logged_and_the_python_plane_says_it_ignores_it(
    nursery: trio.Nursery, datapath: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``busy_poll`` is the C data plane's: the feed's start says what it does there, and that
    the Python plane ignores it."""
    caplog.set_level(logging.INFO, logger="relayd.capture")
    server = await serve(nursery, Peer())
    config = feed_config(groups_for(_base_port(), 1), [server.port], busy_poll=50e-6)
    await nursery.start(CaptureFeedRuntime(config).run)
    if datapath == "c":
        assert "latency mode: the data-path threads poll without sleeping for 50us" in caplog.text
    else:
        assert "busy_poll ignored: the Python data plane has no latency mode" in caplog.text
