"""relayd.arbitration: header parsing, the A/B arbiter, the content window, the capture side's
upstream counting; property tests merge two lossy, delayed copies of the Deribit sample."""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd.arbitration import (
    SBE_INCREMENTAL,
    SBE_RETRANSMIT,
    SBE_SNAPSHOT,
    Arbiter,
    ArbitrationConfig,
    ArbitrationMode,
    ChannelKind,
    ContentWindow,
    DeribitLayout,
    SequenceEvent,
    UpstreamMonitor,
    Verdict,
    parse_deribit,
)
from relayd.tools.pcapng import read_datagrams

GROUP = int(IPv4Address("239.111.111.1"))
V1 = DeribitLayout.FRAME_V1
SBE = DeribitLayout.SBE
NO_SNAPSHOT_PORTS: frozenset[int] = frozenset()


def v1(channel: int, seq: int, body: bytes = b"x" * 12) -> bytes:
    return struct.pack("<HHI", len(body), channel, seq) + body


def sbe(
    channel: int, seq: int, count: int = 1, *, stamp: int = 1, kind: int = SBE_INCREMENTAL
) -> bytes:
    header = struct.pack("<qqiHH", stamp, seq, channel, kind, count)
    return header + b"\0" * 16 * count


def deribit(layout: DeribitLayout = V1, hold: float = 0.05, **kwargs: object) -> Arbiter:
    config = ArbitrationConfig(
        mode=ArbitrationMode.DERIBIT,
        layout=layout,
        hold_timeout=hold,
        **kwargs,  # type: ignore[arg-type]
    )
    return Arbiter(config)


def offer_all(
    arbiter: Arbiter, source: int, payloads: Sequence[bytes], now: float = 0.0, port: int = 6100
) -> list[Verdict]:
    return [arbiter.offer(source, GROUP, port, p, now) for p in payloads]


def released(arbiter: Arbiter) -> list[bytes]:
    out = [item.payload for item in arbiter.released]
    arbiter.released.clear()
    return out


# ---- parsing ------------------------------------------------------------------------------


def test_v1_header_parsed() -> None:
    header = parse_deribit(V1, 6100, v1(7, 1234), frozenset({6101}))
    assert header is not None
    assert (header.channel, header.seq, header.span, header.sequenced) == (7, 1234, 1, True)
    assert header.kind is ChannelKind.INCREMENTAL
    snapshot = parse_deribit(V1, 6101, v1(107, 5), frozenset({6101}))
    assert snapshot is not None
    assert snapshot.kind is ChannelKind.SNAPSHOT


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x01\x02\x03", v1(1, 1)[:-1], struct.pack("<HHI", 0, 1, 1) + b"extra"],
    ids=["empty", "short", "length too big", "length too small"],
)
def test_v1_malformed(payload: bytes) -> None:
    assert parse_deribit(V1, 6100, payload, NO_SNAPSHOT_PORTS) is None


def test_sbe_header_parsed() -> None:
    header = parse_deribit(SBE, 6100, sbe(3, 100, 4, stamp=99), NO_SNAPSHOT_PORTS)
    assert header is not None
    assert (header.channel, header.seq, header.span, header.stamp) == (3, 100, 4, 99)
    assert header.sequenced
    for kind in (SBE_SNAPSHOT, SBE_INCREMENTAL | SBE_RETRANSMIT, 0):
        other = parse_deribit(SBE, 6100, sbe(3, 100, kind=kind), NO_SNAPSHOT_PORTS)
        assert other is not None
        assert not other.sequenced
    snap = parse_deribit(SBE, 6100, sbe(3, 100, kind=SBE_SNAPSHOT), NO_SNAPSHOT_PORTS)
    assert snap is not None
    assert snap.kind is ChannelKind.SNAPSHOT


@pytest.mark.parametrize(
    "payload",
    [
        b"\0" * 23,
        sbe(1, -5),
        sbe(1, 5, kind=0x08),
        sbe(1, 5, 3)[:-1],  # three messages need 48 bytes after the header
    ],
    ids=["short", "negative seq", "unknown type bit", "count larger than the body"],
)
def test_sbe_malformed(payload: bytes) -> None:
    assert parse_deribit(SBE, 6100, payload, NO_SNAPSHOT_PORTS) is None


# ---- modes none and content ---------------------------------------------------------------


