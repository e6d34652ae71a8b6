"""The emit feed over real loopback sockets: TCP in, wire protocol, multicast out.

The feed sends out of 127.0.0.1 with IP_MULTICAST_LOOP on; receivers join test groups in
239.255.0.0/16 on 127.0.0.1 (with IP_MULTICAST_ALL off, so they see only their own groups).
The capture side is played by the test with the wire encoders. Every test of the streaming
data path runs twice, on the C and on the Python data path (the ``datapath`` fixture).
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
import trio

from relayd.admission import PROTECTED_FOR, PendingTable, Room, per_source_default
from relayd.config import Endpoint, PortRange
from relayd.emit import ACK_INTERVAL, EmitFeedRuntime
from relayd.keys import KeyFileError, KeyFileMissingError, load_auth_keys
from relayd.runtime import Feed
from relayd.wire import (
    FROM_EMIT,
    Ack,
    Challenge,
    Decoder,
    Error,
    ErrorCode,
    Heartbeat,
    encode_datagram,
    encode_error,
    encode_heartbeat,
    encode_hello,
)
from tests.helpers.capture_standin import (
    Peer,
    Receivers,
    make_config,
    metric,
    pick_groups,
    running,
    track_stream,
)
from tests.helpers.loopback import FEED, per_group


@pytest.fixture
def groups() -> list[tuple[IPv4Address, int]]:
    return pick_groups(6)


def make_datagrams(
    groups: Sequence[tuple[IPv4Address, int]], count: int, first_seq: int = 1, seed: int = 1
) -> list[tuple[int, IPv4Address, int, bytes]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        group, port = groups[rng.randrange(len(groups))]
        size = rng.choice((0, 1, 153, 160, 1200, 8000))
        payload = bytes(rng.getrandbits(8) for _ in range(size))
        out.append((first_seq + i, group, port, payload))
    return out


def frames(datagrams: Iterable[tuple[int, IPv4Address, int, bytes]]) -> bytes:
    return b"".join(
        encode_datagram(seq, int(group), port, 1_700_000_000_000_000_000 + seq, payload)
        for seq, group, port, payload in datagrams
    )


async def stream_then_close(
    feed: EmitFeedRuntime, session: bytes, datagrams: list[tuple[int, IPv4Address, int, bytes]]
) -> None:
    """One connection of ``session`` streams ``datagrams`` (from sequence 1), is ACKed in full
    and closes; returns once the feed has closed it on its own (the data-path thread notices
    the EOF), so the next connection is a reconnect, not a supersede."""
    assert feed.listen_port
    first = await Peer.start(feed.listen_port, session=session)
    assert await first.welcome() == 0
    await first.stream.send_all(frames(datagrams))
    await first.wait_ack(datagrams[-1][0])
    await first.aclose()
    while metric(feed, "active_connections"):
        await trio.sleep(0.01)


async def send_in_pieces(peer: Peer, data: bytes, seed: int = 2) -> None:
    """Send with arbitrary splits, frames cut anywhere."""
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        step = rng.randrange(1, 5000)
        await peer.stream.send_all(data[pos : pos + step])
        pos += step
        if rng.random() < 0.2:
            await trio.sleep(0.001)


def expected(
    datagrams: Iterable[tuple[int, IPv4Address, int, bytes]],
) -> list[tuple[IPv4Address, int, bytes]]:
    return [(group, port, payload) for _, group, port, payload in datagrams]


def same_per_group(
    got: Sequence[tuple[IPv4Address, int, bytes]], want: Sequence[tuple[IPv4Address, int, bytes]]
) -> bool:
    """The same datagrams, in the same order within each group:port, and nothing extra."""
    return len(got) == len(want) and per_group(got) == per_group(want)


# -- tests ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("datapath")
async def test_datagrams_arrive_byte_identical_in_order(
    groups: list[tuple[IPv4Address, int]], receivers: Receivers
) -> None:
    datagrams = make_datagrams(groups, 400)
    with trio.fail_after(15):
        async with running(make_config()) as feed:
            assert feed.health().healthy
            assert feed.health().state == "listening"
            assert feed.health().detail["last_datagram_age_seconds"] is None  # none arrived
            assert feed.listen_port
            peer = await Peer.start(feed.listen_port)
            assert await peer.welcome() == 0
            assert feed.health().state == "streaming"
            await send_in_pieces(peer, frames(datagrams))
            await peer.wait_ack(400)
            got = await receivers.settle()
            assert per_group(got) == per_group(expected(datagrams))
            assert len(got) == len(datagrams)
            payload_bytes = sum(len(d[3]) for d in datagrams)
            assert metric(feed, "datagrams_in") == 400
            assert metric(feed, "datagrams_out") == 400
            assert metric(feed, "bytes_out") == payload_bytes
            assert metric(feed, "bytes_in") > payload_bytes
            assert metric(feed, "frames_in") == 401  # and the HELLO
            assert metric(feed, "duplicates") == 0
            assert metric(feed, "gaps") == 0
            assert metric(feed, "connections_accepted") == 1
            assert metric(feed, "active_connections") == 1
            assert metric(feed, "ack_lag") == 0
            assert metric(feed, "last_datagram_age_seconds") < 5
            count = metric(feed, "capture_to_emit_latency_seconds_count")
            assert 1 <= count <= 400  # once per chunk, not per datagram
            health = feed.health()
            assert health.healthy
            assert 0 <= health.detail["last_datagram_age_seconds"] < 5
            assert health.detail["connections"][0]["highest_seq"] == 400
            await peer.aclose()
            with trio.fail_after(2):
                while metric(feed, "active_connections"):
                    await trio.sleep(0.01)
            assert metric(feed, "connections_closed", reason="eof") == 1


@pytest.mark.usefixtures("datapath")
async def test_resent_frames_after_reconnect_are_not_emitted_twice(
    groups: list[tuple[IPv4Address, int]], receivers: Receivers
) -> None:
    session = os.urandom(16)
    datagrams = make_datagrams(groups, 120)
    with trio.fail_after(15):
        async with running(make_config()) as feed:
            assert feed.listen_port
            await stream_then_close(feed, session, datagrams[:50])
            # The capture side resends everything from its replay buffer after reconnecting.
            second = await Peer.start(feed.listen_port, session=session)
            assert await second.welcome() == 50
            await send_in_pieces(second, frames(datagrams[20:90]))
            await second.wait_ack(90)
            # A third connection of the same session supersedes the second (which the capture
            # side has abandoned) instead of being refused; it resumes after 90.
            third = await Peer.start(feed.listen_port, session=session)
            assert await third.welcome() == 90
            await second.closed_with(ErrorCode.TOO_MANY_CONNECTIONS)
            await third.stream.send_all(frames(datagrams[60:]))
            await third.wait_ack(120)
            got = await receivers.settle()
            assert same_per_group(got, expected(datagrams))
            assert metric(feed, "duplicates") == 30 + 30
            assert metric(feed, "datagrams_out") == 120
            assert metric(feed, "connections_closed", reason="superseded") == 1
            # A new session starts from zero.
            other = await Peer.start(feed.listen_port)
            assert await other.welcome() == 0
            assert metric(feed, "sessions") == 2


@pytest.mark.usefixtures("datapath")
async def test_a_session_resumed_after_another_host_emitted_counts_no_false_gap(
    groups: list[tuple[IPv4Address, int]], receivers: Receivers
) -> None:
    """The capture side comes back to this host after another emit host emitted (and ACKed)
    31..50 of its session: it resumes at 51, which is no gap here. A sequence missing within
    the connection afterwards is one."""
    session = os.urandom(16)
    datagrams = make_datagrams(groups, 90)
    with trio.fail_after(15):
        async with running(make_config()) as feed:
            assert feed.listen_port
            await stream_then_close(feed, session, datagrams[:30])
            back = await Peer.start(feed.listen_port, session=session)
            assert await back.welcome() == 30
            await send_in_pieces(back, frames(datagrams[50:80]))  # 51..80
            await back.wait_ack(80)
            assert (metric(feed, "gaps"), metric(feed, "gap_sequences")) == (0, 0)
            await send_in_pieces(back, frames(datagrams[81:]))  # 82..90: 81 missing
            await back.wait_ack(90)
            assert (metric(feed, "gaps"), metric(feed, "gap_sequences")) == (1, 1)
            assert metric(feed, "datagrams_out") == 30 + 30 + 9


@pytest.mark.usefixtures("datapath")
async def test_rapid_supersedes_never_emit_a_datagram_twice(
    groups: list[tuple[IPv4Address, int]], receivers: Receivers
) -> None:
    """Connections of one session replacing each other in quick succession, each resending
    from before its welcome ACK while the previous one may still be streaming: each datagram
    goes out exactly once, in order."""
    session = os.urandom(16)
    total, step = 600, 60
    datagrams = make_datagrams(groups, total)
    with trio.fail_after(20):
        async with running(make_config()) as feed:
            assert feed.listen_port
            peers = []
            for end in range(step, total + 1, step):
                peer = await Peer.start(feed.listen_port, session=session)
                resume = await peer.welcome()
                assert resume <= end - step  # nothing emitted twice or ahead of its frames
                # Like a replay buffer: resend from a little before the welcome ACK.
                await peer.stream.send_all(frames(datagrams[max(0, resume - 25) : end]))
                peers.append(peer)
            await peers[-1].wait_ack(total)
            got = await receivers.settle()
            assert same_per_group(got, expected(datagrams))
            assert metric(feed, "datagrams_out") == total
            assert metric(feed, "connections_closed", reason="superseded") == len(peers) - 1
            assert metric(feed, "active_connections") == 1


async def test_wrong_feed_gets_error_and_close() -> None:
    with trio.fail_after(10):
        async with running(make_config()) as feed:
            assert feed.listen_port
            peer = await Peer.start(feed.listen_port, feed="prod")
            error = await peer.closed_with(ErrorCode.WRONG_FEED)
            assert "prod" in error.message
            assert metric(feed, "connections_rejected", reason="wrong_feed") == 1
            assert metric(feed, "connections_accepted") == 0


async def test_source_outside_allowed_cidrs_is_closed_at_once() -> None:
    config = make_config(allowed_sources=(IPv4Network("10.0.0.0/8"),))
    with trio.fail_after(10):
        async with running(config) as feed:
            assert feed.listen_port
            stream = await Peer.connect(feed.listen_port)
            with trio.fail_after(2):  # far below hello_timeout: closed at accept
                try:
                    data = await stream.receive_some(1024)
                except trio.BrokenResourceError:
                    data = b""
            assert data == b""  # not even a CHALLENGE
            await stream.aclose()
            assert metric(feed, "connections_rejected", reason="source") == 1
            assert metric(feed, "pending_connections") == 0


@pytest.mark.usefixtures("datapath")
async def test_silent_garbage_and_probe_connections_do_not_disturb_a_stream(
    groups: list[tuple[IPv4Address, int]], receivers: Receivers
) -> None:
    datagrams = make_datagrams(groups, 600, seed=7)
    data = frames(datagrams)
    garbage = [
        b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n",
        bytes.fromhex("16030100f4010000f00303") + os.urandom(64),  # a TLS ClientHello start
        b"\x00\x05\x01" + os.urandom(40),  # DATA before HELLO
    ]
    config = make_config(hello_timeout=0.5, max_connections=1)
    with trio.fail_after(20):
        async with running(config) as feed:
            assert feed.listen_port
            port = feed.listen_port
            # (from addresses of their own: one source holds at most a quarter of the pending cap)
            silent = [await Peer.connect(port, f"127.0.0.{10 + i}") for i in range(8)]
            peer = await Peer.start(port)  # silent ones hold no max_connections slot
            assert await peer.welcome() == 0
            bad: list[trio.SocketStream] = []

            async def disturb() -> None:
                for blob in garbage:
                    stream = await Peer.connect(port)
                    await stream.send_all(blob)
                    bad.append(stream)
                for _ in range(20):  # load-balancer TCP health checks: connect, close
                    probe = await Peer.connect(port)
                    await probe.aclose()
                    await trio.sleep(0.005)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(disturb)
                await send_in_pieces(peer, data[: len(data) // 2])
                await trio.sleep(0.7)  # the silent ones time out meanwhile
                await send_in_pieces(peer, data[len(data) // 2 :])
            await peer.wait_ack(600)
            got = await receivers.settle()
            assert same_per_group(got, expected(datagrams))

            for stream in bad:
                reader = Peer(stream, b"", FEED, None)
                challenge = await reader.next_event()
                assert isinstance(challenge, Challenge)
                await reader.closed_with(ErrorCode.PROTOCOL)
            for stream in silent:
                reader = Peer(stream, b"", FEED, None)
                assert isinstance(await reader.next_event(), Challenge)
                await reader.closed_with(ErrorCode.HELLO_TIMEOUT)
            assert metric(feed, "decode_errors") == 3
            assert metric(feed, "connections_rejected", reason="protocol") == 3
            assert metric(feed, "connections_rejected", reason="hello_timeout") == 8
            assert metric(feed, "connections_rejected", reason="no_hello") == 20
            assert metric(feed, "active_connections") == 1
            assert metric(feed, "pending_connections") == 0
            assert feed.health().healthy


@pytest.mark.usefixtures("datapath")
async def test_groups_and_ports_outside_the_allowlist_are_dropped_and_counted() -> None:
    allowed, port = pick_groups(1)[0]
    outside_group = IPv4Address("239.1.2.3")  # outside 239.255.0.0/16
    bad_port = port + 1
    rx = Receivers([(allowed, port), (outside_group, port), (allowed, bad_port)])
    config = make_config(allowed_ports=(PortRange(port, port),))
    datagrams = [
        (1, allowed, port, b"one"),
        (2, outside_group, port, b"not me"),
        (3, allowed, bad_port, b"nor me"),
        (4, allowed, port, b"four"),
        (5, outside_group, port, b"never"),
    ]
    try:
        with trio.fail_after(10):
            async with running(config) as feed:
                assert feed.listen_port
                peer = await Peer.start(feed.listen_port)
                await peer.welcome()
                await peer.stream.send_all(frames(datagrams))
                await peer.wait_ack(5)  # dropped ones are acknowledged too
                assert await rx.settle(0.3) == [(allowed, port, b"one"), (allowed, port, b"four")]
                assert metric(feed, "datagrams_dropped", reason="group_not_allowed") == 2
                assert metric(feed, "datagrams_dropped", reason="port_not_allowed") == 1
                assert metric(feed, "datagrams_out") == 2
    finally:
        rx.close()


async def test_hello_timeout_closes_with_error() -> None:
    with trio.fail_after(10):
        async with running(make_config(hello_timeout=0.3)) as feed:
            assert feed.listen_port
            peer = Peer(await Peer.connect(feed.listen_port), b"", FEED, None)
            start = trio.current_time()
            assert isinstance(await peer.next_event(), Challenge)
            await peer.closed_with(ErrorCode.HELLO_TIMEOUT)
            assert 0.25 < trio.current_time() - start < 3.0
            assert metric(feed, "connections_rejected", reason="hello_timeout") == 1


@pytest.mark.usefixtures("datapath")
async def test_max_connections_counts_only_welcomed_connections() -> None:
    with trio.fail_after(10):
        async with running(make_config(max_connections=2)) as feed:
            assert feed.listen_port
            port = feed.listen_port
            waiting = [await Peer.connect(port, f"127.0.0.{10 + i}") for i in range(5)]
            first = await Peer.start(port)
            second = await Peer.start(port)
            assert await first.welcome() == 0
            assert await second.welcome() == 0
            third = await Peer.start(port)
            error = await third.closed_with(ErrorCode.TOO_MANY_CONNECTIONS)
            assert "2 connections" in error.message
            assert metric(feed, "connections_rejected", reason="limit") == 1
            await first.aclose()
            with trio.fail_after(2):
                while metric(feed, "active_connections") != 1:
                    await trio.sleep(0.01)
            fourth = await Peer.start(port)
            assert await fourth.welcome() == 0
            for stream in waiting:
                await stream.aclose()


@pytest.mark.usefixtures("datapath")
async def test_pending_limit_closes_the_oldest_silent_connection() -> None:
    with trio.fail_after(10):
        config = make_config(hello_timeout=5.0)
        async with running(config, pending_limit=3, per_source_limit=3) as feed:
            assert feed.listen_port
            port = feed.listen_port
            silent = [Peer(await Peer.connect(port), b"", FEED, None) for _ in range(3)]
            for peer in silent:
                assert isinstance(await peer.next_event(), Challenge)
            # the cap is reached and every pending connection is younger than PROTECTED_FOR:
            # the newcomer is refused before any handshake
            assert await refused(port)
            assert metric(feed, "connections_rejected", reason="pending_limit") == 1
            await trio.sleep(PROTECTED_FOR)
            newest = Peer(await Peer.connect(port), b"", FEED, None)  # now the oldest goes
            await silent[0].closed_with(ErrorCode.TOO_MANY_CONNECTIONS, timeout=2)
            assert isinstance(await newest.next_event(), Challenge)
            assert metric(feed, "connections_rejected", reason="pending_limit") == 2
            assert metric(feed, "pending_connections") == 3
            real = await Peer.start(port, source="127.0.0.2")  # another source gets in at once
            assert await real.welcome() == 0


async def refused(port: int, source: str | None = None) -> bool:
    """Connect; True when the emit side refused the connection (reset, or closed before its
    CHALLENGE)."""
    try:
        stream = await Peer.connect(port, source)
    except OSError:
        return True
    with trio.move_on_after(0.5):  # a pending connection stays silent: not refused
        return await Peer(stream, b"", FEED, None).next_event() is None
    return False


def test_pending_table_evicts_within_the_flooding_source() -> None:
    table: PendingTable[str] = PendingTable(limit=6, per_source_limit=3, protected_for=0.5)
    assert table.room_for("capture", 0.0) is Room.FREE
    assert table.add(1, "capture", "c1", 0.0) is None
    for key in (2, 3, 4):
        assert table.room_for("flood", 1.0) is Room.FREE
        assert table.add(key, "flood", f"f{key}", 1.0) is None
    # the flood at its own cap: its newcomers are refused while its oldest is protected ...
    assert table.room_for("flood", 1.4) is Room.REFUSED
    # ... and then evict its own oldest, never the capture side's
    assert table.room_for("flood", 1.5) is Room.EVICT
    assert table.add(5, "flood", "f5", 1.5) == "f2"
    assert table.held_by("flood") == 3
    assert 1 in table
    # at the feed's cap, the source holding the most gives up its oldest
    assert table.add(20, "other", "o20", 2.0) is None
    assert table.add(21, "another", "a21", 2.0) is None
    assert table.room_for("third", 2.0) is Room.EVICT
    assert table.add(22, "third", "t22", 2.0) == "f3"
    assert table.pop(1) == "c1"
    assert table.pop(1) is None
    assert len(table) == 5
    assert per_source_default(32) == 8
    assert per_source_default(1) == 1


@pytest.mark.usefixtures("datapath")
async def test_a_flood_from_one_source_never_evicts_another_sources_handshake() -> None:
    """A capture side from 127.0.0.2 between its CHALLENGE and its HELLO while 127.0.0.1 opens
    five times the pending cap of silent connections: only the flood's own are evicted."""
    with trio.fail_after(20):
        async with running(make_config(hello_timeout=10.0), pending_limit=8) as feed:
            assert feed.listen_port
            port = feed.listen_port
            real = Peer(await Peer.connect(port, "127.0.0.2"), os.urandom(16), FEED, None)
            assert isinstance(await real.next_event(), Challenge)
            for _ in range(40):
                await refused(port)
            with trio.fail_after(5):  # every one of them accepted: refused, evicted or pending
                while metric(feed, "connections_rejected", reason="pending_limit") < 40 - 2:
                    await trio.sleep(0.01)
            assert metric(feed, "pending_connections") <= 1 + 2
            await real.stream.send_all(encode_hello(FEED, real.session, b""))
            assert await real.welcome() == 0
            assert metric(feed, "active_connections") == 1


