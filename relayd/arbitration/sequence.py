"""Per-channel sequence tracking shared by the emit side's arbiter and the capture side's
upstream counting (sans-I/O): a bounded channel table, where a sequence falls against its
channel, and how a reset by the exchange is told from a stale copy.

``UpstreamMonitor`` is the capture side's use: it counts the exchange's gaps, duplicates and
resets per channel before anything is relayed, and holds or drops nothing.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import attrs

from relayd.arbitration.headers import PARSERS, ChannelKind, DeribitLayout

__all__ = [
    "Channel",
    "ChannelCounters",
    "ChannelPosition",
    "ChannelTable",
    "Held",
    "SequenceEvent",
    "UpstreamMonitor",
    "UpstreamStats",
    "channel_key",
    "classify",
    "restart",
    "split_channel_key",
]


class SequenceEvent(enum.Enum):
    """How one datagram's sequence relates to its channel's (the capture side's view)."""

    IN_ORDER = "in_order"  # the next one, or the first of a new channel
    GAP = "gap"  # later than the next one: sequences were skipped
    BEHIND = "behind"  # entirely at or below what was seen: a duplicate or a late one
    OVERLAP = "overlap"  # starts below the next one, ends past it
    RESET = "reset"  # far behind (older than the stale horizon): a new sequence epoch
    HEARTBEAT = "heartbeat"  # an SBE packet of no messages
    UNSEQUENCED = "unsequenced"  # snapshot or retransmit SBE packet, no per-packet sequence
    MALFORMED = "malformed"  # too short or inconsistent for the layout


class Channel:
    """The sequence state of one (group, port, channel)."""

    __slots__ = (
        "counters",
        "floor_current",
        "floor_previous",
        "held",
        "held_since",
        "kind",
        "next",
        "rotated",
        "stale_below",
        "stamp",
    )

    def __init__(self, kind: ChannelKind, seq: int, now: float) -> None:
        self.kind = kind
        self.next = seq
        # ``floor_previous`` is at or below every sequence that was next within the last
        # stale horizon: a sequence below it is older than any copy can lag (see rotate). A
        # new channel has no such past: nothing is a reset in its first horizon.
        self.floor_previous = -1
        self.floor_current = seq
        self.rotated = now
        # After a reset, what a lagging copy still brings of the old sequence (up to the old
        # next) is stale for one horizon, not a jump forward.
        self.stale_below = 0
        self.stamp = 0  # the highest sendingTime sent (SBE)
        self.held: dict[int, Held] | None = None
        self.held_since = 0.0
        self.counters = ChannelCounters()


class Held(NamedTuple):
    seq: int
    span: int
    stamp: int
    source: int
    group: int
    port: int
    payload: bytes
    owner: int = 0  # the capture session it came from (its ACKs wait for it), 0: none
    frame: int = 0  # its sequence in that session


@attrs.define
class ChannelCounters:
    """What one channel saw (capture side: at the exchange; emit side: after arbitration)."""

    datagrams: int = 0
    gaps: int = 0
    missing: int = 0  # sequence numbers lost in gaps
    duplicates: int = 0
    resets: int = 0
    overlaps: int = 0


def channel_key(group: int, port: int, channel: int) -> int:
    return (group << 48) | (port << 32) | (channel & 0xFFFFFFFF)


def split_channel_key(key: int) -> tuple[int, int, int]:
    """(group, port, channel) of a key made by the trackers."""
    return key >> 48, (key >> 32) & 0xFFFF, key & 0xFFFFFFFF


class ChannelTable:
    """Bounded table of channels, least recently used evicted first."""

    __slots__ = ("_table", "evictions", "horizon", "limit")

    def __init__(self, limit: int, horizon: float) -> None:
        self._table: OrderedDict[int, Channel] = OrderedDict()
        self.limit = limit
        self.horizon = horizon
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._table)

    def items(self) -> Iterator[tuple[int, Channel]]:
        return iter(self._table.items())

    def get(self, key: int) -> Channel | None:
        channel = self._table.get(key)
        if channel is not None:
            self._table.move_to_end(key)
        return channel

    def add(self, key: int, channel: Channel) -> Channel | None:
        """Add ``channel``; returns the channel evicted to make room, if any."""
        evicted = None
        if len(self._table) >= self.limit:
            _, evicted = self._table.popitem(last=False)
            self.evictions += 1
        self._table[key] = channel
        return evicted

    def rotate(self, channel: Channel, now: float) -> None:
        """Move the stale floors forward once per horizon (lazily, on the channel's traffic).

        At any time, sequences that were next within the last horizon are >= floor_previous:
        it holds the floor from one rotation ago (at least one horizon old), or, after a quiet
        spell of two horizons, the sequence the channel rested at."""
        elapsed = now - channel.rotated
        if elapsed >= self.horizon:
            if elapsed < 2 * self.horizon:
                channel.floor_previous = channel.floor_current
            else:
                channel.floor_previous = channel.next
            channel.floor_current = channel.next
            channel.rotated = now
            channel.stale_below = 0


def classify(channel: Channel, seq: int, count: int, stamp: int) -> SequenceEvent:
    """Where ``seq .. seq+count-1`` falls against the channel (rotate it first)."""
    expected = channel.next
    if count == 0:  # an SBE heartbeat: no messages, the current sequence
        if seq > expected:
            return SequenceEvent.BEHIND if seq < channel.stale_below else SequenceEvent.GAP
        return SequenceEvent.HEARTBEAT if stamp > channel.stamp else SequenceEvent.BEHIND
    if seq == expected:
        return SequenceEvent.IN_ORDER
    if seq > expected:
        return SequenceEvent.BEHIND if seq < channel.stale_below else SequenceEvent.GAP
    if seq + count <= expected:
        if seq < channel.floor_previous:
            return SequenceEvent.RESET
        return SequenceEvent.BEHIND
    return SequenceEvent.OVERLAP