def test_none_sends_everything() -> None:
    arbiter = Arbiter(ArbitrationConfig(mode=ArbitrationMode.NONE))
    verdicts = offer_all(arbiter, 0, [b"a", b"a", v1(1, 1), v1(1, 1)])
    assert verdicts == [Verdict.EMIT] * 4
    assert arbiter.stats.sent == 4


def test_content_merges_copies_within_the_window() -> None:
    config = ArbitrationConfig(mode=ArbitrationMode.CONTENT, content_window=1.0)
    arbiter = Arbiter(config)
    assert arbiter.offer(0, GROUP, 6100, b"tick", 0.0) is Verdict.EMIT
    assert arbiter.offer(1, GROUP, 6100, b"tick", 0.5) is Verdict.DUPLICATE
    assert arbiter.offer(1, GROUP, 6101, b"tick", 0.5) is Verdict.EMIT  # another port
    assert arbiter.offer(1, GROUP + 1, 6100, b"tick", 0.5) is Verdict.EMIT  # another group
    # The caveat: the same bytes sent twice on purpose within the window are merged.
    assert arbiter.offer(0, GROUP, 6100, b"tick", 0.9) is Verdict.DUPLICATE
    # Past the window the same bytes are new again.
    assert arbiter.offer(0, GROUP, 6100, b"tick", 1.01) is Verdict.EMIT
    assert arbiter.stats.duplicates == 2
    assert arbiter.stats.sent_by_source == {0: 2, 1: 2}


def test_content_window_is_bounded_by_entries() -> None:
    window = ContentWindow(seconds=100.0, entries=3)
    for i in range(10):
        assert not window.seen(GROUP, 6100, b"%d" % i, 0.0)
        assert len(window) <= 3
    assert window.evicted == 7
    assert not window.seen(GROUP, 6100, b"0", 0.0)  # evicted, so new again
    assert window.seen(GROUP, 6100, b"9", 0.0)


# ---- mode deribit ---------------------------------------------------------------------------


def test_second_copy_is_suppressed() -> None:
    arbiter = deribit()
    copy = [v1(1, seq) for seq in range(10, 15)]
    assert offer_all(arbiter, 0, copy) == [Verdict.EMIT] * 5
    assert offer_all(arbiter, 1, copy) == [Verdict.DUPLICATE] * 5
    assert arbiter.stats.sent_by_source == {0: 5}
    assert arbiter.stats.duplicates == 5


def test_hole_in_one_copy_is_filled_by_the_other_in_order() -> None:
    arbiter = deribit()
    assert offer_all(arbiter, 0, [v1(1, 10), v1(1, 12), v1(1, 13)]) == [
        Verdict.EMIT,
        Verdict.HELD,
        Verdict.HELD,
    ]
    assert arbiter.next_deadline() == pytest.approx(0.05)
    assert arbiter.offer(1, GROUP, 6100, v1(1, 10), 0.01) is Verdict.DUPLICATE
    assert arbiter.offer(1, GROUP, 6100, v1(1, 11), 0.01) is Verdict.EMIT
    assert released(arbiter) == [v1(1, 12), v1(1, 13)]
    assert offer_all(arbiter, 1, [v1(1, 12), v1(1, 13)]) == [Verdict.DUPLICATE] * 2
    assert arbiter.offer(0, GROUP, 6100, v1(1, 14), 0.02) is Verdict.EMIT
    assert arbiter.stats.gaps == 0
    assert arbiter.next_deadline() is None
    assert arbiter.held_now == 0


def test_pending_floor_is_the_lowest_frame_a_session_has_held_until_it_is_sent() -> None:
    """What each session's ACKs must wait for: its frames held behind a hole, or released
    and not taken by a pump yet; another session's are not its concern."""
    arbiter = deribit()
    assert arbiter.pending_floor(1) is None
    assert arbiter.offer(0, GROUP, 6100, v1(1, 10), 0.0, owner=1, frame=1) is Verdict.EMIT
    assert arbiter.offer(0, GROUP, 6100, v1(1, 12), 0.0, owner=1, frame=2) is Verdict.HELD
    assert arbiter.offer(0, GROUP, 6100, v1(2, 5), 0.0, owner=1, frame=3) is Verdict.EMIT
    assert arbiter.offer(0, GROUP, 6100, v1(1, 13), 0.0, owner=1, frame=4) is Verdict.HELD
    assert (arbiter.pending, arbiter.pending_floor(1), arbiter.pending_floor(2)) == (True, 2, None)
    # the other copy fills the hole: A's held ones are released, then taken and sent
    assert arbiter.offer(1, GROUP, 6100, v1(1, 11), 0.01, owner=2, frame=1) is Verdict.EMIT
    assert arbiter.pending_floor(1) == 2  # released, not sent yet
    assert released(arbiter) == [v1(1, 12), v1(1, 13)]
    assert (arbiter.pending, arbiter.pending_floor(1)) == (False, None)
    # a hole no copy fills: released (and counted) at the deadline
    assert arbiter.offer(0, GROUP, 6100, v1(1, 15), 0.02, owner=1, frame=5) is Verdict.HELD
    assert arbiter.pending_floor(1) == 5
    assert arbiter.expire(0.1) == 1
    released(arbiter)
    assert arbiter.pending_floor(1) is None