@pytest.mark.usefixtures("datapath")
async def test_connection_flood_is_bounded_and_a_capture_still_streams(
    groups: list[tuple[IPv4Address, int]], receivers: Receivers
) -> None:
    datagrams = make_datagrams(groups, 200, seed=11)
    config = make_config(hello_timeout=10.0, max_connections=1)
    with trio.fail_after(20):
        async with running(config, pending_limit=16) as feed:
            assert feed.listen_port
            peer = await Peer.start(feed.listen_port)
            assert await peer.welcome() == 0
            flood = []
            for i in range(150):  # connections that never speak, far beyond the pending cap
                flood.append(await refused(feed.listen_port))
                if i % 10 == 0:
                    await peer.stream.send_all(frames(datagrams[i : i + 10]))
                assert metric(feed, "pending_connections") <= 16
            await peer.stream.send_all(frames(datagrams[150:]))
            await peer.wait_ack(200)
            assert same_per_group(await receivers.settle(), expected(datagrams))
            # A second capture process (from an address of its own) still gets through the
            # flood to its HELLO check.
            late = await Peer.start(feed.listen_port, source="127.0.0.2")
            await late.closed_with(ErrorCode.TOO_MANY_CONNECTIONS)  # the limit, not the flood
            assert metric(feed, "connections_rejected", reason="limit") == 1
            assert metric(feed, "connections_rejected", reason="pending_limit") >= 150 - 16
            assert metric(feed, "pending_connections") <= 16
            assert metric(feed, "active_connections") == 1


