"""The C capture side: numbering, claim word, receiver (``rd_capture_next``) and ACK reader
(``rd_capture_read``)."""

from __future__ import annotations

import ctypes
import socket
from typing import TYPE_CHECKING, Final

from relayd import wire
from relayd.datapath import (
    ACK_READ_SIZE,
    CAPTURE_BATCH_SIZE,
    CAPTURE_HOLD_GAP,
    CLAIM_CLOSED,
    CaptureNumbering,
    ClaimWord,
    UpstreamCounter,
    Why,
)
from relayd.fastpath.abi import CaptureReaderState, CaptureState, _take_over
from relayd.fastpath.upstream import _CUpstreamCounter
from relayd.wire import CaptureConnection, Event, ProtocolError

if TYPE_CHECKING:
    from relayd.fastpath.plane import CPlane


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
        hold: float = 0.0,
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
            hold_ns=int(hold * 1e9),
            hold_gap_ns=int(CAPTURE_HOLD_GAP * 1e9),
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