def test_hole_in_every_copy_is_a_counted_gap() -> None:
    arbiter = deribit()
    offer_all(arbiter, 0, [v1(1, 10), v1(1, 13), v1(1, 14)])
    assert arbiter.offer(1, GROUP, 6100, v1(1, 13), 0.01) is Verdict.DUPLICATE  # already held
    assert arbiter.expire(0.04) == 0
    assert arbiter.expire(0.05) == 2
    items = list(arbiter.released)
    assert [item.payload for item in items] == [v1(1, 13), v1(1, 14)]
    assert [item.gap for item in items] == [2, 0]
    assert (arbiter.stats.gaps, arbiter.stats.missing) == (1, 2)
    [(_, _, counters)] = list(arbiter.channels())
    assert (counters.gaps, counters.missing) == (1, 2)
    # The missing ones arriving late are not sent after their successors.
    assert arbiter.offer(1, GROUP, 6100, v1(1, 11), 0.06) is Verdict.DUPLICATE


def test_no_hold_reports_the_gap_at_once() -> None:
    arbiter = deribit(hold=0)
    assert arbiter.offer(0, GROUP, 6100, v1(1, 10), 0.0) is Verdict.EMIT
    assert arbiter.offer(0, GROUP, 6100, v1(1, 15), 0.0) is Verdict.GAP
    assert arbiter.gap_size == 4
    assert (arbiter.stats.gaps, arbiter.stats.missing) == (1, 4)


def test_a_single_live_source_reports_gaps_without_holding() -> None:
    arbiter = deribit()
    arbiter.set_live_sources(1)
    arbiter.offer(0, GROUP, 6100, v1(1, 10), 0.0)
    assert arbiter.offer(0, GROUP, 6100, v1(1, 13), 0.0) is Verdict.GAP
    assert arbiter.gap_size == 2
    arbiter.set_live_sources(2)
    assert arbiter.offer(0, GROUP, 6100, v1(1, 15), 0.0) is Verdict.HELD


def test_channels_are_independent() -> None:
    arbiter = deribit()
    assert arbiter.offer(0, GROUP, 6100, v1(1, 10), 0.0) is Verdict.EMIT
    assert arbiter.offer(0, GROUP, 6100, v1(2, 10), 0.0) is Verdict.EMIT
    assert arbiter.offer(0, GROUP, 6101, v1(1, 10), 0.0) is Verdict.EMIT
    assert arbiter.offer(0, GROUP + 1, 6100, v1(1, 10), 0.0) is Verdict.EMIT
    assert arbiter.offer(1, GROUP, 6100, v1(2, 10), 0.0) is Verdict.DUPLICATE


def test_stale_copy_within_the_horizon_is_a_duplicate_and_older_is_a_reset() -> None:
    arbiter = deribit(stale_horizon=10.0)
    for second in range(30):  # one datagram a second, 100..129
        arbiter.offer(0, GROUP, 6100, v1(1, 100 + second), float(second))
    # A copy replayed from a few seconds back: duplicates.
    assert arbiter.offer(1, GROUP, 6100, v1(1, 120), 29.5) is Verdict.DUPLICATE
    # Sequence 1 again, far below anything sent within the horizon: the exchange restarted.
    assert arbiter.offer(0, GROUP, 6100, v1(1, 1), 30.0) is Verdict.RESET
    assert arbiter.offer(0, GROUP, 6100, v1(1, 2), 30.0) is Verdict.EMIT
    assert arbiter.offer(1, GROUP, 6100, v1(1, 1), 30.1) is Verdict.DUPLICATE
    assert arbiter.stats.resets == 1


