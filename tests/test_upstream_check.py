"""The capture side's upstream check (``upstream_check = "deribit"``): the data planes' upstream
counters on both planes, the C one held to relayd.arbitration's ``UpstreamMonitor`` (the
specification) by a differential fuzz and over the Deribit samples."""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Sequence
from ipaddress import IPv4Address
from pathlib import Path

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd import fastpath, pyplane, wire
from relayd.arbitration import SBE_INCREMENTAL, SBE_SNAPSHOT, ChannelPosition, DeribitLayout
from relayd.capture import CaptureFeedRuntime
from relayd.config import ConfigError, load_config, parse_config
from relayd.datapath import (
    UPSTREAM_SNAPSHOT_PORTS,
    DataPlane,
    UpstreamCounter,
    select_plane,
)
from relayd.tools.pcapng import read_datagrams
from tests.helpers.emit_standin import Peer, Server, feed_config, serve
from tests.helpers.loopback import LOOPBACK, free_udp_port, wait_for
from tests.helpers.relayd_process import (
    RelaydProcess,
    get_text,
    loopback_pair_toml,
    pick_groups,
)
from tests.test_config import CAPTURE

GROUP = int(IPv4Address("239.111.111.1"))
V1 = DeribitLayout.FRAME_V1
SBE = DeribitLayout.SBE
SECOND = 10**9
#: hypothesis examples of the differential test (``make fuzz`` raises it)
FUZZ_EXAMPLES = int(os.environ.get("RELAYD_FUZZ_EXAMPLES", "300"))
U64 = 2**64


def v1(channel: int, seq: int, body: bytes = b"x" * 12) -> bytes:
    return struct.pack("<HHI", len(body), channel, seq) + body


def sbe(
    channel: int, seq: int, count: int = 1, *, stamp: int = 1, kind: int = SBE_INCREMENTAL
) -> bytes:
    return struct.pack("<qqiHH", stamp, seq, channel, kind, count) + b"\0" * 16 * count


def frames(datagrams: Sequence[tuple[int, int, bytes]]) -> bytes:
    """DATA frames as a capture batch holds them."""
    return b"".join(
        wire.encode_datagram(seq, group, port, 0, payload)
        for seq, (group, port, payload) in enumerate(datagrams, 1)
    )


def scan(counter: UpstreamCounter, datagrams: Sequence[tuple[int, int, bytes]], now: int) -> None:
    counter.scan(frames(datagrams), len(datagrams), now)


def c_plane() -> DataPlane:
    try:
        plane = fastpath.load()
    except fastpath.DataPathError as exc:
        pytest.skip(f"C data path unavailable: {exc}")
    if plane is None:
        pytest.skip(f"C data path unavailable: {fastpath.describe()}")
    return plane


@pytest.fixture
def plane(datapath: str) -> DataPlane:
    return select_plane()


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


@pytest.fixture(scope="module")
def counter_pair() -> tuple[DataPlane, DataPlane]:
    """The C plane (skips without it) and the Python one, whose counter is the specification."""
    return c_plane(), pyplane.PLANE


# ---- configuration (on test_config's minimal CAPTURE feed) ---------------------------------


def test_upstream_check_is_off_by_default_and_reads_frame_v1() -> None:
    [feed] = parse_config(CAPTURE).capture
    assert (feed.upstream_check, feed.deribit_layout) == ("none", "frame-v1")
    [feed] = parse_config(CAPTURE + 'upstream_check = "deribit"\nderibit_layout = "sbe"\n').capture
    assert (feed.upstream_check, feed.deribit_layout) == ("deribit", "sbe")
    assert DeribitLayout(feed.deribit_layout) is SBE


def test_the_capture_example_checks_the_production_feed() -> None:
    example = load_config(
        Path(__file__).resolve().parent.parent / "etc/relayd/capture.example.toml"
    )
    checks = {feed.name: (feed.upstream_check, feed.deribit_layout) for feed in example.capture}
    assert checks == {"prod": ("deribit", "frame-v1"), "dev": ("none", "frame-v1")}


def test_upstream_check_values_are_checked() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(CAPTURE + 'upstream_check = "cme"\nderibit_layout = "sbe2"\n')
    assert info.value.errors == (
        "invalid value 'cme', expected one of: none, deribit @ $.capture[0].upstream_check",
        "invalid value 'sbe2', expected one of: frame-v1, sbe @ $.capture[0].deribit_layout",
    )


