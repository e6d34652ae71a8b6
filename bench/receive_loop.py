"""CPU of the capture receive thread's loop per batch of one datagram, on loopback.

At low rates every batch is one datagram, so the Python pass of ``Receive.drain`` (claim,
account, replay buffer) is paid per datagram. This runs the real loop with the data plane
``select_plane`` picks, feeding it one datagram before each wait (a ``sendto`` on loopback in
the same thread), with a caught-up connection (a socketpair) that takes every batch at once:

* **loop**: ``Receive.drain`` as the feed runs it;
* **floor**: the same sends, waits and C batches with no Python pass (what the data plane and
  the kernel cost alone).

``loop - floor`` is the Python pass per batch. Thread CPU time; alternate runs of two trees
(``--rounds``) when comparing them, the machine's load moves both. No root needed.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, cast

from relayd.capture.receive import Receive
from relayd.capture.uplink import Uplink
from relayd.datapath import (
    CaptureNumbering,
    CaptureReceiver,
    ClaimWord,
    DataPlane,
    Why,
    select_plane,
)
from relayd.logs import RateLimitedLogger
from relayd.netif import GroupReceiver
from relayd.replay import ReplayBuffer

PAYLOAD = b"x" * 160
IP_PKTINFO = 8  # Linux; the socket module does not export it


def _fed(inner: CaptureReceiver, feed: Callable[[], bool]) -> CaptureReceiver:
    """``inner`` whose ``next`` first sends it one datagram (STOPPED after the last): its class
    swapped for a subclass, so every other attribute costs what it costs in the feed."""

    class Fed(type(inner)):  # type: ignore[misc]
        __slots__ = ()

        def next(self) -> Why:
            return cast(Why, super().next()) if feed() else Why.STOPPED

    inner.__class__ = Fed
    return inner


@contextmanager
def _sockets() -> Iterator[tuple[socket.socket, socket.socket, socket.socket, socket.socket, int]]:
    """(receiving socket, its sender, the uplink's pair, a stop pipe's read end); closed after."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    stop_r, stop_w = os.pipe()
    try:
        yield rx, tx, a, b, stop_r
    finally:
        for sock in (rx, tx, a, b):
            sock.close()
        os.close(stop_r)
        os.close(stop_w)


def _empty(sock: socket.socket) -> None:
    try:
        while sock.recv(1 << 20):
            pass
    except BlockingIOError:
        pass


def loop_cpu(plane: DataPlane, count: int) -> float:
    """Thread CPU µs per datagram of ``Receive.drain``, one datagram per batch."""
    with _sockets() as (rx, tx, a, b, stop_r):
        limited = RateLimitedLogger(logging.getLogger("bench.receive_loop"))
        uplink = Uplink("bench", ReplayBuffer(1 << 30, 3600.0), limited)
        uplink.attach(a, 0)
        receive = Receive("bench", uplink, limited)
        sent = 0

        def feed() -> bool:
            nonlocal sent
            if sent == count:
                return False
            if sent % 100 == 0:  # what the emit side would read and ACK
                _empty(b)
                uplink.ack(receive.seq)
            tx.send(PAYLOAD)
            sent += 1
            return True

        class Plane:
            name = plane.name
            capture_numbering = plane.capture_numbering
            claim_word = plane.claim_word

            def capture_receiver(
                self,
                sock: socket.socket,
                port: int,
                stop_fd: int,
                numbering: CaptureNumbering,
                claim: ClaimWord | None,
                upstream: Any = None,
                *,
                busy_poll: float = 0.0,
                hold: float = 0.0,
            ) -> CaptureReceiver:
                # no hold: this thread feeds the socket, so a batch held open for more would
                # only wait out the hold; this measures the pass per batch
                del hold
                inner = plane.capture_receiver(
                    sock, port, stop_fd, numbering, claim, upstream, busy_poll=busy_poll
                )
                return _fed(inner, feed)

        receiver = cast(GroupReceiver, SimpleNamespace(sock=rx, port=rx.getsockname()[1]))
        token = cast(Any, SimpleNamespace(run_sync_soon=lambda _fn: None))
        start = time.thread_time_ns()
        receive.drain(cast(DataPlane, Plane()), receiver, lambda: None, stop_r, token)
        return (time.thread_time_ns() - start) / count / 1000


def floor_cpu(plane: DataPlane, count: int) -> float:
    """The same sends, waits and batches without the Python pass: µs per datagram."""
    with _sockets() as (rx, tx, a, b, stop_r):
        word = plane.claim_word()
        word.store(a.fileno())
        numbering = plane.capture_numbering(0)
        receiver = plane.capture_receiver(rx, rx.getsockname()[1], stop_r, numbering, word)
        start = time.thread_time_ns()
        for i in range(count):
            if i % 100 == 0:
                _empty(b)
            tx.send(PAYLOAD)
            receiver.next()
            receiver.frames()
            word.store(a.fileno())  # the uplink's hand-back
        receiver.done()
        numbering.close()
        return (time.thread_time_ns() - start) / count / 1000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.receive_loop", description=__doc__)
    parser.add_argument("--count", type=int, default=20000, help="datagrams per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each (median)")
    args = parser.parse_args(argv)
    plane = select_plane()
    loops, floors = [], []
    for _ in range(args.rounds):
        floors.append(floor_cpu(plane, args.count))
        loops.append(loop_cpu(plane, args.count))
    loop, floor = statistics.median(loops), statistics.median(floors)
    print(
        f"{plane.name} data plane, one datagram per batch, median of {args.rounds}: "
        f"loop {loop:.2f} µs, floor {floor:.2f} µs, Python pass {loop - floor:.2f} µs per batch"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