@pytest.mark.usefixtures("datapath")
async def test_heartbeats_when_idle_then_idle_timeout() -> None:
    # Forty heartbeat intervals to one idle timeout: a data-path thread a loaded machine wakes
    # late still sends several, and a timeout not taken from the config sends many more.
    config = make_config(heartbeat_interval=0.05, idle_timeout=2.0)
    with trio.fail_after(30):
        async with running(config) as feed:
            assert feed.listen_port
            before_hello = trio.current_time()  # the idle timer starts after the HELLO came
            peer = await Peer.start(feed.listen_port)
            assert await peer.welcome() == 0
            beats = 0
            while True:
                event = await peer.next_event(20)
                if isinstance(event, Heartbeat):
                    beats += 1
                    continue
                assert isinstance(event, Error)
                assert event.code == ErrorCode.IDLE_TIMEOUT
                assert event.message == "nothing received for 2s"
                break
            assert trio.current_time() - before_hello >= config.idle_timeout  # never early
            # one heartbeat at most per interval while the timer ran (none more after it)
            assert 3 <= beats <= config.idle_timeout / config.heartbeat_interval + 1
            assert await peer.next_event() is None
            assert metric(feed, "connections_closed", reason="idle_timeout") == 1


@pytest.mark.usefixtures("datapath")
async def test_peer_heartbeats_keep_the_connection_open() -> None:
    config = make_config(heartbeat_interval=0.1, idle_timeout=2.0)
    with trio.fail_after(30):
        async with running(config) as feed:
            assert feed.listen_port
            peer = await Peer.start(feed.listen_port)
            assert await peer.welcome() == 0
            silent = await Peer.start(feed.listen_port)  # shows the idle timer runs meanwhile
            assert await silent.welcome() == 0

            async def heartbeat() -> None:  # twenty per idle timeout: late wake-ups do not matter
                while True:
                    await peer.stream.send_all(encode_heartbeat(0))
                    await trio.sleep(0.1)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(heartbeat)
                start = trio.current_time()
                await silent.closed_with(ErrorCode.IDLE_TIMEOUT, timeout=20)
                # more than twice the idle timeout since the heartbeating peer's HELLO
                await trio.sleep_until(start + 2.5 * config.idle_timeout)
                assert metric(feed, "active_connections") == 1
                nursery.cancel_scope.cancel()
            assert metric(feed, "connections_closed", reason="idle_timeout") == 1


