"""The Python plane's upstream counter (``rd_upstream_*``): the specification, locked."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable
from typing import Final

from relayd import wire
from relayd.arbitration.headers import ChannelKind, DeribitLayout
from relayd.arbitration.sequence import ChannelPosition, UpstreamMonitor
from relayd.datapath import UPSTREAM_SNAPSHOT_PORTS, UpstreamChannel, UpstreamTotals

#: A DATA frame's length, type, flags, port and group (network byte order).
_FRAME_ADDRESS: Final = struct.Struct(">HBBHI")


class _UpstreamCounter:
    """``rd_upstream_*`` in Python (``UpstreamCounter``): the specification itself, locked."""

    def __init__(self, layout: DeribitLayout, max_channels: int, stale_horizon_ns: int) -> None:
        self._monitor = UpstreamMonitor(
            layout,
            snapshot_ports=frozenset(UPSTREAM_SNAPSHOT_PORTS),
            max_channels=max_channels,
            stale_horizon=stale_horizon_ns,  # and ``now`` in ns too: integers, as in C
        )
        self._lock = threading.Lock()

    def scan(self, frames: bytes | memoryview, count: int, now_ns: int) -> None:
        view = memoryview(frames)
        see = self._monitor.see
        unpack = _FRAME_ADDRESS.unpack_from
        header = wire.DATA_HEADER_SIZE
        offset = 0
        with self._lock:
            for _ in range(count):
                length, _type, _flags, port, group = unpack(view, offset)
                end = offset + length + 2
                see(group, port, view[offset + header : end], now_ns)  # type: ignore[arg-type]
                offset = end

    def totals(self) -> UpstreamTotals:
        with self._lock:
            monitor = self._monitor
            stats = monitor.stats
            return UpstreamTotals(
                stats.datagrams,
                stats.gaps,
                stats.missing,
                stats.snapshot_gaps,
                stats.duplicates,
                stats.resets,
                stats.overlaps,
                stats.heartbeats,
                stats.unsequenced,
                stats.malformed,
                monitor.channel_evictions,
                sum(1 for _ in monitor.channels()),
                monitor.last_gap,
            )

    def channels(self, lossy: bool = False) -> list[UpstreamChannel]:
        with self._lock:
            return [
                UpstreamChannel(
                    group,
                    port,
                    channel,
                    kind is ChannelKind.SNAPSHOT,
                    c.datagrams,
                    c.gaps,
                    c.missing,
                    c.duplicates,
                    c.resets,
                    c.overlaps,
                )
                for (group, port, channel), kind, c in self._monitor.channels()
                if not lossy or c.gaps or c.duplicates or c.resets or c.overlaps
            ]

    def positions(self) -> list[ChannelPosition]:
        with self._lock:
            return self._monitor.positions()

    def resume(self, positions: Iterable[ChannelPosition], now_ns: int) -> int:
        with self._lock:
            return sum(self._monitor.resume(position, now_ns) for position in positions)

    def close(self) -> None:
        pass
