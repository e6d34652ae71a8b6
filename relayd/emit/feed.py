"""An emit feed: one TCP listener whose DATA frames go out as multicast.

The cloud half of the data path. ``EmitFeedRuntime(config)`` implements
:class:`relayd.runtime.Feed`: ``open`` reads the keys, binds the listener and opens the
multicast sender; ``run`` serves capture connections with them until cancelled. The pieces:
the gate (source check, pending connections, handshake: relayd/emit/listener.py), the sessions
(relayd/emit/sessions.py), the destinations (relayd/emit/destinations.py), one data-path
thread per streaming connection (relayd/emit/pump.py) and the accounting
(relayd/emit/stats.py). A connection that sends nothing for ``idle_timeout`` is closed with
IDLE_TIMEOUT; one that does not read its ACKs for as long, with SLOW_CONSUMER.

Healthy means: the listener is bound and the multicast sender is not failing (from a failed
send, an egress queue discipline's drop included, until ``SEND_RECOVERY`` seconds without one
and a successful send since, or until ``FAILING_HOLD`` seconds pass with no send at all, so an
idle standby does not stay unhealthy). An instance with no capture connection is healthy,
or the load balancer would never route the feed to it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import socket
from collections.abc import Iterable, Iterator, Sequence
from ipaddress import IPv4Address
from typing import Any, Final, Literal

import attrs
import trio

from relayd.config import EmitFeed
from relayd.datapath import DataPlane, run_stoppable, select_plane
from relayd.emit.destinations import Destinations
from relayd.emit.listener import Gate, open_listener
from relayd.emit.pump import PumpEnd, pump_connection
from relayd.emit.sessions import Connection, Session, Sessions
from relayd.emit.stats import Closed, EmitStats, PumpLink, Rejected, SessionChange
from relayd.keys import load_auth_keys
from relayd.netif import (
    InterfaceError,
    drain_error_queue,
    interface_index,
    open_multicast_sender,
    resolve_interface,
)
from relayd.runtime import Feed, FeedHealth, Sample
from relayd.wire import EmitConnection, Error, ErrorCode, encode_ack, encode_error

__all__ = ["EmitFeedRuntime"]

log = logging.getLogger("relayd.emit")

#: ERROR codes with which a capture side says it stops on purpose.
_PEER_STOPS: Final = frozenset({ErrorCode.SHUTTING_DOWN, ErrorCode.FEED_REMOVED})

#: How long a deliberate close waits for the peer's FIN after ERROR and our FIN.
LINGER: Final = 0.2


class EmitFeedRuntime:
    """One ``[[emit]]`` feed (the ``relayd.runtime.Feed`` protocol, kind "emit")."""

    kind: Literal["emit", "capture"] = "emit"

    def __init__(
        self,
        config: EmitFeed,
        *,
        keys: Sequence[bytes] | None = None,
        pending_limit: int | None = None,
        per_source_limit: int | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self._keys = None if keys is None else tuple(keys)  # None: read the key files at open
        self.stats = EmitStats(config.name)
        self.sessions = Sessions()
        self._pending_limit = (
            pending_limit if pending_limit is not None else max(16, 8 * config.max_connections)
        )
        self._per_source_limit = per_source_limit
        self.gate = Gate(
            config.name, config, self.stats, self._pending_limit, self._per_source_limit
        )
        self._destinations: Destinations | None = None
        #: The bound TCP port, once opened (useful with port 0).
        self.listen_port: int | None = None
        self.interface_address: IPv4Address | None = None
        self._close_reason: tuple[int, str] = (ErrorCode.SHUTTING_DOWN, "relay shutting down")
        self._state = "starting"
        self._listening = False
        self._listener: socket.socket | None = None
        self._mcast: socket.socket | None = None
        self._plane: DataPlane | None = None
        self._links: list[PumpLink] = []
        self._started_at = 0.0
        self._limiter: trio.CapacityLimiter | None = None

    # -- Feed protocol ---------------------------------------------------------------------

    def set_close_reason(self, code: int, message: str) -> None:
        """What every connection is told (ERROR code and text) when the feed is cancelled."""
        self._close_reason = (int(code), message)

    def update_keys(self, config: EmitFeed) -> bool:
        """Take ``config`` without a restart when it differs from the running one in
        ``auth_key_files`` only (and keys are in use): read the files again for every later
        HELLO; streaming connections are not touched. False when a restart is needed. Raises
        KeyFileError and keeps the current keys when a file cannot be used."""
        old = self.config
        if attrs.evolve(old, auth_key_files=config.auth_key_files) != config or not (
            old.auth_key_files or config.auth_key_files
        ):
            return False
        self.gate.keys = load_auth_keys(config.auth_key_files)
        self.reconfigure(config)
        return True

    def open(self, previous: Feed | None = None) -> None:
        """Read the keys, bind the listener and open the multicast sender (raises when one
        of them fails; nothing stays open then).

        From ``previous`` (the emit feed this one replaces) it takes the counters when it has
        the same name, and its bound listener when the address is the same: a duplicate of
        the descriptor, so both hold the one socket until the old feed stops, and no
        connection waiting in the accept queue is lost (binding a second socket would fail
        while the old one listens)."""
        cfg = self.config
        keys = self._keys if self._keys is not None else load_auth_keys(cfg.auth_key_files)
        interface_address = resolve_interface(cfg.interface)
        ifindex = interface_index(cfg.interface)
        plane = select_plane()
        inherited = previous if isinstance(previous, EmitFeedRuntime) else None
        listener = (
            inherited.listener_for(cfg.listen.host, cfg.listen.port)
            if inherited is not None
            else None
        )
        if listener is None:
            listener = open_listener(cfg.listen.host, cfg.listen.port)
        try:
            self._mcast = open_multicast_sender(
                interface_address,
                cfg.ttl,
                cfg.loop,
                cfg.send_buffer,
                report_drops=True,
                ifindex=ifindex,
            )
        except BaseException:
            listener.close()
            raise
        if inherited is not None and inherited.name == self.name:
            self.stats = inherited.stats
            self.gate = Gate(
                self.name, cfg, self.stats, self._pending_limit, self._per_source_limit
            )
        self.gate.keys = keys
        self.interface_address = interface_address
        self._plane = plane
        self._listener = listener
        self.listen_port = listener.getsockname()[1]
        destinations = Destinations(self.name, cfg, connect=self._plane.connects_destinations)
        destinations.interface = self.interface_address
        destinations.ifindex = ifindex
        self._destinations = destinations

    def listener_for(self, host: str, port: int) -> socket.socket | None:
        """A duplicate of this feed's listening socket when it is bound to ``host:port``
        (port 0 never matches: it asks for a fresh port), else None."""
        listener = self._listener
        if listener is None or port == 0 or listener.fileno() < 0:
            return None
        if (self.config.listen.host, self.config.listen.port) != (host, port):
            return None
        duplicate = socket.socket(fileno=os.dup(listener.fileno()))
        duplicate.setblocking(False)
        return duplicate

    def close(self) -> None:
        """Release what ``open`` acquired, when ``run`` will not."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._mcast is not None:
            self._mcast.close()
            self._mcast = None
        if self._destinations is not None:
            self._destinations.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._listener is None:
            self.open()
        listener, mcast = self._listener, self._mcast
        assert listener is not None
        assert mcast is not None
        cfg = self.config
        try:
            self._started_at = trio.current_time()
            # no shared thread pool limit: connections are bounded by max_connections
            self._limiter = trio.CapacityLimiter(math.inf)
            async with trio.open_nursery() as outer:
                outer.start_soon(self._tick)
                async with trio.open_nursery() as handlers:
                    await outer.start(self.gate.accept, listener, handlers, self._serve)
                    self._listening = True
                    self._state = "listening"
                    log.info(
                        "emit feed %s listening on %s:%d, multicast out of %s ttl %d, data path %s",
                        self.name,
                        cfg.listen.host,
                        self.listen_port,
                        self.interface_address,
                        cfg.ttl,
                        self._plane.name if self._plane is not None else "?",
                    )
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._listening = False
            self._state = "stopped"
            listener.close()
            mcast.close()
            if self._destinations is not None:
                self._destinations.close()

    def health(self) -> FeedHealth:
        stats = self.stats
        stats.sync()
        failing = stats.sending_failed()
        healthy = self._listening and not failing
        if not self._listening:
            state = self._state
        elif failing:
            state = "failing"
        elif self.sessions.active:
            state = "streaming"
        else:
            state = "listening"
        out_rate, in_rate = stats.rates()
        detail: dict[str, Any] = {
            "listen": f"{self.config.listen.host}:{self.listen_port or self.config.listen.port}",
            "interface": str(self.interface_address or self.config.interface),
            "connections": [self._describe(c) for c in self.sessions.active.values()],
            "pending_connections": len(self.gate.pending),
            "sessions": len(self.sessions),
            # None until a datagram arrived (the metric counts from start-up instead)
            "last_datagram_age_seconds": (
                None if stats.last_datagram_at is None else round(self._last_datagram_age(), 3)
            ),
            "datagrams_per_second": round(out_rate, 1),
            "bytes_in_per_second": round(in_rate, 1),
            "datagrams_out": stats.datagrams_out,
            "sending_failed": failing,
            "last_error": stats.last_error,
        }
        return FeedHealth(healthy, state, detail, len(self.sessions.active), stats.datagrams_out)

    def samples(self) -> Iterable[Sample]:
        self.stats.sync()
        return list(self._samples())

    # -- accounting helpers -----------------------------------------------------------------

    def reconfigure(self, config: EmitFeed) -> None:
        """Serve by ``config`` from now on, as far as it applies in place: the allowlist (the
        pumps forget their destination tables before their next chunk), the handshake's
        settings for later connections. Keys and sockets are not touched."""
        self.config = config
        self.gate.config = config
        if self._destinations is not None and self._destinations.reconfigure(config):
            for link in self._links:
                if link.pump is not None:
                    link.pump.clear_destinations()

    @staticmethod
    def _describe(conn: Connection) -> dict[str, Any]:
        session = conn.session
        return {
            "peer": conn.peer,
            "session": session.session_id.hex() if session else None,
            "highest_seq": session.highest if session else 0,
            "acked_seq": conn.acked_seq,
        }

    def _last_datagram_age(self) -> float:
        since = self.stats.last_datagram_at
        if since is None:
            since = self._started_at
        return max(0.0, trio.current_time() - since)

    def _samples(self) -> Iterator[Sample]:
        feed = (("feed", self.name),)

        def gauge(name: str, help_text: str, value: float) -> Sample:
            return Sample(name, "gauge", help_text, feed, value)

        yield from self.stats.samples()
        yield gauge(
            "active_connections", "Capture connections past HELLO.", len(self.sessions.active)
        )
        yield gauge(
            "pending_connections", "Connections waiting for their HELLO.", len(self.gate.pending)
        )
        yield gauge(
            "sessions", "Capture sessions remembered for deduplication.", len(self.sessions)
        )
        yield gauge(
            "last_datagram_age_seconds",
            "Seconds since the last DATA frame (since start when none yet).",
            self._last_datagram_age(),
        )
        yield gauge(
            "ack_lag",
            "Largest difference between a session's emitted and acknowledged sequence.",
            self.sessions.ack_lag(),
        )
        yield gauge(
            "up",
            "1 while the listener is bound and the emitter works.",
            float(self._listening and not self.stats.sending_failed()),
        )

    async def _tick(self) -> None:
        """Once a second: feed the rate windows, follow the egress interface's address, and
        empty the multicast sockets' error queues (counted as send errors), so that none grows
        or holds an error that would fail a later send while no pump is failing to take it."""
        while True:
            self.stats.tick(trio.current_time())
            self._follow_interface()
            senders = [self._mcast] if self._mcast is not None else []
            if self._destinations is not None:
                senders += self._destinations.senders()
            for sock in senders:
                if sock.fileno() >= 0:
                    self.stats.queued_errors(drain_error_queue(sock))
            await trio.sleep(1.0)

    def _follow_interface(self) -> None:
        """Read the egress interface's address again (one ioctl) and, when it changed,
        connect the destination sockets again: they keep the source address they were
        connected with, and their sends fail until then (counted). The shared socket
        selects the interface by index and needs nothing."""
        destinations = self._destinations
        if destinations is None or destinations.ifindex is None:
            return  # a literal address: nothing to follow
        try:
            address = resolve_interface(self.config.interface)
        except InterfaceError:
            return  # no address right now: sends fail and are counted until it has one
        if address == self.interface_address:
            return
        old, self.interface_address = self.interface_address, address
        destinations.interface = address
        renewed = destinations.reconnect()
        log.warning(
            "emit feed %s: interface %s changed address from %s to %s; %d destination "
            "sockets connected again",
            self.name,
            self.config.interface,
            old,
            address,
            renewed,
        )

    # -- one connection ---------------------------------------------------------------------

    async def _serve(self, conn: Connection) -> None:
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
                conn.error = self._close_reason
                conn.reason = Closed.STOPPED
            await self._finish(conn)

    def _welcome(self, conn: Connection, session_id: bytes) -> bool:
        """Admit a connection past its HELLO: it supersedes its session's older connection,
        then takes one of ``max_connections``; False when refused (``conn.error``)."""
        cfg = self.config
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
        self.stats.connections_accepted += 1
        log.info(
            "%s: capture connection from %s, session %s, resuming after %d",
            self.name,
            conn.peer,
            session_id.hex(),
            session.highest,
        )
        return True

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

    @staticmethod
    def _final_ack(conn: Connection) -> bytes:
        """An ACK of what was emitted of the connection's session and not ACKed on it yet,
        sent before this side's ERROR: the capture side that fails over to another host then
        resends nothing this one emitted."""
        session = conn.session
        if session is None or conn.acked < 0 or session.highest <= conn.acked_seq:
            return b""
        return encode_ack(session.highest)

    async def _say_final_ack(self, conn: Connection, session: Session) -> None:
        """The capture side said goodbye: ACK what was emitted of its session and not yet
        ACKed (so it knows exactly what it still holds), then let it close first."""
        session.goodbye = conn.reason is Closed.PEER_SHUTDOWN
        if session.highest <= conn.acked_seq:
            return  # everything emitted is ACKed already
        try:
            conn.sock.send(conn.unsent + encode_ack(session.highest))
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
        assert self._plane is not None
        assert self._destinations is not None
        assert self._mcast is not None
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
        self._links.append(link)
        try:
            end, detail = await run_stoppable(
                functools.partial(
                    pump_connection,
                    self._plane,
                    conn,
                    proto,
                    link,
                    self._mcast,
                    self._destinations,
                    self.config.idle_timeout,
                    self.config.heartbeat_interval,
                    link.max_datagram_size,
                ),
                limiter=self._limiter,
            )
            self._pumped(conn, end, detail)
        finally:
            self.stats.detach(link)
            self._links.remove(link)
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
        # EOF: closed by the capture side; STOPPED: cancelled, the cancel scope says why