@pytest.mark.usefixtures("datapath")
async def test_heartbeats_more_often_than_the_ack_interval_allows_do_not_spin() -> None:
    # Control frames go out at most once per ACK_INTERVAL, so a shorter heartbeat_interval
    # means one every ACK_INTERVAL, and the data-path thread sleeps in between. (The C one
    # polled without sleeping from heartbeat_interval on: half a core, on an idle connection.)
    config = make_config(heartbeat_interval=ACK_INTERVAL / 2, idle_timeout=30.0)
    with trio.fail_after(30):
        async with running(config) as feed:
            assert feed.listen_port
            peer = await Peer.start(feed.listen_port)
            assert await peer.welcome() == 0
            cpu, wall = time.process_time(), trio.current_time()
            await trio.sleep(2.0)
            used = (time.process_time() - cpu) / (trio.current_time() - wall)
            # A load on the machine only lowers this; a sleeping thread uses about 1%.
            assert used < 0.1, f"{used:.0%} of a core for an idle connection"
            assert isinstance(await peer.next_event(), Heartbeat)


@pytest.mark.usefixtures("datapath")
async def test_garbage_after_hello_closes_only_that_connection(
    groups: list[tuple[IPv4Address, int]], receivers: Receivers
) -> None:
    datagrams = make_datagrams(groups, 50, seed=3)
    with trio.fail_after(10):
        async with running(make_config()) as feed:
            assert feed.listen_port
            good = await Peer.start(feed.listen_port)
            bad = await Peer.start(feed.listen_port)
            await good.welcome()
            await bad.welcome()
            await bad.stream.send_all(b"\x00\x09\x77" + bytes(9))  # unknown frame type
            await bad.closed_with(ErrorCode.PROTOCOL)
            await good.stream.send_all(frames(datagrams))
            await good.wait_ack(50)
            assert same_per_group(await receivers.settle(), expected(datagrams))
            assert metric(feed, "decode_errors") == 1
            assert metric(feed, "connections_closed", reason="protocol") == 1


