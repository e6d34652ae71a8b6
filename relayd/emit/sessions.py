"""An emit feed's capture sessions and the connections streaming them (Trio only).

The feed remembers, per ``session_id``, the highest sequence it emitted (at most
``SESSION_LIMIT`` sessions, least recently used forgotten first): the welcome ACK carries it,
and the pump starts from it (``session.accept``). A HELLO whose session already has a
connection supersedes it: that older connection (a capture process that reconnected before
this side noticed the old TCP stream died) is closed, so it never blocks the reconnect with
TOO_MANY_CONNECTIONS. ``max_connections`` counts only connections past a valid HELLO.

A HELLO with a ``session_id`` other than the latest one's is a session change: the capture
side restarted (or another one took over) and resumes nothing of the old session. When the
old session did not end with the capture side's goodbye (an ERROR after which this side sent
its final ACK), whatever that capture side still held unacknowledged is gone: the change is
counted as a possible loss (:class:`SessionChange`).
"""

from __future__ import annotations

import itertools
import socket
from collections import OrderedDict
from typing import Any, Final

import trio

from relayd.emit.stats import Closed, PumpLink, SessionChange
from relayd.wire import ErrorCode

__all__ = ["SESSION_LIMIT", "Connection", "Session", "Sessions"]

#: Sessions remembered per feed for deduplication.
SESSION_LIMIT: Final = 1024

#: Owner numbers at the A/B arbiter, unique in the process (an arbiter outlives a reload, and
#: with it the feed's sessions).
_OWNERS: Final = itertools.count(1)


class Session:
    """One capture session: what was emitted of it, and who streams it."""

    __slots__ = (
        "_highest",
        "connection",
        "goodbye",
        "link",
        "owner",
        "pump_done",
        "session_id",
    )

    def __init__(self, session_id: bytes) -> None:
        self.session_id = session_id
        #: its number at the feed's arbiter: what it holds of this session holds its ACKs back
        self.owner = next(_OWNERS)
        self._highest = 0
        #: its latest connection ended with the capture side's goodbye (a clean stop)
        self.goodbye = False
        self.connection: Connection | None = None  # the connection streaming it, if any
        # set when the pump thread of the session's latest connection has returned
        self.pump_done: trio.Event | None = None
        self.link: PumpLink | None = None  # the running pump (it holds ``highest`` then)

    @property
    def highest(self) -> int:
        """Highest sequence emitted (or deliberately skipped)."""
        link = self.link
        pump = None if link is None else link.pump
        return self._highest if pump is None else pump.highest

    @highest.setter
    def highest(self, value: int) -> None:
        self._highest = value


class Connection:
    """One accepted TCP connection, from accept to close."""

    __slots__ = (
        "acked",
        "error",
        "final_ack",
        "id",
        "linger",
        "link",
        "peer",
        "reason",
        "scope",
        "session",
        "sock",
        "unsent",
    )

    def __init__(self, conn_id: int, sock: socket.socket, peer: str) -> None:
        self.id = conn_id
        self.sock = sock
        self.peer = peer
        self.scope = trio.CancelScope()
        self.session: Session | None = None
        self.acked = -1  # highest sequence ACKed to the peer (-1: not even the welcome)
        self.error: tuple[int, str] | None = None  # the ERROR (code, text) to close with
        self.reason: Closed | None = None  # why a streaming connection ended
        self.final_ack = False  # the capture side said goodbye: ACK all emitted, then close
        self.unsent = b""  # the rest of a control frame the pump could not finish
        self.link: PumpLink | None = None  # its pump, while it runs
        self.linger = True  # after its ERROR, wait briefly for the peer's FIN (not when evicted)

    @property
    def acked_seq(self) -> int:
        """Highest sequence ACKed so far (0 before the welcome ACK)."""
        pump = None if self.link is None else self.link.pump
        return max(self.acked if pump is None else pump.acked, 0)

    def describe(self) -> dict[str, Any]:
        """The connection in the feed's health detail."""
        session = self.session
        return {
            "peer": self.peer,
            "session": session.session_id.hex() if session else None,
            "highest_seq": session.highest if session else 0,
            "acked_seq": self.acked_seq,
        }

    def end(self, code: int, message: str, reason: Closed | None) -> None:
        """End the connection with ERROR(code, message), counted as ``reason``."""
        if self.error is None:
            self.error = (code, message)
            self.reason = reason
        self.scope.cancel()


class Sessions:
    """The sessions remembered and the connections streaming (the ``max_connections``)."""

    def __init__(self) -> None:
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()
        self.active: dict[int, Connection] = {}
        self.latest: Session | None = None  # the session admitted last

    def change(self, session_id: bytes) -> SessionChange | None:
        """What admitting ``session_id`` now means: None when it is the latest session (or
        the first one this host sees), else a clean change or a possible loss."""
        latest = self.latest
        if latest is None or latest.session_id == session_id:
            return None
        if latest.goodbye and latest.connection is None:
            return SessionChange.CLEAN
        return SessionChange.POSSIBLE_LOSS

    def __len__(self) -> int:
        return len(self._sessions)

    def supersede(self, session_id: bytes) -> Connection | None:
        """End the connection streaming ``session_id``, if any (a newer one takes over);
        returns it."""
        session = self._sessions.get(session_id)
        if session is None or session.connection is None:
            return None
        old = session.connection
        old.end(ErrorCode.TOO_MANY_CONNECTIONS, "superseded by a newer connection", None)
        # Free the slot now: the old task closes at its next checkpoint.
        self.active.pop(old.id, None)
        session.connection = None
        return old

    def admit(self, conn: Connection, session_id: bytes) -> Session:
        """``conn`` streams ``session_id`` from now on (remembered, most recently used)."""
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = Session(session_id)
            while len(self._sessions) > SESSION_LIMIT:
                self._sessions.popitem(last=False)
        else:
            self._sessions.move_to_end(session_id)
        session.connection = conn
        session.goodbye = False
        conn.session = session
        self.active[conn.id] = conn
        self.latest = session
        return session

    def release(self, conn: Connection) -> bool:
        """``conn`` ended; True when it was streaming."""
        if self.active.pop(conn.id, None) is None:
            return False
        session = conn.session
        if session is not None and session.connection is conn:
            session.connection = None
        return True

    def ack_lag(self) -> int:
        """Largest difference between a session's emitted and acknowledged sequence."""
        lag = 0
        for conn in self.active.values():
            if conn.session is not None:
                lag = max(lag, conn.session.highest - conn.acked_seq)
        return lag
