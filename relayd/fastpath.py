"""The C data plane (``relayd/_fastpath.c``), loaded with ctypes, and which data path is in use.

The per-datagram loops of the emit and capture feeds run in C when the shared library was
built (``make`` and the wheel build compile it) and in Python otherwise; both do the same work
and pass the same tests. ctypes releases the GIL during every call, so a data-path thread in C
never waits for the Trio thread and never makes it wait. ``RELAYD_DATAPATH`` chooses: ``c``
(refuse to start without the library), ``python`` (never load it), or ``auto`` (the default:
C when it loads).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Final

__all__ = [
    "LIBRARY",
    "RD_CONTROL",
    "RD_EMPTY",
    "RD_EOF",
    "RD_ERROR",
    "RD_FULL",
    "RD_IDLE",
    "RD_NEED_DEST",
    "RD_RESET",
    "RD_SEND_ERROR",
    "RD_SLOW",
    "RD_STOPPED",
    "CaptureReaderState",
    "CaptureState",
    "DataPathError",
    "DataPlane",
    "EmitState",
    "active",
    "describe",
    "load",
]

ABI: Final = 7
LIBRARY: Final = Path(__file__).with_name("_fastpath.so")
LATENCY_BUCKETS: Final = 26
DEST_SLOTS: Final = 1024

# Why a call returned (relayd/_fastpath.c).
RD_STOPPED: Final = 1
RD_EOF: Final = 2
RD_RESET: Final = 3
RD_IDLE: Final = 4
RD_CONTROL: Final = 5
RD_NEED_DEST: Final = 6
RD_SEND_ERROR: Final = 7
RD_SLOW: Final = 8
RD_EMPTY: Final = 9
RD_FULL: Final = 10
RD_ERROR: Final = 11

# Destination verdicts for rd_emit_set_dest.
DEST_ALLOWED: Final = 1
DEST_DENIED_GROUP: Final = 2
DEST_DENIED_PORT: Final = 3

_u64 = ctypes.c_uint64
_i64 = ctypes.c_int64


class _Dest(ctypes.Structure):
    _fields_ = (("key", _u64), ("state", _u64), ("addr", _u64), ("addr2", _u64), ("fd", _i64))


class EmitState(ctypes.Structure):
    """``struct rd_emit``: one streaming emit connection."""

    _fields_ = (
        ("tcp_fd", _i64),
        ("stop_fd", _i64),
        ("mcast_fd", _i64),
        ("buf", ctypes.c_void_p),
        ("cap", _u64),
        ("idle_ns", _i64),
        ("ack_interval_ns", _i64),
        ("heartbeat_ns", _i64),
        ("start", _u64),
        ("end", _u64),
        ("highest", _u64),
        ("acked", _u64),
        ("acked_any", _u64),
        ("last_out_ns", _i64),
        ("blocked_since_ns", _i64),
        ("out_off", _u64),
        ("out_len", _u64),
        ("out", ctypes.c_uint8 * 16),
        ("acks_sent", _u64),
        ("heartbeats_sent", _u64),
        ("clear_dests", _u64),
        ("bytes_in", _u64),
        ("frames_in", _u64),
        ("datagrams_in", _u64),
        ("datagrams_out", _u64),
        ("bytes_out", _u64),
        ("duplicates", _u64),
        ("gaps", _u64),
        ("gap_sequences", _u64),
        ("send_waits", _u64),
        ("denied_group", _u64),
        ("denied_port", _u64),
        ("send_errors", _u64),
        ("last_send_ok", _u64),
        ("last_ts_ns", _u64),
        ("chunk_ts_ns", _u64),
        ("last_rx_ns", _i64),
        ("latency", _u64 * (LATENCY_BUCKETS + 1)),
        ("latency_count", _u64),
        ("latency_sum_ns", _u64),
        ("err", _i64),
        ("need_key", _u64),
        ("dests", _Dest * DEST_SLOTS),
        ("dest_count", _u64),
    )


class CaptureState(ctypes.Structure):
    """``struct rd_capture``: one capture socket."""

    _fields_ = (
        ("fd", _i64),
        ("stop_fd", _i64),
        ("buf", ctypes.c_void_p),
        ("cap", _u64),
        ("room", _u64),
        ("port", _u64),
        ("tcp_fd", _i64),
        ("count", _u64),
        ("offset", _u64),
        ("payload_bytes", _u64),
        ("sent", _u64),
        ("send_err", _i64),
        ("drops", _u64),
        ("drops_seen", _u64),
        ("err", _i64),
    )


class CaptureReaderState(ctypes.Structure):
    """``struct rd_capture_rx``: what the emit side sends back on one capture connection."""

    _fields_ = (
        ("tcp_fd", _i64),
        ("stop_fd", _i64),
        ("idle_ns", _i64),
        ("buf", ctypes.c_void_p),
        ("cap", _u64),
        ("start", _u64),
        ("end", _u64),
        ("acked", _u64),
        ("acks", _u64),
        ("heartbeats", _u64),
        ("bytes_in", _u64),
        ("err", _i64),
    )


class DataPlane:
    """The library's entry points. Those that block (in ``poll``) are called through
    ``ctypes.CDLL``, which releases the GIL; the quick ones through ``ctypes.PyDLL``, which
    keeps it, so a receive thread is not handed over to the Trio thread in the middle of a
    batch."""

    def __init__(self, blocking: ctypes.CDLL, quick: ctypes.PyDLL) -> None:
        emit = ctypes.POINTER(EmitState)
        capture = ctypes.POINTER(CaptureState)
        reader = ctypes.POINTER(CaptureReaderState)
        self.emit_pump = blocking.rd_emit_pump
        self.emit_pump.argtypes = (emit,)
        self.emit_pump.restype = ctypes.c_int
        self.emit_set_dest = quick.rd_emit_set_dest
        self.emit_set_dest.argtypes = (emit, _u64, _u64, _i64)
        self.emit_set_dest.restype = None
        self.capture_wait = blocking.rd_capture_wait
        self.capture_wait.argtypes = (capture,)
        self.capture_wait.restype = ctypes.c_int
        self.capture_batch = quick.rd_capture_batch
        self.capture_batch.argtypes = (capture, _u64)
        self.capture_batch.restype = ctypes.c_int
        self.capture_read = blocking.rd_capture_read
        self.capture_read.argtypes = (reader,)
        self.capture_read.restype = ctypes.c_int


class DataPathError(RuntimeError):
    """``RELAYD_DATAPATH=c`` and the C data plane cannot be loaded."""


_cache: dict[str, tuple[DataPlane | None, str]] = {}


def _choice() -> str:
    choice = os.environ.get("RELAYD_DATAPATH", "auto").strip().lower() or "auto"
    if choice not in ("auto", "c", "python"):
        raise DataPathError(f"RELAYD_DATAPATH={choice!r}: expected auto, c or python")
    return choice


def _open(choice: str) -> tuple[DataPlane | None, str]:
    if choice == "python":
        return None, "RELAYD_DATAPATH=python"
    try:
        lib = ctypes.CDLL(str(LIBRARY))
    except OSError as exc:
        reason = f"{LIBRARY.name} not loadable ({exc})"
        if choice == "c":
            raise DataPathError(f"RELAYD_DATAPATH=c but {reason}") from None
        return None, reason
    # The ABI number first: an older library may lack the symbols this version looks up.
    lib.rd_abi.restype = ctypes.c_int
    abi = lib.rd_abi()
    sizes: tuple[int, ...] = ()
    if abi == ABI:
        lib.rd_emit_size.restype = _u64
        lib.rd_capture_size.restype = _u64
        lib.rd_capture_rx_size.restype = _u64
        sizes = (lib.rd_emit_size(), lib.rd_capture_size(), lib.rd_capture_rx_size())
    want = tuple(ctypes.sizeof(t) for t in (EmitState, CaptureState, CaptureReaderState))
    if sizes != want:
        reason = f"{LIBRARY.name} is from another version (ABI {abi}, want {ABI})"
        if choice == "c":
            raise DataPathError(f"RELAYD_DATAPATH=c but {reason}")
        return None, reason
    return DataPlane(lib, ctypes.PyDLL(str(LIBRARY))), ""


def load() -> DataPlane | None:
    """The C data plane, or None when the Python data path is in use (``describe`` says why).
    Read when a feed starts. Raises DataPathError when ``RELAYD_DATAPATH`` is invalid or asks
    for C and the library cannot be loaded."""
    choice = _choice()
    if choice not in _cache:
        _cache[choice] = _open(choice)
    return _cache[choice][0]


def active() -> str:
    """``"c"`` or ``"python"``: the data path feeds started now would use (never raises)."""
    try:
        return "python" if load() is None else "c"
    except DataPathError:
        return "python"


def describe() -> str:
    """One line for the log: which data path runs, and why not C."""
    lib = load()
    return "C" if lib is not None else f"Python: {_cache[_choice()][1]}"