@pytest.mark.usefixtures("datapath")
async def test_peer_that_stops_reading_is_dropped_as_slow_consumer() -> None:
    # A capture side that sends and never reads: every small ACK and heartbeat queues up until
    # the socket buffers are full, then the emit side gives up on it. The buffers fill at one
    # control frame per ACK_INTERVAL: seconds, and many more on a loaded machine. Both peers
    # send a heartbeat every 50 ms: an idle timeout that a loaded machine's pauses do not reach.
    config = make_config(heartbeat_interval=0.001, idle_timeout=3.0)
    with trio.fail_after(120):
        async with running(config) as feed:
            assert feed.listen_port
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # before the window
            await sock.connect(("127.0.0.1", feed.listen_port))
            stream = trio.SocketStream(sock)
            track_stream(stream)
            challenge = Decoder(FROM_EMIT).feed(await stream.receive_some(1024))[0]
            assert isinstance(challenge, Challenge)
            await stream.send_all(encode_hello(FEED, os.urandom(16)))
            other = await Peer.start(feed.listen_port)
            assert await other.welcome() == 0

            async def keep_reading() -> None:
                while await other.next_event(10) is not None:
                    pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_reading)
                with trio.fail_after(100):
                    while metric(feed, "connections_closed", reason="slow_consumer") == 0:
                        await stream.send_all(encode_heartbeat(0))
                        await other.stream.send_all(encode_heartbeat(0))
                        await trio.sleep(0.05)
                assert metric(feed, "active_connections") == 1  # the other one is fine
                nursery.cancel_scope.cancel()


