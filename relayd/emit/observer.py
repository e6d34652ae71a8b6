"""An emit feed's observer: is another relay emitting this feed's groups?

The feed's observer joins the feed's groups on its egress interface (``watch_groups``, else
each destination this host has emitted to, up to ``LEARNED_LIMIT``) and, in a data-path
thread of its own, drains what arrives from a source address other than this host's, tells
the feed's :class:`FeedRole` (the role machine of relayd/emit/role.py behind a lock) and renews
or closes the feed's emit gate (relayd/datapath.py ``EmitGate``) after every drain.

It is a bounded-rate sample, not a copy of the feed: every ``TICK`` it reads at most
``DRAIN_LIMIT`` datagrams per socket (one per port and 20 groups, as capture's) from a small
receive buffer (``OBSERVER_BUFFER``) and the kernel drops the rest, so a standby host that
sees the full feed rate spends a few thousand ``recvmsg`` a second on it whatever the rate
(``python -m bench.observer``). What it needs is
"another relay emits this feed, since when, last seen"; the datagrams it drains from other
relays go to ``hook(group, port, payload, now)`` when one is set (an arbiter's ``observe``;
at high rates a sample). Waking from a freeze, it drains before it decides: the datagrams
another relay sent meanwhile are in its buffer, so the gate stays closed and the pumps'
backlog is never emitted (relayd/emit/role.py, the lease).

With a beacon destination (the feed's ``beacon_destination()``: the first watch group on the
beacon port) it also joins that and, after each decision, sends this host's beacon
(relayd/emit/beacon.py) while the feed is claiming or active; the beacons it drains from
other hosts of the same feed go to the role machine (the claim, and a standby that knows the
active host before any data flows).
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address
from typing import Any, Final

import trio

from relayd.config import GroupPort
from relayd.datapath import EmitGate, current_beat
from relayd.emit.beacon import Beacon, BeaconError, decode, encode
from relayd.emit.role import GRACE, Role, RoleEvent, RoleMachine, StepDown
from relayd.netif import (
    ANCBUFSIZE,
    MAX_MEMBERSHIPS_PER_SOCKET,
    GroupReceiver,
    InterfaceError,
    join_groups,
    open_group_receivers,
    open_multicast_sender,
    parse_ancillary,
)

__all__ = ["DRAIN_LIMIT", "LEARNED_LIMIT", "OBSERVER_BUFFER", "TICK", "FeedRole", "Observer"]

log = logging.getLogger("relayd.emit")

#: How often the observer drains and decides (a tenth of the role's grace).
TICK: Final = 0.1
#: Datagrams read per socket per tick at most; the kernel drops what the buffer cannot hold.
DRAIN_LIMIT: Final = 256
#: SO_RCVBUF of each observer socket (small on purpose: the sample's bound).
OBSERVER_BUFFER: Final = 256 * 1024
#: Destinations learned from the pumps at most (without ``watch_groups``).
LEARNED_LIMIT: Final = 64
_RECEIVE_SIZE: Final = 65536
#: Buffers of the beacon sockets (a beacon is under 80 bytes, about 10 a second per host).
BEACON_BUFFER: Final = 64 * 1024
#: ``setsockopt(IPPROTO_IP, IP_BLOCK_SOURCE, ip_mreq_source)`` (linux/in.h).
IP_BLOCK_SOURCE: Final = 38

#: ``hook(group, port, payload, now)``: a datagram another relay sent (group as an int).
ObserveHook = Callable[[int, int, bytes, float], None]


class FeedRole:
    """The role machine of one feed behind a lock, the gate it drives, and its log lines.

    The observer's thread drains and decides (``observed``); Trio says when the feed's
    streams change (``streaming``) and reads ``snapshot``; the pumps read the gate and ask
    ``standing_down`` when it is closed."""

    def __init__(
        self, name: str, address: IPv4Address | None, grace: float = GRACE, claim: float = 0.0
    ) -> None:
        self.name = name
        self.gate = EmitGate()
        self._machine = RoleMachine(address, grace=grace, claim=claim)
        self._lock = threading.Lock()

    @property
    def claim(self) -> float:
        return self._machine.claim

    @claim.setter
    def claim(self, claim: float) -> None:
        """The claim period (0: none; set when the feed has a beacon destination)."""
        with self._lock:
            self._machine.claim = claim

    @property
    def address(self) -> IPv4Address | None:
        return self._machine.address

    @address.setter
    def address(self, address: IPv4Address | None) -> None:
        with self._lock:
            self._machine.address = address

    def observed(
        self,
        others: dict[IPv4Address, int],
        now: float,
        beacons: Sequence[tuple[IPv4Address, Beacon]] = (),
    ) -> Beacon | None:
        """The observer drained its sockets at ``now``: datagrams per other relay, and the
        beacons of this feed from other hosts. Returns the beacon to send now (None: none)."""
        with self._lock:
            machine = self._machine
            for source, datagrams in others.items():
                machine.saw(source, datagrams, now)
            for source, beacon in beacons:
                machine.beacon(source, beacon.state, beacon.emitted, now)
            events = machine.decide(now)
            self.gate.open_until(machine.lease_until)
            self._log(events, now)
            state = machine.beacon_state()
            return None if state is None else Beacon(self.name, state, machine.gate_opened)

    def streaming(self, active: bool) -> None:
        """Whether the feed has an accepted stream now (from Trio)."""
        with self._lock:
            events = self._machine.streaming(active, time.monotonic())
            self.gate.open_until(self._machine.lease_until)
            self._log(events, time.monotonic())

    def admits(self) -> bool:
        with self._lock:
            return self._machine.admits()

    def standing_down(self) -> bool:
        """True once this host must not emit the feed (standby): pumps end their streams."""
        with self._lock:
            return self._machine.role is Role.STANDBY

    def snapshot(self) -> dict[str, Any]:
        """The role as ``/healthz/<feed>``, ``/metrics`` and ``relayd status`` show it."""
        now, wall = time.monotonic(), time.time()
        with self._lock:
            m = self._machine
            return {
                "role": m.role.value,
                "reason": m.reason(now),
                "active_for_seconds": (
                    None if m.active_since is None else round(now - m.active_since, 3)
                ),
                "split_brain": m.split_brain,
                "split_brains": m.split_brains,
                "stepped_down": {why.value: n for why, n in m.step_downs.items()},
                "claim_seconds": m.claim,
                "claiming_for_seconds": (
                    None if m.claim_since is None else round(now - m.claim_since, 3)
                ),
                "claims": {outcome.value: n for outcome, n in m.claims.items()},
                "claimants": [
                    {
                        "source": str(source),
                        "last_seen_seconds_ago": round(max(0.0, now - seen), 3),
                    }
                    for source, seen in m.claimants.items()
                ],
                "other_relays": [
                    {
                        "source": str(seen.source),
                        "since": _iso(wall - (now - seen.first_seen)),
                        "last_seen_seconds_ago": round(max(0.0, now - seen.last_seen), 3),
                        "datagrams_sampled": seen.datagrams,
                        "beacon": None if seen.beacon is None else seen.beacon.name.lower(),
                        "emitted": seen.emitted,
                    }
                    for seen in m.others.values()
                ],
            }

    def _log(self, events: list[RoleEvent], now: float) -> None:
        m = self._machine
        for event in events:
            if event is RoleEvent.SPLIT_BRAIN:
                log.warning(
                    "emit feed %s: split-brain: this host emits while %s emits the feed's groups "
                    "too (event %d)",
                    self.name,
                    ", ".join(str(source) for source in m.others),
                    m.split_brains,
                    extra={"feed": self.name},
                )
            elif event is RoleEvent.SPLIT_BRAIN_RESOLVED:
                log.warning("emit feed %s: split-brain resolved", self.name)
            elif event is RoleEvent.STEPPED_DOWN:
                assert m.stepped_down is not None
                log.warning(
                    "emit feed %s: stepping down (%s): %s; streams end with NOT_ACTIVE",
                    self.name,
                    m.stepped_down.value,
                    _STEP_DOWN_WHY[m.stepped_down],
                    extra={"feed": self.name},
                )
            elif event is RoleEvent.CLAIM_YIELDED:  # routine with A/B capture hosts
                log.info(
                    "emit feed %s: claim yielded to %s before emitting anything; streams end "
                    "with NOT_ACTIVE",
                    self.name,
                    ", ".join(str(s) for s in (*m.others, *m.claimants)) or "another relay",
                    extra={"feed": self.name},
                )
            elif event is RoleEvent.BECAME_CLAIMING:
                log.info(
                    "emit feed %s: claiming the feed for %g s before emitting",
                    self.name,
                    m.claim,
                )
            elif event is RoleEvent.BECAME_STANDBY:
                log.info("emit feed %s: standby: %s", self.name, m.reason(now))
            else:
                log.debug("emit feed %s: %s", self.name, m.role.value)


_STEP_DOWN_WHY: Final = {
    StepDown.SEEN_FIRST: "the other relay was emitting before this host became active",
    StepDown.HIGHER_ADDRESS: "split-brain unresolved, the lower address keeps the feed",
    StepDown.WOKE_TO_ANOTHER: "the emit lease lapsed (a freeze?) and another relay emitted "
    "meanwhile: the backlog is not emitted",
    StepDown.YIELDED: "a claim gave way to another relay before anything was emitted",
}


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


class Observer:
    """The sockets and the thread loop (``run``) of one feed's observer."""

    def __init__(
        self,
        name: str,
        role: FeedRole,
        interface: IPv4Address,
        watch: Sequence[GroupPort],
        beacon: GroupPort | None = None,
        ttl: int = 1,
    ) -> None:
        self.name = name
        self.role = role
        self.interface = interface
        #: An arbiter's ``observe``: given every datagram drained from another relay.
        self.hook: ObserveHook | None = None
        self.explicit = bool(watch)
        self.watched: set[tuple[IPv4Address, int]] = set()
        self._receivers: list[GroupReceiver] = []
        self._learned: list[tuple[IPv4Address, int]] = []
        self._lock = threading.Lock()
        self.own_datagrams = 0  # its own sends looped back (IP_MULTICAST_LOOP)
        self.other_datagrams = 0
        self.join_errors = 0
        for group in watch:
            self._join((group.group, group.port))
        #: Where beacons go (None: none), the sockets, and what they carried.
        self.beacon = beacon
        self._beacon_receivers: list[GroupReceiver] = []
        self._beacon_sender: socket.socket | None = None
        self.beacons_sent = 0
        self.beacons_received = 0
        self.beacons_ignored = 0  # another feed's, or not a beacon this relay reads
        self.beacon_send_errors = 0
        if beacon is not None:
            self._open_beacon(beacon, ttl)

    def _open_beacon(self, beacon: GroupPort, ttl: int) -> None:
        try:
            self._beacon_receivers = open_group_receivers(
                [(beacon.group, beacon.port)], self.interface, BEACON_BUFFER, force_buffer=False
            )
            self._beacon_sender = open_multicast_sender(self.interface, ttl, False, BEACON_BUFFER)
        except (InterfaceError, OSError) as exc:
            self.join_errors += 1
            self.close_beacon()
            self.beacon = None  # so the feed claims nothing: a claim nobody hears is no claim
            log.warning(
                "emit feed %s: cannot open the beacon on %s:%d (no claim: a stream makes this "
                "host active at once): %s",
                self.name,
                beacon.group,
                beacon.port,
                exc,
            )

    def learn(self, key: int) -> None:
        """A destination this host emits to (``group << 16 | port``, from a pump's thread):
        watched from the next tick on, without ``watch_groups`` and up to LEARNED_LIMIT."""
        if self.explicit:
            return
        destination = (IPv4Address(key >> 16), key & 0xFFFF)
        with self._lock:
            if destination in self.watched or len(self.watched) >= LEARNED_LIMIT:
                return
            self.watched.add(destination)
            self._learned.append(destination)

    @property
    def sockets(self) -> int:
        """Sockets open for the watched groups (one per port and 20 groups)."""
        return len(self._receivers)

    def close(self) -> None:
        for receiver in self._receivers:
            receiver.close()
        self._receivers.clear()
        self.close_beacon()

    def close_beacon(self) -> None:
        for receiver in self._beacon_receivers:
            receiver.close()
        self._beacon_receivers.clear()
        if self._beacon_sender is not None:
            self._beacon_sender.close()
            self._beacon_sender = None

    def run(self, stop_fd: int, _token: trio.lowlevel.TrioToken) -> None:
        """Drain, decide, wait a tick; until ``stop_fd`` is readable."""
        poller = select.poll()
        poller.register(stop_fd, select.POLLIN)
        buffer = bytearray(_RECEIVE_SIZE)
        beat = current_beat()
        try:
            while True:
                self._join_learned()
                now = time.monotonic()
                others: dict[IPv4Address, int] = {}
                for receiver in self._receivers:
                    self._drain(receiver, buffer, others, now)
                beacons = [b for r in self._beacon_receivers for b in self._beacons(r, buffer)]
                self._announce(self.role.observed(others, now, beacons))
                with beat.wait():
                    if poller.poll(int(TICK * 1000)):
                        return
        finally:
            self.close()

    def _drain(
        self,
        receiver: GroupReceiver,
        buffer: bytearray,
        others: dict[IPv4Address, int],
        now: float,
    ) -> None:
        recvmsg_into = receiver.sock.recvmsg_into
        own = str(self.role.address)
        hook = self.hook
        sources: dict[str, int] = {}
        for _ in range(DRAIN_LIMIT):
            try:
                size, ancdata, _flags, address = recvmsg_into((buffer,), ANCBUFSIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            source = address[0]
            if source == own:
                self.own_datagrams += 1
                continue
            sources[source] = sources.get(source, 0) + 1
            if hook is not None:
                group, _drops = parse_ancillary(ancdata)
                hook(group, receiver.port, bytes(buffer[:size]), now)
        for source, count in sources.items():
            self.other_datagrams += count
            address = IPv4Address(source)
            others[address] = others.get(address, 0) + count

    def _beacons(
        self, receiver: GroupReceiver, buffer: bytearray
    ) -> list[tuple[IPv4Address, Beacon]]:
        """Other hosts' beacons of this feed waiting on the beacon socket."""
        own = str(self.role.address)
        out: list[tuple[IPv4Address, Beacon]] = []
        for _ in range(DRAIN_LIMIT):
            try:
                size, address = receiver.sock.recvfrom_into(buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if address[0] == own:
                continue
            try:
                beacon = decode(bytes(buffer[:size]))
            except BeaconError:
                self.beacons_ignored += 1
                continue
            if beacon.feed != self.name:
                self.beacons_ignored += 1
                continue
            self.beacons_received += 1
            out.append((IPv4Address(address[0]), beacon))
        return out

    def _announce(self, beacon: Beacon | None) -> None:
        sender, destination = self._beacon_sender, self.beacon
        if beacon is None or sender is None or destination is None:
            return
        try:
            sender.sendto(encode(beacon), (str(destination.group), destination.port))
        except OSError:
            self.beacon_send_errors += 1
        else:
            self.beacons_sent += 1

    def _block_own(self, receiver: GroupReceiver, group: IPv4Address) -> None:
        """Have the kernel drop this host's own datagrams (looped back with ``loop = true``)
        before they fill the small buffer and crowd out another relay's; the source check in
        ``_drain`` stays for a changed address."""
        own = self.role.address
        if own is None:
            return
        mreq = group.packed + self.interface.packed + own.packed
        try:
            receiver.sock.setsockopt(socket.IPPROTO_IP, IP_BLOCK_SOURCE, mreq)
        except OSError as exc:
            log.debug("emit feed %s: cannot block own source on %s: %s", self.name, group, exc)

    def _join_learned(self) -> None:
        with self._lock:
            learned, self._learned = self._learned, []
        for destination in learned:
            self._join(destination)

    def _join(self, destination: tuple[IPv4Address, int]) -> None:
        """Join on a socket of the destination's port with room (as capture groups them), else
        on a new one: fewer descriptors, one sample bound per socket."""
        self.watched.add(destination)
        group, port = destination
        roomy = [
            i
            for i, r in enumerate(self._receivers)
            if r.port == port and len(r.groups) < MAX_MEMBERSHIPS_PER_SOCKET
        ]
        try:
            if roomy:
                receiver = join_groups(self._receivers[roomy[0]], [group])
                self._receivers[roomy[0]] = receiver
            else:
                (receiver,) = open_group_receivers(
                    [destination], self.interface, OBSERVER_BUFFER, force_buffer=False
                )
                self._receivers.append(receiver)
            self._block_own(receiver, group)
        except (InterfaceError, OSError) as exc:
            self.join_errors += 1
            log.warning(
                "emit feed %s: cannot watch %s:%d for other relays: %s",
                self.name,
                destination[0],
                destination[1],
                exc,
            )
