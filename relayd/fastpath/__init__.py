"""The C leaf of the data plane (``relayd/_fastpath.c``), loaded with ctypes, and which leaf runs.

The per-datagram loops of the emit and capture feeds run in C when the shared library was
built (``make`` and the wheel build compile it) and in Python otherwise (relayd/pyplane.py);
both implement relayd/datapath.py's interface and pass the same tests. Every entry point is
bound through ``ctypes.CDLL``, which releases the GIL for the call (the GIL rule is in
relayd/datapath.py). ``RELAYD_DATAPATH`` chooses: ``c`` (refuse to start without the library),
``python`` (never load it), or ``auto`` (the default: C when it loads).

The ABI is defined once, in the C file; at load the library's layout table (every field's
offset and size) and its constants are compared with the ctypes structs below and with the
Python constants they stand for (:class:`relayd.datapath.Why`,
:class:`relayd.session.Destination`, the latency buckets, the largest payload), so a struct or
constant changed on one side only refuses to load instead of misreporting.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from relayd import wire
from relayd.arbitration import (
    ArbitrationConfig,
    ArbitrationMode,
    ChannelPosition,
    DeribitLayout,
    Verdict,
)
from relayd.datapath import (
    ACK_READ_SIZE,
    ARBITER_COUNTERS,
    ARBITER_SOURCES,
    CAPTURE_BATCH_SIZE,
    CLAIM_CLOSED,
    CLAIM_HELD,
    EMIT_RECEIVE_SIZE,
    UPSTREAM_MAX_CHANNELS,
    UPSTREAM_SNAPSHOT_PORTS,
    UPSTREAM_STALE_HORIZON_NS,
    CaptureNumbering,
    ClaimWord,
    EmitGate,
    EmitStart,
    UpstreamChannel,
    UpstreamCounter,
    UpstreamTotals,
    Why,
)
from relayd.metrics import LATENCY_BUCKETS
from relayd.session import Destination
from relayd.wire import CaptureConnection, Event, ProtocolError

__all__ = [
    "LIBRARY",
    "CArbiter",
    "CPlane",
    "CaptureReaderState",
    "CaptureState",
    "DataPathError",
    "EmitState",
    "active",
    "describe",
    "load",
]

ABI: Final = 15
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
        ("numbering", ctypes.c_void_p),
        ("claim", ctypes.c_void_p),
        ("held", _u64),
        ("more", _u64),
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


class _CEmitPump:
    """:class:`relayd.datapath.EmitPump` over ``rd_emit_pump``."""

    __slots__ = (
        "_arbiter",
        "_buffer",
        "_gate",
        "_proto",
        "_pump",
        "_ref",
        "_set_dest",
        "counters",
        "err",
        "need_key",
    )

    def __init__(self, plane: CPlane, start: EmitStart) -> None:
        self._buffer = buffer = (ctypes.c_uint8 * EMIT_RECEIVE_SIZE)()
        self._proto = proto = start.proto
        state = self.counters = EmitState(
            tcp_fd=start.tcp.fileno(),
            stop_fd=start.stop_fd,
            mcast_fd=start.mcast.fileno(),
            buf=ctypes.addressof(buffer),
            cap=EMIT_RECEIVE_SIZE,
            idle_ns=int(start.idle * 1e9),
            ack_interval_ns=int(start.ack_interval * 1e9),
            heartbeat_ns=int(start.heartbeat * 1e9),
            max_payload=start.max_datagram_size,
            arb=None if start.arbiter is None else _c_arbiter(start.arbiter).address,
            arb_source=start.source,
            arb_owner=start.owner,
            busy_ns=int(start.busy_poll * 1e9),
            gate=None if start.gate is None else ctypes.addressof(start.gate),
            highest=start.highest,
            acked=max(start.acked, 0),
            acked_any=start.acked >= 0,
            resuming=1,
        )
        state.end = _take_over(proto.take_buffered(), buffer, "the HELLO")
        self._arbiter = start.arbiter  # kept alive while the pump may use it
        self._gate = start.gate  # referenced by address from the state: kept alive here
        self._ref = ctypes.byref(state)
        self._pump = plane.rd_emit_pump
        self._set_dest = plane.rd_emit_set_dest
        self.need_key = 0
        self.err = 0

    @property
    def highest(self) -> int:
        return int(self.counters.highest)

    @property
    def acked(self) -> int:
        state = self.counters
        return int(state.acked) if state.acked_any else -1

    def run(self) -> Why:
        why = Why(self._pump(self._ref))
        self.need_key = self.counters.need_key
        self.err = self.counters.err
        return why

    def set_destination(self, key: int, verdict: Destination, fd: int) -> None:
        self._set_dest(self._ref, key, verdict, fd)

    def clear_destinations(self) -> None:
        self.counters.clear_dests = 1

    def control(self) -> list[Event] | ProtocolError:
        state = self.counters
        try:
            return self._proto.receive(bytes(self._buffer[state.start : state.end]))
        except ProtocolError as exc:
            return exc

    def unsent(self) -> bytes:
        state = self.counters
        return bytes(state.out[state.out_off : state.out_len])


def _c_arbiter(arbiter: object) -> CArbiter:
    if not isinstance(arbiter, CArbiter):
        raise TypeError(f"the C pump needs the C plane's arbiter, not {arbiter!r}")
    return arbiter


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


_WHY: Final[dict[int, Why]] = {int(why): why for why in Why}


class _CNumbering:
    """:class:`relayd.datapath.CaptureNumbering` over ``rd_numbering_new``."""

    def __init__(self, plane: CPlane, seq: int) -> None:
        handle = plane.rd_numbering_new(seq)
        if not handle:
            raise MemoryError("capture numbering")
        self.handle: int | None = handle
        self._plane = plane

    def close(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            self._plane.rd_numbering_free(handle)

    def __del__(self) -> None:
        self.close()


class _CClaimWord:
    """:class:`relayd.datapath.ClaimWord` in C memory, swapped by ``rd_claim_swap``."""

    __slots__ = ("_swap", "_word", "address")

    def __init__(self, plane: CPlane) -> None:
        self._word = ctypes.c_int64(CLAIM_CLOSED)
        self.address = ctypes.addressof(self._word)
        self._swap = plane.rd_claim_swap

    def load(self) -> int:
        return self._word.value

    def swap(self, expect: int, value: int) -> int:
        return int(self._swap(self.address, expect, value))

    def store(self, value: int) -> None:
        self._word.value = value


class _CReceiver:
    """:class:`relayd.datapath.CaptureReceiver` over ``rd_capture_next``."""

    __slots__ = (
        "_buffer",
        "_claim",
        "_done",
        "_next",
        "_numbering",
        "_ref",
        "_state",
        "_upstream",
        "_view",
        "claimed",
        "count",
        "drops",
        "err",
        "first",
        "payload_bytes",
        "send_err",
        "sent",
    )

    def __init__(
        self,
        plane: CPlane,
        sock: socket.socket,
        port: int,
        stop_fd: int,
        numbering: CaptureNumbering,
        claim: ClaimWord | None,
        upstream: UpstreamCounter | None,
        busy_poll: float,
    ) -> None:
        if upstream is not None and not isinstance(upstream, _CUpstreamCounter):
            raise TypeError("the C capture receiver takes the C plane's upstream counter")
        if not isinstance(numbering, _CNumbering) or numbering.handle is None:
            raise TypeError("the C capture receiver takes the C plane's numbering")
        if claim is not None and not isinstance(claim, _CClaimWord):
            raise TypeError("the C capture receiver takes the C plane's claim word")
        # kept alive as long as the receiver
        self._upstream, self._numbering, self._claim = upstream, numbering, claim
        self._buffer = buffer = (ctypes.c_uint8 * CAPTURE_BATCH_SIZE)()
        self._view = memoryview(buffer).cast("B")
        self._state = state = CaptureState(
            fd=sock.fileno(),
            stop_fd=stop_fd,
            buf=ctypes.addressof(buffer),
            cap=CAPTURE_BATCH_SIZE,
            room=wire.DATA_HEADER_SIZE + wire.MAX_PAYLOAD,
            port=port,
            upstream=None if upstream is None else upstream.handle,
            busy_ns=int(busy_poll * 1e9),
            numbering=numbering.handle,
            claim=None if claim is None else claim.address,
        )
        self._ref = ctypes.byref(state)
        self._next = plane.rd_capture_next
        self._done = plane.rd_capture_done
        self.first = self.count = self.payload_bytes = self.sent = self.send_err = self.err = 0
        self.claimed = False
        self.drops: int | None = None

    def next(self) -> Why:
        why = _WHY[self._next(self._ref)]  # not Why(): once per batch, it costs
        state = self._state
        self.first = state.first
        self.count = state.count
        self.payload_bytes = state.payload_bytes
        self.claimed = bool(state.claimed)
        self.sent = state.sent
        self.send_err = state.send_err
        self.err = state.err
        self.drops = state.drops if state.drops_seen else None
        return why

    def done(self) -> None:
        self._done(self._ref)

    def frames(self) -> bytes:
        return bytes(self._view[: self._state.offset])


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


class _CAckReader:
    """:class:`relayd.datapath.AckReader` over ``rd_capture_read``."""

    __slots__ = ("_buffer", "_conn", "_read", "_ref", "_state", "err")

    def __init__(
        self, plane: CPlane, tcp: socket.socket, stop_fd: int, conn: CaptureConnection, idle: float
    ) -> None:
        self._buffer = buffer = (ctypes.c_uint8 * ACK_READ_SIZE)()
        self._conn = conn
        self._state = state = CaptureReaderState(
            tcp_fd=tcp.fileno(),
            stop_fd=stop_fd,
            idle_ns=int(idle * 1e9),
            buf=ctypes.addressof(buffer),
            cap=ACK_READ_SIZE,
        )
        state.end = _take_over(conn.take_buffered(), buffer, "the welcome")
        self._ref = ctypes.byref(state)
        self._read = plane.rd_capture_read
        self.err = 0

    @property
    def acked(self) -> int:
        return int(self._state.acked)

    def run(self) -> Why:
        why = Why(self._read(self._ref))
        self.err = self._state.err
        return why

    def control(self) -> list[Event] | ProtocolError:
        state = self._state
        try:
            return self._conn.receive(bytes(self._buffer[state.start : state.end]))
        except ProtocolError as exc:
            return exc


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
    ) -> _CReceiver:
        return _CReceiver(self, sock, port, stop_fd, numbering, claim, upstream, busy_poll)

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


_cache: dict[str, tuple[CPlane | None, str]] = {}


def _choice() -> str:
    choice = os.environ.get("RELAYD_DATAPATH", "auto").strip().lower() or "auto"
    if choice not in ("auto", "c", "python"):
        raise DataPathError(f"RELAYD_DATAPATH={choice!r}: expected auto, c or python")
    return choice


def _open(choice: str) -> tuple[CPlane | None, str]:
    if choice == "python":
        return None, "RELAYD_DATAPATH=python"
    try:
        return open_library(LIBRARY), ""
    except DataPathError as exc:
        if choice == "c":
            raise DataPathError(f"RELAYD_DATAPATH=c but {exc}") from None
        return None, str(exc)


def load() -> CPlane | None:
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
