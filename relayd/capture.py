"""A capture feed: join multicast groups, frame every datagram, stream it to the emit side.

Two halves that never wait for each other:

* one **data-path thread per socket** (a socket holds one port and at most 20 groups; the
  thread is started and stopped by a Trio task with ``trio.to_thread``) blocks in ``poll`` on
  the socket and a stop pipe, then drains every readable datagram with ``recvmsg_into``
  straight into a preallocated frame buffer, 26 bytes past the frame's start, stamps it
  (CLOCK_REALTIME ns), numbers it (one sequence per session, across all groups) and writes the
  DATA header in front of it in place. The whole batch becomes one ``bytes`` (the only copy),
  one chunk of the replay buffer, and, when the TCP side is caught up, one non-blocking
  ``send`` right away, from the thread. No await per datagram, and no waiting for more data to
  batch: latency first. A thread rather than a Trio task because it was measured to cost less
  CPU and latency per wake-up (docs/PERFORMANCE.md). The sequence, the replay buffer, the send
  state and the counters are shared with Trio under one lock; when the socket is full the
  thread asks Trio to wake the sender task.
* the **connection loop** connects to the targets (every address of every name), does the
  CHALLENGE / HELLO / welcome ACK exchange, rewinds the replay buffer to the welcome ACK and
  streams. A sender task takes over whenever the socket is full; a reader task applies ACKs
  (which trim the replay buffer) and watches ``idle_timeout``; a heartbeat task speaks when
  the stream is idle. Any error ends the connection; the loop reconnects with jittered
  exponential backoff capped at 2 s.

On the C data plane (``relayd/_fastpath.c``, the default when it loads) the receive thread
runs ``_drain_c``: ``rd_capture_batch`` receives, stamps, numbers and frames the batch and,
when the TCP side is caught up, sends it before Python does the bookkeeping; and the reader is
a thread in ``rd_capture_read``, which keeps the highest ACK for the receive thread to apply
once per batch (``_apply_acks``) and hands anything but ACK and HEARTBEAT to the Python
decoder.

The UDP drain goes on while the TCP side is slow, stalled or reconnecting: the replay buffer
absorbs it, bounded in bytes and age, and its drops are counted and logged.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import functools
import logging
import math
import os
import random
import select
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal

import trio

from relayd import fastpath, wire
from relayd.config import CaptureFeed
from relayd.datapath import run_stoppable
from relayd.emit import load_auth_keys
from relayd.logs import RateLimitedLogger
from relayd.netif import (
    ANCBUFSIZE,
    MAX_DATAGRAM,
    GroupReceiver,
    open_group_receivers,
    parse_ancillary,
    resolve_interface,
    send_all,
)
from relayd.replay import Chunk, ReplayBuffer
from relayd.runtime import FeedHealth, MetricType, Sample

__all__ = ["BACKOFF_CAP", "CaptureFeedRuntime", "backoff_delay"]

log = logging.getLogger("relayd.capture")

#: Frame buffer per receiving socket; a batch ends when less than a maximal frame fits.
BATCH_BUFFER = 512 * 1024
_FRAME_ROOM = wire.DATA_HEADER_SIZE + MAX_DATAGRAM
#: Reconnect delays: first retry after a failure, growth factor, cap.
BACKOFF_FIRST = 0.05
BACKOFF_CAP = 2.0
#: A connection that streamed at least this long resets the backoff.
STABLE_AFTER = 1.0
_RECV_SIZE = 64 * 1024


def backoff_delay(failures: int, rng: random.Random | None = None) -> float:
    """Delay before the next attempt after ``failures`` consecutive failures (0: none)."""
    if failures <= 0:
        return 0.0
    base = min(BACKOFF_CAP, BACKOFF_FIRST * 2.0 ** (failures - 1))
    return base * (rng or random).uniform(0.5, 1.0)


def _age(since: float | None) -> float | None:
    """Seconds since a ``time.monotonic`` stamp, or None when it never happened."""
    return None if since is None else round(max(0.0, time.monotonic() - since), 3)


class _ConnectionEndedError(Exception):
    """The current connection is over (error, timeout, peer close); reconnect."""


class _PeerRefusedError(_ConnectionEndedError):
    """The emit side sent ERROR (it refused the HELLO, or it is closing)."""


class CaptureFeedRuntime:
    """One ``[[capture]]`` feed (the ``relayd.runtime.Feed`` protocol, kind "capture")."""

    kind: Literal["capture"] = "capture"

    def __init__(self, config: CaptureFeed, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.name = config.name
        self.session_id = os.urandom(wire.SESSION_ID_SIZE)
        self._key: bytes | None = None  # read by run(): a missing key fails the start
        self._rng = rng or random.Random()
        self._replay = ReplayBuffer(config.replay_max_bytes, config.replay_max_age)
        self._limited = RateLimitedLogger(log)
        self._close_code = int(wire.ErrorCode.SHUTTING_DOWN)
        self._close_message = "capture side shutting down"
        self._seq = 0
        # current connection (set only while streaming)
        self._sock: socket.socket | None = None
        self._pending: memoryview | None = None  # rest of a frame sequence partly sent
        self._control: collections.deque[bytes] = collections.deque()
        self._blocked = False  # the socket was full; the sender task waits for writability
        self._send_error: OSError | None = None
        self._wake = trio.Event()
        # The receive threads (one per socket) and Trio share the sequence, the replay buffer,
        # the send state and the counters: changed under this lock.
        self._lock = threading.Lock()
        self._last_send = 0.0
        self._highest_sent = 0
        self.peer: str | None = None
        # health
        self._started = False
        self._down_since = time.monotonic()
        self._last_error = ""
        # metrics
        self.datagrams_in = 0
        self.bytes_in = 0
        self.kernel_drops = 0
        self.frames_sent = 0
        self.bytes_sent = 0
        self.resent_datagrams = 0
        self.connects: collections.Counter[str] = collections.Counter()
        self.errors_from_peer: collections.Counter[int] = collections.Counter()
        self.receivers: list[GroupReceiver] = []
        self._reported_drops = 0
        self._lib: fastpath.DataPlane | None = None  # None: the Python data path
        # the C reader's state while a connection streams (it holds the latest ACK)
        self._rx: fastpath.CaptureReaderState | None = None

    # -- Feed protocol ---------------------------------------------------------------------

    def set_close_reason(self, code: int, message: str) -> None:
        self._close_code = code
        self._close_message = message

    def update_keys(self, config: CaptureFeed) -> None:
        """Read ``config.auth_key_file`` again for the next connection (a reload that rotates
        the key); the current connection, session and replay buffer are kept. Raises
        KeyFileError and keeps the current key when the file cannot be used."""
        path = config.auth_key_file
        self._key = None if path is None else load_auth_keys([path])[0]
        self.config = config

    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def replay(self) -> ReplayBuffer:
        return self._replay

    def health(self) -> FeedHealth:
        with self._lock:
            self._apply_acks()
        replay = self._replay
        detail: dict[str, object] = {
            "peer": self.peer,
            "acked_seq": replay.acked_seq,
            "last_seq": self._seq,
            "unacked_datagrams": replay.unacked_datagrams,
            "replay_bytes": replay.total_bytes,
            "replay_dropped_datagrams": replay.dropped_datagrams,
            "kernel_drops": self.kernel_drops,
            "last_datagram_age_seconds": _age(replay.last_appended_at),
        }
        if not self._started:
            return FeedHealth(False, "starting", detail)
        if self._sock is not None:
            return FeedHealth(True, "streaming", detail)
        down = time.monotonic() - self._down_since
        detail["disconnected_for"] = round(down, 3)
        detail["last_error"] = self._last_error
        if down <= self.config.reconnect_budget:
            return FeedHealth(True, "reconnecting", detail)
        return FeedHealth(False, "disconnected", detail)

    def samples(self) -> Iterable[Sample]:
        with self._lock:
            self._apply_acks()
        feed = (("feed", self.name),)
        replay = self._replay

        def one(name: str, kind: MetricType, text: str, value: float) -> Sample:
            return Sample(f"capture_{name}", kind, text, feed, value)

        yield one("datagrams_in", "counter", "Datagrams received.", self.datagrams_in)
        yield one("bytes_in", "counter", "Payload bytes received.", self.bytes_in)
        yield one("kernel_drops", "counter", "Datagrams the kernel dropped.", self.kernel_drops)
        yield one("frames_sent", "counter", "DATA frames sent.", self.frames_sent)
        yield one("bytes_sent", "counter", "Bytes written to TCP.", self.bytes_sent)
        yield one("replay_bytes", "gauge", "Bytes in the replay buffer.", replay.total_bytes)
        yield one("replay_chunks", "gauge", "Chunks in the replay buffer.", len(replay))
        yield one(
            "replay_dropped_datagrams",
            "counter",
            "Unacknowledged datagrams dropped from the replay buffer.",
            replay.dropped_datagrams,
        )
        yield one(
            "replay_dropped_bytes",
            "counter",
            "Unacknowledged bytes dropped from the replay buffer.",
            replay.dropped_bytes,
        )
        yield one(
            "resent_datagrams",
            "counter",
            "Datagrams sent again after a reconnect.",
            self.resent_datagrams,
        )
        for result in ("ok", "failed", "refused"):
            yield Sample(
                "capture_connects",
                "counter",
                "Connection attempts by result.",
                (*feed, ("result", result)),
                self.connects[result],
            )
        yield one("connected", "gauge", "1 while streaming.", 1 if self.connected else 0)
        yield one("acked_seq", "gauge", "Highest sequence acknowledged.", replay.acked_seq)
        yield one(
            "unacked_datagrams",
            "gauge",
            "Datagrams not yet acknowledged.",
            replay.unacked_datagrams,
        )
        for code, count in sorted(self.errors_from_peer.items()):
            yield Sample(
                "capture_errors_from_peer",
                "counter",
                "ERROR frames received from the emit side, by code.",
                (*feed, ("code", str(code))),
                count,
            )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        if config.auth_key_file is not None:
            self._key = load_auth_keys([config.auth_key_file])[0]
        interface = resolve_interface(config.interface)
        self._lib = fastpath.load()
        groups = [(gp.group, gp.port) for gp in config.groups]
        self.receivers = open_group_receivers(
            groups, interface, config.receive_buffer, sources=config.sources
        )
        try:
            capped = [r for r in self.receivers if r.receive_buffer_capped]
            if capped:
                log.warning(
                    "feed %s: receive buffer capped at %d bytes (asked %d); raise "
                    "net.core.rmem_max or run as root",
                    self.name,
                    capped[0].receive_buffer_effective,
                    config.receive_buffer,
                )
            async with trio.open_nursery() as nursery:
                for receiver in self.receivers:
                    nursery.start_soon(self._receive, receiver)
                self._started = True
                self._down_since = time.monotonic()
                log.info(
                    "feed %s: joined %d groups on %s with %d sockets, data path %s",
                    self.name,
                    len(groups),
                    interface,
                    len(self.receivers),
                    fastpath.describe(),
                )
                task_status.started()
                await self._connect_loop()
        finally:
            for receiver in self.receivers:
                receiver.close()

    # -- receive (hot path) -----------------------------------------------------------------

    async def _receive(self, receiver: GroupReceiver) -> None:
        """Run the socket's data-path thread (``_drain``, or ``_drain_c`` on the C data plane)
        until cancelled."""
        drain = self._drain if self._lib is None else self._drain_c
        await run_stoppable(functools.partial(drain, receiver))

    def _drain_c(
        self, receiver: GroupReceiver, stop_fd: int, token: trio.lowlevel.TrioToken
    ) -> None:
        """``_drain`` on the C data plane: ``rd_capture_wait`` blocks in ``poll`` and
        ``rd_capture_batch`` receives, stamps, numbers and frames a whole batch and sends it
        when the TCP side is caught up; the replay buffer and the accounting stay here, once
        per batch (and the send, through ``_kick``, when the TCP side is behind)."""
        lib = self._lib
        assert lib is not None
        frame = (ctypes.c_uint8 * BATCH_BUFFER)()
        view = memoryview(frame).cast("B")
        state = fastpath.CaptureState(
            fd=receiver.sock.fileno(),
            stop_fd=stop_fd,
            buf=ctypes.addressof(frame),
            cap=BATCH_BUFFER,
            room=_FRAME_ROOM,
            port=receiver.port,
        )
        ref = ctypes.byref(state)
        wait = lib.capture_wait
        batch = lib.capture_batch
        apply_acks = self._apply_acks
        monotonic = time.monotonic
        replay = self._replay
        lock = self._lock
        wake_sender = self._wake_sender
        schedule = token.run_sync_soon
        last_drops = 0
        while True:
            why = wait(ref)
            if why == fastpath.RD_STOPPED:
                return
            if why == fastpath.RD_ERROR:
                raise OSError(state.err, os.strerror(state.err))
            why = fastpath.RD_FULL
            while why == fastpath.RD_FULL:  # batches until the socket is empty
                # Sequence numbers are assigned while receiving: one lock holds the batch, so
                # chunks of several sockets enter the replay buffer in sequence order.
                with lock:
                    apply_acks()
                    first = self._seq
                    sock = self._sock
                    direct = (
                        sock is not None
                        and not self._blocked
                        and self._pending is None
                        and not self._control
                        and replay.caught_up
                    )
                    state.tcp_fd = sock.fileno() if direct and sock is not None else -1
                    why = batch(ref, first + 1)
                    count = state.count
                    if count:
                        seq = self._seq = first + count
                        self.datagrams_in += count
                        self.bytes_in += state.payload_bytes
                        now = monotonic()
                        replay.append(Chunk(first + 1, seq, now, bytes(view[: state.offset])))
                        if direct:
                            wake = self._sent_by_c(state.sent, state.send_err, now)
                        else:
                            wake = self._kick()
                        replay.expire(now)
                        if replay.dropped_datagrams != self._reported_drops:
                            self._note_replay_drops()
                        if wake:
                            schedule(wake_sender)
                    if state.drops_seen and state.drops != last_drops:
                        self._count_kernel_drops(int(state.drops) - last_drops)
                        last_drops = int(state.drops)
                if why == fastpath.RD_ERROR:
                    raise OSError(state.err, os.strerror(state.err))

    def _drain(self, receiver: GroupReceiver, stop_fd: int, token: trio.lowlevel.TrioToken) -> None:
        """The data-path thread of one socket: block in ``poll`` (with ``stop_fd``, which
        ends it), then drain batches until the socket is empty, each appended to the replay
        buffer and sent at once when the TCP side is caught up."""
        sock = receiver.sock
        port = receiver.port
        recvmsg_into = sock.recvmsg_into
        frame = bytearray(BATCH_BUFFER)
        view = memoryview(frame)
        limit = BATCH_BUFFER - _FRAME_ROOM
        header = wire.DATA_HEADER_SIZE
        pack = wire.pack_datagram_header
        time_ns = time.time_ns
        monotonic = time.monotonic
        replay = self._replay
        lock = self._lock
        wake_sender = self._wake_sender
        schedule = token.run_sync_soon
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.register(stop_fd, select.POLLIN)
        poll = poller.poll
        last_drops = 0
        while True:
            ready = poll()
            if len(ready) > 1 or ready[0][0] == stop_fd:  # two fds: one of them is stop_fd
                return
            full = True
            while full:  # batches until the socket is empty
                offset = 0
                drops: int | None = None
                # Sequence numbers are assigned while receiving: one lock holds the batch, so
                # chunks of several sockets enter the replay buffer in sequence order.
                with lock:
                    first = seq = self._seq
                    while offset <= limit:
                        try:
                            size, ancdata, _flags, _addr = recvmsg_into(
                                [view[offset + header :]], ANCBUFSIZE
                            )
                        except (BlockingIOError, InterruptedError):
                            full = False
                            break
                        ts = time_ns()
                        group, dropped = parse_ancillary(ancdata)
                        if dropped is not None:
                            drops = dropped
                        seq += 1
                        pack(frame, offset, seq, group, port, ts, size)
                        offset += header + size
                    if offset:
                        count = seq - first
                        self._seq = seq
                        self.datagrams_in += count
                        self.bytes_in += offset - header * count
                        now = monotonic()
                        replay.append(Chunk(first + 1, seq, now, bytes(view[:offset])))
                        replay.expire(now)
                        if replay.dropped_datagrams != self._reported_drops:
                            self._note_replay_drops()
                        if self._kick():
                            schedule(wake_sender)
                    if drops is not None and drops != last_drops:
                        self._count_kernel_drops(drops - last_drops)
                        last_drops = drops

    def _count_kernel_drops(self, growth: int) -> None:
        """The socket's drop counter (SO_RXQ_OVFL, 32 bits, wraps) grew: count and warn."""
        self.kernel_drops += growth & 0xFFFFFFFF
        self._limited.warning(
            f"{self.name}:kernel-drops",
            "feed %s: the kernel dropped datagrams (receive buffer full), %d so far",
            self.name,
            self.kernel_drops,
        )

    def _wake_sender(self) -> None:
        """Run by Trio on behalf of a data-path thread."""
        self._wake.set()

    def _note_replay_drops(self) -> None:
        dropped = self._replay.dropped_datagrams
        if dropped != self._reported_drops:
            self._reported_drops = dropped
            self._limited.warning(
                f"{self.name}:replay-drops",
                "feed %s: replay buffer full or too old, dropped %d unacknowledged datagrams "
                "(%d bytes) so far",
                self.name,
                dropped,
                self._replay.dropped_bytes,
            )

    # -- send ----------------------------------------------------------------------------------

    def _kick(self) -> bool:
        """New data or control frames: send now if the socket takes them. True when the
        sender task must be woken (to wait for writability, or to end the connection);
        the caller holds ``_lock`` and wakes it (from a thread: through Trio)."""
        if self._sock is None or self._blocked:
            return False
        try:
            done = self._pump()
        except OSError as exc:
            self._send_error = exc
            self._blocked = True
            return True
        if not done:
            self._blocked = True
            return True
        return False

    def _sent_by_c(self, sent: int, err: int, now: float) -> bool:
        """Account for the batch ``rd_capture_batch`` sent itself (it was just appended to the
        replay buffer, which was caught up). True when the sender task must be woken: the
        socket was full, or the send failed. The caller holds ``_lock``."""
        chunk = self._replay.next_unsent()
        assert chunk is not None
        self._highest_sent = max(self._highest_sent, chunk.last_seq)
        self.frames_sent += chunk.last_seq - chunk.first_seq + 1
        self.bytes_sent += sent
        if sent:
            self._last_send = now
        if err:
            self._send_error = OSError(err, os.strerror(err))
            self._blocked = True
            return True
        if sent < len(chunk.data):
            self._pending = memoryview(chunk.data)[sent:]
            self._blocked = True
            return True
        return False

    def _pump(self) -> bool:
        """Write pending bytes, control frames, then unsent chunks; True when all is sent,
        False when the socket is full. Raises OSError when the connection broke."""
        sock = self._sock
        if sock is None:
            return True
        replay = self._replay
        send = sock.send
        while True:
            data = self._pending
            if data is None:
                if self._control:
                    data = memoryview(self._control.popleft())
                else:
                    chunk = replay.next_unsent()
                    if chunk is None:
                        return True
                    if chunk.first_seq <= self._highest_sent:
                        self.resent_datagrams += (
                            min(chunk.last_seq, self._highest_sent) - chunk.first_seq + 1
                        )
                    self._highest_sent = max(self._highest_sent, chunk.last_seq)
                    self.frames_sent += chunk.last_seq - chunk.first_seq + 1
                    data = memoryview(chunk.data)
            try:
                sent = send(data)
            except BlockingIOError:
                self._pending = data
                return False
            self.bytes_sent += sent
            self._last_send = time.monotonic()
            if sent < len(data):
                self._pending = data[sent:]
            else:
                self._pending = None

    async def _sender(self, sock: socket.socket) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while True:
                with self._lock:
                    if self._send_error is not None:
                        raise _ConnectionEndedError(f"send failed: {self._send_error}")
                    try:
                        if self._pump():
                            self._blocked = False
                            break
                    except OSError as exc:
                        raise _ConnectionEndedError(f"send failed: {exc}") from None
                    self._blocked = True
                await trio.lowlevel.wait_writable(sock)

    async def _heartbeats(self) -> None:
        interval = self.config.heartbeat_interval
        while True:
            now = time.monotonic()
            with self._lock:
                due = self._last_send + interval
                if now >= due:
                    self._last_send = now
                    if not self._blocked and self._pending is None:
                        self._control.append(wire.encode_heartbeat(time.time_ns()))
                        if self._kick():
                            self._wake.set()
                    due = now + interval
                self._apply_acks()
                if self._replay.expire(now):
                    self._note_replay_drops()
            await trio.sleep(max(0.0, due - now))

    # -- receive ACKs ---------------------------------------------------------------------------

    def _apply_acks(self) -> None:
        """Trim the replay buffer to the latest ACK the C reader saw (the caller holds
        ``_lock``): the receive threads do it once per batch, the heartbeat task when idle."""
        rx = self._rx
        if rx is not None:
            acked = rx.acked
            if acked > self._replay.acked_seq:
                self._replay.ack(acked)

    async def _reader_c(self, sock: socket.socket, conn: wire.CaptureConnection) -> None:
        """``_reader`` on the C data plane: a thread blocked in ``rd_capture_read``, which keeps
        the highest ACK and skips HEARTBEATs without the GIL; the receive threads apply the
        ACK. Python decodes only what the C reader hands back (an ERROR, a bad frame)."""
        await run_stoppable(functools.partial(self._read_c, sock, conn))

    def _read_c(
        self,
        sock: socket.socket,
        conn: wire.CaptureConnection,
        stop_fd: int,
        _token: trio.lowlevel.TrioToken,
    ) -> None:
        lib = self._lib
        assert lib is not None
        idle = self.config.idle_timeout
        buffer = (ctypes.c_uint8 * _RECV_SIZE)()
        rx = fastpath.CaptureReaderState(
            tcp_fd=sock.fileno(),
            stop_fd=stop_fd,
            idle_ns=int(idle * 1e9),
            buf=ctypes.addressof(buffer),
            cap=_RECV_SIZE,
        )
        leftover = conn.take_buffered()  # bytes after the welcome ACK
        if len(leftover) > _RECV_SIZE // 2:  # at most one frame: never, but never overrun
            raise _ConnectionEndedError(f"{len(leftover)} bytes pending after the welcome")
        ctypes.memmove(buffer, leftover, len(leftover))
        rx.end = len(leftover)
        ref = ctypes.byref(rx)
        with self._lock:
            self._rx = rx
        try:
            while True:
                why = lib.capture_read(ref)
                if why == fastpath.RD_STOPPED:
                    return
                if why == fastpath.RD_CONTROL:
                    self._handle(conn, bytes(buffer[rx.start : rx.end]))
                    raise _ConnectionEndedError(
                        "protocol error from the emit side: undecodable frame "
                        + bytes(buffer[rx.start : min(rx.end, rx.start + 16)]).hex()
                    )
                if why == fastpath.RD_EOF:
                    raise _ConnectionEndedError("closed by the emit side")
                if why == fastpath.RD_RESET:
                    raise _ConnectionEndedError(f"receive failed: {os.strerror(rx.err)}")
                if why == fastpath.RD_IDLE:
                    raise _ConnectionEndedError(f"nothing received for {idle:g} s")
                raise RuntimeError(f"rd_capture_read returned {why}")
        finally:
            with self._lock:
                self._apply_acks()
                self._rx = None

    async def _reader(self, sock: socket.socket, conn: wire.CaptureConnection) -> None:
        idle = self.config.idle_timeout
        while True:
            with trio.move_on_after(idle) as scope:
                await trio.lowlevel.wait_readable(sock)
            if scope.cancelled_caught:
                raise _ConnectionEndedError(f"nothing received for {idle:g} s")
            self._handle(conn, self._recv(sock))

    def _recv(self, sock: socket.socket) -> bytes:
        try:
            data = sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError as exc:
            raise _ConnectionEndedError(f"receive failed: {exc}") from None
        if not data:
            raise _ConnectionEndedError("closed by the emit side")
        return data

    def _decode(self, conn: wire.CaptureConnection, data: bytes) -> list[wire.Event]:
        try:
            return conn.receive(data)
        except wire.ProtocolError as exc:
            raise _ConnectionEndedError(f"protocol error from the emit side: {exc}") from None

    def _handle(self, conn: wire.CaptureConnection, data: bytes) -> None:
        """Apply what the emit side says while streaming: ACKs trim the replay buffer."""
        for event in self._decode(conn, data):
            if isinstance(event, wire.Ack):
                with self._lock:
                    self._replay.ack(event.seq)
            elif isinstance(event, wire.Error):
                self._peer_error(event)

    def _peer_error(self, event: wire.Error) -> None:
        self.errors_from_peer[event.code] += 1
        try:
            name = wire.ErrorCode(event.code).name
        except ValueError:
            name = "UNKNOWN"
        self._limited.warning(
            f"{self.name}:peer-error:{event.code}",
            "feed %s: the emit side %s sent ERROR %d (%s): %s",
            self.name,
            self.peer,
            event.code,
            name,
            event.message,
        )
        raise _PeerRefusedError(f"ERROR {event.code} ({name}) from the emit side: {event.message}")

    # -- connections ----------------------------------------------------------------------------

    async def _resolve(self) -> list[tuple[str, int]]:
        addresses: list[tuple[str, int]] = []
        for target in self.config.targets:
            try:
                infos = await trio.socket.getaddrinfo(
                    target.host, target.port, family=socket.AF_INET, type=socket.SOCK_STREAM
                )
            except OSError as exc:
                self._last_error = f"{target.host}:{target.port}: cannot resolve: {exc}"
                self._limited.warning(
                    f"{self.name}:resolve:{target.host}",
                    "feed %s: cannot resolve %s: %s",
                    self.name,
                    target.host,
                    exc,
                )
                continue
            for info in infos:
                address = (str(info[4][0]), int(info[4][1]))
                if address not in addresses:
                    addresses.append(address)
        return addresses

    async def _connect_loop(self) -> None:
        failures = 0
        attempt = 0
        while True:
            addresses = await self._resolve()
            streamed = 0.0
            if addresses:
                address = addresses[attempt % len(addresses)]
                attempt += 1
                streamed = await self._session(address)
            if streamed >= STABLE_AFTER:
                failures = 0
            else:
                failures += 1
            await trio.sleep(backoff_delay(failures, self._rng))

    async def _session(self, address: tuple[str, int]) -> float:
        """One connection: connect, handshake, stream until it ends. Returns how long it
        streamed (0 when it never got there); never raises for network trouble."""
        peer = f"{address[0]}:{address[1]}"
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        started = 0.0
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = wire.CaptureConnection(self.name, self.session_id, self._key)
            try:
                with trio.fail_after(self.config.connect_timeout):
                    welcome = await self._handshake(sock, address, conn)
            except (OSError, trio.TooSlowError, _ConnectionEndedError) as exc:
                refused = isinstance(exc, _PeerRefusedError)
                self.connects["refused" if refused else "failed"] += 1
                reason = str(exc) or "timed out"
                if isinstance(exc, trio.TooSlowError):
                    reason = f"no welcome within {self.config.connect_timeout:g} s"
                self._last_error = f"{peer}: {reason}"
                self._limited.warning(
                    f"{self.name}:connect:{peer}",
                    "feed %s: cannot stream to %s: %s",
                    self.name,
                    peer,
                    reason,
                )
                return 0.0
            self.connects["ok"] += 1
            self._wake = trio.Event()
            with self._lock:
                resend = self._replay.rewind(welcome)
                self.peer = peer
                self._pending = None
                self._control.clear()
                self._blocked = False
                self._send_error = None
                self._last_send = time.monotonic()
                self._sock = sock
            started = trio.current_time()
            log.info(
                "feed %s: streaming to %s (welcome ACK %d, %d datagrams to resend)",
                self.name,
                peer,
                welcome,
                resend,
            )
            reason = await self._stream(sock, conn)
            self._last_error = f"{peer}: {reason}"
            self._limited.warning(
                f"{self.name}:lost:{peer}",
                "feed %s: connection to %s ended: %s",
                self.name,
                peer,
                reason,
            )
            return trio.current_time() - started
        finally:
            with self._lock:
                if trio.current_effective_deadline() == -math.inf and self._sock is sock:
                    self._goodbye(sock)
                if self._sock is sock:
                    self._down_since = time.monotonic()
                self._sock = None
                self._pending = None
                self.peer = None
            sock.close()

    async def _handshake(
        self, sock: socket.socket, address: tuple[str, int], conn: wire.CaptureConnection
    ) -> int:
        err = sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        await trio.lowlevel.wait_writable(sock)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        welcome: int | None = None
        while welcome is None:
            await trio.lowlevel.wait_readable(sock)
            for event in self._decode(conn, self._recv(sock)):
                if isinstance(event, wire.Challenge):
                    await send_all(sock, conn.hello(event))
                elif isinstance(event, wire.Error):
                    self._peer_error(event)
                elif isinstance(event, wire.Ack):
                    if welcome is None:
                        welcome = event.seq
                    else:
                        with self._lock:
                            self._replay.ack(event.seq)
        return welcome

    async def _stream(self, sock: socket.socket, conn: wire.CaptureConnection) -> str:
        """Run reader, sender and heartbeats until one of them ends the connection."""
        reason = "stopped"

        async def guard(task: Callable[[], Awaitable[None]]) -> None:
            nonlocal reason
            try:
                await task()
            except _ConnectionEndedError as exc:
                reason = str(exc)
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            reader = self._reader if self._lib is None else self._reader_c
            nursery.start_soon(guard, lambda: reader(sock, conn))
            nursery.start_soon(guard, lambda: self._sender(sock))
            nursery.start_soon(guard, self._heartbeats)
            with self._lock:
                if self._kick():  # the resend starts at once
                    self._wake.set()
        return reason

    def _goodbye(self, sock: socket.socket) -> None:
        """Say why we close (on stop), when the stream is at a frame boundary."""
        try:
            if self._pending is not None:
                sent = sock.send(self._pending)
                if sent < len(self._pending):
                    return
            sock.send(wire.encode_error(self._close_code, self._close_message))
        except OSError:
            pass
