"""The C A/B arbiter (``struct rd_arb``, its own mutex) behind ``FeedArbiter``."""

from __future__ import annotations

import ctypes
import socket
import threading
from typing import TYPE_CHECKING

from relayd import wire
from relayd.arbitration import ArbitrationConfig, Verdict
from relayd.datapath import ARBITER_COUNTERS
from relayd.fastpath.abi import (
    _LAYOUTS,
    _MODES,
    _VERDICTS,
    ARB_SNAPSHOT_PORTS,
    ArbiterConfig,
    ArbiterRelease,
    ArbiterStatsState,
    _u64,
)

if TYPE_CHECKING:
    from relayd.fastpath.plane import CPlane


class CArbiter:
    """:class:`relayd.datapath.FeedArbiter` over ``struct rd_arb`` (its own mutex)."""

    def __init__(self, plane: CPlane, config: ArbitrationConfig) -> None:
        ports = sorted(config.snapshot_ports)
        if len(ports) > ARB_SNAPSHOT_PORTS:
            raise ValueError(f"at most {ARB_SNAPSHOT_PORTS} snapshot ports, not {len(ports)}")
        cfg = ArbiterConfig(
            mode=_MODES[config.mode],
            layout=_LAYOUTS[config.layout],
            max_channels=config.max_channels,
            max_held=config.max_held,
            max_held_bytes=config.max_held_bytes,
            content_entries=config.content_window_entries,
            hold_timeout=config.hold_timeout,
            stale_horizon=config.stale_horizon,
            content_window=config.content_window,
            snapshot_port_count=len(ports),
        )
        for i, port in enumerate(ports):
            cfg.snapshot_ports[i] = port
        self._plane = plane
        self._closing = threading.Lock()
        self.address: int | None = plane.rd_arb_new(ctypes.byref(cfg))
        if not self.address:
            raise MemoryError("the C arbiter could not be allocated")
        self._stats = ArbiterStatsState.from_address(plane.rd_arb_stats(self.address))
        self._payload = (ctypes.c_uint8 * wire.MAX_PAYLOAD)()
        self._release = ArbiterRelease()

    def observe(self, group: int, port: int, payload: bytes, now: float) -> None:
        with self._closing:  # never into a freed arbiter, from whatever thread
            if self.address:
                self._plane.rd_arb_observe(self.address, group, port, payload, len(payload), now)

    def set_live_sources(self, count: int) -> None:
        with self._closing:
            if self.address:
                self._plane.rd_arb_set_live_sources(self.address, count)

    def flush(self, mcast: socket.socket) -> tuple[int, int]:
        failed = _u64()
        with self._closing:
            if not self.address:
                return 0, 0
            sent = self._plane.rd_arb_flush(self.address, mcast.fileno(), ctypes.byref(failed))
        return int(sent), int(failed.value)

    def counts(self) -> dict[str, int]:
        stats = self._stats
        return {name: int(getattr(stats, name)) for name in ARBITER_COUNTERS}

    def sent_by_source(self) -> list[int]:
        return list(self._stats.sent_by_source)

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
        code = self._plane.rd_arb_offer(
            self.address, source, owner, frame, group, port, payload, len(payload), now
        )
        return _VERDICTS[code - 1]

    def floor(self, owner: int) -> int | None:
        with self._closing:
            floor = int(self._plane.rd_arb_floor(self.address, owner)) if self.address else 0
        return floor or None

    def take_released(self) -> list[tuple[int, int, int, bytes, int]]:
        out = []
        release = self._release
        while self._plane.rd_arb_take_released(
            self.address, ctypes.byref(release), self._payload, wire.MAX_PAYLOAD
        ):
            payload = bytes(self._payload[: release.len])
            out.append((release.source, release.group, release.port, payload, release.gap))
        return out

    def expire(self, now: float) -> int:
        return int(self._plane.rd_arb_expire(self.address, now))

    def next_deadline(self) -> float | None:
        deadline = float(self._plane.rd_arb_next_deadline(self.address))
        return None if deadline == float("inf") else deadline

    @property
    def gap_size(self) -> int:
        return int(self._stats.gap_size)

    def close(self) -> None:
        """Free the C arbiter; its counters stay readable (a copy)."""
        with self._closing:
            address, self.address = self.address, None
            if address:
                self._stats = ArbiterStatsState.from_buffer_copy(self._stats)
                self._plane.rd_arb_free(address)
