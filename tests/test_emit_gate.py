"""The emit gate (relayd/datapath.py ``EmitGate``) on both data planes: a pump emits a datagram
only while the gate's lease is fresh; closed, it returns GATED with the datagram neither sent
nor claimed, and goes on from it once the gate opens again."""

from __future__ import annotations

import os
import socket
import time
from ipaddress import IPv4Address

import pytest
import trio

from relayd.arbitration import ArbitrationConfig, ArbitrationMode
from relayd.config import GroupPort
from relayd.datapath import EmitGate, EmitStart, Why, select_plane
from relayd.emit.stats import GateWaits
from relayd.session import Destination
from relayd.wire import EmitConnection, ErrorCode, encode_datagram, encode_hello
from tests.helpers.capture_standin import Peer, make_config, metric, pick_groups, running

FEED = "gated"
LOCALHOST = int(IPv4Address("127.0.0.1"))


def _frames(first: int, count: int, port: int) -> bytes:
    return b"".join(
        encode_datagram(seq, LOCALHOST, port, seq, seq.to_bytes(8, "big"))
        for seq in range(first, first + count)
    )


def _received(sock: socket.socket) -> list[int]:
    got = []
    while True:
        try:
            got.append(int.from_bytes(sock.recv(64), "big"))
        except BlockingIOError:
            return got


@pytest.mark.parametrize("mode", [ArbitrationMode.NONE, ArbitrationMode.CONTENT])
@pytest.mark.usefixtures("datapath")
def test_a_closed_gate_holds_every_datagram_until_it_opens(mode: ArbitrationMode) -> None:
    """Also with an arbiter, whose clock reading per datagram the gate shares."""
    plane = select_plane()
    arbiter = None if mode is ArbitrationMode.NONE else plane.arbiter(ArbitrationConfig(mode=mode))
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    port = receiver.getsockname()[1]
    pump_side, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stop_r, stop_w = os.pipe()
    proto = EmitConnection(FEED, (), os.urandom(16))
    proto.challenge()
    proto.receive(encode_hello(FEED, os.urandom(16)))
    gate = EmitGate()  # closed: open_until_ns 0
    try:
        pump = plane.emit_pump(
            EmitStart(
                pump_side, sender, stop_r, proto, 0, 0, 0.3, 10.0, 0.002, 8500, arbiter, gate=gate
            )
        )

        def run_until_idle() -> list[Why]:
            seen = []
            while (why := pump.run()) not in (Why.IDLE, Why.GATED):
                seen.append(why)
                if why == Why.NEED_DEST:
                    assert pump.need_key == LOCALHOST << 16 | port
                    pump.set_destination(pump.need_key, Destination.ALLOWED, -1)
            return [*seen, why]

        peer.sendall(_frames(1, 10, port))
        assert run_until_idle() == [Why.GATED]
        assert pump.highest == 0  # nothing claimed: an ACK would not cover it
        time.sleep(0.05)
        assert _received(receiver) == []

        gate.open_until(time.monotonic() + 30)
        assert run_until_idle() == [Why.NEED_DEST, Why.IDLE]
        assert pump.highest == 10
        time.sleep(0.05)
        assert _received(receiver) == list(range(1, 11))

        gate.open_until(0)  # closed again (a stale lease, or standby)
        peer.sendall(_frames(11, 5, port))
        assert run_until_idle() == [Why.GATED]
        assert pump.highest == 10
        gate.open_until(time.monotonic() + 30)
        assert run_until_idle() == [Why.IDLE]
        time.sleep(0.05)
        assert _received(receiver) == list(range(11, 16))
        assert pump.counters.datagrams_out == 15  # type: ignore[attr-defined]
        if arbiter is not None:  # offered once each, after the gate
            assert arbiter.counts()["offered"] == arbiter.counts()["sent"] == 15
    finally:
        if arbiter is not None:
            arbiter.close()
        for sock in (pump_side, peer, sender, receiver):
            sock.close()
        os.close(stop_r)
        os.close(stop_w)


