"""An emit feed: one TCP listener whose DATA frames go out as multicast.

The cloud half of the data path. ``EmitFeedRuntime(config)`` implements
:class:`relayd.runtime.Feed`: ``run`` binds the listener, opens the multicast sender and serves
capture connections until cancelled.

Connections
-----------
Every accepted peer outside ``allowed_sources`` is closed at once. Everyone else gets a
CHALLENGE and must answer with a valid HELLO within ``hello_timeout``. Until then a connection
is *pending*: it costs one file descriptor and one small task, and it does not hold one of the
``max_connections`` slots. Pending connections have a cap of their own
(``pending_limit``, default ``max(16, 8 * max_connections)``); when it is reached the oldest
pending connection is closed to make room, so a flood of silent connections (load-balancer
probes, scanners, half-open floods) can neither exhaust the slots a real capture side needs nor
grow without bound. ``max_connections`` counts only connections past a valid HELLO.

A HELLO whose session already has a connection here supersedes it: that older connection (a
capture process that reconnected before this side noticed the old TCP stream died) is closed,
so it never blocks the reconnect with TOO_MANY_CONNECTIONS and never competes with it.

Sessions
--------
The feed remembers, per ``session_id``, the highest sequence it emitted (at most
``SESSION_LIMIT`` sessions, least recently used forgotten first). The welcome ACK carries it,
DATA at or below it is counted as a duplicate and not emitted again, DATA above ``highest + 1``
counts a gap (not for the first DATA of a session this host has not seen before: after a
failover the capture side resends only what the previous host did not acknowledge).

Hot path
--------
After the HELLO (handled in Trio) the connection's data path runs in a thread of its own
(``trio.to_thread``): it blocks in ``poll`` on the TCP socket and a stop pipe, reads a chunk
with ``recv_into`` into a preallocated buffer, decodes it completely and sends every datagram
with a non-blocking ``sendto``, blocking in ``poll`` only on ``EAGAIN``. Measured against the
Trio task it replaces (docs/PERFORMANCE.md), it saves the ``epoll_ctl`` and the run-loop pass
of every wait: about a quarter of emit's CPU per datagram at 10k/s and half of the relay's
median latency. The Trio side keeps the writer below, cancellation (a cancelled connection
writes to the stop pipe; the thread returns at once), health and metrics; the thread asks Trio
to wake the writer at most once per ACK. One thread per session at a time: a connection that
supersedes another waits until the old thread has returned, so dedup by the session's highest
sequence stays exact. Destinations are cached per ``(group, port)``; the cache holds only
allowed destinations, so the allowlist costs one dict lookup per datagram. Counters are
integer adds per chunk under one lock; the capture-to-emit latency histogram is updated once
per chunk, from the chunk's last datagram.

On the C data plane (``relayd/_fastpath.c``, the default when it loads) the thread runs
``_pump_c`` instead: ``rd_emit_pump`` does the poll, recv, decode, dedup and send without the
GIL, on a socket connected to each destination, with its own per-connection destination table
filled by ``_verdict``; it returns to Python only for a control or malformed frame (the Python
decoder judges it), a new destination, a send error or the end. Its counters are added to the
feed's by ``_sync``, when it returns and when health or metrics are read.

ACKs (coalesced: at most one per ``ACK_INTERVAL``, and always soon after the stream goes quiet)
and a HEARTBEAT after ``heartbeat_interval`` without other output are sent by a second task per
connection (``_writer``), or by the C pump itself on the C data plane. If such a send cannot
complete within ``idle_timeout`` the peer has stopped reading: it is closed with SLOW_CONSUMER.
A connection that sends nothing for ``idle_timeout`` is closed with IDLE_TIMEOUT.

Send errors on the multicast socket (ENOBUFS, ENETUNREACH, EPERM, ...) drop that datagram, are
counted by errno name and logged (rate-limited). The feed is unhealthy from a failed send until
the next successful one (or until ``FAILING_HOLD`` seconds pass with no send at all, so an idle
standby instance does not stay unhealthy forever).

Health
------
Healthy means: the listener is bound and the multicast sender is not failing. An instance that
is ready but has no capture connection is healthy (otherwise the load balancer would never
route the feed to it).

Authentication keys: ``keys`` given to the constructor are used as they are; when ``keys`` is
None, ``run`` reads ``config.auth_key_files`` with :func:`load_auth_keys` before it reports
ready, so an unreadable key file fails the start.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import math
import os
import select
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Final, Literal

import trio

from relayd import fastpath
from relayd.config import MIN_KEY_BYTES, EmitFeed, MissingKeyFileError
from relayd.datapath import run_stoppable, wait_writable
from relayd.logs import RateLimitedLogger
from relayd.metrics import LatencyHistogram, Rate
from relayd.netif import InterfaceError, open_multicast_sender, resolve_interface, send_all
from relayd.runtime import FeedHealth, Sample
from relayd.wire import (
    Datagram,
    EmitConnection,
    Error,
    ErrorCode,
    HandshakeError,
    Heartbeat,
    ProtocolError,
    State,
    encode_ack,
    encode_error,
    encode_heartbeat,
)

__all__ = [
    "ACK_INTERVAL",
    "FAILING_HOLD",
    "MIN_KEY_BYTES",
    "SESSION_LIMIT",
    "EmitFeedRuntime",
    "KeyFileError",
    "KeyFileMissingError",
    "load_auth_keys",
]

log = logging.getLogger("relayd.emit")

#: Shortest time between two ACKs on one connection (ACKs are coalesced, not per datagram).
ACK_INTERVAL: Final = 0.002
#: Sessions remembered per feed for deduplication.
SESSION_LIMIT: Final = 1024
#: A failed send keeps the feed unhealthy at most this long when no send follows it.
FAILING_HOLD: Final = 30.0
#: How long a deliberate close waits for the peer's FIN after ERROR and our FIN.
LINGER: Final = 0.2
#: Bytes read per ``recv`` while streaming (about 1400 DATA frames of 160-byte payloads).
RECEIVE_SIZE: Final = 256 * 1024
#: Bytes read per ``recv`` before the HELLO.
HANDSHAKE_RECEIVE_SIZE: Final = 2048
#: Destinations with a connected socket of their own (C data path) per feed; more use one
#: shared socket.
CONNECTED_DESTINATIONS: Final = 256
#: Destinations cached at most; the cache is cleared when it grows past this.
DESTINATION_CACHE_LIMIT: Final = 65536
#: SO_SNDBUF of capture connections (only ACK, HEARTBEAT and ERROR frames go that way).
CONTROL_SEND_BUFFER: Final = 16 * 1024
#: Accepts in a row before the accept loop yields to other tasks.
ACCEPT_BATCH: Final = 64

_DROP_REASONS: Final = ("group_not_allowed", "port_not_allowed", "send_error")
_REJECT_REASONS: Final = (
    "source",
    "limit",
    "pending_limit",
    "hello_timeout",
    "no_hello",
    "wrong_feed",
    "auth",
    "version",
    "protocol",
    "peer_error",
)
_CLOSE_REASONS: Final = (
    "eof",
    "reset",
    "peer_error",
    "idle_timeout",
    "protocol",
    "slow_consumer",
    "superseded",
    "stopped",
    "internal_error",
)
_HANDSHAKE_REJECT: Final = {
    ErrorCode.WRONG_FEED: "wrong_feed",
    ErrorCode.AUTH_FAILED: "auth",
    ErrorCode.UNSUPPORTED_VERSION: "version",
}


class KeyFileError(Exception):
    """An authentication key file that cannot be used."""


class KeyFileMissingError(KeyFileError, MissingKeyFileError):
    """A key file that does not exist (yet): the supervisor retries the feed with backoff."""


def load_auth_keys(paths: Iterable[Path]) -> tuple[bytes, ...]:
    """The keys in ``paths``: each file's bytes with surrounding whitespace removed.

    A key must be at least ``MIN_KEY_BYTES`` bytes (e.g. 32 random bytes, or their hex or
    base64 text: the text itself is the key, as the capture side reads it the same way).
    """
    keys = []
    for path in paths:
        try:
            data = Path(path).read_bytes().strip()
        except FileNotFoundError:
            raise KeyFileMissingError(f"key file {path} does not exist (yet)") from None
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from None
        if len(data) < MIN_KEY_BYTES:
            raise KeyFileError(f"key file {path} holds fewer than {MIN_KEY_BYTES} bytes")
        keys.append(data)
    return tuple(keys)


class _Session:
    __slots__ = ("_highest", "connection", "pump", "pump_done", "session_id")

    def __init__(self, session_id: bytes) -> None:
        self.session_id = session_id
        self._highest = 0
        self.connection: _Connection | None = None  # the connection streaming it, if any
        # set when the data-path thread of the session's latest connection has returned
        self.pump_done: trio.Event | None = None
        # the C data path's state while it streams this session (it holds ``highest`` then)
        self.pump: fastpath.EmitState | None = None

    @property
    def highest(self) -> int:
        """Highest sequence emitted (or deliberately skipped)."""
        pump = self.pump
        return self._highest if pump is None else int(pump.highest)

    @highest.setter
    def highest(self, value: int) -> None:
        self._highest = value


class _Connection:
    __slots__ = (
        "ack_requested",
        "acked",
        "error",
        "id",
        "peer",
        "pump",
        "reason",
        "scope",
        "session",
        "sock",
        "unsent",
        "wake",
    )

    def __init__(self, conn_id: int, sock: socket.socket, peer: str) -> None:
        self.id = conn_id
        self.sock = sock
        self.peer = peer
        self.scope = trio.CancelScope()
        self.session: _Session | None = None
        self.acked = -1  # highest sequence ACKed to the peer (-1: not even the welcome)
        self.wake = trio.Event()  # set when an ACK is due
        self.ack_requested = False  # the data-path thread asked Trio to set ``wake``
        self.error: tuple[int, str] | None = None  # the ERROR (code, text) to close with
        self.reason: str | None = None  # why a streaming connection ended (connections_closed)
        self.unsent = b""  # the rest of a control frame the C data path could not finish
        self.pump: fastpath.EmitState | None = None  # the C data path's state, while it runs

    @property
    def acked_seq(self) -> int:
        """Highest sequence ACKed so far (0 before the welcome ACK)."""
        pump = self.pump
        return max(self.acked, 0) if pump is None else int(pump.acked)

    def request_ack(self) -> None:
        """Run by Trio on behalf of the data-path thread."""
        self.wake.set()

    def end(self, code: int, message: str, reason: str | None) -> None:
        """End the connection with ERROR(code, message), counted as ``reason``."""
        if self.error is None:
            self.error = (code, message)
            self.reason = reason
        self.scope.cancel()


class _Stats:
    """Plain integer counters, added to once per chunk."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "connections_accepted",
        "datagrams_in",
        "datagrams_out",
        "decode_errors",
        "duplicates",
        "frames_in",
        "gap_sequences",
        "gaps",
        "send_waits",
    )

    def __init__(self) -> None:
        self.frames_in = 0
        self.bytes_in = 0
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.bytes_out = 0
        self.duplicates = 0
        self.gaps = 0
        self.gap_sequences = 0
        self.connections_accepted = 0
        self.decode_errors = 0
        self.send_waits = 0  # times the multicast socket was full (EAGAIN) and we waited


