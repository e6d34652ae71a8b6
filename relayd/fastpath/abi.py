"""The C ABI as Python sees it: its version, where the library is, the ctypes structs, the
shared constants, and the check at load.

The ABI is defined once, in the C file; at load the library's layout table (every field's
offset and size) and its constants are compared with the ctypes structs below and with the
Python constants they stand for (:class:`relayd.datapath.Why`,
:class:`relayd.session.Destination`, the latency buckets, the largest payload), so a struct or
constant changed on one side only refuses to load instead of misreporting.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Final

from relayd import wire
from relayd.arbitration import ArbitrationMode, DeribitLayout, Verdict
from relayd.datapath import (
    ARBITER_COUNTERS,
    ARBITER_SOURCES,
    CLAIM_CLOSED,
    CLAIM_HELD,
    EmitGate,
    UpstreamChannel,
    Why,
)
from relayd.metrics import LATENCY_BUCKETS
from relayd.session import Destination
from relayd.wire import ProtocolError

ABI: Final = 16
#: Built next to this package, in relayd/ (hatch_build.py), for the wheel and the editable install.
LIBRARY: Final = Path(__file__).parent.with_name("_fastpath.so")
#: Entries of the C emit pump's destination table (per connection).
DEST_SLOTS: Final = 1024

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
        ("max_payload", _u64),
        ("arb", ctypes.c_void_p),
        ("arb_source", _u64),
        ("arb_owner", _u64),
        ("busy_ns", _i64),
        ("gate", ctypes.c_void_p),
        ("start", _u64),
        ("end", _u64),
        ("highest", _u64),
        ("acked", _u64),
        ("acked_any", _u64),
        ("resuming", _u64),
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
        ("oversize", _u64),
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
        ("busy_ns", _i64),
        ("hold_ns", _i64),
        ("hold_gap_ns", _i64),
        ("numbering", ctypes.c_void_p),
        ("claim", ctypes.c_void_p),
        ("held", _u64),
        ("more", _u64),
        ("joined", _u64),
        ("last_wake", _u64),
        ("last_wake_ns", _i64),
        ("claimed_fd", _i64),
        ("first", _u64),
        ("claimed", _u64),
        ("count", _u64),
        ("offset", _u64),
        ("payload_bytes", _u64),
        ("sent", _u64),
        ("send_err", _i64),
        ("drops", _u64),
        ("drops_seen", _u64),
        ("err", _i64),
        ("upstream", ctypes.c_void_p),
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


#: Snapshot ports of the 8-byte Deribit layout an arbiter takes at most.
ARB_SNAPSHOT_PORTS: Final = 8
_d = ctypes.c_double


class ArbiterConfig(ctypes.Structure):
    """``struct rd_arb_config``: ``ArbitrationConfig`` for the C arbiter."""

    _fields_ = (
        ("mode", _u64),
        ("layout", _u64),
        ("max_channels", _u64),
        ("max_held", _u64),
        ("max_held_bytes", _u64),
        ("content_entries", _u64),
        ("hold_timeout", _d),
        ("stale_horizon", _d),
        ("content_window", _d),
        ("snapshot_port_count", _u64),
        ("snapshot_ports", _u64 * ARB_SNAPSHOT_PORTS),
    )


class ArbiterStatsState(ctypes.Structure):
    """``struct rd_arb_stats``: the C arbiter's counters (read without its lock)."""

    _fields_ = (
        *((name, _u64) for name in ARBITER_COUNTERS),
        ("gap_size", _u64),
        ("sent_by_source", _u64 * ARBITER_SOURCES),
    )


class ArbiterRelease(ctypes.Structure):
    """``struct rd_arb_release``: one released datagram (``rd_arb_take_released``)."""

    _fields_ = (("source", _u64), ("group", _u64), ("port", _u64), ("gap", _u64), ("len", _u64))


