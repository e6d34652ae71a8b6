"""The data-path thread of one streaming emit connection.

It drives the data plane's pump (relayd/datapath.py ``EmitPump``: poll, recv, decode, dedup,
multicast, the coalesced ACKs and idle HEARTBEATs) and answers what the pump returns for: a
destination seen for the first time (``Destinations.judge``), a failed send (kept in its link,
for Trio to count, with what the failing socket's error queue held), a frame the pump does not
handle (the Python decoder's verdict). It ends with a :class:`PumpEnd` for the feed to act on,
in Trio.
"""

from __future__ import annotations

import enum
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any, Final

import trio

from relayd.datapath import DataPlane, EmitStart, FeedArbiter, Why, current_beat
from relayd.emit.destinations import Destinations
from relayd.emit.observer import FeedRole
from relayd.emit.sessions import Connection
from relayd.emit.stats import PumpLink
from relayd.netif import drain_error_queue
from relayd.session import Destination
from relayd.wire import EmitConnection, Error, ProtocolError

__all__ = ["ACK_INTERVAL", "PumpEnd", "pump_connection"]

#: Shortest time between two ACKs on one connection (ACKs are coalesced, not per datagram).
ACK_INTERVAL: Final = 0.002
#: While the feed's gate is closed, how often the pump looks at it again.
GATE_POLL: Final = 0.01


class PumpEnd(enum.Enum):
    """How a connection's data path ended."""

    STOPPED = enum.auto()  # cancelled: the feed's cancel scope says why
    EOF = enum.auto()  # closed by the capture side
    RESET = enum.auto()  # detail: the error text
    IDLE = enum.auto()  # detail: the idle timeout
    SLOW = enum.auto()  # a control frame could not be written for the idle timeout
    PROTOCOL = enum.auto()  # detail: the ProtocolError
    PEER_ERROR = enum.auto()  # detail: the decoded events, from the ERROR on
    STANDBY = enum.auto()  # the feed's role is standby: another relay emits it


_ENDS: Final = {
    Why.STOPPED: PumpEnd.STOPPED,
    Why.EOF: PumpEnd.EOF,
    Why.SLOW: PumpEnd.SLOW,
}


def pump_connection(
    plane: DataPlane,
    conn: Connection,
    proto: EmitConnection,
    link: PumpLink,
    mcast: socket.socket,
    destinations: Destinations,
    idle: float,
    heartbeat: float,
    max_datagram_size: int,
    arbiter: FeedArbiter | None,
    source: int,
    role: FeedRole | None,
    learn: Callable[[int], None] | None,
    stop_fd: int,
    _token: trio.lowlevel.TrioToken,
    *,
    busy_poll: float = 0.0,
) -> tuple[PumpEnd, Any]:
    """Run ``conn``'s data path until it ends (in its thread); ``link.pump`` is the pump.
    ``role``: the feed's role and emit gate (None: always open); ``learn`` is told every
    allowed destination (the observer watches them). ``busy_poll``: the feed's latency mode
    (seconds to poll without sleeping after data)."""
    session = conn.session
    assert session is not None
    try:
        pump = plane.emit_pump(
            EmitStart(
                conn.sock,
                mcast,
                stop_fd,
                proto,
                session.highest,
                conn.acked,
                idle,
                heartbeat,
                ACK_INTERVAL,
                max_datagram_size,
                arbiter,
                source,
                busy_poll,
                None if role is None else role.gate,
                session.owner,
            )
        )
    except ProtocolError as exc:
        return PumpEnd.PROTOCOL, exc
    link.pump = pump
    beat = current_beat()
    while True:
        with beat.wait():  # the pump's own loop: poll with a bounded timeout, then a chunk
            why = pump.run()
        if why == Why.NEED_DEST:
            key = pump.need_key
            verdict, fd = destinations.judge(key)
            pump.set_destination(key, verdict, fd)
            if learn is not None and verdict is Destination.ALLOWED:
                learn(key)
        elif why == Why.GATED:
            assert role is not None
            link.gate_waits = link.gate_waits.began(time.monotonic())
            try:
                with beat.wait():  # waiting by design: for the observer's decision
                    end = _wait_for_gate(role, stop_fd)
            finally:
                link.gate_waits = link.gate_waits.ended(time.monotonic())
            if end is not None:
                return end, None
        elif why == Why.SEND_ERROR:  # counted by Trio from the link (EmitStats.sync)
            errors = link.errors
            errors[pump.err] = errors.get(pump.err, 0) + 1
            # earlier datagrams that failed after their send, and the pending error that
            # would fail the next one (IP_RECVERR: relayd/netif.py)
            failed = destinations.sender(pump.need_key) or mcast
            for err in drain_error_queue(failed):
                errors[err] = errors.get(err, 0) + 1
        elif why == Why.CONTROL:
            return _verdict_on(pump.control())
        elif why == Why.RESET:
            return PumpEnd.RESET, os.strerror(pump.err)
        elif why == Why.IDLE:
            return PumpEnd.IDLE, idle
        elif why in _ENDS:
            return _ENDS[why], None
        else:
            raise RuntimeError(f"the emit pump returned {why!r}")


def _wait_for_gate(role: FeedRole, stop_fd: int) -> PumpEnd | None:
    """The gate is closed (a freeze, a starved observer, or standby): None once it opens
    again, STANDBY when the feed stepped down (nothing held is emitted), STOPPED when the
    stop pipe says so."""
    poller = select.poll()
    poller.register(stop_fd, select.POLLIN)
    while not role.gate.is_open():
        if role.standing_down():
            return PumpEnd.STANDBY
        if poller.poll(int(GATE_POLL * 1000)):
            return PumpEnd.STOPPED
    return None


def _verdict_on(decoded: list[Any] | ProtocolError) -> tuple[PumpEnd, Any]:
    """An ERROR from the peer ends the connection as PEER_ERROR; anything else the pump
    handed back is a protocol error (with the Python decoder's message)."""
    if isinstance(decoded, ProtocolError):
        return PumpEnd.PROTOCOL, decoded
    if decoded and isinstance(decoded[0], Error):
        return PumpEnd.PEER_ERROR, decoded
    return PumpEnd.PROTOCOL, ProtocolError(f"unexpected frames: {decoded!r:.80}")