async def test_a_standby_feed_refuses_streams_and_says_why() -> None:
    """Another relay seen on the feed's groups: /healthz/<feed> not ready with the reason, a
    new connection refused with NOT_ACTIVE, relayd_emit_active 0; once it is silent for the
    grace, ready again and the next stream makes this host active."""
    other = IPv4Address("10.1.2.3")
    with trio.fail_after(20):
        async with running(make_config()) as feed:
            assert feed.listen_port
            assert metric(feed, "emit_active") == 0
            feed.role.observed({other: 5}, time.monotonic())
            health = feed.health()
            assert health.healthy  # the process is fine (relayd_feed_up 1, /healthz 200)
            assert not health.ready  # but the NLB must not send it the feed
            assert health.state == "standby"
            role = health.detail["role"]
            assert "10.1.2.3" in role["reason"]
            assert role["other_relays"][0]["source"] == "10.1.2.3"
            peer = await Peer.start(feed.listen_port)
            error = await peer.closed_with(ErrorCode.NOT_ACTIVE)
            assert "standby" in error.message
            assert metric(feed, "connections_rejected", reason="not_active") == 1
            assert metric(feed, "emit_standby") == 1
            while feed.role.snapshot()["role"] == "standby":  # GRACE after the last sighting
                await trio.sleep(0.1)
            assert feed.health().ready
            peer = await Peer.start(feed.listen_port)
            assert await peer.welcome() == 0
            assert metric(feed, "emit_active") == 1
            assert metric(feed, "split_brain") == 0


async def test_a_split_brain_steps_down_and_ends_even_an_idle_stream() -> None:
    """Active with an idle stream while another relay (a lower address) emits: one split-brain,
    after SPLIT_TIMEOUT the higher address steps down, and the stream ends with NOT_ACTIVE
    although no datagram came to find the gate closed."""
    other = IPv4Address("10.1.2.3")  # below 127.0.0.1: this host yields
    with trio.fail_after(20):
        async with running(make_config()) as feed:
            assert feed.listen_port
            peer = await Peer.start(feed.listen_port)
            assert await peer.welcome() == 0
            assert metric(feed, "emit_active") == 1

            async def other_relay_emits() -> None:
                while True:
                    feed.role.observed({other: 5}, time.monotonic())
                    await trio.sleep(0.1)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(other_relay_emits)
                error = await peer.closed_with(ErrorCode.NOT_ACTIVE, timeout=10)
                assert "stepped down" in error.message
                assert metric(feed, "split_brain") == 1
                assert metric(feed, "emit_stepped_down", reason="higher_address") == 1
                assert metric(feed, "connections_closed", reason="not_active") == 1
                assert metric(feed, "emit_active") == 0
                assert not feed.health().ready
                nursery.cancel_scope.cancel()


async def test_the_observer_never_counts_this_hosts_own_datagrams() -> None:
    """With ``loop = true`` this host's sends come back to its own sockets: the observer
    blocks its own source in the kernel (IP_BLOCK_SOURCE) and ignores it by address, so the
    feed never stands by for itself."""
    groups = pick_groups(2)
    with trio.fail_after(20):
        async with running(make_config(loop=True)) as feed:
            assert feed.listen_port
            assert feed.observer is not None
            peer = await Peer.start(feed.listen_port)
            assert await peer.welcome() == 0
            frames = [
                encode_datagram(seq, int(group), port, seq, bytes(32))
                for seq, (group, port) in enumerate(groups * 200, start=1)
            ]
            await peer.stream.send_all(b"".join(frames))
            await peer.wait_ack(len(frames))
            while len(feed.observer.watched) < len(groups):  # learned from the pumps
                await trio.sleep(0.05)
            await trio.sleep(0.3)
            await peer.stream.send_all(
                b"".join(
                    encode_datagram(seq, int(group), port, seq, bytes(32))
                    for seq, (group, port) in enumerate(groups * 200, start=len(frames) + 1)
                )
            )
            await peer.wait_ack(2 * len(frames))
            await trio.sleep(0.3)
            assert feed.role.snapshot()["role"] == "active"
            assert metric(feed, "emit_observed_datagrams", origin="other") == 0
            assert metric(feed, "emit_observed_datagrams", origin="own") == 0
            assert metric(feed, "emit_watched_groups") == len(groups)


async def test_the_observer_sees_another_relay_and_hands_its_datagrams_to_the_hook() -> None:
    """Another relay (source 127.0.0.2) emits one of ``watch_groups``: the observer's real
    sockets see it, the feed stands by, and the hook gets each datagram it drained."""
    (group, port), *_ = pick_groups(1)
    config = make_config(watch_groups=(GroupPort(group, port),))
    seen: list[tuple[int, int, bytes]] = []
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.2", 0))
    sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    try:
        with trio.fail_after(20):
            async with running(config) as feed:
                feed.observe_hook = lambda g, p, payload, _now: seen.append((g, p, payload))
                assert metric(feed, "emit_watched_groups") == 1
                while feed.role.snapshot()["role"] != "standby":
                    sender.sendto(b"other relay", (str(group), port))
                    await trio.sleep(0.02)
                role = feed.role.snapshot()
                assert role["other_relays"][0]["source"] == "127.0.0.2"
                assert (int(group), port, b"other relay") in seen
                assert metric(feed, "emit_observed_datagrams", origin="other") >= 1
    finally:
        sender.close()


