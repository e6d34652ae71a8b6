"""The A/B arbiter of one feed (sans-I/O): every copy of every datagram in, one verdict out.

Several capture hosts stream the same multicast groups; the active emit host hands every
datagram of every copy to one ``Arbiter`` per feed, which says what to do with it: send it now,
drop it (another copy, or the previous emitter, already sent it), or hold it for a moment
because the copy that brought it lost the datagram before it and another copy may still bring
that one. Held datagrams come back out of ``Arbiter.released`` in sequence order as soon as the
hole is filled, or when ``expire`` gives up on the hole (an upstream gap, counted).

Cost: O(1) per datagram, no I/O, no clock of its own (the caller passes ``now`` in seconds of
any monotonic clock). Memory: at most ``max_channels`` channels (least recently used evicted,
counted), at most ``max_held`` held datagrams (more forces the oldest hole closed, counted), a
content window of at most ``content_window_entries`` hashes.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator
from typing import Final, NamedTuple

import attrs

from relayd.arbitration.headers import (
    PARSERS,
    ChannelKind,
    DeribitLayout,
    parse_deribit,
)
from relayd.arbitration.sequence import (
    Channel,
    ChannelCounters,
    ChannelTable,
    Held,
    SequenceEvent,
    channel_key,
    classify,
    restart,
    split_channel_key,
)

__all__ = [
    "Arbiter",
    "ArbiterStats",
    "ArbitrationConfig",
    "ArbitrationMode",
    "ContentWindow",
    "Release",
    "Verdict",
]


class ArbitrationMode(enum.Enum):
    NONE = "none"
    CONTENT = "content"
    DERIBIT = "deribit"


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
    #: payload bytes held at most (more closes the oldest hole early, like ``max_held``)
    max_held_bytes: int = attrs.field(default=16 << 20, validator=attrs.validators.ge(1))
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


class Release(NamedTuple):
    """A held datagram to send now, in order (``gap`` sequences before it were lost)."""

    source: int
    group: int
    port: int
    payload: bytes
    gap: int
    owner: int = 0  # as offered: the session whose ACKs wait until it is taken and sent
    frame: int = 0


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
    ``observe`` records what another relay emitted on the feed's groups.

    ACKs wait for held datagrams: ``offer(..., owner=, frame=)`` names the capture session
    and its sequence number; ``pending_floor(owner)`` is the lowest frame of that session
    still held or released and not taken yet, and the session's connection acknowledges only
    below it (relayd/session.py ``ack_point``), so a held datagram dies with this host only
    unacknowledged: the capture side resends it to the next one."""

    def __init__(self, config: ArbitrationConfig) -> None:
        self.config = config
        self.mode = config.mode
        self.layout = config.layout
        self.snapshot_ports = config.snapshot_ports
        self._parse = PARSERS[config.layout]
        self.hold_timeout = config.hold_timeout
        self.max_held = config.max_held
        self.max_held_bytes = config.max_held_bytes
        self._channels = ChannelTable(config.max_channels, config.stale_horizon)
        self._horizon = config.stale_horizon
        self._window = ContentWindow(config.content_window, config.content_window_entries)
        self._holding: dict[int, Channel] = {}  # channels with held datagrams
        self._held_count = 0
        self._held_bytes = 0
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

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    def channels(self) -> Iterator[tuple[tuple[int, int, int], ChannelKind, ChannelCounters]]:
        for key, channel in self._channels.items():
            yield split_channel_key(key), channel.kind, channel.counters

    def offer(
        self,
        source: int,
        group: int,
        port: int,
        payload: bytes,
        now: float,
        owner: int = 0,
        frame: int = 0,
    ) -> Verdict:
        """The verdict on one datagram of copy ``source`` (any small int naming the session);
        ``owner`` and ``frame``: its capture session and sequence there, kept with it while
        it is held (``pending_floor``)."""
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
            channel = Channel(kind, seq + count, now)
            channel.stamp = stamp
            channel.counters.datagrams = 1
            self._add_channel(key, channel)
            return self._sent(source, Verdict.EMIT)
        if now - channel.rotated >= self._horizon:
            self._channels.rotate(channel, now)
        channel.counters.datagrams += 1
        expected = channel.next
        if count and seq < expected and seq + count <= expected and seq >= channel.floor_previous:
            # the other copy's datagram, the commonest case (what classify calls BEHIND)
            channel.counters.duplicates += 1
            stats.duplicates += 1
            return Verdict.DUPLICATE
        event = SequenceEvent.IN_ORDER if count and seq == expected else None
        if event is None:
            event = classify(channel, seq, count, stamp)
        if event is SequenceEvent.IN_ORDER:
            channel.next = seq + count
            channel.stamp = max(channel.stamp, stamp)
            if channel.held is not None:
                self._drain(key, channel, now)
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
            held = Held(seq, count, stamp, source, group, port, payload, owner, frame)
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
                self._drain(key, channel, now)
            return self._sent(source, Verdict.OVERLAP)
        # RESET: whatever is held belongs to the old sequence; it goes out first.
        if channel.held is not None:
            self._flush(key, channel)
        channel.counters.resets += 1
        stats.resets += 1
        restart(channel, seq, count, now)
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
        key = channel_key(group, port, header.channel)
        channel = self._channels.get(key)
        seq, count, stamp = header.seq, header.span, header.stamp
        if channel is None:
            channel = Channel(header.kind, seq + count, now)
            channel.stamp = stamp
            self._add_channel(key, channel)
            return
        self._channels.rotate(channel, now)
        event = classify(channel, seq, count, stamp)
        if event is SequenceEvent.RESET:
            if channel.held is not None:
                self._flush(key, channel)
            restart(channel, seq, count, now)
        elif event is not SequenceEvent.BEHIND:
            channel.next = max(channel.next, seq + count)
        channel.stamp = max(channel.stamp, stamp)
        if channel.held is not None:
            self._drain(key, channel, now)

    @property
    def pending(self) -> bool:
        """Whether anything is held or released and not taken (else no ACK waits)."""
        return bool(self._holding or self.released)

    def pending_floor(self, owner: int) -> int | None:
        """The lowest ``frame`` of session ``owner`` held or released and not taken yet (None:
        nothing): its connection may acknowledge only below it. A scan of what is held (at
        most ``max_held``), only while something is; the pumps ask once per ACK."""
        if not (self._holding or self.released):
            return None
        floor = None
        for channel in self._holding.values():
            assert channel.held is not None
            for item in channel.held.values():
                if item.owner == owner and (floor is None or item.frame < floor):
                    floor = item.frame
        for release in self.released:
            if release.owner == owner and (floor is None or release.frame < floor):
                floor = release.frame
        return floor

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

    def _add_channel(self, key: int, channel: Channel) -> None:
        evicted = self._channels.add(key, channel)
        if evicted is not None and evicted.held is not None:
            # The evicted channel's key is gone from the table; release what it held as-is.
            for old_key, holder in list(self._holding.items()):
                if holder is evicted:
                    self._flush(old_key, evicted)

    def _after_hole(self, key: int, channel: Channel, seq: int, item: Held, now: float) -> Verdict:
        if self.hold_timeout == 0 or self.live_sources < 2:
            missing = seq - channel.next
            self._count_gap(channel, missing)
            self.gap_size = missing
            channel.next = seq + item.span
            channel.stamp = max(channel.stamp, item.stamp)
            if channel.held is not None:  # held before the live sources dropped to one
                self._drain(key, channel, now)
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
        self._held_bytes += len(item.payload)
        self.stats.held += 1
        while self._holding and (
            self._held_count > self.max_held or self._held_bytes > self.max_held_bytes
        ):
            self.stats.hold_overflows += 1
            oldest_key = min(self._holding, key=lambda k: self._holding[k].held_since)
            self._skip_hole(oldest_key, self._holding[oldest_key], now)
        return Verdict.HELD

    def _count_gap(self, channel: Channel, missing: int) -> None:
        stats = self.stats
        channel.counters.gaps += 1
        channel.counters.missing += missing
        stats.gaps += 1
        stats.missing += missing
        if channel.kind is ChannelKind.SNAPSHOT:
            stats.snapshot_gaps += 1

    def _release(self, item: Held, gap: int) -> None:
        self._held_count -= 1
        self._held_bytes -= len(item.payload)
        self.stats.released += 1
        self._sent(item.source, Verdict.EMIT)
        self.released.append(
            Release(item.source, item.group, item.port, item.payload, gap, item.owner, item.frame)
        )

    def _drain(self, key: int, channel: Channel, now: float) -> None:
        """Release held datagrams that now follow in sequence; drop those already covered.
        When a hole was filled and another remains, that one gets its own wait from ``now``
        (a datagram behind it may have left the exchange after the first hole opened)."""
        held = channel.held
        assert held is not None
        pop = held.pop
        released = self.stats.released
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
                    self._held_bytes -= len(item.payload)
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
        elif self.stats.released != released:
            channel.held_since = now

    def _skip_hole(self, key: int, channel: Channel, now: float) -> None:
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
            self._drain(key, channel, now)
        else:
            channel.held = None
            del self._holding[key]

    def _flush(self, key: int, channel: Channel) -> None:
        """Release everything held on ``channel`` in sequence order, holes counted."""
        while channel.held is not None:
            self._skip_hole(key, channel, channel.held_since)
