"""A/B arbitration of one feed's datagrams by the exchange's own sequence numbers (sans-I/O).

Several capture hosts stream the same multicast groups; the active emit host hands every
datagram of every copy to one ``Arbiter`` per feed, which says what to do with it: send it now,
drop it (another copy, or the previous emitter, already sent it), or hold it for a moment
because the copy that brought it lost the datagram before it and another copy may still bring
that one. Held datagrams come back out of ``Arbiter.released`` in sequence order as soon as the
hole is filled, or when ``expire`` gives up on the hole (an upstream gap, counted). The capture
side counts the exchange's own gaps and duplicates with an ``UpstreamMonitor`` over the same
sequence tracking, before anything is relayed.

Modes (``ArbitrationMode``): ``DERIBIT`` (group, port, channel and sequence from the Deribit
packet header, in one of two layouts, ``DeribitLayout``), ``CONTENT`` (a hash of group, port and
payload within a bounded window, for feeds without sequence numbers: two identical legitimate
datagrams within the window are merged into one), and ``NONE`` (every datagram is sent).

Cost: O(1) per datagram, no I/O, no clock of its own (the caller passes ``now`` in seconds of
any monotonic clock). Memory: at most ``max_channels`` channels (least recently used evicted,
counted), at most ``max_held`` held datagrams (more forces the oldest hole closed, counted), a
content window of at most ``content_window_entries`` hashes. docs/EXACTLY_ONCE.md has the rules
and why they are what they are.
"""

from __future__ import annotations

import enum
import struct
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from typing import Final, NamedTuple

import attrs

__all__ = [
    "SBE_INCREMENTAL",
    "SBE_RETRANSMIT",
    "SBE_SNAPSHOT",
    "Arbiter",
    "ArbiterStats",
    "ArbitrationConfig",
    "ArbitrationMode",
    "ChannelCounters",
    "ChannelKind",
    "ContentWindow",
    "DeribitHeader",
    "DeribitLayout",
    "Release",
    "SequenceEvent",
    "UpstreamMonitor",
    "UpstreamStats",
    "Verdict",
    "parse_deribit",
    "split_channel_key",
]

# The 8-byte frame header of the published sample captures: PacketLength u16 (bytes after the
# header), ChannelID u16, Sequence u32, little-endian. One sequence number per packet.
V1_HEADER: Final = struct.Struct("<HHI")
# The SBE market data schema's PacketHeader (24 bytes, little-endian): sendingTime int64 (ns),
# seqNum int64 (of the packet's first message), channelId int32, type uint16 (a bit set),
# messageCount uint16. The next packet's seqNum is seqNum + messageCount; a heartbeat is a packet
# of 0 messages carrying the current sequence number.
SBE_HEADER: Final = struct.Struct("<qqiHH")
SBE_MESSAGE_HEADER_SIZE: Final = 16  # every message starts with a 16-byte mdMessageHeader
SBE_INCREMENTAL: Final = 0x01
SBE_SNAPSHOT: Final = 0x02
SBE_RETRANSMIT: Final = 0x04
_SBE_KNOWN_TYPES: Final = SBE_INCREMENTAL | SBE_SNAPSHOT | SBE_RETRANSMIT


class ArbitrationMode(enum.Enum):
    NONE = "none"
    CONTENT = "content"
    DERIBIT = "deribit"


class DeribitLayout(enum.Enum):
    FRAME_V1 = "frame-v1"  # 8 bytes: length, channel, sequence (the sample captures)
    SBE = "sbe"  # 24 bytes: sendingTime, seqNum, channelId, type, messageCount


class ChannelKind(enum.Enum):
    INCREMENTAL = "incremental"
    SNAPSHOT = "snapshot"


class Verdict(enum.Enum):
    """What the data plane does with one offered datagram."""

    EMIT = "emit"  # the next one in sequence (or the first of a new channel): send it
    GAP = "gap"  # send it; ``Arbiter.gap_size`` sequences before it were lost in every copy
    RESET = "reset"  # send it; the exchange restarted the channel's sequence
    OVERLAP = "overlap"  # send it; its message range is partly new, partly already sent
    UNSEQUENCED = "unsequenced"  # send it; no usable sequence, first copy within the window
    MALFORMED = "malformed"  # send it; too short or inconsistent for the layout (counted)
    DUPLICATE = "duplicate"  # drop it: already sent (another copy, the previous emitter, stale)
    HELD = "held"  # the arbiter keeps it; it comes out of ``released`` in sequence order

    @property
    def sends(self) -> bool:
        return self not in _NOT_SENT


