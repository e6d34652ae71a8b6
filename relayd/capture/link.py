"""A capture feed's connection to the emit side: connect, handshake, stream, reconnect.

It connects to the targets (every address of every name), does the CHALLENGE / HELLO /
welcome ACK exchange, rewinds the replay buffer to the welcome ACK and streams through the
uplink (relayd/capture/uplink.py). While streaming, a sender task takes over whenever the
socket is full, a heartbeat task speaks when the stream is idle, and the data plane's ACK
reader (a thread) keeps the highest ACK, which trims the replay buffer, and watches
``idle_timeout``. An ACK watch ends a connection whose peer heartbeats but reads nothing:
data sent that waits ``ack_timeout`` with no ACK progress. Any error ends the connection; the
loop reconnects to the next address with jittered exponential backoff capped at 2 s. Time
here is Trio's.
"""

from __future__ import annotations

import collections
import enum
import errno
import functools
import logging
import math
import os
import random
import socket
from collections.abc import Awaitable, Callable

import trio

from relayd import wire
from relayd.capture.uplink import SendFailedError, Uplink
from relayd.config import CaptureFeed, Endpoint
from relayd.datapath import DataPlane, Why, current_beat, run_stoppable
from relayd.logs import RateLimitedLogger
from relayd.netif import send_all

__all__ = ["BACKOFF_CAP", "Connect", "Link", "backoff_delay"]

log = logging.getLogger("relayd.capture")

#: Reconnect delays: first retry after a failure, growth factor, cap.
BACKOFF_FIRST = 0.05
BACKOFF_CAP = 2.0
#: A connection that streamed at least this long resets the backoff.
STABLE_AFTER = 1.0
#: The ACK watch looks again at least this often (a fraction of ``ack_timeout``).
ACK_WATCH_STEPS = 4
#: After the goodbye, how long to wait for the emit side's final ACK (and its close).
FINAL_ACK_WAIT = 0.5
#: Before the goodbye, how many milliseconds to wait at most for a receive thread's batch
#: write to finish (it takes microseconds).
CLAIM_WAIT_STEPS = 100
#: Bytes read per ``recv`` during the handshake.
_HANDSHAKE_RECEIVE_SIZE = 64 * 1024


def backoff_delay(failures: int, rng: random.Random | None = None) -> float:
    """Delay before the next attempt after ``failures`` consecutive failures (0: none)."""
    if failures <= 0:
        return 0.0
    base = min(BACKOFF_CAP, BACKOFF_FIRST * 2.0 ** (failures - 1))
    return base * (rng or random).uniform(0.5, 1.0)


class Connect(enum.Enum):
    """How a connection attempt ended (``capture_connects``)."""

    OK = "ok"
    FAILED = "failed"
    REFUSED = "refused"  # the emit side sent ERROR


class _ConnectionEndedError(Exception):
    """The current connection is over (error, timeout, peer close); reconnect."""


class _PeerRefusedError(_ConnectionEndedError):
    """The emit side sent ERROR (it refused the HELLO, or it is closing)."""