class UpstreamStatsState(ctypes.Structure):
    """``struct rd_upstream_stats``: an upstream counter's totals."""

    _fields_ = tuple(
        (name, _u64)
        for name in (
            "datagrams",
            "gaps",
            "missing",
            "snapshot_gaps",
            "duplicates",
            "resets",
            "overlaps",
            "heartbeats",
            "unsequenced",
            "malformed",
            "evictions",
            "channels",
            "last_gap_group",
            "last_gap_port",
            "last_gap_channel",
            "last_gap_missing",
        )
    )


class UpstreamChannelState(ctypes.Structure):
    """``struct rd_upstream_channel``: one channel's counters."""

    _fields_ = (
        *((name, _u64) for name in UpstreamChannel._fields),
        ("next", _i64),
        ("stamp", _i64),
    )


#: ``DeribitLayout`` as the library numbers it.
UPSTREAM_LAYOUTS: Final = {DeribitLayout.FRAME_V1: 0, DeribitLayout.SBE: 1}
UP_MAX_SNAPSHOT_PORTS: Final = 8

STRUCTS: Final[dict[str, type[ctypes.Structure]]] = {
    "rd_dest": _Dest,
    "rd_emit": EmitState,
    "rd_capture": CaptureState,
    "rd_capture_rx": CaptureReaderState,
    "rd_arb_config": ArbiterConfig,
    "rd_arb_stats": ArbiterStatsState,
    "rd_arb_release": ArbiterRelease,
    "rd_upstream_stats": UpstreamStatsState,
    "rd_upstream_channel": UpstreamChannelState,
    "rd_gate": EmitGate,
}

_MODES: Final = {ArbitrationMode.NONE: 0, ArbitrationMode.CONTENT: 1, ArbitrationMode.DERIBIT: 2}
_LAYOUTS: Final = {DeribitLayout.FRAME_V1: 0, DeribitLayout.SBE: 1}
_VERDICTS: Final = (
    Verdict.EMIT,
    Verdict.GAP,
    Verdict.RESET,
    Verdict.OVERLAP,
    Verdict.UNSEQUENCED,
    Verdict.MALFORMED,
    Verdict.DUPLICATE,
    Verdict.HELD,
)


class _Field(ctypes.Structure):
    """``struct rd_field``: one row of the library's layout table."""

    _fields_ = (
        ("record", ctypes.c_char_p),
        ("field", ctypes.c_char_p),
        ("offset", _u64),
        ("size", _u64),
    )


class _Constant(ctypes.Structure):
    """``struct rd_constant``: one row of the library's constants."""

    _fields_ = (("name", ctypes.c_char_p), ("value", _i64))


def expected_constants() -> dict[str, int]:
    """The values the library's constants must have: the Python definitions they stand for."""
    constants = {f"RD_{why.name}": int(why) for why in Why}
    constants.update(
        DEST_ALLOWED=Destination.ALLOWED,
        DEST_DENIED_GROUP=Destination.GROUP_NOT_ALLOWED,
        DEST_DENIED_PORT=Destination.PORT_NOT_ALLOWED,
        DATA_HEADER=wire.DATA_HEADER_SIZE,
        MAX_PAYLOAD=wire.MAX_PAYLOAD,
        LATENCY_BUCKETS=LATENCY_BUCKETS,
        DEST_SLOTS=DEST_SLOTS,
        MAX_ERROR_TEXT=wire.MAX_ERROR_TEXT,
        ARB_SOURCES=ARBITER_SOURCES,
        ARB_SNAPSHOT_PORTS=ARB_SNAPSHOT_PORTS,
        UP_FRAME_V1=UPSTREAM_LAYOUTS[DeribitLayout.FRAME_V1],
        UP_SBE=UPSTREAM_LAYOUTS[DeribitLayout.SBE],
        UP_MAX_SNAPSHOT_PORTS=UP_MAX_SNAPSHOT_PORTS,
        RD_CLAIM_CLOSED=CLAIM_CLOSED,
        RD_CLAIM_HELD=CLAIM_HELD,
    )
    constants.update({f"ARB_MODE_{mode.name}": value for mode, value in _MODES.items()})
    constants.update({f"ARB_LAYOUT_{layout.name}": value for layout, value in _LAYOUTS.items()})
    constants.update({f"ARB_{verdict.name}": i for i, verdict in enumerate(_VERDICTS, 1)})
    return constants