def test_reset_within_the_horizon_is_suppressed_until_the_horizon_passes() -> None:
    """The documented cost of telling stale copies from resets by age: a channel restarted
    less than a horizon after it last moved is taken for a stale copy until then."""
    arbiter = deribit(stale_horizon=10.0)
    arbiter.offer(0, GROUP, 6100, v1(1, 500), 0.0)
    assert arbiter.offer(0, GROUP, 6100, v1(1, 1), 1.0) is Verdict.DUPLICATE
    assert arbiter.offer(0, GROUP, 6100, v1(1, 2), 25.0) is Verdict.RESET


def test_malformed_datagrams_are_sent_once_and_counted() -> None:
    arbiter = deribit()
    assert arbiter.offer(0, GROUP, 6100, b"bad", 0.0) is Verdict.MALFORMED
    assert arbiter.offer(1, GROUP, 6100, b"bad", 0.0) is Verdict.DUPLICATE
    assert arbiter.stats.malformed == 2
    assert arbiter.stats.sent == 1


def test_sbe_ranges_heartbeats_overlaps_and_snapshots() -> None:
    arbiter = deribit(SBE)
    assert arbiter.offer(0, GROUP, 6100, sbe(5, 100, 3, stamp=10), 0.0) is Verdict.EMIT
    assert arbiter.offer(0, GROUP, 6100, sbe(5, 103, 2, stamp=11), 0.0) is Verdict.EMIT
    assert arbiter.offer(1, GROUP, 6100, sbe(5, 100, 3, stamp=10), 0.0) is Verdict.DUPLICATE
    # Partly new (103..106 where 105 is next): sent whole, counted.
    assert arbiter.offer(1, GROUP, 6100, sbe(5, 103, 4, stamp=12), 0.0) is Verdict.OVERLAP
    assert arbiter.stats.overlaps == 1
    # A heartbeat (no messages) once per copy pair: told apart from the next one by its time.
    assert arbiter.offer(0, GROUP, 6100, sbe(5, 107, 0, stamp=20), 0.0) is Verdict.EMIT
    assert arbiter.offer(1, GROUP, 6100, sbe(5, 107, 0, stamp=20), 0.0) is Verdict.DUPLICATE
    assert arbiter.offer(0, GROUP, 6100, sbe(5, 107, 0, stamp=30), 0.0) is Verdict.EMIT
    assert arbiter.stats.heartbeats == 2
    # Snapshot packets share a seqNum: merged by content.
    snap_a = sbe(105, 107, 1, stamp=40, kind=SBE_SNAPSHOT)
    snap_b = sbe(105, 107, 2, stamp=40, kind=SBE_SNAPSHOT)
    assert arbiter.offer(0, GROUP, 6101, snap_a, 0.0) is Verdict.UNSEQUENCED
    assert arbiter.offer(0, GROUP, 6101, snap_b, 0.0) is Verdict.UNSEQUENCED
    assert arbiter.offer(1, GROUP, 6101, snap_a, 0.0) is Verdict.DUPLICATE
    # Next after the heartbeat continues the range.
    assert arbiter.offer(0, GROUP, 6100, sbe(5, 107, 1, stamp=31), 0.0) is Verdict.EMIT


def test_sbe_heartbeat_behind_a_hole_is_not_held() -> None:
    arbiter = deribit(SBE)
    arbiter.offer(0, GROUP, 6100, sbe(5, 100, 2, stamp=10), 0.0)
    assert arbiter.offer(0, GROUP, 6100, sbe(5, 103, 1, stamp=12), 0.0) is Verdict.HELD
    assert arbiter.offer(0, GROUP, 6100, sbe(5, 104, 0, stamp=13), 0.0) is Verdict.DUPLICATE
    assert arbiter.stats.skipped_heartbeats == 1
    # The other copy fills the hole; the held packet follows; the next data is not lost.
    assert arbiter.offer(1, GROUP, 6100, sbe(5, 102, 1, stamp=11), 0.0) is Verdict.EMIT
    assert released(arbiter) == [sbe(5, 103, 1, stamp=12)]
    assert arbiter.offer(0, GROUP, 6100, sbe(5, 104, 1, stamp=14), 0.0) is Verdict.EMIT


def test_a_long_run_held_behind_a_hole_is_released_in_order() -> None:
    arbiter = deribit(max_held=10_000)
    arbiter.offer(0, GROUP, 6100, v1(1, 0), 0.0)
    run = [v1(1, seq) for seq in range(2, 5002)]
    assert set(offer_all(arbiter, 0, run)) == {Verdict.HELD}
    assert arbiter.expire(1.0) == 5000
    assert released(arbiter) == run
    assert (arbiter.stats.gaps, arbiter.stats.missing) == (1, 1)


