"""The Python leaf of the data plane: relayd/datapath.py's interface without the C library.

For machines without a compiler (``RELAYD_DATAPATH=python``, or ``auto`` when the library is
missing). It runs the loops of relayd/_fastpath.c step for step, with Python's decoder
(relayd/wire.py) and the rules of relayd/session.py, and passes the same tests. Per datagram it
does what the rules need and one ``sendto`` or ``recvmsg_into``; everything else happens once
per chunk or batch.

One module per job: ``emit`` (the emit pump), ``capture`` (numbering, claim word, receiver, ACK
reader), ``arbitration`` (the locked arbiter), ``upstream`` (the upstream counter) and
``sockets`` (what the TCP loops share); this one puts them behind :class:`PythonPlane`.
"""

from __future__ import annotations

import socket
from typing import Final

from relayd.arbitration import ArbitrationConfig
from relayd.arbitration.headers import DeribitLayout
from relayd.datapath import (
    UPSTREAM_MAX_CHANNELS,
    UPSTREAM_STALE_HORIZON_NS,
    CaptureNumbering,
    ClaimWord,
    EmitStart,
    UpstreamCounter,
)
from relayd.pyplane.arbitration import LockedArbiter
from relayd.pyplane.capture import _AckReader, _ClaimWord, _Numbering, _Receiver
from relayd.pyplane.emit import _EmitPump
from relayd.pyplane.upstream import _UpstreamCounter
from relayd.wire import CaptureConnection

__all__ = ["PLANE", "LockedArbiter", "PythonPlane"]


class PythonPlane:
    """The Python leaf."""

    name = "Python"
    connects_destinations = False
    busy_polls = False  # busy_poll is ignored (logged at the feed's start)

    def emit_pump(self, start: EmitStart) -> _EmitPump:
        return _EmitPump(start)

    def capture_numbering(self, seq: int) -> _Numbering:
        return _Numbering(seq)

    def claim_word(self) -> _ClaimWord:
        return _ClaimWord()

    def capture_receiver(
        self,
        sock: socket.socket,
        port: int,
        stop_fd: int,
        numbering: CaptureNumbering,
        claim: ClaimWord | None,
        upstream: UpstreamCounter | None = None,
        *,
        busy_poll: float = 0.0,
        hold: float = 0.0,
    ) -> _Receiver:
        del busy_poll  # the latency mode is the C plane's (docs/CONFIG.md, busy_poll)
        del hold  # a batch per wake-up: the hold saves the C plane's Python passes
        return _Receiver(sock, port, stop_fd, numbering, claim, upstream)

    def upstream_counter(
        self,
        layout: DeribitLayout,
        max_channels: int = UPSTREAM_MAX_CHANNELS,
        stale_horizon_ns: int = UPSTREAM_STALE_HORIZON_NS,
    ) -> _UpstreamCounter:
        return _UpstreamCounter(layout, max_channels, stale_horizon_ns)

    def arbiter(self, config: ArbitrationConfig) -> LockedArbiter:
        return LockedArbiter(config)

    def ack_reader(
        self, tcp: socket.socket, stop_fd: int, conn: CaptureConnection, idle: float
    ) -> _AckReader:
        return _AckReader(tcp, stop_fd, conn, idle)


PLANE: Final = PythonPlane()
