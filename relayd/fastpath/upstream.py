"""The C upstream counter (``rd_upstream_*``) behind ``UpstreamCounter``."""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from typing import TYPE_CHECKING

from relayd.arbitration import ChannelPosition, DeribitLayout
from relayd.datapath import UPSTREAM_SNAPSHOT_PORTS, UpstreamChannel, UpstreamTotals
from relayd.fastpath.abi import (
    UP_MAX_SNAPSHOT_PORTS,
    UPSTREAM_LAYOUTS,
    UpstreamChannelState,
    UpstreamStatsState,
)

if TYPE_CHECKING:
    from relayd.fastpath.plane import CPlane


class _CUpstreamCounter:
    """:class:`relayd.datapath.UpstreamCounter` over ``rd_upstream_*``."""

    def __init__(
        self, plane: CPlane, layout: DeribitLayout, max_channels: int, stale_horizon_ns: int
    ) -> None:
        self.handle: int | None = None
        ports = (ctypes.c_uint16 * UP_MAX_SNAPSHOT_PORTS)(*UPSTREAM_SNAPSHOT_PORTS)
        handle = plane.rd_upstream_new(
            UPSTREAM_LAYOUTS[layout],
            max_channels,
            stale_horizon_ns,
            ports,
            len(UPSTREAM_SNAPSHOT_PORTS),
        )
        if not handle:
            raise ValueError(
                f"upstream counter refused: {max_channels} channels, horizon {stale_horizon_ns} ns"
            )
        self.handle = handle
        self._plane = plane
        self._max_channels = max_channels

    def _handle(self) -> int:
        if self.handle is None:
            raise ValueError("upstream counter closed")
        return self.handle

    def scan(self, frames: bytes | memoryview, count: int, now_ns: int) -> None:
        data = bytes(frames)
        self._plane.rd_upstream_scan(self._handle(), data, count, now_ns)

    def totals(self) -> UpstreamTotals:
        out = UpstreamStatsState()
        self._plane.rd_upstream_read(self._handle(), ctypes.byref(out))
        last_gap = None
        if out.gaps:
            last_gap = (
                out.last_gap_group,
                out.last_gap_port,
                out.last_gap_channel,
                out.last_gap_missing,
            )
        return UpstreamTotals(
            out.datagrams,
            out.gaps,
            out.missing,
            out.snapshot_gaps,
            out.duplicates,
            out.resets,
            out.overlaps,
            out.heartbeats,
            out.unsequenced,
            out.malformed,
            out.evictions,
            out.channels,
            last_gap,
        )

    def channels(self, lossy: bool = False) -> list[UpstreamChannel]:
        rows = (UpstreamChannelState * self._max_channels)()
        n = self._plane.rd_upstream_channels(self._handle(), rows, self._max_channels, lossy)
        return [
            UpstreamChannel(
                row.group,
                row.port,
                row.channel,
                bool(row.snapshot),
                row.datagrams,
                row.gaps,
                row.missing,
                row.duplicates,
                row.resets,
                row.overlaps,
            )
            for row in rows[:n]
        ]

    def positions(self) -> list[ChannelPosition]:
        rows = (UpstreamChannelState * self._max_channels)()
        n = self._plane.rd_upstream_channels(self._handle(), rows, self._max_channels, False)
        return [
            ChannelPosition(
                row.group, row.port, row.channel, bool(row.snapshot), row.next, row.stamp
            )
            for row in rows[:n]
        ]

    def resume(self, positions: Iterable[ChannelPosition], now_ns: int) -> int:
        handle = self._handle()
        resume = self._plane.rd_upstream_resume
        return sum(
            resume(handle, p.group, p.port, p.channel, p.snapshot, p.next, p.stamp, now_ns)
            for p in positions
        )

    def close(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            self._plane.rd_upstream_free(handle)

    def __del__(self) -> None:
        self.close()