def test_observe_skips_what_the_previous_emitter_sent() -> None:
    arbiter = deribit()
    for seq in range(100, 110):  # the previous active emitter's output, seen on the group
        arbiter.observe(GROUP, 6100, v1(1, seq), 0.0)
    arbiter.observe(GROUP, 6100, b"opaque", 0.0)
    # The new emitter's streams resume from further back (the capture replay buffer).
    verdicts = offer_all(arbiter, 0, [v1(1, seq) for seq in range(95, 112)], now=0.1)
    assert verdicts == [Verdict.DUPLICATE] * 15 + [Verdict.EMIT] * 2
    assert arbiter.offer(0, GROUP, 6100, b"opaque", 0.1) is Verdict.DUPLICATE
    assert arbiter.stats.observed == 11


def test_observe_drops_held_datagrams_the_previous_emitter_sent() -> None:
    arbiter = deribit()
    arbiter.offer(0, GROUP, 6100, v1(1, 10), 0.0)
    assert offer_all(arbiter, 0, [v1(1, 12), v1(1, 13)]) == [Verdict.HELD] * 2
    arbiter.observe(GROUP, 6100, v1(1, 12), 0.0)  # the other relay sent up to 12
    assert released(arbiter) == [v1(1, 13)]
    assert arbiter.held_now == 0
    assert arbiter.stats.duplicates == 1
    assert arbiter.offer(0, GROUP, 6100, v1(1, 14), 0.0) is Verdict.EMIT


def test_observe_after_a_reset_ignores_the_old_sequence() -> None:
    arbiter = deribit(stale_horizon=10.0)
    for second in range(30):
        arbiter.offer(0, GROUP, 6100, v1(1, 100 + second), float(second))
    assert arbiter.offer(0, GROUP, 6100, v1(1, 1), 30.0) is Verdict.RESET
    arbiter.observe(GROUP, 6100, v1(1, 125), 30.0)  # a late copy of the old sequence
    assert arbiter.offer(0, GROUP, 6100, v1(1, 2), 30.0) is Verdict.EMIT
    # A lagging copy of the old sequence is stale for one horizon, not a jump forward.
    assert arbiter.offer(1, GROUP, 6100, v1(1, 127), 30.0) is Verdict.DUPLICATE


def test_channel_table_is_bounded_and_evictions_counted() -> None:
    arbiter = deribit(max_channels=4)
    for channel in range(10):
        arbiter.offer(0, GROUP, 6100, v1(channel, 1), 0.0)
    assert len(list(arbiter.channels())) == 4
    assert arbiter.channel_evictions == 6


def test_held_datagrams_are_bounded() -> None:
    arbiter = deribit(max_held=3)
    arbiter.offer(0, GROUP, 6100, v1(1, 1), 0.0)
    for seq in range(3, 10):
        arbiter.offer(0, GROUP, 6100, v1(1, seq), 0.0)
        assert arbiter.held_now <= 3
    assert arbiter.stats.hold_overflows > 0
    assert released(arbiter)[0] == v1(1, 3)


def test_evicted_channel_releases_what_it_held() -> None:
    arbiter = deribit(max_channels=1)
    arbiter.offer(0, GROUP, 6100, v1(1, 1), 0.0)
    assert arbiter.offer(0, GROUP, 6100, v1(1, 3), 0.0) is Verdict.HELD
    arbiter.offer(0, GROUP, 6100, v1(2, 1), 0.0)
    assert released(arbiter) == [v1(1, 3)]
    assert arbiter.held_now == 0
    assert arbiter.next_deadline() is None


@settings(max_examples=200, deadline=None)
@given(
    payloads=st.lists(
        st.one_of(
            st.binary(max_size=80),
            st.builds(v1, st.integers(0, 3), st.integers(0, 2**32 - 1)),
            st.builds(
                sbe,
                st.integers(-(2**31), 2**31 - 1),
                st.integers(-(2**63), 2**63 - 2**16),
                st.integers(0, 3),
                stamp=st.integers(-(2**63), 2**63 - 1),
                kind=st.integers(0, 2**16 - 1),
            ),
        ),
        max_size=50,
    ),
    layout=st.sampled_from([V1, SBE]),
    mode=st.sampled_from(list(ArbitrationMode)),
)
def test_any_bytes_get_a_verdict_never_an_exception(
    payloads: list[bytes], layout: DeribitLayout, mode: ArbitrationMode
) -> None:
    arbiter = Arbiter(ArbitrationConfig(mode=mode, layout=layout))
    monitor = UpstreamMonitor(layout)
    for index, payload in enumerate(payloads):
        assert isinstance(arbiter.offer(index % 2, GROUP, 6100, payload, index * 0.01), Verdict)
        arbiter.observe(GROUP, 6100, payload[::-1], index * 0.01)
        assert isinstance(monitor.see(GROUP, 6100, payload, index * 0.01), SequenceEvent)
    arbiter.expire(math.inf)
    assert arbiter.stats.sent + arbiter.stats.duplicates == len(payloads)