_NOT_SENT: Final = frozenset({Verdict.DUPLICATE, Verdict.HELD})


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


class DeribitHeader(NamedTuple):
    """The arbitration-relevant part of one Deribit packet header."""

    channel: int
    seq: int  # the first sequence number the packet carries
    span: int  # sequence numbers it carries (messageCount; 1 in the 8-byte layout)
    stamp: int  # sendingTime in ns (SBE), 0 in the 8-byte layout
    sequenced: bool  # False: snapshot, retransmit or reject SBE packets
    kind: ChannelKind


_Fields = tuple[int, int, int, int, bool, ChannelKind]  # DeribitHeader's, as a plain tuple


def _parse_v1(payload: bytes, port: int, snapshot_ports: frozenset[int]) -> _Fields | None:
    size = len(payload)
    if size < 8:
        return None
    length, channel, seq = V1_HEADER.unpack_from(payload)
    if length != size - 8:
        return None
    kind = ChannelKind.SNAPSHOT if port in snapshot_ports else ChannelKind.INCREMENTAL
    return channel, seq, 1, 0, True, kind


def _parse_sbe(payload: bytes, port: int, snapshot_ports: frozenset[int]) -> _Fields | None:
    size = len(payload)
    if size < 24:
        return None
    stamp, seq, channel, type_bits, count = SBE_HEADER.unpack_from(payload)
    if seq < 0 or type_bits & ~_SBE_KNOWN_TYPES or size < 24 + SBE_MESSAGE_HEADER_SIZE * count:
        return None
    if type_bits == SBE_INCREMENTAL:
        return channel, seq, count, stamp, True, ChannelKind.INCREMENTAL
    # Snapshot packets share one seqNum (the incremental sequence they reflect); retransmits
    # repeat sequences on purpose; type 0 is a reject: none has a sequence of its own.
    kind = ChannelKind.SNAPSHOT if type_bits & SBE_SNAPSHOT else ChannelKind.INCREMENTAL
    return channel, seq, count, stamp, False, kind


_PARSERS: Final = {DeribitLayout.FRAME_V1: _parse_v1, DeribitLayout.SBE: _parse_sbe}


def parse_deribit(
    layout: DeribitLayout, port: int, payload: bytes, snapshot_ports: frozenset[int]
) -> DeribitHeader | None:
    """The header of one datagram, or None if it is too short or inconsistent for ``layout``."""
    fields = _PARSERS[layout](payload, port, snapshot_ports)
    return None if fields is None else DeribitHeader(*fields)


@attrs.frozen(kw_only=True)
class ArbitrationConfig:
    """One feed's arbitration settings."""

    mode: ArbitrationMode = ArbitrationMode.NONE
    layout: DeribitLayout = DeribitLayout.FRAME_V1
    #: ports whose channels are snapshot channels in the 8-byte layout (SBE says it per packet)
    snapshot_ports: frozenset[int] = frozenset({6101})
    max_channels: int = attrs.field(default=4096, validator=attrs.validators.ge(1))
    #: how long a datagram after a hole waits for another copy to fill it (0: never wait)
    hold_timeout: float = attrs.field(default=0.05, validator=attrs.validators.ge(0))
    max_held: int = attrs.field(default=4096, validator=attrs.validators.ge(1))
    #: no copy lags more than this (seconds; above the capture replay_max_age): a sequence
    #: older than that is a reset by the exchange, not a stale copy
    stale_horizon: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    content_window: float = attrs.field(default=2.0, validator=attrs.validators.gt(0))
    content_window_entries: int = attrs.field(default=1 << 17, validator=attrs.validators.ge(1))


