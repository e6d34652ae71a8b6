"""The Python leaf of the data plane: relayd/datapath.py's interface without the C library.

For machines without a compiler (``RELAYD_DATAPATH=python``, or ``auto`` when the library is
missing). It runs the loops of relayd/_fastpath.c step for step, with Python's decoder
(relayd/wire.py) and the rules of relayd/session.py, and passes the same tests. Per datagram it
does what the rules need and one ``sendto`` or ``recvmsg_into``; everything else happens once
per chunk or batch.
"""

from __future__ import annotations

import math
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable
from typing import Final

from relayd import wire
from relayd.arbitration import Arbiter, ArbitrationConfig, Verdict
from relayd.arbitration.headers import ChannelKind, DeribitLayout
from relayd.arbitration.sequence import ChannelPosition, UpstreamMonitor
from relayd.datapath import (
    ACK_READ_SIZE,
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
    EmitStart,
    UpstreamChannel,
    UpstreamCounter,
    UpstreamTotals,
    Why,
    wait_writable,
)
from relayd.metrics import LatencyHistogram
from relayd.netif import ANCBUFSIZE, parse_ancillary
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
from relayd.wire import (
    Ack,
    CaptureConnection,
    Datagram,
    Event,
    Heartbeat,
    ProtocolError,
    encode_ack,
    encode_heartbeat,
)

__all__ = ["PLANE", "LockedArbiter", "PythonPlane"]

_ROOM: Final = wire.DATA_HEADER_SIZE + wire.MAX_PAYLOAD
_READABLE: Final = select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL
#: How long an arbitrated send waits for room in a full socket (the arbiter's lock is held).
ARB_SEND_WAIT: Final = 1.0


class LockedArbiter:
    """:class:`relayd.datapath.FeedArbiter` over the specification itself: one
    ``relayd.arbitration.Arbiter`` behind a ``threading.Lock``, which the pumps hold from the
    verdict until the datagram and what it released are sent (so each channel goes out in
    order whichever thread sends)."""

    def __init__(self, config: ArbitrationConfig) -> None:
        self.arbiter = Arbiter(config)
        self.lock = threading.Lock()
        self._closed = False  # as the C arbiter: nothing observed once closed

    def observe(self, group: int, port: int, payload: bytes, now: float) -> None:
        with self.lock:
            if not self._closed:
                self.arbiter.observe(group, port, payload, now)

    def set_live_sources(self, count: int) -> None:
        with self.lock:
            self.arbiter.set_live_sources(count)

    def counts(self) -> dict[str, int]:
        arbiter = self.arbiter
        stats = arbiter.stats
        return {
            "offered": stats.offered,
            "sent": stats.sent,
            "duplicates": stats.duplicates,
            "held": stats.held,
            "released": stats.released,
            "gaps": stats.gaps,
            "missing": stats.missing,
            "snapshot_gaps": stats.snapshot_gaps,
            "resets": stats.resets,
            "overlaps": stats.overlaps,
            "heartbeats": stats.heartbeats,
            "skipped_heartbeats": stats.skipped_heartbeats,
            "unsequenced": stats.unsequenced,
            "malformed": stats.malformed,
            "observed": stats.observed,
            "hold_overflows": stats.hold_overflows,
            "channel_evictions": arbiter.channel_evictions,
            "content_evictions": arbiter.content_evictions,
            "held_now": arbiter.held_now,
            "held_bytes": arbiter.held_bytes,
            "channels": arbiter.channel_count,
            "live_sources": arbiter.live_sources,
        }

    def sent_by_source(self) -> list[int]:
        sent = [0] * ARBITER_SOURCES
        for source, count in list(self.arbiter.stats.sent_by_source.items()):
            sent[min(source, ARBITER_SOURCES - 1)] += count
        return sent

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
        with self.lock:
            return self.arbiter.offer(source, group, port, payload, now, owner, frame)

    def floor(self, owner: int) -> int | None:
        if not self.arbiter.pending:  # a racy peek: what this owner's pump held it sees
            return None
        with self.lock:
            return self.arbiter.pending_floor(owner)

    def take_released(self) -> list[tuple[int, int, int, bytes, int]]:
        with self.lock:
            released = self.arbiter.released
            out = [(r.source, r.group, r.port, r.payload, r.gap) for r in released]
            released.clear()
        return out

    def expire(self, now: float) -> int:
        with self.lock:
            return self.arbiter.expire(now)

    def next_deadline(self) -> float | None:
        with self.lock:
            return self.arbiter.next_deadline()

    @property
    def gap_size(self) -> int:
        return self.arbiter.gap_size

    def flush(self, mcast: socket.socket) -> tuple[int, int]:
        sent = failed = 0
        with self.lock:
            self.arbiter.expire(math.inf)
            released = self.arbiter.released
            while released:
                item = released.popleft()
                try:
                    mcast.sendto(item.payload, (wire_group(item.group), item.port))
                except OSError:
                    failed += 1
                else:
                    sent += 1
        return sent, failed

    def close(self) -> None:
        with self.lock:
            self._closed = True

    def wake(self) -> float:
        """When a pump must wake for the arbiter (``time.monotonic()``): now (-inf) while
        released datagrams wait to be sent, inf when nothing is held."""
        with self.lock:
            if self.arbiter.released:
                return -math.inf
            deadline = self.arbiter.next_deadline()
        return math.inf if deadline is None else deadline + 1e-6


#: A DATA frame's length, type, flags, port and group (network byte order).
_FRAME_ADDRESS: Final = struct.Struct(">HBBHI")


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


