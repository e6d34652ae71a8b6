"""The C emit pump (``rd_emit_pump``) behind relayd/datapath.py's ``EmitPump``."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from relayd.datapath import EMIT_RECEIVE_SIZE, EmitStart, Why
from relayd.fastpath.abi import EmitState, _take_over
from relayd.fastpath.arbitration import CArbiter
from relayd.session import Destination
from relayd.wire import Event, ProtocolError

if TYPE_CHECKING:
    from relayd.fastpath.plane import CPlane


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