# ---- unit, on both planes -------------------------------------------------------------------


def test_counts_gaps_duplicates_resets_and_names_the_last_gap(plane: DataPlane) -> None:
    counter = plane.upstream_counter(V1, stale_horizon_ns=10 * SECOND)
    try:
        scan(counter, [(GROUP, 6100, v1(1, seq)) for seq in (10, 11, 14, 14, 12, 15)], 0)
        scan(counter, [(GROUP, 6100, b"xx"), (GROUP, 6100, v1(1, 1))], 20 * SECOND)
        totals = counter.totals()
        assert (totals.datagrams, totals.gaps, totals.missing) == (8, 1, 2)
        assert (totals.duplicates, totals.resets, totals.malformed) == (2, 1, 1)
        assert totals.last_gap == (GROUP, 6100, 1, 2)
        assert totals.channels == 1
        [channel] = counter.channels()
        assert (channel.group, channel.port, channel.channel, channel.snapshot) == (
            GROUP,
            6100,
            1,
            False,
        )
        assert (channel.datagrams, channel.gaps, channel.missing, channel.resets) == (7, 1, 2, 1)
    finally:
        counter.close()


def test_sbe_ranges_heartbeats_and_unsequenced_packets(plane: DataPlane) -> None:
    counter = plane.upstream_counter(SBE)
    try:
        datagrams = [
            (GROUP, 6100, sbe(3, 100, 4, stamp=1)),  # 100..103
            (GROUP, 6100, sbe(3, 104, 2, stamp=2)),  # in order
            (GROUP, 6100, sbe(3, 106, 0, stamp=3)),  # heartbeat
            (GROUP, 6100, sbe(3, 106, 0, stamp=3)),  # its copy
            (GROUP, 6100, sbe(3, 110, 1, stamp=4)),  # 106..109 missing
            (GROUP, 6100, sbe(3, 109, 3, stamp=5)),  # overlap
            (GROUP, 6100, sbe(3, 50, 1, kind=SBE_SNAPSHOT)),  # unsequenced
            (GROUP, 6100, sbe(3, 112, 2)[:30]),  # shorter than its messages
        ]
        scan(counter, datagrams, 0)
        totals = counter.totals()
        assert (totals.gaps, totals.missing, totals.overlaps) == (1, 4, 1)
        assert (totals.heartbeats, totals.duplicates) == (1, 1)
        assert (totals.unsequenced, totals.malformed) == (1, 1)
    finally:
        counter.close()


def test_snapshot_port_gaps_are_counted_apart(plane: DataPlane) -> None:
    counter = plane.upstream_counter(V1)
    try:
        [snapshot_port] = UPSTREAM_SNAPSHOT_PORTS
        scan(counter, [(GROUP, snapshot_port, v1(101, seq)) for seq in (1, 4, 7)], 0)
        scan(counter, [(GROUP, 6100, v1(1, seq)) for seq in (1, 3)], 0)
        totals = counter.totals()
        assert (totals.gaps, totals.snapshot_gaps, totals.missing) == (3, 2, 5)
        assert {(c.port, c.snapshot) for c in counter.channels()} == {
            (snapshot_port, True),
            (6100, False),
        }
    finally:
        counter.close()


def test_channel_table_is_bounded_least_recently_used_evicted(plane: DataPlane) -> None:
    counter = plane.upstream_counter(V1, max_channels=3)
    try:
        scan(counter, [(GROUP, 6100, v1(channel, 1)) for channel in range(1, 4)], 0)
        scan(counter, [(GROUP, 6100, v1(1, 2))], 0)  # channel 1 used: 2 is the oldest now
        scan(counter, [(GROUP, 6100, v1(4, 1))], 0)
        totals = counter.totals()
        assert (totals.channels, totals.evictions) == (3, 1)
        assert [c.channel for c in counter.channels()] == [3, 1, 4]
        scan(counter, [(GROUP, 6100, v1(2, 9))], 0)  # starts again: no gap, no memory of it
        assert counter.totals().gaps == 0
    finally:
        counter.close()