@pytest.mark.usefixtures("datapath")
async def test_stop_tells_every_connection_the_close_reason() -> None:
    feed = EmitFeedRuntime(make_config())
    as_feed: Feed = feed  # mypy checks that the runtime implements the Feed protocol
    assert as_feed.kind == "emit"
    assert as_feed.name == FEED
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(feed.run)
            assert feed.listen_port
            peers = [await Peer.start(feed.listen_port) for _ in range(2)]
            for peer in peers:
                await peer.welcome()
            pending = Peer(await Peer.connect(feed.listen_port), b"", FEED, None)
            assert isinstance(await pending.next_event(), Challenge)
            feed.set_close_reason(ErrorCode.FEED_REMOVED, "feed removed from the configuration")
            start = trio.current_time()
            nursery.cancel_scope.cancel()
        assert trio.current_time() - start < 2.0
        for peer in [*peers, pending]:
            error = await peer.closed_with(ErrorCode.FEED_REMOVED)
            assert error.message == "feed removed from the configuration"
    assert not feed.health().healthy
    assert feed.health().state == "stopped"


@pytest.mark.usefixtures("datapath")
async def test_authentication(tmp_path: Any) -> None:
    key = b"k" * 32
    key_file = tmp_path / "feed.key"
    key_file.write_bytes(key + b"\n")
    config = make_config(auth_key_files=(key_file,))
    with trio.fail_after(10):
        async with running(config) as feed:
            assert feed.listen_port
            anonymous = await Peer.start(feed.listen_port)
            await anonymous.closed_with(ErrorCode.AUTH_FAILED)
            wrong = await Peer.start(feed.listen_port, key=b"w" * 32)
            await wrong.closed_with(ErrorCode.AUTH_FAILED)
            right = await Peer.start(feed.listen_port, key=key)
            assert await right.welcome() == 0
            assert metric(feed, "connections_rejected", reason="auth") == 2


