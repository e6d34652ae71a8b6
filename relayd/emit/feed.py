"""An emit feed: one TCP listener whose DATA frames go out as multicast.

The cloud half of the data path. ``EmitFeedRuntime(config)`` implements
:class:`relayd.runtime.Feed`: ``open`` reads the keys, binds the listener and opens the
multicast sender; ``run`` serves capture connections with them until cancelled. The pieces:
the gate (source check, pending connections, handshake: relayd/emit/listener.py), each
connection's life from HELLO to close (relayd/emit/streams.py), the sessions
(relayd/emit/sessions.py), the destinations (relayd/emit/destinations.py), one data-path
thread per streaming connection (relayd/emit/pump.py), the accounting
(relayd/emit/stats.py) and whether this host is the feed's active emitter
(relayd/emit/activity.py). A connection that sends nothing for ``idle_timeout`` is closed with
IDLE_TIMEOUT; one that does not read its ACKs for as long, with SLOW_CONSUMER.

Healthy means: the listener is bound and the multicast sender is not failing (from a failed
send, an egress queue discipline's drop included, until ``SEND_RECOVERY`` seconds without one
and a successful send since, or until ``FAILING_HOLD`` seconds pass with no send at all, so an
idle standby does not stay unhealthy). An instance with no capture connection is healthy,
or the load balancer would never route the feed to it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable, Iterator, Sequence
from ipaddress import IPv4Address
from typing import Any, Literal

import attrs
import trio

from relayd.config import EmitFeed
from relayd.datapath import DataPlane, log_latency_mode, select_plane
from relayd.emit.activity import FeedActivity
from relayd.emit.arbitration import FeedArbitration
from relayd.emit.destinations import Destinations
from relayd.emit.listener import Gate, open_listener
from relayd.emit.observer import FeedRole, ObserveHook, Observer
from relayd.emit.sessions import Sessions
from relayd.emit.stats import EmitStats
from relayd.emit.streams import ConnectionStreams
from relayd.keys import load_auth_keys
from relayd.netif import (
    InterfaceError,
    drain_error_queue,
    interface_index,
    open_multicast_sender,
    resolve_interface,
    set_multicast_interface,
)
from relayd.runtime import Feed, FeedHealth, Sample
from relayd.wire import ErrorCode

__all__ = ["EmitFeedRuntime"]

log = logging.getLogger("relayd.emit")


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
        # A running emit feed, other than ``previous``, that listens on this feed's address
        # and leaves it in the same reload (two feeds swapping ports): ``open`` takes a
        # duplicate of its listener, as it does of ``previous``'s.
        self.listener_donor: EmitFeedRuntime | None = None
        self._mcast: socket.socket | None = None
        self._plane: DataPlane | None = None
        self._streams: ConnectionStreams | None = None
        #: A/B arbitration of its concurrent capture sessions (relayd/emit/arbitration.py)
        self.arbitration: FeedArbitration | None = None
        self._arbitration_released = False
        self._started_at = 0.0
        #: One active emitter: the feed's role, observer and beacons (relayd/emit/activity.py)
        self.activity = FeedActivity(config.name, config.emitter_grace, self.sessions, self.observe)

    # -- Feed protocol ---------------------------------------------------------------------

    def set_close_reason(self, code: int, message: str) -> None:
        """What every connection is told (ERROR code and text) when the feed is cancelled."""
        self._close_reason = (int(code), message)
        if self._streams is not None:
            self._streams.close_reason = self._close_reason

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
        if listener is None and self.listener_donor is not None:
            listener = self.listener_donor.listener_for(cfg.listen.host, cfg.listen.port)
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
        self.activity.open(interface_address, cfg)
        self._plane = plane
        self._listener = listener
        self.listen_port = listener.getsockname()[1]
        arbitration = inherited.arbitration if inherited is not None else None
        if (
            inherited is None
            or inherited.name != self.name
            or arbitration is None
            or not arbitration.carries_over(cfg, plane)
        ):
            # a restarted feed with the same settings keeps what its arbiter knows
            arbitration = FeedArbitration(self.name, cfg, plane)
        self.arbitration = arbitration.acquire()
        destinations = Destinations(self.name, cfg, connect=self._plane.connects_destinations)
        destinations.interface = self.interface_address
        destinations.ifindex = ifindex
        self._destinations = destinations
        self._streams = ConnectionStreams(
            self.name,
            cfg,
            stats=self.stats,
            gate=self.gate,
            sessions=self.sessions,
            plane=plane,
            destinations=destinations,
            mcast=self._mcast,
            arbitration=self.arbitration,
            role=self.activity.role,
            observer=self.activity.observer,
        )
        self._streams.close_reason = self._close_reason

    @property
    def role(self) -> FeedRole:
        """This feed's role among the emit hosts and its emit gate."""
        return self.activity.role

    @property
    def observer(self) -> Observer | None:
        """The feed's observer (None until ``open``)."""
        return self.activity.observer

    @property
    def observe_hook(self) -> ObserveHook | None:
        """The observer's hook (``FeedActivity.observe_hook``)."""
        return self.activity.observe_hook

    @observe_hook.setter
    def observe_hook(self, hook: ObserveHook | None) -> None:
        self.activity.observe_hook = hook

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
        self._release_arbitration()
        self.activity.close()

    def _release_arbitration(self) -> None:
        arbitration = self.arbitration
        if arbitration is not None and not self._arbitration_released:
            self._arbitration_released = True
            arbitration.release()

    def observe(self, group: int, port: int, payload: bytes) -> None:
        """Any thread: a datagram another relay emitted on this feed's groups (host-order
        ``group``): with arbitration, this feed will not send it (nor anything before it on
        its channel) again. Nothing with ``arbitration = "none"``."""
        if self.arbitration is not None:
            self.arbitration.observe(group, port, payload)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._listener is None:
            self.open()
        listener, mcast, streams = self._listener, self._mcast, self._streams
        assert listener is not None
        assert mcast is not None
        assert streams is not None
        cfg = self.config
        try:
            self._started_at = trio.current_time()
            async with trio.open_nursery() as outer:
                outer.start_soon(self._tick)
                self.activity.start(outer)
                async with trio.open_nursery() as handlers:
                    await outer.start(self.gate.accept, listener, handlers, streams.serve)
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
                    if self._plane is not None:
                        log_latency_mode(log, self.name, cfg.busy_poll, self._plane)
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._listening = False
            self._state = "stopped"
            listener.close()
            mcast.close()
            if self._destinations is not None:
                self._destinations.close()
            self._release_arbitration()
            self.activity.close()

    def health(self) -> FeedHealth:
        stats = self.stats
        stats.sync()
        failing = stats.sending_failed()
        role = self.activity.role.snapshot()
        standby = role["role"] == "standby"
        healthy = self._listening and not failing
        if not self._listening:
            state = self._state
        elif failing:
            state = "failing"
        elif standby:  # not ready: the NLB steers the feed's connections to the active host
            state = "standby"
        elif self.sessions.active:
            state = "streaming"
        else:
            state = "listening"
        out_rate, in_rate = stats.rates()
        detail: dict[str, Any] = {
            "listen": f"{self.config.listen.host}:{self.listen_port or self.config.listen.port}",
            "interface": str(self.interface_address or self.config.interface),
            "connections": [c.describe() for c in self.sessions.active.values()],
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
            "emit_gated": stats.gated,
            "emit_gated_seconds": round(stats.gated_seconds, 3),
            "role": role,
        }
        if self.arbitration is not None:
            detail["arbitration"] = self.arbitration.detail()
        return FeedHealth(
            healthy,
            state,
            detail,
            len(self.sessions.active),
            stats.datagrams_out,
            ready=not standby,
        )

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
        moved = self._destinations is not None and self._destinations.reconfigure(config)
        if self._streams is not None:
            self._streams.config = config
            if moved:
                self._streams.forget_destinations()

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
        if self.arbitration is not None:
            yield from self.arbitration.samples()
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
        yield from self.activity.samples()

    async def _tick(self) -> None:
        """Once a second: feed the rate windows, follow the egress interface's address, and
        empty the multicast sockets' error queues (counted as send errors), so that none grows
        or holds an error that would fail a later send while no pump is failing to take it."""
        while True:
            self.stats.tick(trio.current_time())
            self.activity.end_streams_if_standing_down()
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
        connected with, and their sends fail until then (counted). The shared socket gets the
        new source address in place."""
        destinations = self._destinations
        if destinations is None or destinations.ifindex is None:
            return  # 0.0.0.0, or an address no interface had: nothing to follow
        try:
            # by index: a literal address names the interface that had it at start
            address = resolve_interface(socket.if_indextoname(destinations.ifindex))
        except (InterfaceError, OSError):
            return  # no address right now: sends fail and are counted until it has one
        if address == self.interface_address:
            return
        old, self.interface_address = self.interface_address, address
        self.activity.role.address = address
        destinations.interface = address
        if self._mcast is not None:
            set_multicast_interface(self._mcast, address, destinations.ifindex)
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