def test_a_reset_is_what_falls_below_the_stale_floor(plane: DataPlane) -> None:
    """The floor is what was next a horizon ago: that sequence itself is a late copy, one
    below it a reset."""
    counter = plane.upstream_counter(V1, stale_horizon_ns=10 * SECOND)
    try:
        scan(counter, [(GROUP, 6100, v1(1, 100))], 0)
        scan(counter, [(GROUP, 6100, v1(1, 101))], 10 * SECOND)  # floor 101 from now on
        scan(counter, [(GROUP, 6100, v1(1, 102))], 20 * SECOND)  # floor_previous 101
        scan(counter, [(GROUP, 6100, v1(1, 101))], 20 * SECOND)
        assert (counter.totals().duplicates, counter.totals().resets) == (1, 0)
        scan(counter, [(GROUP, 6100, v1(1, 100))], 20 * SECOND)
        assert (counter.totals().duplicates, counter.totals().resets) == (1, 1)
    finally:
        counter.close()


def test_one_counter_serves_several_receive_threads(plane: DataPlane) -> None:
    """A feed's receive threads share its counter (the C scan runs without the GIL): four
    threads, each its own port and 16 channels, batches of 512 datagrams in which every
    channel skips one sequence number; nothing is lost or counted twice. (Without the C
    counter's mutex the counts came out wrong in some runs of this test.)"""
    counter = plane.upstream_counter(V1, max_channels=64)
    batches = 100
    work = {
        port: [
            frames(
                [
                    (GROUP, port, v1(ch, 33 * n + k))
                    for k in range(1, 34)
                    if k != 17
                    for ch in range(16)
                ]
            )
            for n in range(batches)
        ]
        for port in range(6100, 6104)
    }
    start = threading.Barrier(4)

    def receive(port: int) -> None:
        start.wait()
        for n, batch in enumerate(work[port]):
            counter.scan(batch, 512, n)

    try:
        threads = [threading.Thread(target=receive, args=(port,)) for port in work]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        totals = counter.totals()
        assert totals.datagrams == 4 * batches * 512
        assert totals.channels == 64
        assert (totals.gaps, totals.missing) == (64 * batches, 64 * batches)
        assert totals.duplicates == totals.resets == totals.malformed == totals.evictions == 0
    finally:
        counter.close()


def test_a_counter_resumes_where_an_earlier_one_left_each_channel(plane: DataPlane) -> None:
    """The positions of one counter, resumed by a new one (a restarted capture process):
    what the exchange sent meanwhile is a gap, a sequence below the position a reset (the
    exchange restarted the channel), nothing is counted by the resume itself, and a channel
    tracked already is left alone."""
    first = plane.upstream_counter(V1)
    second = plane.upstream_counter(V1)
    try:
        scan(first, [(GROUP, 6100, v1(1, seq)) for seq in range(1, 11)], 0)
        scan(first, [(GROUP, 6101, v1(2, 5))], 0)
        positions = first.positions()
        assert sorted(positions) == [
            ChannelPosition(GROUP, 6100, 1, False, 11, 0),
            ChannelPosition(GROUP, 6101, 2, True, 6, 0),
        ]
        assert second.resume(positions, SECOND) == 2
        assert second.resume(positions, SECOND) == 0
        assert second.totals().datagrams == 0
        assert second.totals().channels == 2
        scan(second, [(GROUP, 6100, v1(1, 31)), (GROUP, 6101, v1(2, 1))], 2 * SECOND)
        totals = second.totals()
        assert (totals.gaps, totals.missing, totals.resets, totals.duplicates) == (1, 20, 1, 0)
        assert totals.last_gap == (GROUP, 6100, 1, 20)
    finally:
        first.close()
        second.close()