def test_load_auth_keys(tmp_path: Any) -> None:
    good = tmp_path / "good"
    good.write_text("0123456789abcdef0123456789abcdef\n")
    short = tmp_path / "short"
    short.write_text("short\n")
    assert load_auth_keys([good]) == (b"0123456789abcdef0123456789abcdef",)
    with pytest.raises(KeyFileError, match="fewer than"):
        load_auth_keys([short])
    with pytest.raises(KeyFileMissingError, match="does not exist"):
        load_auth_keys([tmp_path / "missing"])
    with pytest.raises(KeyFileError, match="cannot read"):
        load_auth_keys([tmp_path])


async def test_listener_port_in_use_fails_the_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        feed = EmitFeedRuntime(make_config(listen=Endpoint("127.0.0.1", port)))
        with pytest.raises(OSError, match="in use"):
            await feed.run()
        assert not feed.health().healthy


@pytest.mark.usefixtures("datapath")
@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (ErrorCode.SHUTTING_DOWN, "peer_shutdown"),
        (ErrorCode.FEED_REMOVED, "peer_shutdown"),
        (ErrorCode.PROTOCOL, "peer_error"),
    ],
)
async def test_a_capture_side_that_stops_cleanly_is_not_a_peer_error(
    code: ErrorCode, reason: str
) -> None:
    """A capture side stopping (ERROR SHUTTING_DOWN or FEED_REMOVED, then FIN) is counted as
    ``connections_closed{reason="peer_shutdown"}``; any other ERROR stays ``peer_error``."""
    with trio.fail_after(10):
        async with running(make_config()) as feed:
            assert feed.listen_port
            peer = await Peer.start(feed.listen_port)
            assert await peer.welcome() == 0
            await peer.stream.send_all(encode_error(code, "capture side shutting down"))
            await peer.stream.send_eof()
            while metric(feed, "active_connections"):
                await trio.sleep(0.01)
            closed = {
                r: metric(feed, "connections_closed", reason=r)
                for r in ("peer_shutdown", "peer_error")
            }
            assert closed == {reason: 1, ({"peer_shutdown", "peer_error"} - {reason}).pop(): 0}
            await peer.aclose()