#: ``struct rd_emit`` counters, in the order ``_sync`` unpacks them.
_C_COUNTERS: Final = (
    "bytes_in",
    "frames_in",
    "datagrams_in",
    "datagrams_out",
    "bytes_out",
    "duplicates",
    "gaps",
    "gap_sequences",
    "send_waits",
    "denied_group",
    "denied_port",
    "latency_count",
)


class _PumpLink:
    """A running C data path and what of its counters the feed has counted already."""

    __slots__ = ("last", "latency", "latency_sum_ns", "state")

    def __init__(self, state: fastpath.EmitState) -> None:
        self.state = state
        self.last = [0] * len(_C_COUNTERS)
        self.latency = [0] * len(state.latency)
        self.latency_sum_ns = 0


class EmitFeedRuntime:
    """One ``[[emit]]`` feed: listener, HELLO gate, decode, dedup, multicast send."""

    kind: Literal["emit", "capture"] = "emit"  # the type relayd.runtime.Feed declares

    def __init__(
        self,
        config: EmitFeed,
        *,
        keys: Sequence[bytes] | None = None,
        pending_limit: int | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self._keys: tuple[bytes, ...] | None = None if keys is None else tuple(keys)
        self.pending_limit = (
            pending_limit if pending_limit is not None else max(16, 8 * config.max_connections)
        )
        #: The bound TCP port, once ``run`` reported ready (useful with port 0).
        self.listen_port: int | None = None
        self.interface_address: IPv4Address | None = None
        self._close_reason: tuple[int, str] = (
            ErrorCode.SHUTTING_DOWN,
            "relay shutting down",
        )
        self._state = "starting"
        self._listening = False
        self._mcast: socket.socket | None = None
        self._sessions: OrderedDict[bytes, _Session] = OrderedDict()
        self._pending: dict[int, _Connection] = {}
        self._active: dict[int, _Connection] = {}
        self._next_id = 0
        # allowed destinations only: (group << 16 | port) -> ("a.b.c.d", port)
        self._dests: dict[int, tuple[str, int]] = {}
        # sockets connected to allowed destinations, for the C data path (_connected_fd)
        self._connected: dict[int, socket.socket] = {}
        # refused destinations: (group << 16 | port) -> drop reason
        self._denied: dict[int, str] = {}
        self.stats = _Stats()
        self.dropped: dict[str, int] = dict.fromkeys(_DROP_REASONS, 0)
        self.rejected: dict[str, int] = dict.fromkeys(_REJECT_REASONS, 0)
        self.closed: dict[str, int] = dict.fromkeys(_CLOSE_REASONS, 0)
        self.send_errors: dict[str, int] = {}
        self.latency = LatencyHistogram()
        self._started_at = time.monotonic()
        self._last_datagram_at: float | None = None
        # time of the latest failed send while failing; None after a successful one
        self._send_failed_at: float | None = None
        self._last_error: str | None = None
        self._rate_out = Rate(window=10.0)
        self._rate_in_bytes = Rate(window=10.0)
        self._rlog = RateLimitedLogger(log, interval=10.0, max_keys=256)
        # Data-path threads (one per streaming connection) and Trio share the counters, the
        # destination caches, the histogram and the rate-limited logger: updated under this
        # lock, once per chunk.
        self._lock = threading.Lock()
        self._limiter: trio.CapacityLimiter | None = None
        self._lib: fastpath.DataPlane | None = None  # None: the Python data path
        self._pumps: list[_PumpLink] = []  # running C data paths

    # -- Feed interface ---------------------------------------------------------------------

    def set_close_reason(self, code: int, message: str) -> None:
        """What every connection is told (ERROR code and text) when the feed is cancelled."""
        self._close_reason = (int(code), message)

    def update_keys(self, config: EmitFeed) -> None:
        """Read ``config.auth_key_files`` again and use them for every later HELLO (a reload
        that rotates keys); streaming connections are not touched. Raises KeyFileError and
        keeps the current keys when a file cannot be used."""
        self._keys = load_auth_keys(config.auth_key_files)
        if (config.allowed_groups, config.allowed_ports) != (
            self.config.allowed_groups,
            self.config.allowed_ports,
        ):
            with self._lock:
                self._dests.clear()  # the destination caches encode the allowlist
                self._denied.clear()
                for link in self._pumps:
                    link.state.clear_dests = 1
                self.config = config
        self.config = config

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        if self._keys is None:
            self._keys = load_auth_keys(cfg.auth_key_files)
        self.interface_address = resolve_interface(cfg.interface)
        self._lib = fastpath.load()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        mcast: socket.socket | None = None
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((cfg.listen.host, cfg.listen.port))
            listener.listen(socket.SOMAXCONN)
            listener.setblocking(False)
            mcast = open_multicast_sender(
                self.interface_address, cfg.ttl, cfg.loop, cfg.send_buffer
            )
            self._mcast = mcast
            self.listen_port = listener.getsockname()[1]
            self._started_at = time.monotonic()
            # no shared thread pool limit: connections are bounded by max_connections
            self._limiter = trio.CapacityLimiter(math.inf)
            async with trio.open_nursery() as outer:
                outer.start_soon(self._tick)
                async with trio.open_nursery() as handlers:
                    self._listening = True
                    self._state = "listening"
                    log.info(
                        "emit feed %s listening on %s:%d, multicast out of %s ttl %d, data path %s",
                        self.name,
                        cfg.listen.host,
                        self.listen_port,
                        self.interface_address,
                        cfg.ttl,
                        fastpath.describe(),
                    )
                    task_status.started()
                    await self._accept_loop(listener, handlers)
        finally:
            self._listening = False
            self._state = "stopped"
            trio.lowlevel.notify_closing(listener)
            listener.close()
            if mcast is not None:
                mcast.close()
            with self._lock:
                for sock in self._connected.values():
                    sock.close()
                self._connected.clear()

    def health(self) -> FeedHealth:
        self._sync_all()
        failing = self._sending_failed()
        healthy = self._listening and not failing
        if not self._listening:
            state = self._state
        elif failing:
            state = "failing"
        elif self._active:
            state = "streaming"
        else:
            state = "listening"
        detail: dict[str, Any] = {
            "listen": f"{self.config.listen.host}:{self.listen_port or self.config.listen.port}",
            "interface": str(self.interface_address or self.config.interface),
            "connections": [self._describe(c) for c in self._active.values()],
            "pending_connections": len(self._pending),
            "sessions": len(self._sessions),
            # None until a datagram arrived (the metric counts from start-up instead)
            "last_datagram_age_seconds": (
                None if self._last_datagram_at is None else round(self._last_datagram_age(), 3)
            ),
            "datagrams_per_second": round(self._rate_out.per_second(), 1),
            "bytes_in_per_second": round(self._rate_in_bytes.per_second(), 1),
            "datagrams_out": self.stats.datagrams_out,
            "sending_failed": failing,
            "last_error": self._last_error,
        }
        return FeedHealth(healthy, state, detail)

    def samples(self) -> Iterable[Sample]:
        self._sync_all()
        return list(self._samples())

    # -- accounting helpers -----------------------------------------------------------------

    def _describe(self, conn: _Connection) -> dict[str, Any]:
        session = conn.session
        return {
            "peer": conn.peer,
            "session": session.session_id.hex() if session else None,
            "highest_seq": session.highest if session else 0,
            "acked_seq": conn.acked_seq,
        }

    def _last_datagram_age(self) -> float:
        since = self._last_datagram_at if self._last_datagram_at is not None else self._started_at
        return max(0.0, time.monotonic() - since)

    def _sending_failed(self) -> bool:
        failed_at = self._send_failed_at
        return failed_at is not None and time.monotonic() - failed_at < FAILING_HOLD

    def _ack_lag(self) -> int:
        lag = 0
        for conn in self._active.values():
            if conn.session is not None:
                lag = max(lag, conn.session.highest - conn.acked_seq)
        return lag

    def _samples(self) -> Iterator[Sample]:
        feed = (("feed", self.name),)
        s = self.stats

        def counter(name: str, help_text: str, value: float, *extra: tuple[str, str]) -> Sample:
            return Sample(name, "counter", help_text, feed + extra, value)

        def gauge(name: str, help_text: str, value: float) -> Sample:
            return Sample(name, "gauge", help_text, feed, value)

        yield counter("frames_in", "Frames received from capture connections.", s.frames_in)
        yield counter("bytes_in", "TCP bytes received from capture connections.", s.bytes_in)
        yield counter("datagrams_in", "DATA frames received.", s.datagrams_in)
        yield counter("datagrams_out", "Datagrams sent as multicast.", s.datagrams_out)
        yield counter("bytes_out", "Payload bytes sent as multicast.", s.bytes_out)
        for reason, value in self.dropped.items():
            yield counter(
                "datagrams_dropped", "Datagrams not emitted, by reason.", value, ("reason", reason)
            )
        yield counter("duplicates", "DATA frames already emitted in their session.", s.duplicates)
        yield counter("gaps", "Jumps in a session's sequence numbers.", s.gaps)
        yield counter(
            "gap_sequences",
            "Sequence numbers missing in the jumps counted by gaps.",
            s.gap_sequences,
        )
        yield counter(
            "connections_accepted", "Connections accepted past HELLO.", s.connections_accepted
        )
        for reason, value in self.rejected.items():
            yield counter(
                "connections_rejected",
                "Connections refused before streaming, by reason.",
                value,
                ("reason", reason),
            )
        for reason, value in self.closed.items():
            yield counter(
                "connections_closed",
                "Streaming connections that ended, by reason.",
                value,
                ("reason", reason),
            )
        yield counter(
            "send_waits",
            "Times the multicast socket's send buffer was full and the feed waited for room.",
            s.send_waits,
        )
        yield counter("decode_errors", "Connections that sent undecodable bytes.", s.decode_errors)
        for name, value in sorted(self.send_errors.items()):
            yield counter(
                "send_errors", "Failed multicast sends, by errno.", value, ("errno", name)
            )
        yield gauge("active_connections", "Capture connections past HELLO.", len(self._active))
        yield gauge(
            "pending_connections", "Connections waiting for their HELLO.", len(self._pending)
        )
        yield gauge(
            "sessions", "Capture sessions remembered for deduplication.", len(self._sessions)
        )
        yield gauge(
            "last_datagram_age_seconds",
            "Seconds since the last DATA frame (since start when none yet).",
            self._last_datagram_age(),
        )
        yield gauge(
            "ack_lag",
            "Largest difference between a session's emitted and acknowledged sequence.",
            self._ack_lag(),
        )
        yield gauge(
            "up",
            "1 while the listener is bound and the emitter works.",
            float(self._listening and not self._sending_failed()),
        )
        yield from self.latency.samples(
            "capture_to_emit_latency_seconds",
            feed,
            "Capture timestamp to multicast send of each chunk's last datagram, in seconds.",
        )

    async def _tick(self) -> None:
        """Feed the rate windows once a second."""
        while True:
            self._sync_all()
            now = time.monotonic()
            self._rate_out.update(self.stats.datagrams_out, now)
            self._rate_in_bytes.update(self.stats.bytes_in, now)
            await trio.sleep(1.0)

    # -- accepting --------------------------------------------------------------------------

    async def _accept_loop(self, listener: socket.socket, handlers: trio.Nursery) -> None:
        sources = self.config.allowed_sources
        accepted_in_row = 0
        while True:
            try:
                sock, addr = listener.accept()
            except BlockingIOError:
                accepted_in_row = 0
                await trio.lowlevel.wait_readable(listener)
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._rlog.error(
                        "accept", "%s: accept failed: %s; retrying", self.name, exc.strerror
                    )
                    await trio.sleep(0.1)
                continue  # ECONNABORTED, EPROTO, ...: that peer is gone, the listener is fine
            peer_ip = IPv4Address(addr[0])
            peer = f"{addr[0]}:{addr[1]}"
            if not any(peer_ip in net for net in sources):
                sock.close()
                self.rejected["source"] += 1
                self._rlog.warning(
                    f"source:{addr[0]}",
                    "%s: refused connection from %s: not in allowed_sources",
                    self.name,
                    peer,
                )
            else:
                sock.setblocking(False)
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    # Only small control frames go back: a modest send buffer bounds the memory
                    # of a peer that stops reading and lets SLOW_CONSUMER notice it sooner.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CONTROL_SEND_BUFFER)
                except OSError:
                    sock.close()
                    continue
                self._next_id += 1
                conn = _Connection(self._next_id, sock, peer)
                if len(self._pending) >= self.pending_limit:
                    oldest = self._pending.pop(next(iter(self._pending)))
                    self.rejected["pending_limit"] += 1
                    oldest.end(
                        ErrorCode.TOO_MANY_CONNECTIONS,
                        "too many connections waiting for HELLO",
                        None,
                    )
                    self._rlog.warning(
                        "pending_limit",
                        "%s: %d connections without HELLO; closed the oldest (%s)",
                        self.name,
                        self.pending_limit,
                        oldest.peer,
                    )
                self._pending[conn.id] = conn
                handlers.start_soon(self._serve, conn)
            accepted_in_row += 1
            if accepted_in_row >= ACCEPT_BATCH:
                accepted_in_row = 0
                await trio.lowlevel.checkpoint()

    # -- one connection ---------------------------------------------------------------------

    async def _serve(self, conn: _Connection) -> None:
        ended = False  # False at the finally: cancelled from outside, i.e. the feed stops
        try:
            with conn.scope:
                proto = await self._handshake(conn)
                if proto is not None:
                    await self._stream(conn, proto)
            ended = True
        except Exception:  # one connection's bug must never take the feed down
            ended = True
            log.exception("%s: connection from %s failed", self.name, conn.peer)
            if conn.error is None:
                conn.error = (ErrorCode.PROTOCOL, "internal error")
                conn.reason = "internal_error"
        finally:
            if not ended and conn.error is None:
                conn.error = self._close_reason
                conn.reason = "stopped"
            await self._finish(conn)

    async def _finish(self, conn: _Connection) -> None:
        self._pending.pop(conn.id, None)
        session = conn.session
        if self._active.pop(conn.id, None) is not None:
            reason = conn.reason or "eof"
            self.closed[reason] = self.closed.get(reason, 0) + 1
            log.info("%s: connection from %s closed (%s)", self.name, conn.peer, reason)
            if session is not None and session.connection is conn:
                session.connection = None
        sock = conn.sock
        try:
            if conn.error is not None:
                code, message = conn.error
                try:
                    sock.send(conn.unsent + encode_error(code, message))
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                else:
                    await self._linger(sock)
        finally:
            sock.close()

    @staticmethod
    async def _linger(sock: socket.socket) -> None:
        """Read and discard until the peer closes, briefly, so our ERROR is not cut by a RST
        (closing with unread input resets the connection)."""
        with trio.CancelScope(deadline=trio.current_time() + LINGER, shield=True):
            while True:
                try:
                    if not sock.recv(65536):
                        return
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                except OSError:
                    return

    def _reject(self, conn: _Connection, reason: str, code: int, message: str) -> None:
        self.rejected[reason] += 1
        conn.error = (code, message)
        self._rlog.info(
            f"reject:{reason}", "%s: refused %s: %s (%s)", self.name, conn.peer, message, reason
        )

    async def _handshake(self, conn: _Connection) -> EmitConnection | None:
        """CHALLENGE, then a valid HELLO within hello_timeout; the connection is then active and
        welcomed. None when it was refused (``conn.error`` says why) or closed."""
        cfg = self.config
        assert self._keys is not None
        proto = EmitConnection(self.name, self._keys, os.urandom(16))
        sock = conn.sock
        stats = self.stats
        with trio.move_on_after(cfg.hello_timeout):
            try:
                sock.send(proto.challenge())  # 25 bytes into an empty socket buffer
                while proto.state is not State.STREAMING:
                    try:
                        data = sock.recv(HANDSHAKE_RECEIVE_SIZE)
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(sock)
                        continue
                    if not data:
                        self.rejected["no_hello"] += 1
                        return None
                    with self._lock:
                        stats.bytes_in += len(data)
                    events = proto.receive(data)
                    with self._lock:
                        stats.frames_in += len(events)
                    for event in events:
                        if isinstance(event, Error):
                            self.rejected["peer_error"] += 1
                            log.info(
                                "%s: %s sent ERROR %d: %s",
                                self.name,
                                conn.peer,
                                event.code,
                                event.message,
                            )
                            return None
            except HandshakeError as exc:
                reason = _HANDSHAKE_REJECT.get(exc.code, "protocol")
                self._reject(conn, reason, exc.code, str(exc))
                return None
            except ProtocolError as exc:
                stats.decode_errors += 1
                self._reject(conn, "protocol", ErrorCode.PROTOCOL, str(exc))
                return None
            except OSError:
                self.rejected["no_hello"] += 1
                return None
        if proto.state is not State.STREAMING:
            self._reject(conn, "hello_timeout", ErrorCode.HELLO_TIMEOUT, "no HELLO in time")
            return None
        if conn.scope.cancel_called:  # evicted while its HELLO was already on the way
            return None
        hello = proto.hello
        assert hello is not None
        self._pending.pop(conn.id, None)
        # A new connection of a session replaces the old one (which the capture side left).
        session = self._sessions.get(hello.session_id)
        if session is not None and session.connection is not None:
            old = session.connection
            old.end(ErrorCode.TOO_MANY_CONNECTIONS, "superseded by a newer connection", None)
            # Free the slot now: the old task closes at its next checkpoint.
            self._active.pop(old.id, None)
            self.closed["superseded"] += 1
            session.connection = None
            log.info("%s: %s supersedes %s for its session", self.name, conn.peer, old.peer)
        if len(self._active) >= cfg.max_connections:
            self._reject(
                conn,
                "limit",
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"feed {self.name!r} already has {cfg.max_connections} connections",
            )
            return None
        if session is None:
            session = self._sessions[hello.session_id] = _Session(hello.session_id)
            while len(self._sessions) > SESSION_LIMIT:
                self._sessions.popitem(last=False)
        else:
            self._sessions.move_to_end(hello.session_id)
        session.connection = conn
        conn.session = session
        self._active[conn.id] = conn
        stats.connections_accepted += 1
        log.info(
            "%s: capture connection from %s, session %s, resuming after %d",
            self.name,
            conn.peer,
            hello.session_id.hex(),
            session.highest,
        )
        return proto

    async def _stream(self, conn: _Connection, proto: EmitConnection) -> None:
        """Stream until the peer stops: the data path runs in a thread of its own (``_pump``),
        the ACK/HEARTBEAT writer, cancellation and accounting stay in Trio."""
        session = conn.session
        assert session is not None
        # A superseded connection's thread may still be finishing its chunk: one data-path
        # thread per session at a time, so dedup by ``session.highest`` stays exact.
        while True:
            if session.connection is not conn:
                return  # superseded in turn while waiting: never start a second thread
            previous = session.pump_done
            if previous is None:
                break
            await previous.wait()
        done = session.pump_done = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                if self._lib is None:  # the C data path writes its own ACKs and HEARTBEATs
                    nursery.start_soon(self._writer, conn)
                pump = self._pump if self._lib is None else self._pump_c
                outcome, detail = await run_stoppable(
                    functools.partial(pump, conn, proto), limiter=self._limiter
                )
                self._pumped(conn, outcome, detail)
                nursery.cancel_scope.cancel()
        finally:
            done.set()
            if session.pump_done is done:
                session.pump_done = None

    def _pumped(self, conn: _Connection, outcome: str, detail: Any) -> None:
        """Record how the data-path thread ended (in Trio)."""
        if outcome == "reset":
            conn.reason = "reset"  # no ERROR to a reset connection
            log.info("%s: %s: %s", self.name, conn.peer, detail)
        elif outcome == "protocol":
            with self._lock:
                self.stats.decode_errors += 1
            conn.error = (ErrorCode.PROTOCOL, str(detail))
            conn.reason = "protocol"
            self._rlog.warning(
                f"decode:{conn.peer}",
                "%s: undecodable bytes from %s: %s",
                self.name,
                conn.peer,
                detail,
            )
        elif outcome == "peer_error":
            for event in detail:
                if isinstance(event, Error):
                    log.info(
                        "%s: %s sent ERROR %d: %s", self.name, conn.peer, event.code, event.message
                    )
            conn.reason = "peer_error"
        elif outcome == "idle":
            conn.error = (ErrorCode.IDLE_TIMEOUT, f"nothing received for {detail:g}s")
            conn.reason = "idle_timeout"
        elif outcome == "slow":
            conn.end(ErrorCode.SLOW_CONSUMER, "not reading", "slow_consumer")
        # "eof": closed by the capture side; "stopped": cancelled, the cancel scope says why

    async def _writer(self, conn: _Connection) -> None:
        """The welcome ACK, then coalesced ACKs and idle HEARTBEATs; SLOW_CONSUMER when a send
        cannot complete within idle_timeout."""
        cfg = self.config
        session = conn.session
        assert session is not None
        sock = conn.sock
        slow = cfg.idle_timeout
        heartbeat = cfg.heartbeat_interval
        last_send = -float("inf")
        while True:
            conn.ack_requested = False  # before reading highest: a later emit asks again
            highest = session.highest
            if highest > conn.acked:
                frame = encode_ack(highest)
                conn.acked = highest
            elif trio.current_time() - last_send >= heartbeat:
                frame = encode_heartbeat(time.time_ns())
            else:
                frame = b""
            if frame:
                try:
                    with trio.move_on_after(slow) as scope:
                        await send_all(sock, frame)
                except OSError as exc:  # reset by the peer: no ERROR to a reset connection
                    if conn.reason is None:
                        conn.reason = "reset"
                    log.info("%s: %s: %s", self.name, conn.peer, exc.strerror or exc)
                    conn.scope.cancel()
                    return
                if scope.cancelled_caught:
                    conn.end(ErrorCode.SLOW_CONSUMER, "not reading", "slow_consumer")
                    return
                last_send = trio.current_time()
            with trio.move_on_at(last_send + heartbeat):
                await conn.wake.wait()
            if conn.wake.is_set():
                conn.wake = trio.Event()
                await trio.sleep_until(last_send + ACK_INTERVAL)

    def _pump(
        self,
        conn: _Connection,
        proto: EmitConnection,
        stop_fd: int,
        token: trio.lowlevel.TrioToken,
    ) -> tuple[str, Any]:
        """The data-path thread: poll, ``recv_into``, decode, emit, until EOF, an error, the
        idle timeout or ``stop_fd`` becoming readable. Returns (outcome, detail) for
        ``_pumped``. Blocks only in ``poll`` (with ``stop_fd``, so a stop is seen at once)."""
        idle = self.config.idle_timeout
        sock = conn.sock
        recv_into = sock.recv_into
        receive = proto.receive
        buf = bytearray(RECEIVE_SIZE)
        view = memoryview(buf)
        session = conn.session
        assert session is not None
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.register(stop_fd, select.POLLIN)
        poll = poller.poll
        request_ack = conn.request_ack
        schedule = token.run_sync_soon
        lock = self._lock
        stats = self.stats
        monotonic = time.monotonic
        deadline = monotonic() + idle
        while True:
            left = deadline - monotonic()
            if left <= 0:
                return "idle", idle
            ready = poll(math.ceil(left * 1000))
            if not ready:
                continue
            if len(ready) > 1 or ready[0][0] == stop_fd:  # two fds: one of them is stop_fd
                return "stopped", None
            try:
                n = recv_into(buf)
            except BlockingIOError:
                continue
            except OSError as exc:
                return "reset", exc.strerror or exc
            if not n:
                return "eof", None
            deadline = monotonic() + idle
            try:
                events = receive(view[:n])
            except ProtocolError as exc:
                with lock:
                    stats.bytes_in += n
                    stats.frames_in += len(exc.events)
                if self._emit(session, exc.events, stop_fd) == "stopped":  # before the bad frame
                    return "stopped", None
                return "protocol", exc
            with lock:
                stats.bytes_in += n
                stats.frames_in += len(events)
            outcome = self._emit(session, events, stop_fd)
            if outcome is not None:
                return outcome, events
            if session.highest > conn.acked and not conn.ack_requested:
                conn.ack_requested = True
                schedule(request_ack)

    def _pump_c(
        self,
        conn: _Connection,
        proto: EmitConnection,
        stop_fd: int,
        _token: trio.lowlevel.TrioToken,
    ) -> tuple[str, Any]:
        """The data-path thread on the C data plane: ``rd_emit_pump`` runs poll, recv, decode,
        dedup and sendto without the GIL, and writes the welcome ACK, the coalesced ACKs and
        the idle HEARTBEATs itself (the work of ``_writer`` on the Python data path). It
        returns only for what needs Python: a control or malformed frame, a destination seen
        for the first time, a send error, the end. Same outcomes as ``_pump``, plus "slow"
        (a control frame could not be written for ``idle_timeout``)."""
        lib = self._lib
        mcast = self._mcast
        assert lib is not None
        assert mcast is not None
        session = conn.session
        assert session is not None
        buffer = (ctypes.c_uint8 * RECEIVE_SIZE)()
        cfg = self.config
        state = fastpath.EmitState(
            tcp_fd=conn.sock.fileno(),
            stop_fd=stop_fd,
            mcast_fd=mcast.fileno(),
            buf=ctypes.addressof(buffer),
            cap=RECEIVE_SIZE,
            idle_ns=int(cfg.idle_timeout * 1e9),
            ack_interval_ns=int(ACK_INTERVAL * 1e9),
            heartbeat_ns=int(cfg.heartbeat_interval * 1e9),
            highest=session.highest,
            acked=max(conn.acked, 0),
            acked_any=conn.acked >= 0,
        )
        leftover = proto.take_buffered()  # bytes after the HELLO: the start of the stream
        if len(leftover) > RECEIVE_SIZE // 2:  # at most one frame: never, but never overrun
            return "protocol", ProtocolError(f"{len(leftover)} bytes pending after the HELLO")
        ctypes.memmove(buffer, leftover, len(leftover))
        state.end = len(leftover)
        ref = ctypes.byref(state)
        pump = lib.emit_pump
        set_dest = lib.emit_set_dest
        link = _PumpLink(state)
        with self._lock:
            self._pumps.append(link)
            session.pump = conn.pump = state
        try:
            while True:
                why = pump(ref)
                with self._lock:
                    self._sync(link)
                    if why == fastpath.RD_NEED_DEST:
                        key = state.need_key
                        verdict = self._verdict(key)
                        if isinstance(verdict, tuple):
                            set_dest(ref, key, fastpath.DEST_ALLOWED, self._connected_fd(key))
                        else:
                            self._log_denied(key, verdict)
                            denied = verdict == "group_not_allowed"
                            set_dest(
                                ref,
                                key,
                                fastpath.DEST_DENIED_GROUP if denied else fastpath.DEST_DENIED_PORT,
                                -1,
                            )
                        continue
                    if why == fastpath.RD_SEND_ERROR:
                        self._send_failed(OSError(state.err, os.strerror(state.err)))
                        continue
                if why == fastpath.RD_CONTROL:
                    outcome, detail = self._control(proto, bytes(buffer[state.start : state.end]))
                    if outcome == "peer_error":
                        with self._lock:
                            self.stats.frames_in += len(detail)
                    return outcome, detail
                if why == fastpath.RD_STOPPED:
                    return "stopped", None
                if why == fastpath.RD_EOF:
                    return "eof", None
                if why == fastpath.RD_RESET:
                    return "reset", os.strerror(state.err)
                if why == fastpath.RD_IDLE:
                    return "idle", cfg.idle_timeout
                if why == fastpath.RD_SLOW:
                    return "slow", None
                raise RuntimeError(f"rd_emit_pump returned {why}")
        finally:
            with self._lock:
                self._sync(link)
                self._pumps.remove(link)
                session.highest = int(state.highest)
                session.pump = conn.pump = None
                conn.acked = state.acked if state.acked_any else -1
                # a control frame cut short: finished before the closing ERROR
                conn.unsent = bytes(state.out[state.out_off : state.out_len])

    @staticmethod
    def _control(proto: EmitConnection, frames: bytes) -> tuple[str, Any]:
        """The verdict on what the C data path handed back: an ERROR from the peer ends the
        connection as "peer_error", anything else is a protocol error (with the Python
        decoder's message)."""
        try:
            events = proto.receive(frames)
        except ProtocolError as exc:
            return "protocol", exc
        if events and isinstance(events[0], Error):
            return "peer_error", events
        return "protocol", ProtocolError(f"undecodable frame: {frames[:16].hex()}")

    def _sync(self, link: _PumpLink) -> None:
        """Add what a C data path counted since the last call to the feed's counters (the
        caller holds ``_lock``; called from its thread and from Trio)."""
        state = link.state
        last = link.last
        stats = self.stats
        values = [getattr(state, name) for name in _C_COUNTERS]
        growth = [now - before for now, before in zip(values, last, strict=True)]
        if not any(growth):
            return
        link.last = values
        (
            bytes_in,
            frames_in,
            datagrams_in,
            datagrams_out,
            bytes_out,
            duplicates,
            gaps,
            gap_sequences,
            send_waits,
            denied_group,
            denied_port,
            observed,
        ) = growth
        stats.bytes_in += bytes_in
        stats.frames_in += frames_in
        stats.datagrams_in += datagrams_in
        stats.datagrams_out += datagrams_out
        stats.bytes_out += bytes_out
        stats.duplicates += duplicates
        stats.send_waits += send_waits
        self.dropped["group_not_allowed"] += denied_group
        self.dropped["port_not_allowed"] += denied_port
        if datagrams_in:
            self._last_datagram_at = state.last_rx_ns / 1e9
        if datagrams_out and state.last_send_ok:
            self._send_failed_at = None
        if observed:
            buckets = list(state.latency)
            self.latency.add_counts(
                [a - b for a, b in zip(buckets, link.latency, strict=True)],
                state.latency_sum_ns - link.latency_sum_ns,
            )
            link.latency = buckets
            link.latency_sum_ns = state.latency_sum_ns
        if gaps:
            stats.gaps += gaps
            stats.gap_sequences += gap_sequences
            session = self._session_of(state)
            self._rlog.warning(
                f"gap:{session}",
                "%s: session %s skipped %d sequence numbers (capture side dropped them)",
                self.name,
                session,
                gap_sequences,
            )

    def _session_of(self, state: fastpath.EmitState) -> str:
        for session in self._sessions.values():
            if session.pump is state:
                return session.session_id.hex()
        return "?"

    def _sync_all(self) -> None:
        """Bring the counters up to date with every running C data path (from Trio)."""
        if self._pumps:
            with self._lock:
                for link in self._pumps:
                    self._sync(link)

    def _emit(self, session: _Session, events: list[Any], stop_fd: int) -> str | None:
        """Send the datagrams of one chunk (in the data-path thread). None, or "peer_error"
        when the chunk held an ERROR from the peer, or "stopped" when stopped while the
        multicast socket was full."""
        mcast = self._mcast
        assert mcast is not None
        sendto = mcast.sendto
        dests_get = self._dests.get
        highest = session.highest
        start_highest = highest
        n_in = n_out = bytes_out = dups = gaps = gap_seqs = waits = 0
        last_ts = 0
        outcome: str | None = None
        failed = False
        errors: list[OSError] = []
        for event in events:
            if event.__class__ is not Datagram:
                if event.__class__ is Heartbeat:
                    continue
                outcome = "peer_error"
                break
            seq, group, port, ts_ns, payload = event
            n_in += 1
            if seq <= highest:
                dups += 1
                continue
            if seq != highest + 1 and highest:
                gaps += 1
                gap_seqs += seq - highest - 1
            dest = dests_get((group << 16) | port)
            if dest is None:
                with self._lock:
                    dest = self._destination(group, port)
                if dest is None:
                    highest = seq  # deliberately skipped
                    continue
            while True:
                try:
                    sendto(payload, dest)
                except BlockingIOError:
                    waits += 1
                    if not wait_writable(mcast, stop_fd):
                        outcome = "stopped"  # this datagram was not sent: not claimed
                        break
                    continue
                except OSError as exc:
                    failed = True
                    errors.append(exc)
                else:
                    failed = False
                    n_out += 1
                    bytes_out += len(payload)
                break
            if outcome is not None:
                break
            highest = seq
            last_ts = ts_ns
        session.highest = highest
        with self._lock:
            stats = self.stats
            stats.datagrams_in += n_in
            stats.datagrams_out += n_out
            stats.bytes_out += bytes_out
            stats.duplicates += dups
            stats.send_waits += waits
            for error in errors:
                self._send_failed(error)
            if gaps:
                stats.gaps += gaps
                stats.gap_sequences += gap_seqs
                self._rlog.warning(
                    f"gap:{session.session_id.hex()}",
                    "%s: session %s skipped %d sequence numbers (capture side dropped them)",
                    self.name,
                    session.session_id.hex(),
                    gap_seqs,
                )
            if n_in:
                self._last_datagram_at = time.monotonic()
            if highest > start_highest and last_ts:
                self.latency.observe_ns(time.time_ns() - last_ts)
            if n_out and not failed:
                self._send_failed_at = None
        return outcome

    def _send_failed(self, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self.send_errors[name] = self.send_errors.get(name, 0) + 1
        self.dropped["send_error"] += 1
        self._send_failed_at = time.monotonic()
        self._last_error = f"multicast send: {name} ({exc.strerror})"
        self._rlog.warning(
            f"send:{name}", "%s: multicast send failed: %s (%s)", self.name, exc.strerror, name
        )

    def _destination(self, group: int, port: int) -> tuple[str, int] | None:
        """The cached sendto address of an allowed group:port; None (counted) otherwise.
        The caller holds ``_lock``."""
        key = (group << 16) | port
        verdict = self._verdict(key)
        if isinstance(verdict, tuple):
            return verdict
        self.dropped[verdict] += 1
        self._log_denied(key, verdict)
        return None

    def _verdict(self, key: int) -> tuple[str, int] | str:
        """The sendto address of destination ``group << 16 | port``, or the drop reason when
        the allowlist refuses it; cached. The caller holds ``_lock``."""
        dest = self._dests.get(key)
        if dest is not None:
            return dest
        reason = self._denied.get(key)
        if reason is not None:
            return reason
        cfg = self.config
        address = IPv4Address(key >> 16)
        if not any(address in net for net in cfg.allowed_groups):
            reason = "group_not_allowed"
        elif not any((key & 0xFFFF) in ports for ports in cfg.allowed_ports):
            reason = "port_not_allowed"
        else:
            if len(self._dests) >= DESTINATION_CACHE_LIMIT:
                self._dests.clear()
            dest = self._dests[key] = (str(address), key & 0xFFFF)
            return dest
        if len(self._denied) >= DESTINATION_CACHE_LIMIT:
            self._denied.clear()
        self._denied[key] = reason
        return reason

    def _connected_fd(self, key: int) -> int:
        """A multicast socket connected to allowed destination ``key`` (the C data path sends
        with ``send`` on it: the route is cached instead of looked up per datagram), or -1
        for the shared socket. At most ``CONNECTED_DESTINATIONS`` per feed; they stay open
        until the feed stops, as a data-path thread may be sending on one. The caller holds
        ``_lock``."""
        sock = self._connected.get(key)
        if sock is None:
            if len(self._connected) >= CONNECTED_DESTINATIONS or self.interface_address is None:
                return -1
            cfg = self.config
            try:
                sock = open_multicast_sender(
                    self.interface_address, cfg.ttl, cfg.loop, cfg.send_buffer
                )
            except InterfaceError:
                return -1
            try:
                sock.connect((str(IPv4Address(key >> 16)), key & 0xFFFF))
            except OSError:  # no route yet: the shared socket reports it per datagram
                sock.close()
                return -1
            self._connected[key] = sock
        return sock.fileno()

    def _log_denied(self, key: int, reason: str) -> None:
        self._rlog.warning(
            f"{reason}:{key}",
            "%s: dropped a datagram for %s:%d (%s)",
            self.name,
            IPv4Address(key >> 16),
            key & 0xFFFF,
            reason.replace("_", " "),
        )
