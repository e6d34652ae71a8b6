"""The Python plane's emit pump (``rd_emit_pump``): decode, accept, send, acknowledge."""

from __future__ import annotations

import math
import select
import time

from relayd.datapath import EMIT_RECEIVE_SIZE, EmitStart, Why, wait_writable
from relayd.metrics import LatencyHistogram
from relayd.pyplane.arbitration import ARB_SEND_WAIT, LockedArbiter
from relayd.pyplane.sockets import _TcpReceiver, wire_group
from relayd.session import (
    DUPLICATE,
    Control,
    Destination,
    accept,
    ack_point,
    control_wake,
    next_control,
    oversize,
)
from relayd.wire import Datagram, Event, Heartbeat, ProtocolError, encode_ack, encode_heartbeat


class _EmitCounters:
    """The emit pump's counters (``struct rd_emit``'s, by name)."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "datagrams_in",
        "datagrams_out",
        "denied_group",
        "denied_port",
        "duplicates",
        "frames_in",
        "gap_sequences",
        "gaps",
        "histogram",
        "last_rx_ns",
        "last_send_ok",
        "oversize",
        "send_waits",
    )

    def __init__(self) -> None:
        self.bytes_in = self.frames_in = self.datagrams_in = self.datagrams_out = 0
        self.bytes_out = self.duplicates = self.gaps = self.gap_sequences = self.send_waits = 0
        self.denied_group = self.denied_port = self.last_rx_ns = self.last_send_ok = 0
        self.oversize = 0
        self.histogram = LatencyHistogram()

    @property
    def latency(self) -> list[int]:
        return self.histogram.counts

    @property
    def latency_count(self) -> int:
        return self.histogram.count

    @property
    def latency_sum_ns(self) -> int:
        return self.histogram.sum_ns


class _EmitPump:
    """``rd_emit_pump`` in Python (relayd/datapath.py ``EmitPump``)."""

    def __init__(self, start: EmitStart) -> None:
        self._tcp = tcp = start.tcp
        self._mcast = start.mcast
        self._stop_fd = stop_fd = start.stop_fd
        self._proto = start.proto
        self._idle = start.idle
        self._heartbeat = start.heartbeat
        self._ack_interval = start.ack_interval
        self._max_datagram_size = start.max_datagram_size
        arbiter = start.arbiter
        if arbiter is not None and not isinstance(arbiter, LockedArbiter):
            raise TypeError(f"the Python pump needs the Python plane's arbiter, not {arbiter!r}")
        self._arbiter = arbiter
        self._source = start.source
        self._owner = start.owner
        self._gate = start.gate
        self._highest = start.highest
        self._resuming = True  # no DATA on this connection yet (``session.accept``)
        self._acked = start.acked
        self._sock = _TcpReceiver(tcp, stop_fd, EMIT_RECEIVE_SIZE)
        self._events: list[Event] = []  # decoded, not emitted yet: from _next on
        self._next = 0
        self._error: ProtocolError | None = None  # what ends the decoded events
        self._control: list[Event] | ProtocolError = []
        self._dests: dict[int, tuple[Destination, tuple[str, int]]] = {}
        self._clear = False
        self._chunk_ts = 0
        self._out = b""  # the control frame being written
        self._last_out = -math.inf
        self._blocked_since = 0.0
        self.counters = _EmitCounters()
        self.need_key = 0
        self.err = 0

    @property
    def highest(self) -> int:
        return self._highest

    @property
    def acked(self) -> int:
        return self._acked

    def set_destination(self, key: int, verdict: Destination, fd: int) -> None:
        self._dests[key] = (verdict, (str(wire_group(key >> 16)), key & 0xFFFF))

    def clear_destinations(self) -> None:
        self._clear = True

    def control(self) -> list[Event] | ProtocolError:
        return self._control

    def unsent(self) -> bytes:
        return self._out

    def run(self) -> Why:
        idle = self._idle
        deadline = time.monotonic() + idle
        while True:
            why = self._emit()
            if why is not None:
                return why
            while True:
                now = time.monotonic()
                self._queue_control(now)
                if self._out and self._flush(now):
                    return Why.RESET
                if self._out and now - self._blocked_since >= idle:
                    return Why.SLOW
                if now >= deadline:
                    return Why.IDLE
                wake = deadline
                if self._out:
                    wake = min(wake, self._blocked_since + idle)
                else:
                    wake = min(
                        wake,
                        control_wake(
                            self._last_out,
                            self._acked,
                            self._ack_point(),
                            self._ack_interval,
                            self._heartbeat,
                        ),
                    )
                if self._arbiter is not None:  # held datagrams expire on time without traffic
                    due = self._arbiter.wake()
                    if due <= now:
                        if self._expire(self._arbiter, now):
                            return Why.SEND_ERROR
                        continue
                    wake = min(wake, due)
                got = self._sock.wait_and_recv(wake - now, writable=bool(self._out))
                if got.__class__ is Why:
                    self.err = self._sock.err
                    return got
                if not got:
                    continue  # nothing yet, or only writable: the control frame goes on above
                n = int(got)
                self.counters.last_rx_ns = time.monotonic_ns()
                deadline = time.monotonic() + idle
                self.counters.bytes_in += n
                try:
                    self._events = self._proto.receive(self._sock.view[:n])
                except ProtocolError as exc:
                    self._events = exc.events
                    self._error = exc
                self._next = 0
                break

    def _emit(self) -> Why | None:
        """Emit the decoded events from ``_next`` on (``emit_frames``): None when all are done,
        else why to return (``_next`` at the event concerned)."""
        if self._clear:
            self._clear = False
            self._dests.clear()
        events = self._events
        counters = self.counters
        sendto = self._mcast.sendto
        dests = self._dests
        highest = self._highest
        resuming = self._resuming
        index = self._next
        frames = datagrams = out = bytes_out = dups = gaps = skipped_total = 0
        denied_group = denied_port = too_large = 0
        limit = self._max_datagram_size
        arbiter = self._arbiter
        last_ts = 0
        last_ok: bool | None = None
        why: Why | None = None
        count = len(events)
        gate = self._gate
        monotonic_ns = time.monotonic_ns
        clocked = gate is not None or arbiter is not None
        while index < count:
            event = events[index]
            if event.__class__ is not Datagram:
                if event.__class__ is Heartbeat:
                    frames += 1
                    index += 1
                    continue
                self._control = events[index:]  # an ERROR from the peer, and what follows
                why = Why.CONTROL
                break
            seq, group, port, ts_ns, payload = event
            skipped = accept(highest, seq, resuming)
            if skipped == DUPLICATE:
                resuming = False
                frames += 1
                datagrams += 1
                dups += 1
                index += 1
                continue
            # one clock read per datagram serves the gate and the arbiter (as in C)
            read_ns = monotonic_ns() if clocked else 0
            if gate is not None and read_ns >= gate.open_until_ns:
                why = Why.GATED  # not emitted, not claimed (relayd/datapath.py EmitGate)
                break
            key = (group << 16) | port
            dest = dests.get(key)
            if dest is None:
                self.need_key = key
                why = Why.NEED_DEST
                break
            if skipped:
                gaps += 1
                skipped_total += skipped
            verdict, address = dest
            failed = False
            if verdict is Destination.ALLOWED and oversize(len(payload), limit):
                too_large += 1
            elif verdict is Destination.ALLOWED and arbiter is not None:  # A/B arbitration
                failed = self._arbitrated(arbiter, key, payload, address, seq, read_ns)
                last_ts = ts_ns
            elif verdict is Destination.ALLOWED:
                try:
                    sendto(payload, address)
                except OSError as exc:
                    sent = self._send_after(exc, payload, address)
                    if sent is None:
                        why = Why.STOPPED  # this datagram was not sent: not claimed
                        break
                    failed = not sent
                if not failed:
                    out += 1
                    bytes_out += len(payload)
                last_ok = not failed
                last_ts = ts_ns
            elif verdict is Destination.GROUP_NOT_ALLOWED:
                denied_group += 1
            else:
                denied_port += 1
            frames += 1
            datagrams += 1
            highest = seq
            resuming = False
            index += 1
            if failed:
                if arbiter is None:  # arbitrated sends name the failing key themselves
                    self.need_key = key
                why = Why.SEND_ERROR
                break
        if why is None and self._error is not None:
            self._control = self._error
            self._error = None
            why = Why.CONTROL
        self._next = index
        self._highest = highest
        self._resuming = resuming
        counters.frames_in += frames
        counters.datagrams_in += datagrams
        counters.datagrams_out += out
        counters.bytes_out += bytes_out
        counters.duplicates += dups
        counters.gaps += gaps
        counters.gap_sequences += skipped_total
        counters.denied_group += denied_group
        counters.denied_port += denied_port
        counters.oversize += too_large
        if last_ok is not None:
            counters.last_send_ok = last_ok
        if last_ts:
            self._chunk_ts = last_ts
        if why is None and self._chunk_ts:  # once per chunk, from its last datagram
            counters.histogram.observe_ns(time.time_ns() - self._chunk_ts)
            self._chunk_ts = 0
        return why

    # -- A/B arbitration (``arb_emit`` and friends in relayd/_fastpath.c) ---------------------

    def _arbitrated(
        self,
        arbiter: LockedArbiter,
        key: int,
        payload: bytes,
        address: tuple[str, int],
        frame: int,
        read_ns: int,
    ) -> bool:
        """What was released before goes first, then the datagram if the arbiter says so,
        then what it released (``read_ns``: the pump's ``time.monotonic_ns()`` for it). True
        when a send failed (``err``, ``need_key``)."""
        with arbiter.lock:
            waits = self.counters.send_waits
            failed = self._send_released(arbiter)
            if self.counters.send_waits != waits:  # stale after a wait
                read_ns = time.monotonic_ns()
            verdict = arbiter.arbiter.offer(
                self._source,
                key >> 16,
                key & 0xFFFF,
                payload,
                read_ns / 1e9,
                self._owner,
                frame,
            )
            if verdict.sends and not self._send_locked(payload, address, key):
                failed = True
            if not failed:
                failed = self._send_released(arbiter)
        return failed

    def _expire(self, arbiter: LockedArbiter, now: float) -> bool:
        with arbiter.lock:
            arbiter.arbiter.expire(now)
            return self._send_released(arbiter)

    def _send_released(self, arbiter: LockedArbiter) -> bool:
        """Send what the arbiter released, in order, until one fails (True; the rest stays
        for the next pump to take the lock)."""
        released = arbiter.arbiter.released
        while released:
            item = released.popleft()
            key = (item.group << 16) | item.port
            if not self._send_locked(item.payload, (wire_group(item.group), item.port), key):
                return True
        return False

    def _send_locked(self, payload: bytes, address: tuple[str, int], key: int) -> bool:
        """One arbitrated send (the arbiter's lock held): a full socket is waited for
        ``ARB_SEND_WAIT`` at most. False when it failed (``err``, ``need_key``)."""
        counters = self.counters
        try:
            self._mcast.sendto(payload, address)
        except OSError as exc:
            if not self._send_after(exc, payload, address, bounded=True):
                self.need_key = key
                counters.last_send_ok = 0
                return False
        counters.datagrams_out += 1
        counters.bytes_out += len(payload)
        counters.last_send_ok = 1
        return True

    def _send_after(
        self, exc: OSError, payload: bytes, address: tuple[str, int], *, bounded: bool = False
    ) -> bool | None:
        """The pump's one send step after a ``sendto`` failed with ``exc`` (``send_datagram``
        in relayd/_fastpath.c): retry while the socket is full, waiting for room until it has
        some or the stop pipe says stop, or (``bounded``: the arbiter's lock is held)
        ``ARB_SEND_WAIT`` once. True when sent, False when it failed for good (``err``), None
        when stopped."""
        gave_up = False
        while isinstance(exc, BlockingIOError) and not gave_up:
            self.counters.send_waits += 1
            if not bounded:
                if not wait_writable(self._mcast, self._stop_fd):
                    return None
            else:
                poller = select.poll()
                poller.register(self._mcast.fileno(), select.POLLOUT)
                poller.poll(int(ARB_SEND_WAIT * 1000))
                gave_up = True
            try:
                self._mcast.sendto(payload, address)
            except OSError as again:
                exc = again
            else:
                return True
        self.err = exc.errno or 0
        return False

    def _ack_point(self) -> int:
        """How far this connection may acknowledge (``session.ack_point``)."""
        arbiter = self._arbiter
        if arbiter is None:
            return self._highest
        return ack_point(self._highest, arbiter.floor(self._owner))

    def _queue_control(self, now: float) -> None:
        if self._out:
            return
        ackable = self._ack_point()
        due = next_control(
            now, self._last_out, self._acked, ackable, self._ack_interval, self._heartbeat
        )
        if due is Control.ACK:
            self._out = encode_ack(ackable)
            self._acked = ackable
        elif due is Control.HEARTBEAT:
            self._out = encode_heartbeat(time.time_ns())
        else:
            return
        self._blocked_since = now

    def _flush(self, now: float) -> bool:
        """Write what is left of the control frame; True when the connection broke."""
        try:
            sent = self._tcp.send(self._out)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self.err = exc.errno or 0
            return True
        self._out = self._out[sent:]
        if not self._out:
            self._last_out = now
        return False