class ContentWindow:
    """Hashes of (group, port, payload) seen within the last ``seconds`` and ``entries``."""

    __slots__ = ("_order", "_seen", "entries", "evicted", "seconds")

    def __init__(self, seconds: float, entries: int) -> None:
        self.seconds = seconds
        self.entries = entries
        self._seen: dict[int, float] = {}
        self._order: deque[tuple[int, float]] = deque()
        self.evicted = 0  # hashes dropped for the entry bound before their time was up

    def __len__(self) -> int:
        return len(self._seen)

    def seen(self, group: int, port: int, payload: bytes, now: float) -> bool:
        """True if the same datagram was recorded within the window; records it if not."""
        key = hash((group, port, payload))
        order = self._order
        seen = self._seen
        horizon = now - self.seconds
        while order and order[0][1] <= horizon:
            old, at = order.popleft()
            if seen.get(old) == at:
                del seen[old]
        if key in seen:
            return True
        if len(seen) >= self.entries:
            while order:
                old, at = order.popleft()
                if seen.get(old) == at:
                    del seen[old]
                    self.evicted += 1
                    break
        seen[key] = now
        order.append((key, now))
        return False


class _Channel:
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
        self.held: dict[int, _Held] | None = None
        self.held_since = 0.0
        self.counters = ChannelCounters()


class _Held(NamedTuple):
    seq: int
    span: int
    stamp: int
    source: int
    group: int
    port: int
    payload: bytes


class Release(NamedTuple):
    """A held datagram to send now, in order (``gap`` sequences before it were lost)."""

    source: int
    group: int
    port: int
    payload: bytes
    gap: int


@attrs.define
class ChannelCounters:
    """What one channel saw (capture side: at the exchange; emit side: after arbitration)."""

    datagrams: int = 0
    gaps: int = 0
    missing: int = 0  # sequence numbers lost in gaps
    duplicates: int = 0
    resets: int = 0
    overlaps: int = 0


def _channel_key(group: int, port: int, channel: int) -> int:
    return (group << 48) | (port << 32) | (channel & 0xFFFFFFFF)


def split_channel_key(key: int) -> tuple[int, int, int]:
    """(group, port, channel) of a key made by the trackers."""
    return key >> 48, (key >> 32) & 0xFFFF, key & 0xFFFFFFFF


class _Channels:
    """Bounded table of channels, least recently used evicted first."""

    __slots__ = ("_table", "evictions", "horizon", "limit")

    def __init__(self, limit: int, horizon: float) -> None:
        self._table: OrderedDict[int, _Channel] = OrderedDict()
        self.limit = limit
        self.horizon = horizon
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._table)

    def items(self) -> Iterator[tuple[int, _Channel]]:
        return iter(self._table.items())

    def get(self, key: int) -> _Channel | None:
        channel = self._table.get(key)
        if channel is not None:
            self._table.move_to_end(key)
        return channel

    def add(self, key: int, channel: _Channel) -> _Channel | None:
        """Add ``channel``; returns the channel evicted to make room, if any."""
        evicted = None
        if len(self._table) >= self.limit:
            _, evicted = self._table.popitem(last=False)
            self.evictions += 1
        self._table[key] = channel
        return evicted

    def rotate(self, channel: _Channel, now: float) -> None:
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


def _classify(channel: _Channel, seq: int, count: int, stamp: int) -> SequenceEvent:
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


def _restart(channel: _Channel, seq: int, count: int, now: float) -> None:
    channel.stale_below = channel.next
    channel.next = seq + count
    channel.floor_previous = -1
    channel.floor_current = seq
    channel.rotated = now


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
        self._parse = _PARSERS[layout]
        self._channels = _Channels(max_channels, stale_horizon)
        self.stats = UpstreamStats()

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
            channel = _Channel(kind, seq + count, now)
            channel.stamp = stamp
            channel.counters.datagrams = 1
            channels.add(key, channel)
            return SequenceEvent.IN_ORDER
        channels.rotate(channel, now)
        counters = channel.counters
        counters.datagrams += 1
        event = _classify(channel, seq, count, stamp)
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
            _restart(channel, seq, count, now)
        else:
            stats.heartbeats += 1
        channel.stamp = max(channel.stamp, stamp)
        return event

    def see_batch(self, datagrams: Iterable[tuple[int, int, bytes]], now: float) -> UpstreamStats:
        """``see`` every (group, port, payload); returns the totals."""
        see = self.see
        for group, port, payload in datagrams:
            see(group, port, payload, now)
        return self.stats