def test_a_restarted_capture_host_counts_what_the_exchange_sent_while_it_was_down(
    datapath: str, tmp_path: Path
) -> None:
    """``relayd run`` with ``upstream_check`` under a state directory (systemd's
    ``STATE_DIRECTORY``): channel 1 gets 1..40, the process is killed (kill -9, once its state
    file has the position), 41..60 go out while no process listens, a new process resumes where
    the old one left off and, given 61..80, counts one gap of 20 on its /metrics."""
    groups = pick_groups(2)
    config = tmp_path / "relayd.toml"
    config.write_text(loopback_pair_toml(groups, 'upstream_check = "deribit"\n'))
    state = tmp_path / "state"
    state.mkdir()
    env = {"STATE_DIRECTORY": str(state)}
    group, port = str(groups[0][0]), groups[0][1]

    def send(seqs: range) -> None:
        with _deribit_sender("127.0.0.2") as sock:
            _send(sock, [(group, port, v1(1, seq)) for seq in seqs])

    def metric_line(health: int, name: str, value: int) -> str:
        want = f'relayd_upstream_{name}_total{{feed="kit",side="capture"}} {value}\n'
        deadline = time.monotonic() + 30
        while want not in (text := get_text(health, "/metrics")):
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        return text

    saved = state / "upstream-kit.json"
    first = RelaydProcess(config, env)
    try:
        health = first.healthy_port(timeout=30)
        send(range(1, 41))
        metric_line(health, "datagrams", 40)
        deadline = time.monotonic() + 10
        while f"{port},1,false,41,0]" not in (doc := saved.read_text() if saved.exists() else ""):
            assert time.monotonic() < deadline, doc
            time.sleep(0.05)
        assert f"{group}" not in doc  # addresses as integers
    finally:
        first.kill()
    send(range(41, 61))  # nobody listens: lost
    second = RelaydProcess(config, env)
    try:
        health = second.healthy_port(timeout=30)
        second.wait_line("upstream check resumes 1 channels", timeout=10)
        send(range(61, 81))
        text = metric_line(health, "datagrams", 20)
        for name, value in (("gaps", 1), ("missing", 20), ("duplicates", 0), ("resets", 0)):
            assert f'relayd_upstream_{name}_total{{feed="kit",side="capture"}} {value}\n' in text
    finally:
        second.stop()
        second.kill()
    assert '"channels":[[' in saved.read_text()  # written again when it stopped


def test_c_counter_refuses_what_it_cannot_hold() -> None:
    with pytest.raises(ValueError, match="refused"):
        c_plane().upstream_counter(V1, max_channels=0)


# ---- the C counter held to the specification -----------------------------------------------


def _wrapped(values: tuple[object, ...]) -> tuple[object, ...]:
    """Integers as C's 64-bit counters hold them."""
    return tuple(v % U64 if isinstance(v, int) and not isinstance(v, bool) else v for v in values)


def _compare(c: UpstreamCounter, spec: UpstreamCounter) -> None:
    totals_c, totals_spec = c.totals(), spec.totals()
    last_gap = totals_spec.last_gap
    expected = (*_wrapped(totals_spec[:-1]), None if last_gap is None else _wrapped(last_gap))
    assert tuple(totals_c) == expected
    assert [_wrapped(row) for row in spec.channels()] == [tuple(row) for row in c.channels()]
    lossy = [_wrapped(row) for row in spec.channels(lossy=True)]
    assert lossy == [tuple(row) for row in c.channels(lossy=True)]


#: The largest SBE seqNum (int64).
SBE_MAX_SEQ = 2**63 - 1


def _payload(
    layout: DeribitLayout, channel: int, seq: int, count: int, stamp: int, kind: int
) -> bytes:
    if layout is V1:
        return v1(channel, seq % 2**32, b"y" * (count % 5))
    return sbe(channel, seq, count, stamp=stamp, kind=kind)