async def test_the_observer_joins_the_groups_of_a_port_on_one_socket() -> None:
    """Six watched groups on three ports: three sockets (one per port and 20 groups), and
    another relay's datagrams on every group are seen, with the group they were sent to."""
    groups = pick_groups(6)  # three ports, two groups each
    config = make_config(watch_groups=tuple(GroupPort(g, p) for g, p in groups))
    seen: set[tuple[int, int]] = set()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.2", 0))
    sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    try:
        with trio.fail_after(20):
            async with running(config) as feed:
                assert feed.observer is not None
                assert feed.observer.sockets == 3
                assert metric(feed, "emit_watched_groups") == 6
                feed.observe_hook = lambda g, p, _payload, _now: seen.add((g, p))
                want = {(int(g), p) for g, p in groups}
                while not want <= seen:
                    for group, port in groups:
                        sender.sendto(b"other relay", (str(group), port))
                    await trio.sleep(0.05)
                assert seen == want
    finally:
        sender.close()


async def test_with_deribit_arbitration_what_the_observer_drains_reaches_the_arbiter() -> None:
    """The observer's default hook is the feed's arbiter: another relay's datagrams are
    observed (so this host, once active, does not send them again)."""
    (group, port), *_ = pick_groups(1)
    config = make_config(watch_groups=(GroupPort(group, port),), arbitration="deribit")
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.2", 0))
    sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    packet = (4).to_bytes(2, "little") + (7).to_bytes(2, "little") + (1).to_bytes(4, "little")
    try:
        with trio.fail_after(20):
            async with running(config) as feed:
                seq = 1
                while metric(feed, "arbitration_observed") < 3:
                    sender.sendto(
                        packet[:4] + seq.to_bytes(4, "little") + b"data", (str(group), port)
                    )
                    seq += 1
                    await trio.sleep(0.02)
    finally:
        sender.close()


@pytest.mark.usefixtures("datapath")
async def test_datagrams_held_back_by_a_stale_lease_are_counted_and_shown() -> None:
    """The observer starved (it stops renewing the lease): the next datagrams find the gate
    closed and wait; relayd_emit_gated_total and relayd_emit_gated_seconds_total count it,
    /healthz/<feed> shows it, and they go out once the observer renews the lease."""
    (group, port), *_ = pick_groups(1)
    with trio.fail_after(20):
        async with running(make_config()) as feed:
            assert feed.listen_port
            peer = await Peer.start(feed.listen_port)
            assert await peer.welcome() == 0
            while not feed.role.gate.is_open():  # the first drain after the stream began
                await trio.sleep(0.01)
            assert metric(feed, "emit_gated") == 0
            renew = feed.role.observed
            feed.role.observed = lambda *_: None  # type: ignore[method-assign]
            while feed.role.gate.is_open():  # the lease (0.5 s) lapses
                await trio.sleep(0.05)
            frames = [
                encode_datagram(seq, int(group), port, seq, bytes(32)) for seq in range(1, 11)
            ]
            await peer.stream.send_all(b"".join(frames))
            while metric(feed, "emit_gated") == 0:
                await trio.sleep(0.01)
            await trio.sleep(0.2)
            assert metric(feed, "datagrams_out") == 0
            assert metric(feed, "emit_gated_seconds") > 0  # the wait in progress counts
            feed.role.observed = renew  # type: ignore[method-assign]
            await peer.wait_ack(len(frames))
            assert metric(feed, "datagrams_out") == len(frames)
            assert metric(feed, "emit_gated") == 1  # held back once, then all went out
            detail = feed.health().detail
            assert detail["emit_gated"] == 1
            seconds = metric(feed, "emit_gated_seconds")
            assert detail["emit_gated_seconds"] == pytest.approx(seconds, abs=0.001)


def test_gate_waits_count_the_wait_in_progress_and_never_shrink() -> None:
    waits = GateWaits().began(10.0)
    assert (waits.times, waits.total(10.5)) == (1, 0.5)  # in progress: counted up to now
    waits = waits.ended(11.0)
    assert (waits.times, waits.since, waits.total(99.0)) == (1, None, 1.0)
    waits = waits.began(20.0)
    assert (waits.times, waits.total(19.0)) == (2, 1.0)  # a reading from before it began
