"""One emit feed's role among the emit hosts: active, claiming, ready or standby (sans-I/O).

Behind the NLB the capture side cannot choose its emit host; per-feed health is the only
steering. So every emit host watches the feed's groups (relayd/emit/observer.py) and tells
this machine what it saw from *other* relays (``saw``) and whether it has an accepted capture
stream (``streaming``); ``decide`` applies the rules below and ``lease`` says until when the
data plane may emit. Times are seconds on one monotonic clock, given by the caller.

Rules (docs/EXACTLY_ONCE.md, "One active emitter per feed"):

- Another relay *emits* the feed while a datagram from a source address other than this
  host's own was seen on the feed's groups within ``grace``, or an ``ACTIVE`` beacon of the
  feed from it (``beacon``).
- ``ACTIVE``: this host has an accepted stream and has not stepped down. ``READY``: no
  stream, no other relay emitting: it takes a connection. ``STANDBY``: another relay emits
  (and this host has no stream), or this host stepped down: ``/healthz/<feed>`` answers 503
  with ``reason`` and new connections are refused (``admits``), so the NLB steers to the
  active host, also when it fails open. Another host's claim (a ``CLAIMING`` beacon within
  ``grace``) makes a host without a stream ``STANDBY`` too.
- The claim (``claim`` > 0: the feed sends beacons, relayd/emit/beacon.py): a host that gets
  a stream while not active is first ``CLAIMING`` for ``claim`` seconds, its gate closed
  (nothing emitted, nothing ACKed), announcing itself (``beacon_state``). Another relay that
  emits, or another claim from a lower address, makes it yield at once
  (``StepDown.YIELDED``, counted in ``claims``, not in ``step_downs``): ``STANDBY``, its
  streams end with NOT_ACTIVE and the capture side reconnects through the NLB to the other
  host. Otherwise the first observer decision ``claim`` seconds on makes it ``ACTIVE``. Two
  hosts that get streams at once so agree before either emits: the lower address.
- Split-brain: ``ACTIVE`` and another relay emits. Counted once per event (``split_brains``).
  Resolved by a deterministic rule that both hosts apply on their own: a host that saw the
  other emitting *before* it became active steps down at once (the one active longer keeps
  it; at most one of two hosts can have seen the other first); when neither did (both became
  active within one observation, or a partition healed), after ``split_timeout`` the host
  with the higher address steps down. A host that stepped down stays ``STANDBY`` until the
  other relay has been silent for ``grace``.
- The lease: the data plane emits only until ``lease_until`` (``lease`` seconds after the
  latest ``decide``, 0 while ``STANDBY`` or ``CLAIMING``). A host frozen (SIGSTOP) or
  starved longer than the lease finds it stale on waking; if another relay emitted meanwhile
  (the observer drained it before deciding) it steps down without emitting its backlog
  (``StepDown.WOKE_TO_ANOTHER``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from ipaddress import IPv4Address
from typing import Final

import attrs

from relayd.emit.beacon import BeaconState

__all__ = [
    "CLAIM",
    "GRACE",
    "LEASE",
    "SPLIT_TIMEOUT",
    "ClaimOutcome",
    "Role",
    "RoleEvent",
    "RoleMachine",
    "Sighting",
    "StepDown",
]

#: Another relay counts as emitting this long after its latest datagram seen.
GRACE: Final = 1.0
#: How long the data plane may emit after the latest decision (the observer decides about
#: every ``GRACE / 10``); a freeze or stall longer than this closes the gate.
LEASE: Final = 0.5
#: A split-brain neither host resolved by "who saw the other first" is resolved by address
#: after this long.
SPLIT_TIMEOUT: Final = 2.0
#: The claim period by default (three observer decisions): long enough for a beacon sent at
#: the next tick to reach the other hosts and be drained at theirs.
CLAIM: Final = 0.3


class Role(enum.Enum):
    ACTIVE = "active"
    CLAIMING = "claiming"  # has a stream, gate closed, announcing itself for ``claim`` s
    READY = "ready"
    STANDBY = "standby"


class StepDown(enum.Enum):
    """Why an active host stopped emitting (``relayd_emit_stepped_down_total{reason}``)."""

    SEEN_FIRST = "seen_first"  # split-brain: the other was emitting before this host was active
    HIGHER_ADDRESS = "higher_address"  # split-brain unresolved for split_timeout: tie-break
    WOKE_TO_ANOTHER = "woke_to_another"  # the lease lapsed (a freeze) and another relay emits
    #: a claim that gave way (another relay active, or claiming from a lower address):
    #: nothing was emitted; counted in ``claims``, not in ``step_downs``
    YIELDED = "yielded"


class ClaimOutcome(enum.Enum):
    """How a claim ended (``relayd_emit_claims_total{outcome}``)."""

    WON = "won"
    YIELDED = "yielded"


class RoleEvent(enum.Enum):
    """What ``decide`` found worth a log line (each once per occurrence)."""

    SPLIT_BRAIN = enum.auto()
    SPLIT_BRAIN_RESOLVED = enum.auto()
    STEPPED_DOWN = enum.auto()
    BECAME_STANDBY = enum.auto()
    BECAME_READY = enum.auto()
    BECAME_ACTIVE = enum.auto()
    BECAME_CLAIMING = enum.auto()
    CLAIM_YIELDED = enum.auto()


@attrs.define
class Sighting:
    """Another relay seen emitting the feed's groups, in one episode (silences < grace)."""

    source: IPv4Address
    first_seen: float
    last_seen: float
    datagrams: int = 0
    #: what its latest beacon said (None: seen by its data only)
    beacon: BeaconState | None = None
    emitted: bool = False


