"""The life of one capture connection at an emit feed, from HELLO to close.

An emit feed (relayd/emit/feed.py) owns the listener and the sockets; this class serves each
connection the gate (relayd/emit/listener.py) accepts: admit it past its HELLO (superseding its
session's older connection, within ``max_connections``), stream it through a data-path thread
(relayd/emit/pump.py) one session at a time, record how it ended, and close it with the final
ACK and ERROR the capture side needs to know exactly what it still holds. Kept apart from the
feed so that the per-connection rules read in one place.
"""

from __future__ import annotations

import functools
import logging
import math
import socket
from typing import Any, Final

import trio

from relayd.config import EmitFeed
from relayd.datapath import DataPlane, run_stoppable
from relayd.emit.arbitration import FeedArbitration
from relayd.emit.destinations import Destinations
from relayd.emit.listener import Gate
from relayd.emit.observer import FeedRole, Observer
from relayd.emit.pump import PumpEnd, pump_connection
from relayd.emit.sessions import Connection, Session, Sessions
from relayd.emit.stats import Closed, EmitStats, PumpLink, Rejected, SessionChange
from relayd.session import ack_point
from relayd.wire import EmitConnection, Error, ErrorCode, encode_ack, encode_error

__all__ = ["LINGER", "ConnectionStreams"]

log = logging.getLogger("relayd.emit")

#: ERROR codes with which a capture side says it stops on purpose.
_PEER_STOPS: Final = frozenset({ErrorCode.SHUTTING_DOWN, ErrorCode.FEED_REMOVED})

#: How long a deliberate close waits for the peer's FIN after ERROR and our FIN.
LINGER: Final = 0.2


