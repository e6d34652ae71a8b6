"""A capture feed's receive side: one data-path thread per socket, numbering every datagram.

A socket holds one port and at most 20 groups. Its thread (started and stopped by a Trio task
with ``run_stoppable``) waits for datagrams, then takes batches until the socket is empty: the
data plane (relayd/datapath.py ``CaptureReceiver``) receives each datagram straight into a
preallocated frame buffer, stamps it (CLOCK_REALTIME ns), numbers it and writes the DATA
header in front of it in place, and when the connection is caught up writes the batch to it at
once. The batch becomes one ``bytes`` (the only copy) and one chunk of the replay buffer. No
await per datagram, and no waiting for more data to batch: latency first.

Sequence numbers are assigned while receiving, one per session across all groups: the
sequencing lock (held by receive threads only, never by Trio) keeps one batch at a time, so
chunks of several sockets enter the replay buffer in sequence order.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from relayd.capture.uplink import Uplink
from relayd.datapath import DataPlane, UpstreamCounter, Why, current_beat
from relayd.logs import RateLimitedLogger
from relayd.netif import GroupReceiver
from relayd.replay import Chunk

if TYPE_CHECKING:
    from relayd.capture.sites import Fanout

__all__ = ["Receive"]


class Receive:
    """The sequence and the receive counters of one capture feed."""

    def __init__(self, name: str, uplink: Uplink | Fanout, limited: RateLimitedLogger) -> None:
        # ``uplink``: the one site's, or the fan-out to several sites (relayd/capture/sites.py),
        # which takes each batch through the same two calls
        self.name = name
        self._uplink = uplink
        self._limited = limited
        self._sequencing = threading.Lock()
        self.seq = 0  # the highest sequence assigned
        self.datagrams_in = 0
        self.bytes_in = 0
        self.kernel_drops = 0
        #: the feed's upstream check (``upstream_check``), given to every socket's receiver
        self.upstream: UpstreamCounter | None = None

    def drain(
        self,
        plane: DataPlane,
        receiver: GroupReceiver,
        wake_sender: Callable[[], None],
        stop_fd: int,
        token: trio.lowlevel.TrioToken,
        *,
        busy_poll: float = 0.0,
    ) -> None:
        """The data-path thread of one socket, until ``stop_fd`` is readable (looked at before
        every batch, so a socket that never runs empty still stops). ``busy_poll``: the
        feed's latency mode (seconds to poll without sleeping after a batch)."""
        rx = plane.capture_receiver(
            receiver.sock, receiver.port, stop_fd, self.upstream, busy_poll=busy_poll
        )
        # Every name the loop uses is a local: at low rates each batch is one datagram, and
        # this loop is most of the capture side's CPU per datagram (docs/PERFORMANCE.md).
        wait, batch, frames = rx.wait, rx.batch, rx.frames
        claim, append = self._uplink.claim, self._uplink.append
        sequencing = self._sequencing
        schedule = token.run_sync_soon
        monotonic = time.monotonic
        full, error = Why.FULL, Why.ERROR
        beat = current_beat()
        stop = select.poll()
        stop.register(stop_fd, select.POLLIN)
        last_drops = 0
        while True:
            beat.waiting = True  # Beat.wait() inlined
            try:
                ready = wait()
            finally:
                beat.waiting = False
            if not ready:
                return
            why = full
            while why == full:  # batches until the socket is empty
                beat.count += 1
                with sequencing:
                    tcp = claim()
                    first = self.seq + 1
                    why = batch(first, tcp)
                    count = rx.count
                    if count:
                        self.seq = last = first + count - 1
                        self.datagrams_in += count
                        self.bytes_in += rx.payload_bytes
                        chunk = Chunk(first, last, monotonic(), frames())
                        if append(chunk, tcp is not None, rx.sent, rx.send_err):
                            schedule(wake_sender)
                    elif tcp is not None:
                        append(None, True, 0, 0)
                    drops = rx.drops
                    if drops is not None and drops != last_drops:
                        self._count_kernel_drops(drops - last_drops)
                        last_drops = drops
                if why == error:
                    raise OSError(rx.err, os.strerror(rx.err))
                # Sustained input must not hold up stop, reload, shutdown: look at the stop pipe
                # before each further batch (only then: at low rates every batch is one
                # datagram, and rx.wait() has just looked at it).
                if why == full and stop.poll(0):
                    return

    def _count_kernel_drops(self, growth: int) -> None:
        """The socket's drop counter (SO_RXQ_OVFL, 32 bits, wraps) grew: count and warn."""
        self.kernel_drops += growth & 0xFFFFFFFF
        self._limited.warning(
            f"{self.name}:kernel-drops",
            "feed %s: the kernel dropped datagrams (receive buffer full), %d so far",
            self.name,
            self.kernel_drops,
        )