_step = st.tuples(
    st.sampled_from([GROUP, GROUP + 1]),
    st.sampled_from([6100, 6101]),
    st.integers(0, 5),  # channel
    st.one_of(  # sequence: mostly near where the channel is, sometimes far
        st.integers(-3, 6), st.integers(-(2**40), 2**40), st.integers(-(2**62), 2**62)
    ),
    st.integers(0, 4),  # messages (SBE)
    st.integers(-5, 5),  # stamp step (SBE)
    st.sampled_from([SBE_INCREMENTAL] * 6 + [SBE_SNAPSHOT, 0, 8]),
    st.integers(0, 40),  # clock step, in tenths of the horizon
    st.integers(0, 12),  # damage: 0 cuts the payload short
    st.integers(0, 12),  # 1..6: back to where the channel was that many datagrams ago ...
    st.integers(-1, 1),  # ... give or take one (the stale floors' edges)
)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=st.sampled_from([V1, SBE]),
    max_channels=st.integers(1, 6),
    steps=st.lists(_step, max_size=120),
    batch=st.integers(1, 9),
)
def test_c_counter_matches_the_specification(
    layout: DeribitLayout,
    max_channels: int,
    steps: list[tuple[int, int, int, int, int, int, int, int, int, int, int]],
    batch: int,
) -> None:
    c_side, py_side = c_plane(), pyplane.PLANE
    horizon = 10 * SECOND
    c = c_side.upstream_counter(layout, max_channels=max_channels, stale_horizon_ns=horizon)
    spec = py_side.upstream_counter(layout, max_channels=max_channels, stale_horizon_ns=horizon)
    try:
        history: dict[tuple[int, int, int], list[int]] = {}
        stamp = now = 0
        pending: list[tuple[int, int, bytes]] = []
        for step in steps:
            group, port, channel, jump, count, stamp_step, kind, clock, damage, back, edge = step
            past = history.setdefault((group, port, channel), [0])
            if 1 <= back <= 6 and len(past) > back:  # about a stale floor: resets, edges
                seq = max(0, past[-back] + edge)
            else:
                seq = max(0, past[-1] + jump)
            seq = min(seq, SBE_MAX_SEQ)  # far jumps add up: SBE's seqNum is an int64
            past.append(seq + count)
            stamp += stamp_step
            payload = _payload(layout, channel, seq, count, stamp, kind)
            if damage == 0:
                payload = payload[: len(payload) // 2]
            pending.append((group, port, payload))
            if len(pending) >= batch:
                scan(c, pending, now)
                scan(spec, pending, now)
                pending = []
                now += clock * horizon // 10
        scan(c, pending, now)
        scan(spec, pending, now)
        _compare(c, spec)
    finally:
        c.close()
        spec.close()


def test_c_counter_matches_the_specification_on_the_samples(
    counter_pair: tuple[DataPlane, DataPlane], deribit_dir: Path
) -> None:
    """Every sample capture, in batches of 64, the clock at each datagram's capture time; the
    main sample has no gap, combo_legs' snapshot channels 15."""
    c_side, py_side = counter_pair
    for path in sorted(deribit_dir.glob("*.pcapng")):
        c, spec = c_side.upstream_counter(V1), py_side.upstream_counter(V1)
        try:
            datagrams = read_datagrams(path)
            for start in range(0, len(datagrams), 64):
                chunk = datagrams[start : start + 64]
                batch = [(int(d.group), d.port, d.payload) for d in chunk]
                scan(c, batch, chunk[0].ts_ns)
                scan(spec, batch, chunk[0].ts_ns)
            _compare(c, spec)
            totals = c.totals()
            assert totals.datagrams == len(datagrams)
            if path.name == "sample_capture_v1_6.pcapng":
                assert (totals.gaps, totals.duplicates, totals.channels) == (0, 0, 29)
            if path.name == "combo_legs.pcapng":
                assert totals.gaps == totals.snapshot_gaps == 15
        finally:
            c.close()
            spec.close()


# ---- a capture feed on loopback: injected gaps in /metrics, health and status ---------------


def _deribit_sender(source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(source))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    return sock


def _lossy_traffic(
    groups: Sequence[tuple[str, int]], layout: DeribitLayout = V1
) -> list[tuple[str, int, bytes]]:
    """Channel 1 on the first group: 1..100 without 10, 20 and 21 (2 gaps, 3 missing);
    channel 2 on the second: 1..50 with 7 sent twice (1 duplicate). SBE: one message each."""

    def packet(channel: int, seq: int) -> bytes:
        # a sendingTime like the exchange's (ns since the epoch, 1 ms apart)
        stamp = 1_764_950_000_000_000_000 + seq * 1_000_000
        return v1(channel, seq) if layout is V1 else sbe(channel, seq, stamp=stamp)

    (first, port_a), (second, port_b) = groups
    one = [(first, port_a, packet(1, seq)) for seq in range(1, 101) if seq not in (10, 20, 21)]
    two = [(second, port_b, packet(2, seq)) for seq in range(1, 51)]
    two.insert(7, two[6])
    return one + two


def _send(sock: socket.socket, traffic: Sequence[tuple[str, int, bytes]]) -> None:
    for index, (group, port, payload) in enumerate(traffic):
        sock.sendto(payload, (group, port))
        if index % 20 == 19:
            time.sleep(0.002)  # no drops in the loopback's receive buffer


async def _feed_after_lossy_traffic(
    nursery: trio.Nursery,
    groups: Sequence[tuple[str, int]],
    configured: DeribitLayout,
    sent: DeribitLayout,
) -> tuple[CaptureFeedRuntime, Server, list[tuple[str, int, bytes]]]:
    """A capture feed of ``groups`` with ``upstream_check = "deribit"`` in the ``configured``
    layout, its emit stand-in and the ``_lossy_traffic`` sent in the ``sent`` layout, once
    the feed relayed and scanned all of it."""
    server = await serve(nursery, Peer())
    config = attrs.evolve(
        feed_config(groups, [server.port]),
        upstream_check="deribit",
        deribit_layout=configured.value,
    )
    feed = CaptureFeedRuntime(config)
    await nursery.start(feed.run)
    await wait_for(lambda: feed.connected)
    traffic = _lossy_traffic(groups, sent)
    with _deribit_sender(str(LOOPBACK)) as sock:
        _send(sock, traffic)
    await wait_for(lambda: len(server.peer.datagrams) >= len(traffic))
    await wait_for(lambda: feed.upstream is not None and feed.upstream.totals().datagrams == 148)
    return feed, server, traffic


@pytest.mark.usefixtures("datapath")
@pytest.mark.parametrize("layout", [V1, SBE], ids=lambda layout: layout.value)
async def test_capture_feed_counts_injected_gaps(
    nursery: trio.Nursery, layout: DeribitLayout
) -> None:
    port = free_udp_port()
    groups = [("239.255.41.1", port), ("239.255.41.2", port)]
    feed, server, traffic = await _feed_after_lossy_traffic(nursery, groups, layout, layout)
    assert feed.upstream is not None
    samples = {s.name: s.value for s in feed.samples() if s.labels == feed.upstream.labels}
    assert samples["upstream_datagrams"] == 148
    assert (samples["upstream_gaps"], samples["upstream_missing"]) == (2, 3)
    assert (samples["upstream_duplicates"], samples["upstream_resets"]) == (1, 0)
    assert samples["upstream_channels"] == 2
    assert samples["upstream_malformed"] == 0
    detail = feed.health().detail
    assert detail["upstream_gaps"] == 2
    upstream = detail["upstream"]
    assert upstream["last_gap"] == {"channel": f"239.255.41.1:{port}#1", "missing": 2}
    assert [
        (c["channel"], c["gaps"], c["missing"], c["duplicates"]) for c in upstream["top_channels"]
    ] == [
        (f"239.255.41.1:{port}#1", 2, 3, 0),
        (f"239.255.41.2:{port}#2", 0, 0, 1),
    ]
    # what was relayed is untouched: every datagram, in order per group
    assert sorted(d.payload for d in server.peer.datagrams) == sorted(p for _, _, p in traffic)


def test_relayd_shows_injected_gaps_in_metrics_status_and_log(
    datapath: str, tmp_path: Path
) -> None:
    """A real ``relayd run`` (capture and emit feed, each other's peer, on loopback): the gaps
    skipped in the Deribit packets sent are on /metrics, in ``relayd status`` and in a warning
    that names the channel, with the exact counts."""
    groups = pick_groups(2)
    config = tmp_path / "relayd.toml"
    config.write_text(loopback_pair_toml(groups, 'upstream_check = "deribit"\n'))
    relayd = RelaydProcess(config, {})
    try:
        health = relayd.healthy_port(timeout=30)
        traffic = _lossy_traffic(groups)
        with _deribit_sender("127.0.0.2") as sock:
            _send(sock, traffic)
        want = 'relayd_upstream_datagrams_total{feed="kit",side="capture"} 148\n'
        deadline = time.monotonic() + 30
        while want not in (text := get_text(health, "/metrics")):
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        for name, value in (("gaps", 2), ("missing", 3), ("duplicates", 1), ("resets", 0)):
            assert f'relayd_upstream_{name}_total{{feed="kit",side="capture"}} {value}\n' in text
        status = subprocess.run(
            [sys.executable, "-m", "relayd", "status", "--url", f"127.0.0.1:{health}"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert status.returncode == 0, status.stdout + status.stderr
        assert "UPSTREAM GAPS" in status.stdout
        channel = f"{groups[0][0]}:{groups[0][1]}#1"
        assert (
            f"kit: upstream (frame-v1): 2 gaps, 3 missing, 1 duplicates, 0 resets; most on "
            f"channel {channel} (2 gaps, 3 missing, 0 duplicates)"
        ) in status.stdout
        relayd.wait_line(f"feed kit: upstream gap on channel {re.escape(channel)}", timeout=10)
    finally:
        relayd.stop()
        relayd.kill()


@pytest.mark.usefixtures("datapath")
async def test_a_wrong_layout_is_counted_and_warned_about(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """SBE packets into a feed set to frame-v1: every one relayed, counted malformed, and a
    warning that asks about deribit_layout. (An SBE packet whose sendingTime's low 16 bits
    happen to equal its size - 8 would pass for a frame-v1 one: the layout is configured,
    never guessed.)"""
    port = free_udp_port()
    groups = [("239.255.43.1", port), ("239.255.43.2", port)]
    feed, _server, _traffic = await _feed_after_lossy_traffic(nursery, groups, V1, SBE)
    assert feed.upstream is not None
    totals = feed.upstream.totals()
    assert (totals.malformed, totals.gaps, totals.channels) == (148, 0, 0)
    await wait_for(lambda: "is deribit_layout right?" in caplog.text, timeout=10)
    assert re.search(
        r"feed test: \d+ of \d+ datagrams are not Deribit frame-v1 packets", caplog.text
    )


async def test_upstream_counts_carry_on_across_a_reload(nursery: trio.Nursery) -> None:
    """A runtime that replaces the feed's (a reload, a restart) adds its predecessor's counts
    to its own, on /metrics and in the health detail."""
    server = await serve(nursery, Peer())
    port = free_udp_port()
    groups = [("239.255.42.1", port), ("239.255.42.2", port)]
    config = attrs.evolve(feed_config(groups, [server.port]), upstream_check="deribit")
    first = CaptureFeedRuntime(config)
    traffic = _lossy_traffic(groups)
    async with trio.open_nursery() as inner:
        await inner.start(first.run)
        await wait_for(lambda: first.connected)
        with _deribit_sender(str(LOOPBACK)) as sock:
            _send(sock, traffic)
        await wait_for(
            lambda: first.upstream is not None and first.upstream.totals().datagrams == 148
        )
        inner.cancel_scope.cancel()
    second = CaptureFeedRuntime(config)
    second.open(first)
    await nursery.start(second.run)
    await wait_for(lambda: second.connected)
    with _deribit_sender(str(LOOPBACK)) as sock:  # a new channel 1 from 1: no gap
        _send(sock, [(groups[0][0], port, v1(1, seq)) for seq in range(1, 11)])
    await wait_for(lambda: second.upstream is not None and second.upstream.totals().datagrams == 10)
    assert second.upstream is not None
    labels = second.upstream.labels
    samples = {s.name: s.value for s in second.samples() if s.labels == labels}
    assert (samples["upstream_datagrams"], samples["upstream_gaps"]) == (158, 2)
    assert (samples["upstream_missing"], samples["upstream_duplicates"]) == (3, 1)
    upstream = second.health().detail["upstream"]
    assert (upstream["datagrams"], upstream["gaps"], upstream["missing"]) == (158, 2, 3)
    assert second.health().detail["upstream_gaps"] == 2


def test_c_counter_matches_the_specification_under_asan_and_ubsan() -> None:
    """The differential test against an ASan+UBSan build of the C data plane, in a child
    process (tests/test_fastpath_fuzz.py's harness): any sanitizer report fails it."""
    from tests import test_fastpath_fuzz as harness  # noqa: PLC0415 - its sanitizer build

    runtime = harness._sanitizer_runtime()
    if isinstance(runtime, str):
        pytest.skip(f"no sanitizer build: {runtime}")
    c_plane()
    compiler, libasan = runtime
    examples = max(30, FUZZ_EXAMPLES // 4)
    child_code = (
        "import sys\n"
        "sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "from relayd import fastpath\n"
        "assert str(fastpath.LIBRARY).startswith(sys.argv[1]), fastpath.LIBRARY\n"
        "from tests import test_upstream_check as tests\n"
        "tests.test_c_counter_matches_the_specification()\n"
        "print('sanitized upstream session passed', flush=True)\n"
    )
    with tempfile.TemporaryDirectory(prefix="relayd-asan-") as scratch:
        root = harness.sanitized_package(Path(scratch), compiler)
        env = harness.sanitizer_env(libasan, RELAYD_FUZZ_EXAMPLES=str(examples))
        child = subprocess.run(
            [sys.executable, "-c", child_code, str(root), str(Path(__file__).parent.parent)],
            env=env,
            cwd=scratch,
            capture_output=True,
            text=True,
            check=False,
            timeout=max(600, examples * 2),
        )
    report = child.stdout + child.stderr
    assert child.returncode == 0, report[-6000:]
    assert not any(marker in report for marker in harness.SANITIZER_REPORT), report[-6000:]
    assert "sanitized upstream session passed" in child.stdout
