"""The Python plane's capture side: numbering, claim word, receiver (``rd_capture_next``) and
ACK reader (``rd_capture_read``)."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from typing import Final

from relayd import wire
from relayd.datapath import (
    ACK_READ_SIZE,
    CAPTURE_BATCH_SIZE,
    CLAIM_CLOSED,
    CLAIM_HELD,
    CaptureNumbering,
    ClaimWord,
    UpstreamCounter,
    Why,
)
from relayd.netif import ANCBUFSIZE, parse_ancillary
from relayd.pyplane.sockets import _TcpReceiver
from relayd.wire import Ack, CaptureConnection, Event, Heartbeat, ProtocolError

_ROOM: Final = wire.DATA_HEADER_SIZE + wire.MAX_PAYLOAD


class _Numbering:
    """``struct rd_numbering`` in Python (``CaptureNumbering``)."""

    def __init__(self, seq: int) -> None:
        self.lock = threading.Lock()
        self.seq = seq  # the highest sequence assigned

    def close(self) -> None:
        pass


class _ClaimWord:
    """A connection's claim word in Python (``ClaimWord``): ``rd_claim_swap`` under a lock."""

    __slots__ = ("_lock", "_value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = CLAIM_CLOSED

    def load(self) -> int:
        return self._value

    def swap(self, expect: int, value: int) -> int:
        with self._lock:
            old = self._value
            if old == expect:
                self._value = value
            return old

    def store(self, value: int) -> None:
        self._value = value


class _Receiver:
    """``rd_capture_next`` in Python (``CaptureReceiver``)."""

    def __init__(
        self,
        sock: socket.socket,
        port: int,
        stop_fd: int,
        numbering: CaptureNumbering,
        claim: ClaimWord | None,
        upstream: UpstreamCounter | None = None,
    ) -> None:
        if not isinstance(numbering, _Numbering):
            raise TypeError("the Python capture receiver takes the Python plane's numbering")
        self._numbering = numbering
        self._claim = claim
        self._held = False
        self._more = False  # the last batch was full: the next call does not wait
        self._upstream = upstream
        self._sock = sock
        self._port = port
        self._stop_fd = stop_fd
        self._frame = bytearray(CAPTURE_BATCH_SIZE)
        self._view = memoryview(self._frame)
        self._offset = 0
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN)
        self._poller.register(stop_fd, select.POLLIN)
        self._stop = select.poll()
        self._stop.register(stop_fd, select.POLLIN)
        self.first = self.count = self.payload_bytes = self.sent = self.send_err = self.err = 0
        self.claimed = False
        self.drops: int | None = None

    def next(self) -> Why:
        self.done()
        if self._more:
            if self._stop.poll(0):
                return Why.STOPPED
        else:
            self.count = 0
            if any(fd == self._stop_fd for fd, _ in self._poller.poll()):
                return Why.STOPPED
        numbering = self._numbering
        numbering.lock.acquire()
        self._held = True
        self.first = numbering.seq + 1
        why = self._batch(self.first)
        numbering.seq += self.count
        self._more = why == Why.FULL
        if why == Why.ERROR and not self.count:
            self.done()
        return why

    def done(self) -> None:
        if self._held:
            self._held = False
            self._numbering.lock.release()

    def _batch(self, first_seq: int) -> Why:
        recvmsg_into = self._sock.recvmsg_into
        frame = self._frame
        view = self._view
        header = wire.DATA_HEADER_SIZE
        pack = wire.pack_datagram_header
        time_ns = time.time_ns
        port = self._port
        limit = CAPTURE_BATCH_SIZE - _ROOM
        offset = 0
        seq = first_seq
        drops: int | None = None
        why = Why.FULL
        while offset <= limit:
            try:
                size, ancdata, _flags, _addr = recvmsg_into([view[offset + header :]], ANCBUFSIZE)
            except (BlockingIOError, InterruptedError):
                why = Why.EMPTY
                break
            except OSError as exc:
                self.err = exc.errno or 0
                why = Why.ERROR
                break
            ts = time_ns()
            group, dropped = parse_ancillary(ancdata)
            if dropped is not None:
                drops = dropped
            pack(frame, offset, seq, group, port, ts, size)
            seq += 1
            offset += header + size
        self.count = count = seq - first_seq
        self.payload_bytes = offset - header * count
        self.drops = drops
        self._offset = offset
        self.sent = self.send_err = 0
        self.claimed = False
        claim = self._claim
        fd = claim.load() if count and claim is not None else CLAIM_CLOSED
        if fd >= 0 and claim is not None and claim.swap(fd, CLAIM_HELD) == fd:
            self.claimed = True  # latency first: written before the feed's Python runs
            while self.sent < offset:
                try:
                    self.sent += os.write(fd, view[self.sent : offset])
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self.send_err = exc.errno or 0
                    break
        if count and self._upstream is not None:
            self._upstream.scan(view[:offset], count, time.monotonic_ns())
        return why

    def frames(self) -> bytes:
        return bytes(self._view[: self._offset])


class _AckReader:
    """``rd_capture_read`` in Python (``AckReader``)."""

    def __init__(
        self, tcp: socket.socket, stop_fd: int, conn: CaptureConnection, idle: float
    ) -> None:
        self._conn = conn
        self._idle = idle
        self._control: list[Event] | ProtocolError = []
        self._sock = _TcpReceiver(tcp, stop_fd, ACK_READ_SIZE)
        self.acked = 0
        self.err = 0

    def control(self) -> list[Event] | ProtocolError:
        return self._control

    def run(self) -> Why:
        idle = self._idle
        deadline = time.monotonic() + idle
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return Why.IDLE
            got = self._sock.wait_and_recv(left, writable=False)
            if got.__class__ is Why:
                self.err = self._sock.err
                return got
            if not got:
                continue
            deadline = time.monotonic() + idle
            try:
                events = self._conn.receive(self._sock.view[: int(got)])
            except ProtocolError as exc:
                self._take_acks(exc.events)
                self._control = exc
                return Why.CONTROL
            rest = self._take_acks(events)
            if rest:
                self._control = rest
                return Why.CONTROL

    def _take_acks(self, events: list[Event]) -> list[Event]:
        """Keep the highest ACK; the events from the first other than ACK and HEARTBEAT on."""
        for index, event in enumerate(events):
            if event.__class__ is Ack:
                self.acked = max(self.acked, event.seq)
            elif event.__class__ is not Heartbeat:
                return events[index:]
        return []
