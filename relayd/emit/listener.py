"""An emit feed's front door: who may connect, and the CHALLENGE / HELLO handshake.

Every accepted peer outside ``allowed_sources`` is closed at once. Everyone else gets a
CHALLENGE and must answer with a valid HELLO within ``hello_timeout``. Until then a connection
is *pending*: it costs one file descriptor and one small task, and it does not hold one of the
``max_connections`` slots. Pending connections have caps of their own (relayd/admission.py):
``pending_limit`` per feed (default ``max(16, 8 * max_connections)``) and a quarter of it per
source address. A source at its cap loses its own oldest pending connection to make room, and
at the feed's cap the source holding the most does; while those are all younger than
``admission.PROTECTED_FOR`` the newcomer is refused instead (reset, before any handshake work).
So a flood of silent connections (load-balancer probes, scanners, half-open floods) can neither
exhaust the slots a real capture side needs, nor grow without bound, nor evict the pending
connection of a capture side that connects from another address. An evicted connection gets
its ERROR and is closed at once (no linger: at thousands a second lingers would hold
descriptors).

The accept loop is the gate's own: it drains the listen queue in batches and refuses at the
cost of an ``accept`` and a ``close``, so the queue stays short whatever a flood's rate and a
real capture side's SYN never waits behind it. Each admitted connection's handler runs in the
feed's handler nursery.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from ipaddress import IPv4Address
from typing import Final

import trio

from relayd.admission import PendingTable, Room, per_source_default
from relayd.config import EmitFeed
from relayd.emit.sessions import Connection
from relayd.emit.stats import EmitStats, Rejected
from relayd.netif import accept_forever, bind_tcp_listener
from relayd.wire import (
    EmitConnection,
    Error,
    ErrorCode,
    HandshakeError,
    Hello,
    ProtocolError,
    State,
)

__all__ = ["Gate", "open_listener"]

log = logging.getLogger("relayd.emit")

#: Bytes read per ``recv`` before the HELLO.
HANDSHAKE_RECEIVE_SIZE: Final = 2048
#: SO_SNDBUF of capture connections (only ACK, HEARTBEAT and ERROR frames go that way).
CONTROL_SEND_BUFFER: Final = 16 * 1024
#: accept() errors that mean "no resources right now": wait this long and try again.
ACCEPT_RETRY: Final = 0.1
#: SO_LINGER on, zero seconds: close() resets the connection and leaves no TIME_WAIT.
_RESET_ON_CLOSE: Final = struct.pack("ii", 1, 0)

_HANDSHAKE_REJECT: Final = {
    ErrorCode.WRONG_FEED: Rejected.WRONG_FEED,
    ErrorCode.AUTH_FAILED: Rejected.AUTH,
    ErrorCode.UNSUPPORTED_VERSION: Rejected.VERSION,
}


def open_listener(host: str, port: int) -> socket.socket:
    """The feed's TCP listener, bound, listening and non-blocking (raises OSError naming the
    address, e.g. ``cannot bind 0.0.0.0:6667: Address already in use``)."""
    return bind_tcp_listener(host, port)


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
    sock.close()


class Gate:
    """The source check, the pending connections and the handshake of one feed."""

    def __init__(
        self,
        name: str,
        config: EmitFeed,
        stats: EmitStats,
        pending_limit: int,
        per_source_limit: int | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.keys: tuple[bytes, ...] = ()
        self.pending_limit = pending_limit
        self.pending: PendingTable[Connection] = PendingTable(
            pending_limit,
            per_source_limit if per_source_limit is not None else per_source_default(pending_limit),
        )
        self._stats = stats
        self._next_id = 0

    async def accept(
        self,
        listener: socket.socket,
        handlers: trio.Nursery,
        serve: Callable[[Connection], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on ``listener`` until cancelled; ``serve`` each admitted connection in
        ``handlers``. No resources (EMFILE and friends): logged, retried after a pause."""
        task_status.started()

        def admit(sock: socket.socket, host: str, port: int) -> None:
            conn = self.admit(sock, host, port)
            if conn is not None:
                handlers.start_soon(serve, conn)

        def no_resources(exc: OSError) -> None:
            self._stats.rlog.warning(
                "accept", "%s: cannot accept: %s; retrying", self.name, exc.strerror
            )

        await accept_forever(listener, admit, no_resources, retry=ACCEPT_RETRY)

    def admit(self, sock: socket.socket, host: str, port: int) -> Connection | None:
        """A connection for an accepted socket, pending its HELLO; None (closed, counted)
        when its source is not allowed or the pending caps leave no room for it."""
        peer = f"{host}:{port}"
        if not any(IPv4Address(host) in net for net in self.config.allowed_sources):
            sock.close()
            self._stats.rejected[Rejected.SOURCE] += 1
            self._stats.rlog.warning(
                f"source:{host}",
                "%s: refused connection from %s: not in allowed_sources",
                self.name,
                peer,
            )
            return None
        now = trio.current_time()
        room = self.pending.room_for(host, now)
        if room is Room.REFUSED:
            _reset(sock)
            self._stats.rejected[Rejected.PENDING_LIMIT] += 1
            self._log_pending_limit(host)
            return None
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Only small control frames go back: a modest send buffer bounds the memory of a
            # peer that stops reading and lets SLOW_CONSUMER notice it sooner.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CONTROL_SEND_BUFFER)
        except OSError:
            sock.close()
            return None
        self._next_id += 1
        conn = Connection(self._next_id, sock, peer)
        evicted = self.pending.add(conn.id, host, conn, now)
        if evicted is not None:
            self._stats.rejected[Rejected.PENDING_LIMIT] += 1
            evicted.linger = False
            evicted.end(
                ErrorCode.TOO_MANY_CONNECTIONS, "too many connections waiting for HELLO", None
            )
            self._log_pending_limit(host)
        return conn

    def _log_pending_limit(self, host: str) -> None:
        self._stats.rlog.warning(
            "pending_limit",
            "%s: connections without HELLO at the cap (%d per source, %d per feed) as %s "
            "connects; refusing or closing the oldest of the source holding the most",
            self.name,
            self.pending.per_source_limit,
            self.pending.limit,
            host,
        )

    def reject(self, conn: Connection, reason: Rejected, code: int, message: str) -> None:
        self._stats.rejected[reason] += 1
        conn.error = (code, message)
        self._stats.rlog.info(
            f"reject:{reason.value}",
            "%s: refused %s: %s (%s)",
            self.name,
            conn.peer,
            message,
            reason.value,
        )

    async def handshake(self, conn: Connection) -> tuple[EmitConnection, Hello] | None:
        """CHALLENGE, then a valid HELLO within hello_timeout. None when it was refused
        (``conn.error`` says why), closed or evicted."""
        proto = EmitConnection(self.name, self.keys, os.urandom(16))
        sock = conn.sock
        stats = self._stats
        with trio.move_on_after(self.config.hello_timeout):
            try:
                sock.send(proto.challenge())  # 25 bytes into an empty socket buffer
                while proto.state is not State.STREAMING:
                    try:
                        data = sock.recv(HANDSHAKE_RECEIVE_SIZE)
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(sock)
                        continue
                    if not data:
                        stats.rejected[Rejected.NO_HELLO] += 1
                        return None
                    stats.bytes_in += len(data)
                    events = proto.receive(data)
                    stats.frames_in += len(events)
                    if any(isinstance(event, Error) for event in events):
                        _log_peer_errors(self.name, conn.peer, events)
                        stats.rejected[Rejected.PEER_ERROR] += 1
                        return None
            except HandshakeError as exc:
                reason = _HANDSHAKE_REJECT.get(exc.code, Rejected.PROTOCOL)
                self.reject(conn, reason, exc.code, str(exc))
                return None
            except ProtocolError as exc:
                stats.decode_errors += 1
                self.reject(conn, Rejected.PROTOCOL, ErrorCode.PROTOCOL, str(exc))
                return None
            except OSError:
                stats.rejected[Rejected.NO_HELLO] += 1
                return None
        if proto.state is not State.STREAMING:
            self.reject(conn, Rejected.HELLO_TIMEOUT, ErrorCode.HELLO_TIMEOUT, "no HELLO in time")
            return None
        if conn.scope.cancel_called:  # evicted while its HELLO was already on the way
            return None
        self.pending.pop(conn.id, None)
        assert proto.hello is not None
        return proto, proto.hello


def _log_peer_errors(name: str, peer: str, events: Sequence[object]) -> None:
    for event in events:
        if isinstance(event, Error):
            log.info("%s: %s sent ERROR %d: %s", name, peer, event.code, event.message)
            return