class _TcpReceiver:
    """``wait_and_recv`` of relayd/_fastpath.c: both TCP loops wait and receive this way."""

    def __init__(self, tcp: socket.socket, stop_fd: int, size: int) -> None:
        self._tcp = tcp
        self._stop_fd = stop_fd
        self._buffer = bytearray(size)
        self.view = memoryview(self._buffer)
        self._poller = select.poll()
        self._poller.register(tcp.fileno(), select.POLLIN)
        self._poller.register(stop_fd, select.POLLIN)
        self._writable = False
        self.err = 0

    def wait_and_recv(self, timeout: float, *, writable: bool) -> int | Why:
        """Wait up to ``timeout`` seconds for the socket (readable, or writable too) or the
        stop pipe, then receive into ``view``: how many bytes came; 0 when there is nothing
        to receive yet (call again); or STOPPED, EOF, RESET (``err``)."""
        if writable != self._writable:
            self._writable = writable
            events = select.POLLIN | (select.POLLOUT if writable else 0)
            self._poller.modify(self._tcp.fileno(), events)
        ready = self._poller.poll(max(0, math.ceil(timeout * 1000)))
        if not ready:
            return 0
        if any(fd == self._stop_fd for fd, _ in ready):
            return Why.STOPPED
        if not any(ev & _READABLE for _, ev in ready):
            return 0  # only writable
        try:
            n = self._tcp.recv_into(self._buffer)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self.err = exc.errno or 0
            return Why.RESET
        return n if n else Why.EOF


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


def wire_group(group: int) -> str:
    """A host-order IPv4 address as text."""
    return socket.inet_ntoa(group.to_bytes(4, "big"))


class _UpstreamCounter:
    """``rd_upstream_*`` in Python (``UpstreamCounter``): the specification itself, locked."""

    def __init__(self, layout: DeribitLayout, max_channels: int, stale_horizon_ns: int) -> None:
        self._monitor = UpstreamMonitor(
            layout,
            snapshot_ports=frozenset(UPSTREAM_SNAPSHOT_PORTS),
            max_channels=max_channels,
            stale_horizon=stale_horizon_ns,  # and ``now`` in ns too: integers, as in C
        )
        self._lock = threading.Lock()

    def scan(self, frames: bytes | memoryview, count: int, now_ns: int) -> None:
        view = memoryview(frames)
        see = self._monitor.see
        unpack = _FRAME_ADDRESS.unpack_from
        header = wire.DATA_HEADER_SIZE
        offset = 0
        with self._lock:
            for _ in range(count):
                length, _type, _flags, port, group = unpack(view, offset)
                end = offset + length + 2
                see(group, port, view[offset + header : end], now_ns)  # type: ignore[arg-type]
                offset = end

    def totals(self) -> UpstreamTotals:
        with self._lock:
            monitor = self._monitor
            stats = monitor.stats
            return UpstreamTotals(
                stats.datagrams,
                stats.gaps,
                stats.missing,
                stats.snapshot_gaps,
                stats.duplicates,
                stats.resets,
                stats.overlaps,
                stats.heartbeats,
                stats.unsequenced,
                stats.malformed,
                monitor.channel_evictions,
                sum(1 for _ in monitor.channels()),
                monitor.last_gap,
            )

    def channels(self, lossy: bool = False) -> list[UpstreamChannel]:
        with self._lock:
            return [
                UpstreamChannel(
                    group,
                    port,
                    channel,
                    kind is ChannelKind.SNAPSHOT,
                    c.datagrams,
                    c.gaps,
                    c.missing,
                    c.duplicates,
                    c.resets,
                    c.overlaps,
                )
                for (group, port, channel), kind, c in self._monitor.channels()
                if not lossy or c.gaps or c.duplicates or c.resets or c.overlaps
            ]

    def positions(self) -> list[ChannelPosition]:
        with self._lock:
            return self._monitor.positions()

    def resume(self, positions: Iterable[ChannelPosition], now_ns: int) -> int:
        with self._lock:
            return sum(self._monitor.resume(position, now_ns) for position in positions)

    def close(self) -> None:
        pass


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


class PythonPlane:
    """The Python leaf."""

    name = "Python"
    connects_destinations = False
    busy_polls = False  # busy_poll is ignored (logged at the feed's start)

    def emit_pump(self, start: EmitStart) -> _EmitPump:
        return _EmitPump(start)

    def capture_numbering(self, seq: int) -> _Numbering:
        return _Numbering(seq)

    def claim_word(self) -> _ClaimWord:
        return _ClaimWord()

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
    ) -> _Receiver:
        del busy_poll  # the latency mode is the C plane's (docs/CONFIG.md, busy_poll)
        return _Receiver(sock, port, stop_fd, numbering, claim, upstream)

    def upstream_counter(
        self,
        layout: DeribitLayout,
        max_channels: int = UPSTREAM_MAX_CHANNELS,
        stale_horizon_ns: int = UPSTREAM_STALE_HORIZON_NS,
    ) -> _UpstreamCounter:
        return _UpstreamCounter(layout, max_channels, stale_horizon_ns)

    def arbiter(self, config: ArbitrationConfig) -> LockedArbiter:
        return LockedArbiter(config)

    def ack_reader(
        self, tcp: socket.socket, stop_fd: int, conn: CaptureConnection, idle: float
    ) -> _AckReader:
        return _AckReader(tcp, stop_fd, conn, idle)


PLANE: Final = PythonPlane()