@contextlib.contextmanager
def descriptors_exhausted() -> Iterator[None]:
    """This process at its descriptor limit for the block: the soft limit lowered to just
    above the highest descriptor in use, and every free number below it taken."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 4, hard))
    try:
        with contextlib.suppress(OSError):
            while True:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        with pytest.raises(OSError, match="Too many open files"):
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.usefixtures("datapath")
async def test_a_new_destination_without_a_free_descriptor_keeps_the_stream(
    groups: list[tuple[IPv4Address, int]], receivers: Receivers
) -> None:
    """At the descriptor limit, a destination seen for the first time (the C data plane opens
    a connected socket for each) goes out on the feed's shared socket; the stream goes on."""
    before = make_datagrams(groups[:1], 50, seed=21)
    after = make_datagrams(groups[1:3], 100, first_seq=51, seed=22)
    with trio.fail_after(20):
        async with running(make_config()) as feed:
            assert feed.listen_port
            peer = await Peer.start(feed.listen_port)
            assert await peer.welcome() == 0
            await peer.stream.send_all(frames(before))
            await peer.wait_ack(50)
            with descriptors_exhausted():
                await peer.stream.send_all(frames(after))
                await peer.wait_ack(150)
            assert same_per_group(await receivers.settle(), expected(before + after))
            assert metric(feed, "active_connections") == 1
            assert metric(feed, "connections_closed", reason="internal_error") == 0


@pytest.mark.usefixtures("datapath")
async def test_a_goodbye_gets_a_final_ack_and_session_changes_are_counted(
    groups: list[tuple[IPv4Address, int]], receivers: Receivers
) -> None:
    """Issue 13 item 7 and issue 14 item 1: the capture side's goodbye (ERROR) is answered with
    an ACK of everything emitted; a new session after it is a clean change, a new session after
    one that broke off without a goodbye a possible loss (what that capture side held
    unacknowledged is never resent)."""
    datagrams = make_datagrams(groups, 90)
    with trio.fail_after(15):
        async with running(make_config()) as feed:
            assert feed.listen_port
            first = await Peer.start(feed.listen_port)
            assert await first.welcome() == 0
            goodbye = encode_error(ErrorCode.SHUTTING_DOWN, "capture side shutting down")
            await first.stream.send_all(frames(datagrams[:30]) + goodbye)
            acks = []
            while (event := await first.next_event()) is not None:
                assert isinstance(event, (Ack, Heartbeat)), event
                if isinstance(event, Ack):
                    acks.append(event.seq)
            assert acks[-1] == 30
            second = await Peer.start(feed.listen_port)
            assert await second.welcome() == 0
            assert metric(feed, "session_changes", result="clean") == 1
            await second.stream.send_all(frames(datagrams[30:60]))
            await second.wait_ack(60)
            await second.aclose()  # broke off: no goodbye
            third = await Peer.start(feed.listen_port)
            assert await third.welcome() == 0
            assert metric(feed, "session_changes", result="possible_loss") == 1
            again = await Peer.start(feed.listen_port, session=third.session)  # same session
            assert await again.welcome() == 0
            assert metric(feed, "session_changes", result="clean") == 1
            assert metric(feed, "session_changes", result="possible_loss") == 1