def restart(channel: Channel, seq: int, count: int, now: float) -> None:
    channel.stale_below = channel.next
    channel.next = seq + count
    channel.floor_previous = -1
    channel.floor_current = seq
    channel.rotated = now


class ChannelPosition(NamedTuple):
    """Where a channel's sequence stood: what a restarted capture process resumes from."""

    group: int
    port: int
    channel: int
    snapshot: bool
    next: int  # the next sequence expected
    stamp: int  # the highest sendingTime seen (SBE), else 0


@attrs.define
class UpstreamStats:
    """Totals of an ``UpstreamMonitor`` (the exchange side of the capture host)."""

    datagrams: int = 0
    gaps: int = 0
    missing: int = 0
    snapshot_gaps: int = 0  # gaps on snapshot channels (also in gaps)
    duplicates: int = 0
    resets: int = 0
    overlaps: int = 0
    heartbeats: int = 0
    unsequenced: int = 0
    malformed: int = 0


class UpstreamMonitor:
    """The capture side's count of gaps and duplicates per channel, as the exchange sent them.

    ``see`` takes one datagram, ``see_batch`` many; nothing is held or dropped here."""

    def __init__(
        self,
        layout: DeribitLayout,
        *,
        snapshot_ports: frozenset[int] = frozenset({6101}),
        max_channels: int = 4096,
        stale_horizon: float = 60.0,
    ) -> None:
        self.layout = layout
        self.snapshot_ports = snapshot_ports
        self._parse = PARSERS[layout]
        self._channels = ChannelTable(max_channels, stale_horizon)
        self.stats = UpstreamStats()
        #: (group, port, channel, missing) of the latest gap, for the warning that names it
        self.last_gap: tuple[int, int, int, int] | None = None

    @property
    def channel_evictions(self) -> int:
        return self._channels.evictions

    def channels(self) -> Iterator[tuple[tuple[int, int, int], ChannelKind, ChannelCounters]]:
        """((group, port, channel), kind, counters) of every tracked channel."""
        for key, channel in self._channels.items():
            yield split_channel_key(key), channel.kind, channel.counters

    def see(self, group: int, port: int, payload: bytes, now: float) -> SequenceEvent:
        stats = self.stats
        stats.datagrams += 1
        fields = self._parse(payload, port, self.snapshot_ports)
        if fields is None:
            stats.malformed += 1
            return SequenceEvent.MALFORMED
        channel_id, seq, count, stamp, sequenced, kind = fields
        if not sequenced:
            stats.unsequenced += 1
            return SequenceEvent.UNSEQUENCED
        key = (group << 48) | (port << 32) | (channel_id & 0xFFFFFFFF)
        channels = self._channels
        channel = channels.get(key)
        if channel is None:
            channel = Channel(kind, seq + count, now)
            channel.stamp = stamp
            channel.counters.datagrams = 1
            channels.add(key, channel)
            return SequenceEvent.IN_ORDER
        channels.rotate(channel, now)
        counters = channel.counters
        counters.datagrams += 1
        event = classify(channel, seq, count, stamp)
        if event is SequenceEvent.IN_ORDER:
            channel.next = seq + count
        elif event is SequenceEvent.GAP:
            missing = seq - channel.next
            counters.gaps += 1
            counters.missing += missing
            stats.gaps += 1
            stats.missing += missing
            if channel.kind is ChannelKind.SNAPSHOT:
                stats.snapshot_gaps += 1
            self.last_gap = (group, port, channel_id, missing)
            channel.next = seq + count
        elif event is SequenceEvent.BEHIND:
            counters.duplicates += 1
            stats.duplicates += 1
        elif event is SequenceEvent.OVERLAP:
            counters.overlaps += 1
            stats.overlaps += 1
            channel.next = seq + count
        elif event is SequenceEvent.RESET:
            counters.resets += 1
            stats.resets += 1
            restart(channel, seq, count, now)
        else:
            stats.heartbeats += 1
        channel.stamp = max(channel.stamp, stamp)
        return event

    def positions(self) -> list[ChannelPosition]:
        """Where every tracked channel stands, least recently used first."""
        return [
            ChannelPosition(
                *split_channel_key(key), c.kind is ChannelKind.SNAPSHOT, c.next, c.stamp
            )
            for key, c in self._channels.items()
        ]

    def resume(self, position: ChannelPosition, now: float) -> bool:
        """Track a channel from where an earlier process left it (its ``positions``), so a
        capture host restarted counts what the exchange sent while it was down as a gap; a
        sequence below the position is a reset (the exchange restarted the channel), not a
        duplicate. Nothing is counted; a channel tracked already is left alone (False)."""
        key = channel_key(position.group, position.port, position.channel)
        if self._channels.get(key) is not None:
            return False
        kind = ChannelKind.SNAPSHOT if position.snapshot else ChannelKind.INCREMENTAL
        channel = Channel(kind, position.next, now)
        channel.floor_previous = position.next
        channel.stamp = position.stamp
        self._channels.add(key, channel)
        return True

    def see_batch(self, datagrams: Iterable[tuple[int, int, bytes]], now: float) -> UpstreamStats:
        """``see`` every (group, port, payload); returns the totals."""
        see = self.see
        for group, port, payload in datagrams:
            see(group, port, payload, now)
        return self.stats