# ---- the capture side's upstream counting --------------------------------------------------


def test_upstream_monitor_counts_gaps_duplicates_resets() -> None:
    monitor = UpstreamMonitor(V1, stale_horizon=10.0)
    events = [monitor.see(GROUP, 6100, v1(1, seq), 0.0) for seq in (10, 11, 14, 14, 12, 15)] + [
        monitor.see(GROUP, 6100, b"xx", 0.0),
        monitor.see(GROUP, 6100, v1(1, 1), 20.0),
    ]
    assert events == [
        SequenceEvent.IN_ORDER,
        SequenceEvent.IN_ORDER,
        SequenceEvent.GAP,
        SequenceEvent.BEHIND,
        SequenceEvent.BEHIND,
        SequenceEvent.IN_ORDER,
        SequenceEvent.MALFORMED,
        SequenceEvent.RESET,
    ]
    stats = monitor.stats
    assert (stats.gaps, stats.missing, stats.duplicates, stats.resets) == (1, 2, 2, 1)
    assert stats.malformed == 1
    [((group, port, channel), kind, counters)] = list(monitor.channels())
    assert (group, port, channel, kind) == (GROUP, 6100, 1, ChannelKind.INCREMENTAL)
    assert (counters.datagrams, counters.gaps, counters.missing) == (7, 1, 2)


def test_upstream_monitor_on_the_samples(deribit_dir: Path) -> None:
    """The main sample has no gap; combo_legs' snapshot channels step by three (15 gaps)."""
    monitor = UpstreamMonitor(V1)
    for d in read_datagrams(deribit_dir / "sample_capture_v1_6.pcapng"):
        monitor.see(int(d.group), d.port, d.payload, d.ts_ns / 1e9)
    assert monitor.stats.datagrams == 5066
    assert (monitor.stats.gaps, monitor.stats.duplicates, monitor.stats.malformed) == (0, 0, 0)
    assert len(list(monitor.channels())) == 29
    combo = UpstreamMonitor(V1)
    datagrams = [
        (int(d.group), d.port, d.payload) for d in read_datagrams(deribit_dir / "combo_legs.pcapng")
    ]
    stats = combo.see_batch(datagrams, 0.0)
    assert stats.gaps == stats.snapshot_gaps == 15


# ---- property tests: two copies merged -----------------------------------------------------


class Packet(NamedTuple):
    time: float  # when the exchange sent it (seconds)
    group: int
    port: int
    payload: bytes
    channel: tuple[int, int, int]
    seq: int


def _sample_packets(path: Path) -> list[Packet]:
    packets = []
    for d in read_datagrams(path):
        _, channel, seq = struct.unpack_from("<HHI", d.payload)
        key = (int(d.group), d.port, channel)
        packets.append(Packet(d.ts_ns / 1e9, int(d.group), d.port, d.payload, key, seq))
    start = packets[0].time
    return [p._replace(time=p.time - start) for p in packets]


def _synthetic_packets(channels: int, per_channel: int, rng: random.Random) -> list[Packet]:
    packets = []
    seqs = [rng.randrange(1 << 20) for _ in range(channels)]
    for i in range(channels * per_channel):
        channel = rng.randrange(channels)
        seqs[channel] += 1
        payload = v1(channel, seqs[channel], b"%d" % i)
        packets.append(
            Packet(i * 1e-4, GROUP, 6100, payload, (GROUP, 6100, channel), seqs[channel])
        )
    return packets


def _copy(
    packets: Sequence[Packet], loss: float, max_delay: float, rng: random.Random
) -> tuple[list[tuple[float, Packet]], set[int]]:
    """One capture host's copy: random loss, random delay, order kept (one TCP stream)."""
    arrivals = []
    lost = set()
    last = 0.0
    for index, packet in enumerate(packets):
        if rng.random() < loss:
            lost.add(index)
            continue
        last = max(last, packet.time + rng.uniform(0, max_delay))
        arrivals.append((last, packet))
    return arrivals, lost