class ConnectionStreams:
    """Serves an opened emit feed's connections (``serve`` is the gate's handler)."""

    def __init__(
        self,
        name: str,
        config: EmitFeed,
        *,
        stats: EmitStats,
        gate: Gate,
        sessions: Sessions,
        plane: DataPlane,
        destinations: Destinations,
        mcast: socket.socket,
        arbitration: FeedArbitration,
        role: FeedRole | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.name = name
        #: The feed's role among emit hosts and its emit gate (None: always active).
        self.role = role
        self.observer = observer
        #: Read per connection: a reload that applies in place replaces it.
        self.config = config
        self.stats = stats
        self.gate = gate
        self.sessions = sessions
        self.plane = plane
        self.destinations = destinations
        self.mcast = mcast
        self.arbitration = arbitration
        #: What every connection is told (ERROR code and text) when the feed is cancelled.
        self.close_reason: tuple[int, str] = (ErrorCode.SHUTTING_DOWN, "relay shutting down")
        #: The streaming connections' links to their data-path threads.
        self.links: list[PumpLink] = []
        # no shared thread pool limit: connections are bounded by max_connections
        self.limiter = trio.CapacityLimiter(math.inf)

    def forget_destinations(self) -> None:
        """Have every pump forget its destination table before its next chunk."""
        for link in self.links:
            if link.pump is not None:
                link.pump.clear_destinations()

    async def serve(self, conn: Connection) -> None:
        """Handshake, admit and stream one accepted connection, then close it as it ended."""
        ended = False  # False at the finally: cancelled from outside, i.e. the feed stops
        try:
            with conn.scope:
                accepted = await self.gate.handshake(conn)
                if accepted is not None and self._welcome(conn, accepted[1].session_id):
                    await self._stream(conn, accepted[0])
            ended = True
        except Exception:  # one connection's bug must never take the feed down
            ended = True
            log.exception("%s: connection from %s failed", self.name, conn.peer)
            if conn.error is None:
                conn.error = (ErrorCode.PROTOCOL, "internal error")
                conn.reason = Closed.INTERNAL_ERROR
        finally:
            if not ended and conn.error is None:
                conn.error = self.close_reason
                conn.reason = Closed.STOPPED
            await self._finish(conn)

    def _welcome(self, conn: Connection, session_id: bytes) -> bool:
        """Admit a connection past its HELLO: it supersedes its session's older connection,
        then takes one of ``max_connections``; False when refused (``conn.error``)."""
        cfg = self.config
        if self.role is not None and not self.role.admits():
            self.gate.reject(
                conn,
                Rejected.NOT_ACTIVE,
                ErrorCode.NOT_ACTIVE,
                f"feed {self.name!r} is standby here (another relay emits it): connect again",
            )
            return False
        old = self.sessions.supersede(session_id)
        if old is not None:
            self.stats.closed[Closed.SUPERSEDED] += 1
            log.info("%s: %s supersedes %s for its session", self.name, conn.peer, old.peer)
        if len(self.sessions.active) >= cfg.max_connections:
            self.gate.reject(
                conn,
                Rejected.LIMIT,
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"feed {self.name!r} already has {cfg.max_connections} connections",
            )
            return False
        self._count_session_change(conn, session_id)
        session = self.sessions.admit(conn, session_id)
        self._streams_changed()
        self.stats.connections_accepted += 1
        log.info(
            "%s: capture connection from %s, session %s, resuming after %d",
            self.name,
            conn.peer,
            session_id.hex(),
            session.highest,
        )
        return True

    def _streams_changed(self) -> None:
        if self.role is not None:
            self.role.streaming(bool(self.sessions.active))

    def _count_session_change(self, conn: Connection, session_id: bytes) -> None:
        change = self.sessions.change(session_id)
        if change is None:
            return
        self.stats.session_changes[change] += 1
        latest = self.sessions.latest
        assert latest is not None
        if change is SessionChange.CLEAN:
            log.info(
                "%s: %s starts capture session %s after %s ended cleanly",
                self.name,
                conn.peer,
                session_id.hex(),
                latest.session_id.hex(),
                extra={"feed": self.name},
            )
            return
        log.warning(
            "%s: %s starts capture session %s while session %s (emitted up to %d) ended "
            "without a goodbye: what its capture side held unacknowledged may be lost",
            self.name,
            conn.peer,
            session_id.hex(),
            latest.session_id.hex(),
            latest.highest,
            extra={"feed": self.name},
        )

    async def _finish(self, conn: Connection) -> None:
        self.gate.pending.pop(conn.id, None)
        if self.sessions.release(conn):
            self._streams_changed()
            reason = conn.reason or Closed.EOF
            self.stats.closed[reason] += 1
            log.info("%s: connection from %s closed (%s)", self.name, conn.peer, reason.value)
        sock = conn.sock
        try:
            if conn.error is not None:
                code, message = conn.error
                try:
                    sock.send(conn.unsent + self._final_ack(conn) + encode_error(code, message))
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                else:
                    if conn.linger:
                        await self._linger(sock)
            elif conn.final_ack and conn.session is not None:
                await self._say_final_ack(conn, conn.session)
        finally:
            sock.close()

    def _ack_point(self, session: Session) -> int:
        """How far ``session`` may be acknowledged: not past what the arbiter holds of it."""
        arbiter = self.arbitration.arbiter
        held = None if arbiter is None else arbiter.floor(session.owner)
        return ack_point(session.highest, held)

    def _final_ack(self, conn: Connection) -> bytes:
        """An ACK of what was emitted of the connection's session and not ACKed on it yet,
        sent before this side's ERROR: the capture side that fails over to another host then
        resends nothing this one emitted."""
        session = conn.session
        if session is None or conn.acked < 0:
            return b""
        ackable = self._ack_point(session)
        return encode_ack(ackable) if ackable > conn.acked_seq else b""

    async def _say_final_ack(self, conn: Connection, session: Session) -> None:
        """The capture side said goodbye: ACK what was emitted of its session and not yet
        ACKed (so it knows exactly what it still holds), then let it close first."""
        session.goodbye = conn.reason is Closed.PEER_SHUTDOWN
        ackable = self._ack_point(session)
        if ackable <= conn.acked_seq:
            return  # everything emitted is ACKed already
        try:
            conn.sock.send(conn.unsent + encode_ack(ackable))
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        await self._linger(conn.sock)

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

    async def _stream(self, conn: Connection, proto: EmitConnection) -> None:
        """Stream until the peer stops: the data path runs in a thread of its own
        (relayd/emit/pump.py); cancellation and accounting stay in Trio."""
        session = conn.session
        assert session is not None
        assert self.plane is not None
        assert self.destinations is not None
        assert self.mcast is not None
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
        link = PumpLink(session.session_id.hex(), self.config.max_datagram_size)
        session.link = conn.link = link
        self.stats.attach(link)
        self.links.append(link)
        arbitration = self.arbitration
        arbitration.session_started(conn.peer, len(self.links) - 1)
        try:
            end, detail = await run_stoppable(
                functools.partial(
                    pump_connection,
                    self.plane,
                    conn,
                    proto,
                    link,
                    self.mcast,
                    self.destinations,
                    self.config.idle_timeout,
                    self.config.heartbeat_interval,
                    link.max_datagram_size,
                    arbitration.arbiter,
                    arbitration.source_of(conn.peer),
                    self.role,
                    None if self.observer is None else self.observer.learn,
                    busy_poll=self.config.busy_poll,
                ),
                limiter=self.limiter,
            )
            self._pumped(conn, end, detail)
        finally:
            self.stats.detach(link)
            self.links.remove(link)
            self.stats.datagrams_out += arbitration.session_ended(len(self.links), self.mcast)
            pump = link.pump
            if pump is not None:
                session.highest = pump.highest
                conn.acked = pump.acked
                conn.unsent = pump.unsent()  # a control frame cut short: before the ERROR
            session.link = conn.link = None
            done.set()
            if session.pump_done is done:
                session.pump_done = None

    def _pumped(self, conn: Connection, end: PumpEnd, detail: Any) -> None:
        """Record how the data-path thread ended."""
        if end is PumpEnd.RESET:
            conn.reason = Closed.RESET  # no ERROR to a reset connection
            log.info("%s: %s: %s", self.name, conn.peer, detail)
        elif end is PumpEnd.PROTOCOL:
            self.stats.decode_errors += 1
            conn.error = (ErrorCode.PROTOCOL, str(detail))
            conn.reason = Closed.PROTOCOL
            self.stats.rlog.warning(
                f"decode:{conn.peer}",
                "%s: undecodable bytes from %s: %s",
                self.name,
                conn.peer,
                detail,
            )
        elif end is PumpEnd.PEER_ERROR:
            self.stats.frames_in += len(detail)
            conn.reason = Closed.PEER_ERROR
            for event in detail:
                if isinstance(event, Error):
                    if event.code in _PEER_STOPS:
                        conn.reason = Closed.PEER_SHUTDOWN  # a clean stop, not a fault
                    log.info(
                        "%s: %s sent ERROR %d: %s", self.name, conn.peer, event.code, event.message
                    )
                    break
            conn.final_ack = True
        elif end is PumpEnd.IDLE:
            conn.error = (ErrorCode.IDLE_TIMEOUT, f"nothing received for {detail:g}s")
            conn.reason = Closed.IDLE_TIMEOUT
        elif end is PumpEnd.SLOW:
            conn.end(ErrorCode.SLOW_CONSUMER, "not reading", Closed.SLOW_CONSUMER)
        elif end is PumpEnd.STANDBY:  # what it held is neither emitted nor ACKed
            conn.error = (
                ErrorCode.NOT_ACTIVE,
                f"feed {self.name!r} stepped down here (another relay emits it): connect again",
            )
            conn.reason = Closed.NOT_ACTIVE
        # EOF: closed by the capture side; STOPPED: cancelled, the cancel scope says why
