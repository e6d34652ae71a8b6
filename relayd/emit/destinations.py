"""An emit feed's destinations: the allowlist's verdicts, cached, and connected senders.

The pumps ask here (from their threads) the first time they see a ``group:port``; the verdict
is ``session.Allowlist``'s, cached per feed, and an allowed destination gets a multicast
socket connected to it when the data plane uses one (the C pump sends with ``send`` on it: the
route is cached instead of looked up per datagram). Without a descriptor for that socket
(EMFILE under descriptor pressure) the destination is sent to on the feed's shared socket
(``sendto``), as on the Python data plane: a stream never ends for want of a descriptor.
Refusals are logged here, rate-limited; the pumps count them. Its own lock: pump threads and
Trio (a reload that changes the allowlist, the feed's end) share it, for one lookup at a time.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from ipaddress import IPv4Address
from typing import Final

from relayd.config import EmitFeed
from relayd.logs import RateLimitedLogger
from relayd.netif import InterfaceError, open_multicast_sender
from relayd.session import Allowlist, Destination

__all__ = ["CONNECTED_DESTINATIONS", "DESTINATION_CACHE_LIMIT", "Destinations"]

log = logging.getLogger("relayd.emit")

#: Destinations with a connected socket of their own per feed; more use the shared socket.
CONNECTED_DESTINATIONS: Final = 256
#: Verdicts cached at most; the cache is cleared when it grows past this.
DESTINATION_CACHE_LIMIT: Final = 65536


class Destinations:
    """Verdicts on ``group << 16 | port`` keys, and the sockets connected to allowed ones."""

    def __init__(self, name: str, config: EmitFeed, *, connect: bool) -> None:
        self._name = name
        self._config = config
        self._connect = connect
        self._allowlist = Allowlist(config.allowed_groups, config.allowed_ports)
        self._verdicts: dict[int, Destination] = {}
        # sockets connected to allowed destinations; they stay open until the feed stops, as a
        # pump may be sending on one
        self._connected: dict[int, socket.socket] = {}
        self.interface: IPv4Address | None = None  # set when the feed runs
        self.ifindex: int | None = None  # the interface's index when it was named
        self._lock = threading.Lock()
        self._rlog = RateLimitedLogger(log, interval=10.0, max_keys=256)

    def reconfigure(self, config: EmitFeed) -> bool:
        """Take a new allowlist; True when it differs (the pumps must forget their tables)."""
        changed = (config.allowed_groups, config.allowed_ports) != (
            self._config.allowed_groups,
            self._config.allowed_ports,
        )
        with self._lock:
            self._config = config
            if changed:
                self._allowlist = Allowlist(config.allowed_groups, config.allowed_ports)
                self._verdicts.clear()
        return changed

    def judge(self, key: int) -> tuple[Destination, int]:
        """The verdict on ``key`` and the fd of a socket connected to it (-1: the shared
        socket, or refused); a refusal is logged."""
        with self._lock:
            verdict = self._verdicts.get(key)
            if verdict is None:
                verdict = self._allowlist.verdict(key >> 16, key & 0xFFFF)
                if len(self._verdicts) >= DESTINATION_CACHE_LIMIT:
                    self._verdicts.clear()
                self._verdicts[key] = verdict
            if verdict is not Destination.ALLOWED:
                self._log_refused(key, verdict)
                return verdict, -1
            return verdict, self._connected_fd(key) if self._connect else -1

    def sender(self, key: int) -> socket.socket | None:
        """The socket connected to ``key``, if it has one (any thread)."""
        with self._lock:
            return self._connected.get(key)

    def senders(self) -> list[socket.socket]:
        """Every connected socket (any thread)."""
        with self._lock:
            return list(self._connected.values())

    def reconnect(self) -> int:
        """Connect every destination socket again, in place (the pumps keep sending on the
        same descriptor): a connected socket keeps the source address it was connected with,
        so after the interface's address changed, its sends fail until then. Returns how many
        were renewed."""
        renewed = 0
        with self._lock:
            if self.interface is None:
                return 0
            for key, sock in self._connected.items():
                try:
                    fresh = self._open_sender(self.interface)
                except InterfaceError:
                    continue
                with fresh:
                    try:
                        fresh.connect((str(IPv4Address(key >> 16)), key & 0xFFFF))
                    except OSError:
                        continue
                    os.dup2(fresh.fileno(), sock.fileno())
                renewed += 1
        return renewed

    def close(self) -> None:
        with self._lock:
            for sock in self._connected.values():
                sock.close()
            self._connected.clear()

    def _open_sender(self, interface: IPv4Address) -> socket.socket:
        """A multicast sender for one destination, as the feed's shared one is set up."""
        cfg = self._config
        return open_multicast_sender(
            interface, cfg.ttl, cfg.loop, cfg.send_buffer, report_drops=True, ifindex=self.ifindex
        )

    def _connected_fd(self, key: int) -> int:
        sock = self._connected.get(key)
        if sock is None:
            if len(self._connected) >= CONNECTED_DESTINATIONS or self.interface is None:
                return -1
            try:
                sock = self._open_sender(self.interface)
            except InterfaceError:
                return -1
            except OSError as exc:  # no descriptor: the shared socket serves it
                self._rlog.warning(
                    "no_descriptor",
                    "%s: no socket of its own for %s:%d (%s); sending on the shared socket",
                    self._name,
                    IPv4Address(key >> 16),
                    key & 0xFFFF,
                    exc.strerror,
                )
                return -1
            try:
                sock.connect((str(IPv4Address(key >> 16)), key & 0xFFFF))
            except OSError:  # no route yet: the shared socket reports it per datagram
                sock.close()
                return -1
            self._connected[key] = sock
        return sock.fileno()

    def _log_refused(self, key: int, verdict: Destination) -> None:
        reason = verdict.reason
        self._rlog.warning(
            f"{reason}:{key}",
            "%s: dropped a datagram for %s:%d (%s)",
            self._name,
            IPv4Address(key >> 16),
            key & 0xFFFF,
            reason.replace("_", " "),
        )