def _merge(
    arbiter: Arbiter, copies: Sequence[list[tuple[float, Packet]]]
) -> list[tuple[float, bytes]]:
    """Feed every copy to the arbiter in arrival order; returns what it sent, in order."""
    events = sorted(
        (at, source, order, packet)
        for source, copy in enumerate(copies)
        for order, (at, packet) in enumerate(copy)
    )
    sent: list[tuple[float, bytes]] = []

    def drain(now: float) -> None:
        while arbiter.released:
            sent.append((now, arbiter.released.popleft().payload))

    for at, source, _, packet in events:
        arbiter.expire(at)
        drain(at)
        if arbiter.offer(source, packet.group, packet.port, packet.payload, at).sends:
            sent.append((at, packet.payload))
        drain(at)
    arbiter.expire(math.inf)
    drain(math.inf)
    return sent


def _check_exactly_once(
    packets: Sequence[Packet],
    lost_a: set[int],
    lost_b: set[int],
    arbiter: Arbiter,
    sent: list[tuple[float, bytes]],
) -> None:
    payloads = [payload for _, payload in sent]
    assert len(payloads) == len(set(payloads)), "a datagram was sent twice"
    carried = [i for i in range(len(packets)) if not (i in lost_a and i in lost_b)]
    expected = {packets[i].payload for i in carried}
    # Every datagram one copy carried is sent (the first of each channel was observed).
    assert set(payloads) == expected
    by_payload = {p.payload: p for p in packets}
    last: dict[tuple[int, int, int], int] = {}
    for payload in payloads:
        packet = by_payload[payload]
        assert packet.seq > last.get(packet.channel, -1), "out of order within a channel"
        last[packet.channel] = packet.seq
    # Losses in both copies are counted exactly: each run of them followed by a datagram.
    lost_both = sorted(lost_a & lost_b)
    carried_set = set(carried)
    final_seq = {p.channel: p.seq for i, p in enumerate(packets) if i in carried_set}
    missing = sum(1 for i in lost_both if packets[i].seq < final_seq.get(packets[i].channel, -1))
    assert arbiter.stats.missing == missing


def _run_two_copies(
    packets: list[Packet], seed: int, loss_a: float, loss_b: float, max_delay: float
) -> None:
    rng = random.Random(seed)
    # The first datagram of each channel goes through both copies and was seen emitted by
    # the previous relay (observe), so every channel's start is known.
    first: dict[tuple[int, int, int], int] = {}
    for index, packet in enumerate(packets):
        first.setdefault(packet.channel, index)
    starts = set(first.values())
    body = [p for i, p in enumerate(packets) if i not in starts]
    copy_a, lost_a = _copy(body, loss_a, max_delay, rng)
    copy_b, lost_b = _copy(body, loss_b, max_delay, rng)
    arbiter = deribit(hold=max_delay + 0.001)
    for index in first.values():
        p = packets[index]
        arbiter.observe(p.group, p.port, p.payload, 0.0)
    sent = _merge(arbiter, [copy_a, copy_b])
    _check_exactly_once(body, lost_a, lost_b, arbiter, sent)
    assert arbiter.stats.resets == 0
    assert arbiter.held_now == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    loss_a=st.sampled_from([0.0, 0.01, 0.2, 0.5]),
    loss_b=st.sampled_from([0.0, 0.01, 0.2, 0.5]),
    max_delay=st.sampled_from([0.0001, 0.005, 0.2, 2.0]),
)
def test_two_copies_of_the_sample_merge_exactly_once(
    deribit_sample: Path, seed: int, loss_a: float, loss_b: float, max_delay: float
) -> None:
    _run_two_copies(_sample_packets(deribit_sample), seed, loss_a, loss_b, max_delay)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    channels=st.integers(1, 8),
    loss_a=st.floats(0.0, 0.6),
    loss_b=st.floats(0.0, 0.6),
    max_delay=st.floats(0.0001, 0.05),
)
def test_two_synthetic_copies_merge_exactly_once(
    seed: int, channels: int, loss_a: float, loss_b: float, max_delay: float
) -> None:
    packets = _synthetic_packets(channels, 60, random.Random(seed))
    _run_two_copies(packets, seed, loss_a, loss_b, max_delay)


