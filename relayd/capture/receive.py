"""A capture feed's receive side: one data-path thread per socket, numbering every datagram.

A socket holds one port and at most 20 groups. Its thread (started and stopped by a Trio task
with ``run_stoppable``) takes one batch per data-plane call (relayd/datapath.py
``CaptureReceiver.next``): wait for datagrams, receive each straight into a preallocated frame
buffer, stamp it (CLOCK_REALTIME ns), number it and write the DATA header in front of it in
place, and when the connection is caught up claim it (its claim word, relayd/capture/uplink.py)
and write the batch to it, all before any Python runs. The batch then becomes one ``bytes``
(the only copy) and one chunk of the replay buffer. No await per datagram, and no waiting for
more data to batch: latency first. A batch that went out whole may take in what comes over the
next ``BATCH_HOLD`` before its Python pass (one socket, one site: the data plane's hold), each
datagram still written as it comes.

Sequence numbers are assigned while receiving, one per session across all groups: the feed's
numbering (held by receive threads only, never by Trio, from a batch's numbers until its chunk
is in the replay buffer) keeps one batch at a time, so chunks of several sockets enter the
replay buffer in sequence order.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import trio

from relayd.capture.uplink import Uplink
from relayd.datapath import CaptureNumbering, DataPlane, UpstreamCounter, Why, current_beat
from relayd.logs import RateLimitedLogger
from relayd.netif import GroupReceiver
from relayd.replay import Chunk

if TYPE_CHECKING:
    from relayd.capture.sites import Fanout

__all__ = ["BATCH_HOLD", "Receive"]

#: How long a batch already written whole to the connection may stay open for more datagrams
#: (``CaptureReceiver.next``'s hold): one Python pass then covers the wake-ups of up to this
#: long, at most this much later, while every datagram still goes out as it comes. Short beside
#: what waits for the pass on the Trio side (a HEARTBEAT, a resend, the goodbye's 0.1 s).
BATCH_HOLD: Final = 0.002


class Receive:
    """The sequence and the receive counters of one capture feed."""

    def __init__(self, name: str, uplink: Uplink | Fanout, limited: RateLimitedLogger) -> None:
        # ``uplink``: the one site's, or the fan-out to several sites (relayd/capture/sites.py),
        # which takes each batch through the same two calls
        self.name = name
        self._uplink = uplink
        # Only the first site's connection is written by the data plane: the others get a
        # batch from the Python pass, which the hold would delay.
        self._hold = BATCH_HOLD if isinstance(uplink, Uplink) else 0.0
        self._limited = limited
        self._numbering_lock = threading.Lock()
        self._numbering: CaptureNumbering | None = None  # the data plane's, from the first drain
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
        with self._numbering_lock:
            if self._numbering is None:
                self._numbering = plane.capture_numbering(self.seq)
            numbering = self._numbering
        rx = plane.capture_receiver(
            receiver.sock,
            receiver.port,
            stop_fd,
            numbering,
            self._uplink.claim_word(plane),
            self.upstream,
            busy_poll=busy_poll,
            hold=self._hold,
        )
        # Every name the loop uses is a local: at low rates each batch is one datagram, and
        # this loop is most of the capture side's CPU per datagram (docs/PERFORMANCE.md).
        take, frames = rx.next, rx.frames
        append = self._uplink.append
        schedule = token.run_sync_soon
        monotonic = time.monotonic
        empty, stopped, error = Why.EMPTY, Why.STOPPED, Why.ERROR
        beat = current_beat()
        last_drops = 0
        waits = True  # the next call waits for datagrams (the last batch was not full)
        try:
            while True:
                beat.waiting = waits  # Beat.wait() inlined
                why = take()
                beat.waiting = False
                if why == stopped:
                    return
                beat.count += 1
                count = rx.count
                if count:  # under the numbering, until the next take()
                    first = rx.first
                    self.seq = last = first + count - 1
                    self.datagrams_in += count
                    self.bytes_in += rx.payload_bytes
                    chunk = Chunk(first, last, monotonic(), frames())
                    if append(chunk, rx.claimed, rx.sent, rx.send_err):
                        schedule(wake_sender)
                drops = rx.drops
                if drops is not None and drops != last_drops:
                    self._count_kernel_drops(drops - last_drops)
                    last_drops = drops
                if why == error:
                    raise OSError(rx.err, os.strerror(rx.err))
                waits = why == empty
        finally:
            rx.done()

    def _count_kernel_drops(self, growth: int) -> None:
        """The socket's drop counter (SO_RXQ_OVFL, 32 bits, wraps) grew: count and warn."""
        self.kernel_drops += growth & 0xFFFFFFFF
        self._limited.warning(
            f"{self.name}:kernel-drops",
            "feed %s: the kernel dropped datagrams (receive buffer full), %d so far",
            self.name,
            self.kernel_drops,
        )
