"""A capture feed: join multicast groups, frame every datagram, stream it to the emit side.

Two halves that never wait for each other: the receive threads (relayd/capture/receive.py)
and the connection loop here, which connects to the targets (every address of every name),
does the CHALLENGE / HELLO / welcome ACK exchange, rewinds the replay buffer to the welcome
ACK and streams (relayd/capture/uplink.py). While streaming, a sender task takes over whenever
the socket is full, a heartbeat task speaks when the stream is idle, and the data plane's ACK
reader (a thread) keeps the highest ACK, which trims the replay buffer, and watches
``idle_timeout``. Any error ends the connection; the loop reconnects with jittered
exponential backoff capped at 2 s.

The receive threads go on while the TCP side is slow, stalled or reconnecting: the replay
buffer absorbs it, bounded in bytes and age, and its drops are counted and logged.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import math
import os
import random
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal

import attrs
import trio

from relayd import wire
from relayd.capture.receive import Receive
from relayd.capture.uplink import SendFailedError, Uplink
from relayd.config import CaptureFeed
from relayd.datapath import DataPlane, Why, run_stoppable, select_plane
from relayd.keys import load_auth_keys
from relayd.logs import RateLimitedLogger
from relayd.netif import GroupReceiver, open_group_receivers, resolve_interface, send_all
from relayd.replay import ReplayBuffer
from relayd.runtime import FeedHealth, MetricType, Sample

__all__ = ["BACKOFF_CAP", "CaptureFeedRuntime", "backoff_delay"]

log = logging.getLogger("relayd.capture")

#: Reconnect delays: first retry after a failure, growth factor, cap.
BACKOFF_FIRST = 0.05
BACKOFF_CAP = 2.0
#: A connection that streamed at least this long resets the backoff.
STABLE_AFTER = 1.0
#: Bytes read per ``recv`` during the handshake.
_HANDSHAKE_RECEIVE_SIZE = 64 * 1024


def backoff_delay(failures: int, rng: random.Random | None = None) -> float:
    """Delay before the next attempt after ``failures`` consecutive failures (0: none)."""
    if failures <= 0:
        return 0.0
    base = min(BACKOFF_CAP, BACKOFF_FIRST * 2.0 ** (failures - 1))
    return base * (rng or random).uniform(0.5, 1.0)


class _ConnectionEndedError(Exception):
    """The current connection is over (error, timeout, peer close); reconnect."""


class _PeerRefusedError(_ConnectionEndedError):
    """The emit side sent ERROR (it refused the HELLO, or it is closing)."""


class CaptureFeedRuntime:
    """One ``[[capture]]`` feed (the ``relayd.runtime.Feed`` protocol, kind "capture")."""

    kind: Literal["emit", "capture"] = "capture"

    def __init__(self, config: CaptureFeed, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.name = config.name
        self.session_id = os.urandom(wire.SESSION_ID_SIZE)
        self._key: bytes | None = None  # read by open(): a missing key fails the start
        self._rng = rng or random.Random()
        self._limited = RateLimitedLogger(log)
        self._replay = ReplayBuffer(config.replay_max_bytes, config.replay_max_age)
        self.uplink = Uplink(config.name, self._replay, self._limited)
        self.receive = Receive(config.name, self.uplink, self._limited)
        self._close_code = int(wire.ErrorCode.SHUTTING_DOWN)
        self._close_message = "capture side shutting down"
        self._wake = trio.Event()
        self._plane: DataPlane | None = None
        self.peer: str | None = None
        self.receivers: list[GroupReceiver] = []
        self._interface: object = None
        # health (Trio clock)
        self._started = False
        self._down_since = 0.0
        self._last_error = ""
        # metrics
        self.connects: collections.Counter[str] = collections.Counter()
        self.errors_from_peer: collections.Counter[int] = collections.Counter()

    # -- Feed protocol ---------------------------------------------------------------------

    def set_close_reason(self, code: int, message: str) -> None:
        self._close_code = code
        self._close_message = message

    def update_keys(self, config: CaptureFeed) -> bool:
        """Take ``config`` without a restart when it differs from the running one in
        ``auth_key_file`` only: read the file again for the next connection (the current
        connection, session and replay buffer are kept). False when a restart is needed.
        Raises KeyFileError and keeps the current key when the file cannot be used."""
        old = self.config
        if attrs.evolve(old, auth_key_file=config.auth_key_file) != config or not (
            old.auth_key_file or config.auth_key_file
        ):
            return False
        path = config.auth_key_file
        self._key = None if path is None else load_auth_keys([path])[0]
        self.config = config
        return True

    @property
    def connected(self) -> bool:
        return self.uplink.connected

    @property
    def replay(self) -> ReplayBuffer:
        return self._replay

    @property
    def datagrams_in(self) -> int:
        return self.receive.datagrams_in

    @property
    def kernel_drops(self) -> int:
        return self.receive.kernel_drops

    def health(self) -> FeedHealth:
        self.uplink.apply_acks()
        replay = self._replay
        detail: dict[str, object] = {
            "peer": self.peer,
            "acked_seq": replay.acked_seq,
            "last_seq": self.receive.seq,
            "unacked_datagrams": replay.unacked_datagrams,
            "replay_bytes": replay.total_bytes,
            "replay_dropped_datagrams": replay.dropped_datagrams,
            "kernel_drops": self.receive.kernel_drops,
        }
        datagrams = self.receive.datagrams_in
        if not self._started:
            return FeedHealth(False, "starting", detail, 0, datagrams)
        if self.uplink.connected:
            return FeedHealth(True, "streaming", detail, 1, datagrams)
        down = trio.current_time() - self._down_since
        detail["disconnected_for"] = round(down, 3)
        detail["last_error"] = self._last_error
        healthy = down <= self.config.reconnect_budget
        state = "reconnecting" if healthy else "disconnected"
        return FeedHealth(healthy, state, detail, 0, datagrams)

    def samples(self) -> Iterable[Sample]:
        self.uplink.apply_acks()
        feed = (("feed", self.name),)
        replay = self._replay
        uplink = self.uplink
        receive = self.receive

        def one(name: str, kind: MetricType, text: str, value: float) -> Sample:
            return Sample(f"capture_{name}", kind, text, feed, value)

        yield one("datagrams_in", "counter", "Datagrams received.", receive.datagrams_in)
        yield one("bytes_in", "counter", "Payload bytes received.", receive.bytes_in)
        yield one("kernel_drops", "counter", "Datagrams the kernel dropped.", receive.kernel_drops)
        yield one("frames_sent", "counter", "DATA frames sent.", uplink.frames_sent)
        yield one("bytes_sent", "counter", "Bytes written to TCP.", uplink.bytes_sent)
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
            uplink.resent_datagrams,
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

    def open(self) -> None:
        """Read the key, find the interface and join the groups (raises when one of them
        fails; nothing stays open then)."""
        config = self.config
        if config.auth_key_file is not None:
            self._key = load_auth_keys([config.auth_key_file])[0]
        interface = resolve_interface(config.interface)
        self._plane = select_plane()
        groups = [(gp.group, gp.port) for gp in config.groups]
        self.receivers = open_group_receivers(
            groups, interface, config.receive_buffer, sources=config.sources
        )
        self._interface = interface
        capped = [r for r in self.receivers if r.receive_buffer_capped]
        if capped:
            log.warning(
                "feed %s: receive buffer capped at %d bytes (asked %d); raise "
                "net.core.rmem_max or run as root",
                self.name,
                capped[0].receive_buffer_effective,
                config.receive_buffer,
            )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self.receivers:
            self.open()
        plane = self._plane
        assert plane is not None
        try:
            async with trio.open_nursery() as nursery:
                for receiver in self.receivers:
                    nursery.start_soon(
                        run_stoppable,
                        functools.partial(self.receive.drain, plane, receiver, self._wake_sender),
                    )
                self._started = True
                self._down_since = trio.current_time()
                log.info(
                    "feed %s: joined %d groups on %s with %d sockets, data path %s",
                    self.name,
                    len(self.config.groups),
                    self._interface,
                    len(self.receivers),
                    plane.name,
                )
                task_status.started()
                await self._connect_loop()
        finally:
            for receiver in self.receivers:
                receiver.close()

    def _wake_sender(self) -> None:
        """Run by Trio on behalf of a receive thread."""
        self._wake.set()

    # -- streaming -------------------------------------------------------------------------

    async def _sender(self, sock: socket.socket) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while True:
                try:
                    if self.uplink.flush():
                        break
                except SendFailedError as exc:
                    raise _ConnectionEndedError(str(exc)) from None
                await trio.lowlevel.wait_writable(sock)

    async def _heartbeats(self) -> None:
        interval = self.config.heartbeat_interval
        while True:
            wake, wait = self.uplink.heartbeat(interval)
            if wake:
                self._wake.set()
            await trio.sleep(wait)

    async def _reader(self, sock: socket.socket, conn: wire.CaptureConnection) -> None:
        """The data plane's ACK reader, in a thread: it keeps the highest ACK (applied by the
        receive threads and Trio) and skips HEARTBEATs; anything else ends the connection."""
        assert self._plane is not None
        await run_stoppable(functools.partial(self._read, self._plane, sock, conn))

    def _read(
        self,
        plane: DataPlane,
        sock: socket.socket,
        conn: wire.CaptureConnection,
        stop_fd: int,
        _token: trio.lowlevel.TrioToken,
    ) -> None:
        idle = self.config.idle_timeout
        try:
            reader = plane.ack_reader(sock, stop_fd, conn, idle)
        except wire.ProtocolError as exc:
            raise _ConnectionEndedError(f"protocol error from the emit side: {exc}") from None
        self.uplink.reader = reader
        try:
            why = reader.run()
            if why == Why.STOPPED:
                return
            if why == Why.CONTROL:
                self._control(reader.control())
            if why == Why.EOF:
                raise _ConnectionEndedError("closed by the emit side")
            if why == Why.RESET:
                raise _ConnectionEndedError(f"receive failed: {os.strerror(reader.err)}")
            if why == Why.IDLE:
                raise _ConnectionEndedError(f"nothing received for {idle:g} s")
            raise RuntimeError(f"the ACK reader returned {why!r}")
        finally:
            self.uplink.apply_acks()
            self.uplink.reader = None

    def _control(self, decoded: list[wire.Event] | wire.ProtocolError) -> None:
        """What the ACK reader handed back ends the connection: an ERROR (the emit side
        refuses or closes), or a protocol error."""
        if isinstance(decoded, wire.ProtocolError):
            raise _ConnectionEndedError(f"protocol error from the emit side: {decoded}")
        for event in decoded:
            if isinstance(event, wire.Error):
                self._peer_error(event)
        raise _ConnectionEndedError(
            f"protocol error from the emit side: unexpected {decoded!r:.80}"
        )

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

    # -- connections -----------------------------------------------------------------------

    async def _resolve(self) -> list[tuple[str, int]]:
        addresses: list[tuple[str, int]] = []
        for target in self.config.targets:
            try:
                infos = await trio.socket.getaddrinfo(
                    target.host, target.port, family=socket.AF_INET, type=socket.SOCK_STREAM
                )
            except OSError as exc:
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
                streamed = await self._connection(address)
            if streamed >= STABLE_AFTER:
                failures = 0
            else:
                failures += 1
            await trio.sleep(backoff_delay(failures, self._rng))

    async def _connection(self, address: tuple[str, int]) -> float:
        """One connection: connect, handshake, stream until it ends. Returns how long it
        streamed (0 when it never got there); never raises for network trouble."""
        peer = f"{address[0]}:{address[1]}"
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        attached = False
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
            self.peer = peer
            resend = self.uplink.attach(sock, welcome)
            attached = True
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
            self.peer = None
            if attached:
                stopping = trio.current_effective_deadline() == -math.inf
                goodbye = (
                    wire.encode_error(self._close_code, self._close_message) if stopping else None
                )
                if self.uplink.release(sock, goodbye):
                    self._down_since = trio.current_time()
            else:
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
                        self.uplink.ack(event.seq)
        return welcome

    @staticmethod
    def _recv(sock: socket.socket) -> bytes:
        try:
            data = sock.recv(_HANDSHAKE_RECEIVE_SIZE)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError as exc:
            raise _ConnectionEndedError(f"receive failed: {exc}") from None
        if not data:
            raise _ConnectionEndedError("closed by the emit side")
        return data

    @staticmethod
    def _decode(conn: wire.CaptureConnection, data: bytes) -> list[wire.Event]:
        try:
            return conn.receive(data)
        except wire.ProtocolError as exc:
            raise _ConnectionEndedError(f"protocol error from the emit side: {exc}") from None

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
            nursery.start_soon(guard, lambda: self._reader(sock, conn))
            nursery.start_soon(guard, lambda: self._sender(sock))
            nursery.start_soon(guard, self._heartbeats)
            if self.uplink.kick():  # the resend starts at once
                self._wake.set()
        return reason
