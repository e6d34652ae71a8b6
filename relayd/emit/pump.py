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
import socket
from typing import Any, Final

import trio

from relayd.datapath import DataPlane, EmitStart, FeedArbiter, Why, current_beat
from relayd.emit.destinations import Destinations
from relayd.emit.sessions import Connection
from relayd.emit.stats import PumpLink
from relayd.netif import drain_error_queue
from relayd.wire import EmitConnection, Error, ProtocolError

__all__ = ["ACK_INTERVAL", "PumpEnd", "pump_connection"]

#: Shortest time between two ACKs on one connection (ACKs are coalesced, not per datagram).
ACK_INTERVAL: Final = 0.002


class PumpEnd(enum.Enum):
    """How a connection's data path ended."""

    STOPPED = enum.auto()  # cancelled: the feed's cancel scope says why
    EOF = enum.auto()  # closed by the capture side
    RESET = enum.auto()  # detail: the error text
    IDLE = enum.auto()  # detail: the idle timeout
    SLOW = enum.auto()  # a control frame could not be written for the idle timeout
    PROTOCOL = enum.auto()  # detail: the ProtocolError
    PEER_ERROR = enum.auto()  # detail: the decoded events, from the ERROR on


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
    stop_fd: int,
    _token: trio.lowlevel.TrioToken,
    *,
    busy_poll: float = 0.0,
) -> tuple[PumpEnd, Any]:
    """Run ``conn``'s data path until it ends (in its thread); ``link.pump`` is the pump.
    ``busy_poll``: the feed's latency mode (seconds to poll without sleeping after data)."""
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


def _verdict_on(decoded: list[Any] | ProtocolError) -> tuple[PumpEnd, Any]:
    """An ERROR from the peer ends the connection as PEER_ERROR; anything else the pump
    handed back is a protocol error (with the Python decoder's message)."""
    if isinstance(decoded, ProtocolError):
        return PumpEnd.PROTOCOL, decoded
    if decoded and isinstance(decoded[0], Error):
        return PumpEnd.PEER_ERROR, decoded
    return PumpEnd.PROTOCOL, ProtocolError(f"unexpected frames: {decoded!r:.80}")