@settings(max_examples=40, deadline=None)
@given(
    datagrams=st.lists(
        st.tuples(
            st.integers(0, 3),  # source
            st.integers(0, 2**16 - 1),  # channel
            st.integers(0, 2**32 - 1),  # sequence
            st.sampled_from([6100, 6101]),
            st.floats(0, 100),  # time
        ),
        min_size=1,
        max_size=400,
    ),
    layout=st.sampled_from([V1, SBE]),
)
def test_memory_stays_bounded_under_a_channel_flood(
    datagrams: list[tuple[int, int, int, int, float]], layout: DeribitLayout
) -> None:
    arbiter = deribit(layout, max_channels=16, max_held=8, content_window_entries=32)
    monitor = UpstreamMonitor(layout, max_channels=16)
    now = 0.0
    for source, channel, seq, port, step in datagrams:
        now += step / 100
        payload = v1(channel, seq) if layout is V1 else sbe(channel, seq, seq % 4, stamp=seq)
        arbiter.offer(source, GROUP, port, payload, now)
        arbiter.observe(GROUP, port, payload[::-1], now)
        monitor.see(GROUP, port, payload, now)
        assert len(list(arbiter.channels())) <= 16
        assert arbiter.held_now <= 8
        assert len(list(monitor.channels())) <= 16
        arbiter.released.clear()
    arbiter.expire(math.inf)
    assert arbiter.held_now == 0
    stats = arbiter.stats
    assert stats.offered == len(datagrams)
    # Every offered datagram was sent once (at once or released) or dropped as a duplicate.
    assert stats.sent == stats.offered - stats.duplicates


def test_held_datagrams_follow_a_gap_when_the_live_sources_drop_to_one() -> None:
    """Held behind a hole, then the other copy goes away: the next datagram past the hole is
    a gap sent at once, and what was held in between goes out after it (never a negative
    gap at expiry)."""
    arbiter = deribit()
    offer_all(arbiter, 0, [v1(1, 1)])
    assert offer_all(arbiter, 0, [v1(1, 3), v1(1, 4)]) == [Verdict.HELD, Verdict.HELD]
    arbiter.set_live_sources(1)
    assert offer_all(arbiter, 0, [v1(1, 6)]) == [Verdict.GAP]
    assert released(arbiter) == []  # 3 and 4 are below the new next: already covered
    assert arbiter.held_now == 0
    arbiter.expire(math.inf)
    assert arbiter.stats.missing == 4  # 2..5, counted once
    assert arbiter.stats.gaps == 1


def test_held_bytes_are_bounded() -> None:
    """Past max_held_bytes the oldest hole is closed early: counted, nothing lost."""
    arbiter = deribit(max_held_bytes=100)
    offer_all(arbiter, 0, [v1(1, 1, b"x" * 40)])
    sent = []
    for seq in range(3, 8):
        payload = v1(1, seq, b"x" * 40)
        if arbiter.offer(0, GROUP, 6100, payload, 0.0).sends:
            sent.append(payload)
        sent += released(arbiter)
        assert arbiter.held_bytes <= 100
    assert arbiter.stats.hold_overflows == 1
    assert sent == [v1(1, seq, b"x" * 40) for seq in range(3, 8)]
    assert (arbiter.stats.gaps, arbiter.stats.missing, arbiter.held_bytes) == (1, 1, 0)


def test_a_hole_left_after_another_was_filled_gets_its_own_wait() -> None:
    """3 opens a hole at 2 (t=0); 5 opens another at 4 (t=0.15) while 3 is held; 2 fills the
    first at t=0.16. The hole at 4 waits a whole hold from then: 4 left the exchange before
    5, not before 3, so giving up at 0.2 (the first hole's deadline) could lose it."""
    arbiter = deribit(hold=0.2)
    arbiter.set_live_sources(2)
    assert arbiter.offer(0, GROUP, 6100, v1(1, 1), 0.0) is Verdict.EMIT
    assert arbiter.offer(0, GROUP, 6100, v1(1, 3), 0.0) is Verdict.HELD
    assert arbiter.offer(0, GROUP, 6100, v1(1, 5), 0.15) is Verdict.HELD
    assert arbiter.offer(1, GROUP, 6100, v1(1, 2), 0.16) is Verdict.EMIT
    assert arbiter.expire(0.25) == 0  # before: the hole at 4 was given up here
    assert arbiter.offer(1, GROUP, 6100, v1(1, 4), 0.3) is Verdict.EMIT
    assert [r.payload for r in arbiter.released] == [v1(1, 3), v1(1, 5)]
    assert (arbiter.stats.gaps, arbiter.stats.missing) == (0, 0)