@attrs.define
class ArbiterStats:
    """Totals of an ``Arbiter`` (what customers get after arbitration)."""

    offered: int = 0
    sent: int = 0  # sent at once or released
    duplicates: int = 0  # suppressed: already sent, by this host or the one observed
    held: int = 0
    released: int = 0
    gaps: int = 0  # holes no copy filled (declared when the hold expired)
    missing: int = 0  # sequence numbers in those holes
    snapshot_gaps: int = 0  # gaps on snapshot channels (also in gaps)
    resets: int = 0
    overlaps: int = 0
    heartbeats: int = 0
    skipped_heartbeats: int = 0  # heartbeats behind a hole, dropped (also in duplicates)
    unsequenced: int = 0
    malformed: int = 0
    observed: int = 0  # datagrams another relay was seen to emit
    hold_overflows: int = 0  # holes closed early because max_held datagrams were held
    sent_by_source: dict[int, int] = attrs.field(factory=dict)


class Arbiter:
    """Merges every copy of one feed so each upstream datagram is sent once, in order per
    channel, from whichever copy brings it first.

    Per datagram: ``verdict = offer(source, group, port, payload, now)``; send the datagram
    if ``verdict.sends``; then send everything in ``released`` (popleft until empty). Call
    ``expire(now)`` by ``next_deadline()`` (or every batch) and send ``released`` again.
    ``observe`` records what another relay emitted on the feed's groups."""

    def __init__(self, config: ArbitrationConfig) -> None:
        self.config = config
        self.mode = config.mode
        self.layout = config.layout
        self.snapshot_ports = config.snapshot_ports
        self._parse = _PARSERS[config.layout]
        self.hold_timeout = config.hold_timeout
        self.max_held = config.max_held
        self._channels = _Channels(config.max_channels, config.stale_horizon)
        self._horizon = config.stale_horizon
        self._window = ContentWindow(config.content_window, config.content_window_entries)
        self._holding: dict[int, _Channel] = {}  # channels with held datagrams
        self._held_count = 0
        self.live_sources = 2  # fewer than 2: nobody can fill a hole, so none is held
        self.released: deque[Release] = deque()
        self.gap_size = 0  # sequences lost before the datagram of the last GAP verdict
        self.stats = ArbiterStats()

    @property
    def channel_evictions(self) -> int:
        return self._channels.evictions

    @property
    def content_evictions(self) -> int:
        return self._window.evicted

    @property
    def held_now(self) -> int:
        return self._held_count

    def channels(self) -> Iterator[tuple[tuple[int, int, int], ChannelKind, ChannelCounters]]:
        for key, channel in self._channels.items():
            yield split_channel_key(key), channel.kind, channel.counters

    def offer(self, source: int, group: int, port: int, payload: bytes, now: float) -> Verdict:
        """The verdict on one datagram of copy ``source`` (any small int naming the session)."""
        stats = self.stats
        stats.offered += 1
        mode = self.mode
        if mode is ArbitrationMode.NONE:
            return self._sent(source, Verdict.EMIT)
        if mode is ArbitrationMode.CONTENT:
            return self._by_content(source, group, port, payload, now, Verdict.EMIT)
        fields = self._parse(payload, port, self.snapshot_ports)
        if fields is None:
            stats.malformed += 1
            return self._by_content(source, group, port, payload, now, Verdict.MALFORMED)
        channel_id, seq, count, stamp, sequenced, kind = fields
        if not sequenced:
            return self._by_content(source, group, port, payload, now, Verdict.UNSEQUENCED)
        key = (group << 48) | (port << 32) | (channel_id & 0xFFFFFFFF)
        channel = self._channels.get(key)
        if channel is None:
            channel = _Channel(kind, seq + count, now)
            channel.stamp = stamp
            channel.counters.datagrams = 1
            self._add_channel(key, channel)
            return self._sent(source, Verdict.EMIT)
        if now - channel.rotated >= self._horizon:
            self._channels.rotate(channel, now)
        channel.counters.datagrams += 1
        expected = channel.next
        if count and seq < expected and seq + count <= expected and seq >= channel.floor_previous:
            # the other copy's datagram, the commonest case (what _classify calls BEHIND)
            channel.counters.duplicates += 1
            stats.duplicates += 1
            return Verdict.DUPLICATE
        event = SequenceEvent.IN_ORDER if count and seq == expected else None
        if event is None:
            event = _classify(channel, seq, count, stamp)
        if event is SequenceEvent.IN_ORDER:
            channel.next = seq + count
            channel.stamp = max(channel.stamp, stamp)
            if channel.held is not None:
                self._drain(key, channel)
            return self._sent(source, Verdict.EMIT)
        if event is SequenceEvent.BEHIND:
            channel.counters.duplicates += 1
            stats.duplicates += 1
            return Verdict.DUPLICATE
        if event is SequenceEvent.GAP:
            if count == 0 and self.hold_timeout and self.live_sources >= 2:
                # A heartbeat behind a hole says nothing the held data will not: not kept.
                stats.duplicates += 1
                stats.skipped_heartbeats += 1
                return Verdict.DUPLICATE
            held = _Held(seq, count, stamp, source, group, port, payload)
            return self._after_hole(key, channel, seq, held, now)
        if event is SequenceEvent.HEARTBEAT:
            channel.stamp = stamp
            stats.heartbeats += 1
            return self._sent(source, Verdict.EMIT)
        if event is SequenceEvent.OVERLAP:
            # A datagram cannot be cut: sending the already-sent messages again beats losing
            # the new ones (handlers skip messages by sequence).
            channel.counters.overlaps += 1
            stats.overlaps += 1
            channel.next = seq + count
            channel.stamp = max(channel.stamp, stamp)
            if channel.held is not None:
                self._drain(key, channel)
            return self._sent(source, Verdict.OVERLAP)
        # RESET: whatever is held belongs to the old sequence; it goes out first.
        if channel.held is not None:
            self._flush(key, channel)
        channel.counters.resets += 1
        stats.resets += 1
        _restart(channel, seq, count, now)
        channel.stamp = max(channel.stamp, stamp)
        return self._sent(source, Verdict.RESET)

    def observe(self, group: int, port: int, payload: bytes, now: float) -> None:
        """Record a datagram another relay emitted on the feed's groups: this arbiter will not
        send it (nor anything before it on its channel) again."""
        self.stats.observed += 1
        mode = self.mode
        if mode is ArbitrationMode.NONE:
            return
        header = None
        if mode is ArbitrationMode.DERIBIT:
            header = parse_deribit(self.layout, port, payload, self.snapshot_ports)
        if header is None or not header.sequenced:
            self._window.seen(group, port, payload, now)
            return
        key = _channel_key(group, port, header.channel)
        channel = self._channels.get(key)
        seq, count, stamp = header.seq, header.span, header.stamp
        if channel is None:
            channel = _Channel(header.kind, seq + count, now)
            channel.stamp = stamp
            self._add_channel(key, channel)
            return
        self._channels.rotate(channel, now)
        event = _classify(channel, seq, count, stamp)
        if event is SequenceEvent.RESET:
            if channel.held is not None:
                self._flush(key, channel)
            _restart(channel, seq, count, now)
        elif event is not SequenceEvent.BEHIND:
            channel.next = max(channel.next, seq + count)
        channel.stamp = max(channel.stamp, stamp)
        if channel.held is not None:
            self._drain(key, channel)

    def set_live_sources(self, count: int) -> None:
        """How many copies (capture sessions) currently stream the feed. With one, a hole is
        a gap at once (``GAP``): no other copy can fill it, so holding would only add latency.
        Datagrams already held stay until ``expire``."""
        self.live_sources = count

    def next_deadline(self) -> float | None:
        """When the oldest hole's wait ends (None: nothing held)."""
        if not self._holding:
            return None
        return min(channel.held_since for channel in self._holding.values()) + self.hold_timeout

    def expire(self, now: float) -> int:
        """Give up on every hole that waited ``hold_timeout``: count it as a gap and release
        what was held behind it. Returns how many datagrams were released."""
        before = self.stats.released
        limit = now - self.hold_timeout
        for key, channel in list(self._holding.items()):
            while channel.held is not None and channel.held_since <= limit:
                self._skip_hole(key, channel, now)
        return self.stats.released - before

    # ---- internals -----------------------------------------------------------------------

    def _sent(self, source: int, verdict: Verdict) -> Verdict:
        self.stats.sent += 1
        by_source = self.stats.sent_by_source
        by_source[source] = by_source.get(source, 0) + 1
        return verdict

    def _by_content(
        self, source: int, group: int, port: int, payload: bytes, now: float, verdict: Verdict
    ) -> Verdict:
        if self._window.seen(group, port, payload, now):
            self.stats.duplicates += 1
            return Verdict.DUPLICATE
        if verdict is Verdict.UNSEQUENCED:
            self.stats.unsequenced += 1
        return self._sent(source, verdict)

    def _add_channel(self, key: int, channel: _Channel) -> None:
        evicted = self._channels.add(key, channel)
        if evicted is not None and evicted.held is not None:
            # The evicted channel's key is gone from the table; release what it held as-is.
            for old_key, holder in list(self._holding.items()):
                if holder is evicted:
                    self._flush(old_key, evicted)

    def _after_hole(
        self, key: int, channel: _Channel, seq: int, item: _Held, now: float
    ) -> Verdict:
        if self.hold_timeout == 0 or self.live_sources < 2:
            missing = seq - channel.next
            self._count_gap(channel, missing)
            self.gap_size = missing
            channel.next = seq + item.span
            channel.stamp = max(channel.stamp, item.stamp)
            return self._sent(item.source, Verdict.GAP)
        held = channel.held
        if held is None:
            held = channel.held = {}
            channel.held_since = now
            self._holding[key] = channel
        elif seq in held:
            channel.counters.duplicates += 1
            self.stats.duplicates += 1
            return Verdict.DUPLICATE
        held[seq] = item
        self._held_count += 1
        self.stats.held += 1
        if self._held_count > self.max_held:
            self.stats.hold_overflows += 1
            oldest_key = min(self._holding, key=lambda k: self._holding[k].held_since)
            self._skip_hole(oldest_key, self._holding[oldest_key], now)
        return Verdict.HELD

    def _count_gap(self, channel: _Channel, missing: int) -> None:
        stats = self.stats
        channel.counters.gaps += 1
        channel.counters.missing += missing
        stats.gaps += 1
        stats.missing += missing
        if channel.kind is ChannelKind.SNAPSHOT:
            stats.snapshot_gaps += 1

    def _release(self, item: _Held, gap: int) -> None:
        self._held_count -= 1
        self.stats.released += 1
        self._sent(item.source, Verdict.EMIT)
        self.released.append(Release(item.source, item.group, item.port, item.payload, gap))

    def _drain(self, key: int, channel: _Channel) -> None:
        """Release held datagrams that now follow in sequence; drop those already covered."""
        held = channel.held
        assert held is not None
        pop = held.pop
        while held:
            item = pop(channel.next, None)
            if item is None:
                # The run of consecutive ones ended: anything left at or below next overlaps
                # or repeats what was sent (rare: SBE ranges cut differently per copy).
                seq = min(held)
                if seq > channel.next:
                    break
                item = pop(seq)
                if seq + item.span <= channel.next:
                    self._held_count -= 1
                    channel.counters.duplicates += 1
                    self.stats.duplicates += 1
                    continue
                channel.counters.overlaps += 1
                self.stats.overlaps += 1
            channel.next = max(channel.next, item.seq + item.span)
            channel.stamp = max(channel.stamp, item.stamp)
            self._release(item, 0)
        if not held:
            channel.held = None
            del self._holding[key]

    def _skip_hole(self, key: int, channel: _Channel, now: float) -> None:
        """No copy filled the hole before the first held datagram: count it, move on."""
        held = channel.held
        assert held is not None
        seq = min(held)
        missing = seq - channel.next
        self._count_gap(channel, missing)
        item = held.pop(seq)
        channel.next = seq + item.span
        channel.stamp = max(channel.stamp, item.stamp)
        self._release(item, missing)
        channel.held_since = now  # the next hole, if any, gets its own wait
        if held:
            self._drain(key, channel)
        else:
            channel.held = None
            del self._holding[key]

    def _flush(self, key: int, channel: _Channel) -> None:
        """Release everything held on ``channel`` in sequence order, holes counted."""
        while channel.held is not None:
            self._skip_hole(key, channel, channel.held_since)