def python_layout() -> dict[str, list[tuple[str, int, int]]]:
    """``(field, offset, size)`` of every ctypes struct, in order, then ``("", 0, sizeof)``."""
    layout: dict[str, list[tuple[str, int, int]]] = {}
    for record, struct in STRUCTS.items():
        rows = []
        for name, *_ in struct._fields_:
            field = getattr(struct, name)
            rows.append((name, field.offset, field.size))
        rows.append(("", 0, ctypes.sizeof(struct)))
        layout[record] = rows
    return layout


def library_layout(lib: ctypes.CDLL) -> dict[str, list[tuple[str, int, int]]]:
    """The same, from the library's own table (``rd_layout``)."""
    lib.rd_layout.restype = ctypes.POINTER(_Field)
    table = lib.rd_layout()
    fields: dict[str, list[tuple[str, int, int]]] = {}
    sizes: dict[str, tuple[str, int, int]] = {}
    i = 0
    while table[i].record is not None:
        row = table[i]
        record = row.record.decode()
        if row.field is None:
            sizes[record] = ("", 0, row.size)
        else:
            fields.setdefault(record, []).append((row.field.decode(), row.offset, row.size))
        i += 1
    return {record: [*rows, sizes.get(record, ("", 0, -1))] for record, rows in fields.items()}


def library_constants(lib: ctypes.CDLL) -> dict[str, int]:
    lib.rd_constants.restype = ctypes.POINTER(_Constant)
    table = lib.rd_constants()
    constants = {}
    i = 0
    while table[i].name is not None:
        constants[table[i].name.decode()] = table[i].value
        i += 1
    return constants


def _row(row: tuple[str, int, int]) -> str:
    name, offset, size = row
    return f"field {name} at offset {offset} ({size} bytes)" if name else f"size {size}"


def abi_mismatch(lib: ctypes.CDLL) -> str | None:
    """What differs between the library's ABI and this module's, or None."""
    lib.rd_abi.restype = ctypes.c_int
    abi = lib.rd_abi()
    if abi != ABI:  # first: an older library may lack the symbols looked up below
        return f"ABI {abi}, want {ABI}"
    theirs, ours = library_layout(lib), python_layout()
    for record in sorted(theirs.keys() | ours.keys()):
        rows_c, rows_py = theirs.get(record, []), ours.get(record, [])
        for row_c, row_py in zip(rows_c, rows_py, strict=False):
            if row_c != row_py:
                return f"struct {record}: {_row(row_c)} in C, {_row(row_py)} in Python"
        if len(rows_c) != len(rows_py):
            return f"struct {record}: {len(rows_c) - 1} fields in C, {len(rows_py) - 1} in Python"
    constants_c, constants_py = library_constants(lib), expected_constants()
    for name in sorted(constants_c.keys() | constants_py.keys()):
        if constants_c.get(name) != constants_py.get(name):
            theirs_value, ours_value = constants_c.get(name), constants_py.get(name)
            return f"constant {name}: {theirs_value} in C, {ours_value} in Python"
    return None


def _take_over(leftover: bytes, buffer: ctypes.Array[ctypes.c_uint8], after: str) -> int:
    """Put what the Python decoder read past the handshake (at most the start of one frame)
    at the start of a C loop's buffer; returns its length."""
    if len(leftover) > len(buffer) // 2:  # never, but never overrun
        raise ProtocolError(f"{len(leftover)} bytes pending after {after}")
    ctypes.memmove(buffer, leftover, len(leftover))
    return len(leftover)
