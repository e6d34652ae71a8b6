"""The C leaf: the library's entry points bound through ``ctypes.CDLL``, and the library
opened and checked (``open_library``)."""

from __future__ import annotations

import ctypes
import socket
from pathlib import Path

from relayd.arbitration import ArbitrationConfig, DeribitLayout
from relayd.datapath import (
    UPSTREAM_MAX_CHANNELS,
    UPSTREAM_STALE_HORIZON_NS,
    CaptureNumbering,
    ClaimWord,
    EmitStart,
    UpstreamCounter,
)
from relayd.fastpath.abi import (
    ArbiterConfig,
    ArbiterRelease,
    CaptureReaderState,
    CaptureState,
    EmitState,
    UpstreamChannelState,
    UpstreamStatsState,
    _d,
    _i64,
    _u64,
    abi_mismatch,
)
from relayd.fastpath.arbitration import CArbiter
from relayd.fastpath.capture import _CAckReader, _CClaimWord, _CNumbering, _CReceiver
from relayd.fastpath.emit import _CEmitPump
from relayd.fastpath.upstream import _CUpstreamCounter
from relayd.wire import CaptureConnection


class CPlane:
    """The C leaf: the library's entry points, every one bound through ``ctypes.CDLL`` (the GIL
    is released for each call), and the loops built on them."""

    name = "C"
    connects_destinations = True
    busy_polls = True

    def __init__(self, lib: ctypes.CDLL) -> None:
        emit = ctypes.POINTER(EmitState)
        capture = ctypes.POINTER(CaptureState)
        reader = ctypes.POINTER(CaptureReaderState)
        self.rd_emit_pump = lib.rd_emit_pump
        self.rd_emit_pump.argtypes = (emit,)
        self.rd_emit_pump.restype = ctypes.c_int
        self.rd_emit_set_dest = lib.rd_emit_set_dest
        self.rd_emit_set_dest.argtypes = (emit, _u64, _u64, _i64)
        self.rd_emit_set_dest.restype = None
        self.rd_capture_next = lib.rd_capture_next
        self.rd_capture_next.argtypes = (capture,)
        self.rd_capture_next.restype = ctypes.c_int
        self.rd_capture_done = lib.rd_capture_done
        self.rd_capture_done.argtypes = (capture,)
        self.rd_capture_done.restype = None
        self.rd_numbering_new = lib.rd_numbering_new
        self.rd_numbering_new.argtypes = (_u64,)
        self.rd_numbering_new.restype = ctypes.c_void_p
        self.rd_numbering_free = lib.rd_numbering_free
        self.rd_numbering_free.argtypes = (ctypes.c_void_p,)
        self.rd_numbering_free.restype = None
        self.rd_claim_swap = lib.rd_claim_swap
        self.rd_claim_swap.argtypes = (ctypes.c_void_p, _i64, _i64)
        self.rd_claim_swap.restype = _i64
        self.rd_capture_read = lib.rd_capture_read
        self.rd_capture_read.argtypes = (reader,)
        self.rd_capture_read.restype = ctypes.c_int
        arb = ctypes.c_void_p
        self.rd_arb_new = lib.rd_arb_new
        self.rd_arb_new.argtypes = (ctypes.POINTER(ArbiterConfig),)
        self.rd_arb_new.restype = arb
        self.rd_arb_free = lib.rd_arb_free
        self.rd_arb_free.argtypes = (arb,)
        self.rd_arb_free.restype = None
        self.rd_arb_stats = lib.rd_arb_stats
        self.rd_arb_stats.argtypes = (arb,)
        self.rd_arb_stats.restype = ctypes.c_void_p
        self.rd_arb_set_live_sources = lib.rd_arb_set_live_sources
        self.rd_arb_set_live_sources.argtypes = (arb, _u64)
        self.rd_arb_set_live_sources.restype = None
        self.rd_arb_observe = lib.rd_arb_observe
        self.rd_arb_observe.argtypes = (arb, _u64, _u64, ctypes.c_char_p, _u64, _d)
        self.rd_arb_observe.restype = None
        self.rd_arb_offer = lib.rd_arb_offer
        self.rd_arb_offer.argtypes = (arb, _u64, _u64, _u64, _u64, _u64, ctypes.c_char_p, _u64, _d)
        self.rd_arb_offer.restype = ctypes.c_int
        self.rd_arb_floor = lib.rd_arb_floor
        self.rd_arb_floor.argtypes = (arb, _u64)
        self.rd_arb_floor.restype = _u64
        self.rd_arb_expire = lib.rd_arb_expire
        self.rd_arb_expire.argtypes = (arb, _d)
        self.rd_arb_expire.restype = _u64
        self.rd_arb_next_deadline = lib.rd_arb_next_deadline
        self.rd_arb_next_deadline.argtypes = (arb,)
        self.rd_arb_next_deadline.restype = _d
        self.rd_arb_flush = lib.rd_arb_flush
        self.rd_arb_flush.argtypes = (arb, _i64, ctypes.POINTER(_u64))
        self.rd_arb_flush.restype = _u64
        self.rd_arb_take_released = lib.rd_arb_take_released
        self.rd_arb_take_released.argtypes = (
            arb,
            ctypes.POINTER(ArbiterRelease),
            ctypes.POINTER(ctypes.c_uint8),
            _u64,
        )
        self.rd_arb_take_released.restype = ctypes.c_int
        self.rd_upstream_new = lib.rd_upstream_new
        self.rd_upstream_new.argtypes = (_u64, _u64, _u64, ctypes.c_void_p, _u64)
        self.rd_upstream_new.restype = ctypes.c_void_p
        self.rd_upstream_free = lib.rd_upstream_free
        self.rd_upstream_free.argtypes = (ctypes.c_void_p,)
        self.rd_upstream_free.restype = None
        self.rd_upstream_scan = lib.rd_upstream_scan
        self.rd_upstream_scan.argtypes = (ctypes.c_void_p, ctypes.c_char_p, _u64, _i64)
        self.rd_upstream_scan.restype = None
        self.rd_upstream_read = lib.rd_upstream_read
        self.rd_upstream_read.argtypes = (ctypes.c_void_p, ctypes.POINTER(UpstreamStatsState))
        self.rd_upstream_read.restype = None
        self.rd_upstream_resume = lib.rd_upstream_resume
        self.rd_upstream_resume.argtypes = (
            ctypes.c_void_p,
            _u64,
            _u64,
            _u64,
            _u64,
            _i64,
            _i64,
            _i64,
        )
        self.rd_upstream_resume.restype = ctypes.c_int
        self.rd_upstream_channels = lib.rd_upstream_channels
        self.rd_upstream_channels.argtypes = (
            ctypes.c_void_p,
            ctypes.POINTER(UpstreamChannelState),
            _u64,
            _u64,
        )
        self.rd_upstream_channels.restype = _u64

    def emit_pump(self, start: EmitStart) -> _CEmitPump:
        return _CEmitPump(self, start)

    def capture_numbering(self, seq: int) -> _CNumbering:
        return _CNumbering(self, seq)

    def claim_word(self) -> _CClaimWord:
        return _CClaimWord(self)

    def capture_receiver(
        self,
        sock: socket.socket,
        port: int,
        stop_fd: int,
        numbering: CaptureNumbering,
        claim: ClaimWord | None,
        upstream: UpstreamCounter | None = None,
        *,
        busy_poll: float = 0.0,
        hold: float = 0.0,
    ) -> _CReceiver:
        return _CReceiver(self, sock, port, stop_fd, numbering, claim, upstream, busy_poll, hold)

    def upstream_counter(
        self,
        layout: DeribitLayout,
        max_channels: int = UPSTREAM_MAX_CHANNELS,
        stale_horizon_ns: int = UPSTREAM_STALE_HORIZON_NS,
    ) -> _CUpstreamCounter:
        return _CUpstreamCounter(self, layout, max_channels, stale_horizon_ns)

    def arbiter(self, config: ArbitrationConfig) -> CArbiter:
        return CArbiter(self, config)

    def ack_reader(
        self, tcp: socket.socket, stop_fd: int, conn: CaptureConnection, idle: float
    ) -> _CAckReader:
        return _CAckReader(self, tcp, stop_fd, conn, idle)


def open_library(path: Path) -> CPlane:
    """The C leaf from the library at ``path``; DataPathError (its reason) when it cannot be
    loaded or its ABI differs from this module's."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise DataPathError(f"{path.name} not loadable ({exc})") from None
    mismatch = abi_mismatch(lib)
    if mismatch is not None:
        raise DataPathError(f"{path.name} is from another version ({mismatch})")
    return CPlane(lib)


class DataPathError(RuntimeError):
    """``RELAYD_DATAPATH=c`` and the C data plane cannot be loaded."""