class Link:
    """The connection loop of one capture feed, and what it counts."""

    def __init__(
        self,
        config: CaptureFeed,
        uplink: Uplink,
        limited: RateLimitedLogger,
        rng: random.Random,
        *,
        label: str | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.label = label or config.name  # in log lines: the feed, and its site if named
        self.uplink = uplink
        self._limited = limited
        self._rng = rng
        self.session_id = os.urandom(wire.SESSION_ID_SIZE)
        self.key: bytes | None = None
        self.plane: DataPlane | None = None
        self.close_code = int(wire.ErrorCode.SHUTTING_DOWN)
        self.close_message = "capture side shutting down"
        self._wake = trio.Event()
        self.peer: str | None = None
        self.last_error = ""
        self.down_since = 0.0  # Trio clock: when the last connection ended (or the start)
        self.connects: collections.Counter[Connect] = collections.Counter()
        self.ack_stalls = 0  # connections left because ACKs stalled (``ack_timeout``)
        self.errors_from_peer: collections.Counter[int] = collections.Counter()
        self._target: Endpoint | None = None  # the target of the current connection
        self._streaming: trio.CancelScope | None = None  # the current connection's tasks
        self._leaving: str | None = None  # why the current connection is being left

    def retarget(self, config: CaptureFeed) -> None:
        """A new configuration (a reload applied live): targets and timers apply from the next
        connection; a connection to a target no longer listed is left now, with the goodbye
        and the final ACK, and the next one resumes exactly."""
        self.config = config
        scope = self._streaming
        target = self._target
        if scope is not None and target is not None and target not in config.targets:
            self._leaving = f"{target.host}:{target.port} is no longer a target (reload)"
            scope.cancel()

    def wake_sender(self) -> None:
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

    async def _ack_watch(self) -> None:
        """End the connection when data sent has waited ``ack_timeout`` with no ACK progress
        (the peer welcomes and heartbeats but reads nothing, or its pump is wedged)."""
        timeout = self.config.ack_timeout
        while True:
            waited, outstanding = self.uplink.ack_wait()
            if waited >= timeout:
                self.ack_stalls += 1
                raise _ConnectionEndedError(
                    f"no ACK progress for {waited:.3g} s (ack_timeout {timeout:g} s) with "
                    f"{outstanding} datagrams unacknowledged: the emit side reads nothing, "
                    "moving to the next target"
                )
            await trio.sleep(min(timeout - waited, timeout / ACK_WATCH_STEPS))

    async def _reader(self, sock: socket.socket, conn: wire.CaptureConnection) -> None:
        """The data plane's ACK reader, in a thread: it keeps the highest ACK (applied by the
        receive threads and Trio) and skips HEARTBEATs; anything else ends the connection."""
        assert self.plane is not None
        await run_stoppable(functools.partial(self._read, self.plane, sock, conn))

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
            # The reader's loop blocks in poll on the socket and the stop pipe for the whole
            # connection (it keeps the highest ACK where the receive threads read it): judged
            # by the watchdog as waiting by design, and as moving each time it returns.
            with current_beat().wait():
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
            f"{self.label}:peer-error:{event.code}",
            "feed %s: the emit side %s sent ERROR %d (%s): %s",
            self.label,
            self.peer,
            event.code,
            name,
            event.message,
        )
        raise _PeerRefusedError(f"ERROR {event.code} ({name}) from the emit side: {event.message}")

    # -- connections -----------------------------------------------------------------------

    async def _resolve(self) -> list[tuple[tuple[str, int], Endpoint]]:
        addresses: dict[tuple[str, int], Endpoint] = {}
        for target in self.config.targets:
            try:
                infos = await trio.socket.getaddrinfo(
                    target.host, target.port, family=socket.AF_INET, type=socket.SOCK_STREAM
                )
            except OSError as exc:
                self.last_error = f"{target.host}:{target.port}: cannot resolve: {exc}"
                self._limited.warning(
                    f"{self.label}:resolve:{target.host}",
                    "feed %s: cannot resolve %s: %s",
                    self.label,
                    target.host,
                    exc,
                )
                continue
            for info in infos:
                addresses.setdefault((str(info[4][0]), int(info[4][1])), target)
        return list(addresses.items())

    async def run(self) -> None:
        """Connect, stream, reconnect, until cancelled."""
        failures = 0
        attempt = 0
        while True:
            addresses = await self._resolve()
            streamed = 0.0
            if addresses:
                address, self._target = addresses[attempt % len(addresses)]
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
            conn = wire.CaptureConnection(self.name, self.session_id, self.key)
            try:
                with trio.fail_after(self.config.connect_timeout):
                    welcome = await self._handshake(sock, address, conn)
            except (OSError, trio.TooSlowError, _ConnectionEndedError) as exc:
                refused = isinstance(exc, _PeerRefusedError)
                self.connects[Connect.REFUSED if refused else Connect.FAILED] += 1
                reason = str(exc) or "timed out"
                if isinstance(exc, trio.TooSlowError):
                    reason = f"no welcome within {self.config.connect_timeout:g} s"
                self.last_error = f"{peer}: {reason}"
                self._limited.warning(
                    f"{self.label}:connect:{peer}",
                    "feed %s: cannot stream to %s: %s",
                    self.label,
                    peer,
                    reason,
                )
                return 0.0
            self.connects[Connect.OK] += 1
            self._wake = trio.Event()
            self.peer = peer
            resend = self.uplink.attach(sock, welcome)
            attached = True
            started = trio.current_time()
            log.info(
                "feed %s: streaming to %s (welcome ACK %d, %d datagrams to resend)",
                self.label,
                peer,
                welcome,
                resend,
            )
            reason = await self._stream(sock, conn)
            self.last_error = f"{peer}: {reason}"
            self._limited.warning(
                f"{self.label}:lost:{peer}",
                "feed %s: connection to %s ended: %s",
                self.label,
                peer,
                reason,
            )
            return trio.current_time() - started
        finally:
            self.peer = None
            if attached:
                stopping = (
                    trio.current_effective_deadline() == -math.inf or self._leaving is not None
                )
                message = self.close_message if self._leaving is None else self._leaving
                goodbye = wire.encode_error(self.close_code, message) if stopping else None
                if goodbye is not None and self.uplink.refuse_claims():
                    # a receive thread is writing a batch: the goodbye goes after it, so the
                    # final ACK can cover what it wrote (else the next host may get it again)
                    # (a flag a thread clears, no event to wait on: looked at every 1 ms)
                    with trio.CancelScope(shield=True):
                        for _ in range(CLAIM_WAIT_STEPS):
                            if not self.uplink.claimed:
                                break
                            await trio.sleep(0.001)
                current, said = self.uplink.release(sock, goodbye)
                if current:
                    self.down_since = trio.current_time()
                if said:
                    try:
                        await self._final_ack(sock, conn)
                    finally:
                        sock.close()
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

    async def _final_ack(self, sock: socket.socket, conn: wire.CaptureConnection) -> None:
        """After the goodbye: take the emit side's final ACK (it trims the replay buffer, so
        what is left is exactly what this session loses) until it closes, briefly."""
        with trio.CancelScope(deadline=trio.current_time() + FINAL_ACK_WAIT, shield=True):
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    events = self._decode(conn, self._recv(sock))
                except _ConnectionEndedError:
                    return  # closed (the usual end), reset, or out of frame
                for event in events:
                    if isinstance(event, wire.Ack):
                        self.uplink.ack(event.seq)

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

        self._leaving = None
        try:
            async with trio.open_nursery() as nursery:
                self._streaming = nursery.cancel_scope
                nursery.start_soon(guard, lambda: self._reader(sock, conn))
                nursery.start_soon(guard, lambda: self._sender(sock))
                nursery.start_soon(guard, self._heartbeats)
                nursery.start_soon(guard, self._ack_watch)
                if self.uplink.kick():  # the resend starts at once
                    self._wake.set()
        finally:
            self._streaming = None
        return self._leaving or reason
