"""The per-datagram rules of the data path, sans-I/O: the one specification of each decision.

Both data planes follow these rules: the Python data plane (relayd/dataplane/python.py) calls
them directly, the C data plane (relayd/_fastpath.c) implements them in its loops and is fuzzed
against this module (tests/test_fastpath_fuzz.py, tests/test_fastpath.py). A rule changes here
first, then in C, and the differential tests say when the two disagree.

- :func:`accept`: the emit side's sequence rule (emit, duplicate, or gap of n; a
  connection's first DATA is where it resumes, never a gap).
- :class:`Allowlist`: the destination verdict (allowed, or which allowlist refused it).
- :func:`oversize`: the size rule, applied after an allowed verdict (``max_datagram_size``).
- :func:`next_control` and :func:`control_wake`: when an emit connection writes an ACK
  (coalesced) or a HEARTBEAT (idle); :func:`ack_point`: how far it may acknowledge (not past
  a datagram the A/B arbiter still holds).

Capture framing is :func:`relayd.wire.pack_datagram_header` (the C batch writes the same
header) and replay trimming is :meth:`relayd.replay.ReplayBuffer.ack` (the highest ACK wins:
the C ACK reader keeps the highest one it saw for the receive threads to apply).

Resume and close, the same on both data planes because neither leaf decides them:

- **Exact resume**: after any reconnect the capture side resends from the first datagram
  past the highest ACK it holds, from any host (:meth:`relayd.replay.ReplayBuffer.rewind`,
  and ``next_unsent`` cuts a partly acknowledged chunk at that frame). Nothing acknowledged
  is sent again; a new host sees at most what the old one emitted and had not acknowledged.
- **Prompt and final ACKs**: the emit side ACKs within ``ACK_INTERVAL`` (:func:`next_control`);
  when the capture side says goodbye (an ERROR, which both leaves hand back to Trio) the
  emit feed ACKs everything emitted of the session before it closes, and the capture side
  reads that ACK before it closes (relayd/emit/feed.py, relayd/capture/link.py).
- **ACK stall**: data sent that waits ``ack_timeout`` with no ACK progress ends the
  connection on the capture side, which moves to the next target (relayd/capture/uplink.py
  ``ack_wait``, relayd/capture/link.py). Heartbeats do not count as progress.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from ipaddress import IPv4Network
from typing import Final, Protocol

__all__ = [
    "DUPLICATE",
    "OVERSIZE",
    "TGW_MULTICAST_MTU",
    "Allowlist",
    "Control",
    "Destination",
    "accept",
    "ack_point",
    "control_wake",
    "next_control",
    "oversize",
]

#: What :func:`accept` returns for a sequence at or below the highest one emitted.
DUPLICATE: Final = -1


def accept(highest: int, seq: int, resuming: bool = False) -> int:
    """The verdict on DATA ``seq`` of a session whose highest emitted sequence is ``highest``.

    ``DUPLICATE`` (-1) when ``seq <= highest``: already emitted (or deliberately skipped), not
    emitted again. Otherwise the number of sequences skipped before it (0: in order), and
    ``seq`` becomes the session's highest.

    ``resuming``: ``seq`` is the connection's first DATA, where the capture side resumes
    (the first frame past the highest ACK it holds, from any host), so it never counts a gap:
    what lies between was emitted by another emit host (which ACKed it while this one was
    out of the session), or was dropped from the capture side's replay buffer meanwhile,
    which the capture side counts itself at that resume
    (``capture_resume_lost_datagrams``, :meth:`relayd.replay.ReplayBuffer.rewind`). A session
    this host has not seen (``highest`` 0) never counts one either. Within a connection the
    capture side sends every sequence in turn, so a jump there is a gap (frames its replay
    buffer dropped before it could send them), counted here and only here: each loss is
    counted once, at the resume by the capture side or within the connection by this side.
    """
    if seq <= highest:
        return DUPLICATE
    if resuming or not highest:
        return 0
    return seq - highest - 1


class Destination(enum.IntEnum):
    """The verdict on a datagram's ``group:port`` (the values are the C table's states)."""

    ALLOWED = 1
    GROUP_NOT_ALLOWED = 2
    PORT_NOT_ALLOWED = 3

    @property
    def reason(self) -> str:
        """The ``datagrams_dropped`` reason label of a refusal."""
        return self.name.lower()


class _Ports(Protocol):
    @property
    def lo(self) -> int: ...

    @property
    def hi(self) -> int: ...


class Allowlist:
    """``allowed_groups`` and ``allowed_ports`` of an emit feed, as integer masks and bounds."""

    __slots__ = ("_bounds", "_masks")

    def __init__(self, groups: Iterable[IPv4Network], ports: Iterable[_Ports]) -> None:
        self._masks = tuple((int(n.network_address), int(n.netmask)) for n in groups)
        self._bounds = tuple((r.lo, r.hi) for r in ports)

    def verdict(self, group: int, port: int) -> Destination:
        """Whether a datagram to ``group:port`` (group as a host-order int) may be emitted;
        the group is judged first."""
        if not any(group & mask == net for net, mask in self._masks):
            return Destination.GROUP_NOT_ALLOWED
        if not any(lo <= port <= hi for lo, hi in self._bounds):
            return Destination.PORT_NOT_ALLOWED
        return Destination.ALLOWED


#: The largest datagram an AWS Transit Gateway carries as multicast: it does not fragment
#: multicast, it drops what is larger. The default ``max_datagram_size`` of an emit feed.
TGW_MULTICAST_MTU: Final = 8500
#: The ``datagrams_dropped`` reason label of a datagram :func:`oversize` refused.
OVERSIZE: Final = "oversize"


def oversize(payload_size: int, max_datagram_size: int) -> bool:
    """Whether a datagram of ``payload_size`` bytes, to a destination the :class:`Allowlist`
    allowed, is dropped instead of emitted (``max_datagram_size`` is the feed's limit). Judged
    after the destination verdict: a refused destination's datagram counts as refused, whatever
    its size. A dropped datagram's sequence counts as emitted like a refused one's (it is never
    a gap, never resent), and it is not a send: no latency observation, no send error."""
    return payload_size > max_datagram_size


def ack_point(highest: int, held_floor: int | None) -> int:
    """The highest sequence a connection of a session may acknowledge: ``highest`` (what it
    emitted or deliberately skipped), except that with A/B arbitration a datagram of the
    session the arbiter still holds behind a hole (or released and not sent yet), the lowest
    of which is ``held_floor`` (None: none), is not acknowledged, nor anything after it, until
    it is sent or resolved (dropped as a duplicate, or sent when the hole is given up and
    counted). If this host dies meanwhile, the capture side resends it to the next one."""
    if held_floor is None or held_floor > highest:
        return highest
    return held_floor - 1


class Control(enum.Enum):
    """What an emit connection writes back to the capture side now."""

    NOTHING = enum.auto()
    ACK = enum.auto()
    HEARTBEAT = enum.auto()


def next_control(
    now: float, last_out: float, acked: int, highest: int, ack_interval: float, heartbeat: float
) -> Control:
    """The control frame due at ``now`` on a connection whose latest control frame went out at
    ``last_out``, that ACKed ``acked`` (-1: not even the welcome ACK yet) and whose session
    may be acknowledged up to ``highest`` (:func:`ack_point`). At most one frame per
    ``ack_interval`` (ACKs are coalesced); an ACK when there is anything new to acknowledge
    (the welcome ACK at once), else a HEARTBEAT after ``heartbeat`` without output. Any
    unit of time, as long as it is one."""
    if now < last_out + ack_interval:
        return Control.NOTHING
    if highest > acked:
        return Control.ACK
    if now >= last_out + heartbeat:
        return Control.HEARTBEAT
    return Control.NOTHING


def control_wake(
    last_out: float, acked: int, highest: int, ack_interval: float, heartbeat: float
) -> float:
    """When :func:`next_control` next returns something other than NOTHING, for the same
    ``acked`` and ``highest`` (an ACK becomes due earlier when ``highest`` grows)."""
    if highest > acked:
        return last_out + ack_interval
    return last_out + max(heartbeat, ack_interval)