@attrs.define
class RoleMachine:
    """The rules above for one feed; the caller serialises calls (one lock)."""

    address: IPv4Address | None = None  # this host's egress address (the tie-break)
    grace: float = GRACE
    lease: float = LEASE
    split_timeout: float = SPLIT_TIMEOUT
    #: the claim period (0: no claim, a stream makes the host active at once: no beacons)
    claim: float = 0.0
    role: Role = Role.READY
    others: dict[IPv4Address, Sighting] = attrs.field(factory=dict)
    #: other hosts claiming the feed: their latest CLAIMING beacon
    claimants: dict[IPv4Address, float] = attrs.field(factory=dict)
    claim_since: float | None = None
    claims: dict[ClaimOutcome, int] = attrs.field(factory=lambda: dict.fromkeys(ClaimOutcome, 0))
    #: the gate was opened in this active episode (the beacon's ``emitted``)
    gate_opened: bool = False
    active_since: float | None = None
    split_since: float | None = None  # the current split-brain's start
    split_brains: int = 0
    stepped_down: StepDown | None = None  # until the other relay is silent for grace
    step_downs: dict[StepDown, int] = attrs.field(
        factory=lambda: {why: 0 for why in StepDown if why is not StepDown.YIELDED}
    )
    lease_until: float = 0.0
    _streaming: bool = False
    _events: list[RoleEvent] = attrs.field(factory=list)

    # -- inputs -------------------------------------------------------------------------------

    def saw(self, source: IPv4Address, datagrams: int, now: float) -> None:
        """``datagrams`` from another relay's ``source`` were drained at ``now``."""
        if source == self.address or datagrams <= 0:
            return
        self._sight(source, now).datagrams += datagrams

    def beacon(self, source: IPv4Address, state: BeaconState, emitted: bool, now: float) -> None:
        """Another relay's beacon for this feed, drained at ``now``: an ACTIVE one counts as
        that relay emitting (a sighting, as its data would), a CLAIMING one as a claim."""
        if source == self.address:
            return
        if state is BeaconState.CLAIMING:
            self.claimants[source] = now
            return
        sighting = self._sight(source, now)
        sighting.beacon = state
        sighting.emitted = emitted

    def _sight(self, source: IPv4Address, now: float) -> Sighting:
        sighting = self.others.get(source)
        if sighting is None or now - sighting.last_seen > self.grace:
            sighting = self.others[source] = Sighting(source, now, now)
        sighting.last_seen = now
        return sighting

    def streaming(self, active: bool, now: float) -> list[RoleEvent]:
        """Whether this host has an accepted capture stream for the feed. Decides, but never
        renews the lease: only the observer does, after draining what it was sent."""
        self._streaming = active
        return self.decide(now, renew=False)

    # -- the rules ----------------------------------------------------------------------------

    def decide(self, now: float, *, renew: bool = True) -> list[RoleEvent]:
        """Apply the rules at ``now`` and renew (``renew``: the observer has just drained its
        sockets) or close the lease; the events since the previous call (each to be logged
        once)."""
        lapsed = renew and 0.0 < self.lease_until < now
        for source in [s for s, seen in self.others.items() if now - seen.last_seen > self.grace]:
            del self.others[source]
        for source in [s for s, seen in self.claimants.items() if now - seen > self.grace]:
            del self.claimants[source]
        if not self.others and not self.claimants and self.stepped_down is not None:
            self.stepped_down = None
        if self.role is Role.ACTIVE and self.others:
            self._split_brain(now, lapsed)
        elif self.split_since is not None:
            self.split_since = None
            self._events.append(RoleEvent.SPLIT_BRAIN_RESOLVED)
        self._set_role(self._role(), now)
        if self.role is Role.CLAIMING:
            self._claim(now, renew)
        if self.role is Role.ACTIVE and self.others and self.split_since is None:
            self._begin_split(now)
        if self.role in (Role.STANDBY, Role.CLAIMING):
            self.lease_until = 0.0
        elif renew:
            self.lease_until = now + self.lease
            self.gate_opened = self.gate_opened or self.role is Role.ACTIVE
        events, self._events = self._events, []
        return events

    def _role(self) -> Role:
        if self.stepped_down is not None:
            return Role.STANDBY
        if self._streaming:
            if self.claim <= 0 or self.role is Role.ACTIVE:
                return Role.ACTIVE
            return Role.CLAIMING
        return Role.STANDBY if self.others or self.claimants else Role.READY

    def _set_role(self, role: Role, now: float) -> None:
        if role is self.role:
            return
        self.role = role
        self.active_since = now if role is Role.ACTIVE else None
        self.claim_since = now if role is Role.CLAIMING else None
        if role is not Role.ACTIVE:
            self.gate_opened = False
        self._events.append(
            {
                Role.ACTIVE: RoleEvent.BECAME_ACTIVE,
                Role.CLAIMING: RoleEvent.BECAME_CLAIMING,
                Role.READY: RoleEvent.BECAME_READY,
                Role.STANDBY: RoleEvent.BECAME_STANDBY,
            }[role]
        )

    def _claim(self, now: float, renew: bool) -> None:
        """Claiming: yield to an active relay or a lower address's claim at once; win after
        ``claim`` seconds, in an observer decision (after a drain) only."""
        if self.others or any(self._precedes(other) for other in self.claimants):
            self.stepped_down = StepDown.YIELDED
            self.claims[ClaimOutcome.YIELDED] += 1
            self._events.append(RoleEvent.CLAIM_YIELDED)
            self._set_role(Role.STANDBY, now)
            return
        assert self.claim_since is not None
        if renew and now - self.claim_since >= self.claim:
            self.claims[ClaimOutcome.WON] += 1
            self._set_role(Role.ACTIVE, now)

    def _precedes(self, other: IPv4Address) -> bool:
        """Whether another host's claim goes before this host's: the lower address (and any,
        when this host has none)."""
        return self.address is None or other < self.address

    def _begin_split(self, now: float) -> None:
        self.split_since = now
        self.split_brains += 1
        self._events.append(RoleEvent.SPLIT_BRAIN)

    def _split_brain(self, now: float, lapsed: bool) -> None:
        """Active while another relay emits: who keeps it."""
        assert self.active_since is not None
        if min(seen.first_seen for seen in self.others.values()) < self.active_since:
            if self.split_since is None:
                self._begin_split(now)
            self._step_down(StepDown.SEEN_FIRST)
            return
        if lapsed:  # asleep past the lease (a freeze) while the other took over: not emitted
            self._step_down(StepDown.WOKE_TO_ANOTHER)
            return
        if self.split_since is None:
            self._begin_split(now)
        assert self.split_since is not None
        if now - self.split_since >= self.split_timeout and self._higher_than(self.others):
            self._step_down(StepDown.HIGHER_ADDRESS)

    def _higher_than(self, others: Iterable[IPv4Address]) -> bool:
        """The tie-break: this host yields to any lower address (and when it has none)."""
        return self.address is None or any(self.address > other for other in others)

    def _step_down(self, why: StepDown) -> None:
        self.stepped_down = why
        self.step_downs[why] += 1
        self._events.append(RoleEvent.STEPPED_DOWN)

    # -- outputs ------------------------------------------------------------------------------

    @property
    def split_brain(self) -> bool:
        """Now in a split-brain (this host active while another relay emits)."""
        return self.split_since is not None

    def beacon_state(self) -> BeaconState | None:
        """What this host announces now (None: nothing; without a claim period, no beacons)."""
        if self.claim <= 0:
            return None
        if self.role is Role.ACTIVE:
            return BeaconState.ACTIVE
        if self.role is Role.CLAIMING:
            return BeaconState.CLAIMING
        return None

    def admits(self) -> bool:
        """Whether a new capture connection may stream here."""
        return self.role is not Role.STANDBY

    def may_emit(self, now: float) -> bool:
        return now < self.lease_until

    def reason(self, now: float) -> str | None:
        """Why the feed is not ready (STANDBY), for ``/healthz/<feed>``."""
        if self.role is not Role.STANDBY:
            return None
        if not self.others:
            if self.claimants:
                claimant = min(self.claimants)
                yielded = " (yielded)" if self.stepped_down is StepDown.YIELDED else ""
                return f"another relay ({claimant}) claims the feed{yielded}"
            return "stepped down"
        latest = max(self.others.values(), key=lambda seen: seen.last_seen)
        emitting = (
            f"another relay ({latest.source}) emits the feed's groups, last seen "
            f"{max(0.0, now - latest.last_seen):.1f} s ago"
        )
        if self.stepped_down is not None:
            return f"stepped down ({self.stepped_down.value}): {emitting}"
        return emitting
