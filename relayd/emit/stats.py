"""An emit feed's accounting: counters by reason, the latency histogram, the sending state.

Trio owns it: the data-path threads never write here. Their pumps count in their own fields
(relayd/datapath.py ``EmitCounters``, and the failed sends by errno in its ``PumpLink``), and
:meth:`EmitStats.sync` adds the growth of each running pump to the feed's totals when Trio
reads them (health, metrics, the once-a-second tick) and when a pump ends.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import time
from collections.abc import Iterator
from typing import Final, NamedTuple

import trio

from relayd.datapath import EMIT_COUNTERS, EmitPump, trio_time_of
from relayd.logs import RateLimitedLogger
from relayd.metrics import LatencyHistogram, Rate
from relayd.runtime import Sample
from relayd.session import OVERSIZE, Destination

__all__ = [
    "FAILING_HOLD",
    "SEND_RECOVERY",
    "Closed",
    "EmitStats",
    "GateWaits",
    "PumpLink",
    "Rejected",
    "SessionChange",
]

log = logging.getLogger("relayd.emit")

#: A failed send keeps the feed unhealthy at most this long when no send follows it.
FAILING_HOLD: Final = 30.0
#: Seconds without a failed send, and a successful send since, before the feed is healthy
#: again: sends that fail now and then (a queue discipline dropping part of the traffic) keep
#: it unhealthy instead of flapping with every successful send in between.
SEND_RECOVERY: Final = 1.0

_SEND_ERROR: Final = "send_error"


class Rejected(enum.Enum):
    """Why a connection was refused before streaming (``connections_rejected``)."""

    SOURCE = "source"
    LIMIT = "limit"
    PENDING_LIMIT = "pending_limit"
    HELLO_TIMEOUT = "hello_timeout"
    NO_HELLO = "no_hello"
    WRONG_FEED = "wrong_feed"
    AUTH = "auth"
    VERSION = "version"
    PROTOCOL = "protocol"
    PEER_ERROR = "peer_error"
    NOT_ACTIVE = "not_active"  # standby: another relay emits the feed


class Closed(enum.Enum):
    """Why a streaming connection ended (``connections_closed``)."""

    EOF = "eof"
    RESET = "reset"
    PEER_ERROR = "peer_error"
    PEER_SHUTDOWN = "peer_shutdown"  # the capture side said it stops (SHUTTING_DOWN, FEED_REMOVED)
    IDLE_TIMEOUT = "idle_timeout"
    PROTOCOL = "protocol"
    SLOW_CONSUMER = "slow_consumer"
    SUPERSEDED = "superseded"
    STOPPED = "stopped"
    INTERNAL_ERROR = "internal_error"
    NOT_ACTIVE = "not_active"  # this host stepped down: another relay emits the feed


class SessionChange(enum.Enum):
    """A HELLO for a session other than the latest one (``session_changes``)."""

    CLEAN = "clean"  # the old session ended with its capture side's goodbye
    POSSIBLE_LOSS = "possible_loss"  # it broke off, or is still streaming: what its capture
    # side held unacknowledged is not resent by the new session


class GateWaits(NamedTuple):
    """A pump's waits at its feed's closed emit gate (a claim, a stale lease, or standby), on
    ``time.monotonic``'s clock. Immutable: its thread replaces it
    whole, so Trio always reads a consistent one."""

    times: int = 0  # the pump returned GATED: a datagram to emit found the gate closed
    seconds: float = 0.0  # the ended waits
    since: float | None = None  # when the wait in progress began

    def began(self, now: float) -> GateWaits:
        return GateWaits(self.times + 1, self.seconds, now)

    def ended(self, now: float) -> GateWaits:
        return GateWaits(self.times, self.total(now), None)

    def total(self, now: float) -> float:
        """Seconds waited up to ``now``, the wait in progress included."""
        return self.seconds + (0.0 if self.since is None else max(0.0, now - self.since))


class PumpLink:
    """A streaming connection's pump (set by its thread once built) and what of its counters
    the feed has counted already."""

    __slots__ = (
        "counted_errors",
        "counted_gate_seconds",
        "counted_gate_times",
        "errors",
        "gate_waits",
        "last",
        "latency",
        "latency_sum_ns",
        "max_datagram_size",
        "pump",
        "session_hex",
    )

    def __init__(self, session_hex: str, max_datagram_size: int) -> None:
        self.session_hex = session_hex
        self.max_datagram_size = max_datagram_size  # the pump's limit (``session.oversize``)
        self.pump: EmitPump | None = None
        #: failed multicast sends by errno: written by the pump's thread only
        self.errors: dict[int, int] = {}
        self.counted_errors: dict[int, int] = {}
        self.gate_waits = GateWaits()  # written by the pump's thread only
        self.counted_gate_times = 0
        self.counted_gate_seconds = 0.0
        self.last = [0] * len(EMIT_COUNTERS)
        self.latency: list[int] = []
        self.latency_sum_ns = 0


class EmitStats:
    """The counters of one emit feed and whether its multicast sends are failing."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.frames_in = 0
        self.bytes_in = 0
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.bytes_out = 0
        self.duplicates = 0
        self.gaps = 0
        self.gap_sequences = 0
        self.connections_accepted = 0
        self.decode_errors = 0
        self.send_waits = 0  # times the multicast socket was full (EAGAIN) and a pump waited
        self.gated = 0  # times a datagram to emit found the feed's emit gate closed
        self.gated_seconds = 0.0  # how long the pumps waited at the closed gate, summed
        self.dropped: dict[str, int] = dict.fromkeys(
            (
                *(d.reason for d in Destination if d is not Destination.ALLOWED),
                OVERSIZE,
                _SEND_ERROR,
            ),
            0,
        )
        self.rejected: dict[Rejected, int] = dict.fromkeys(Rejected, 0)
        self.closed: dict[Closed, int] = dict.fromkeys(Closed, 0)
        self.session_changes: dict[SessionChange, int] = dict.fromkeys(SessionChange, 0)
        self.send_errors: dict[str, int] = {}
        self.latency = LatencyHistogram()
        self.last_error: str | None = None
        self.last_datagram_at: float | None = None  # Trio clock
        self._send_failed_at: float | None = None  # Trio clock: the latest failure seen
        self._sent_since_failure = False
        self._rate_out = Rate(window=10.0)
        self._rate_in_bytes = Rate(window=10.0)
        self._links: list[PumpLink] = []
        self.rlog = RateLimitedLogger(log, interval=10.0, max_keys=256)

    # -- the pumps -------------------------------------------------------------------------

    def attach(self, link: PumpLink) -> None:
        self._links.append(link)

    def detach(self, link: PumpLink) -> None:
        """The pump ended: count the rest of what it counted."""
        self._sync(link)
        self._links.remove(link)

    def sync(self) -> None:
        """Bring the totals up to date with every running pump."""
        for link in self._links:
            self._sync(link)

    def _sync(self, link: PumpLink) -> None:
        pump = link.pump
        if pump is None:
            return
        counters = pump.counters
        values = [getattr(counters, name) for name in EMIT_COUNTERS]
        growth = [now - before for now, before in zip(values, link.last, strict=True)]
        errors = dict(link.errors)  # one C-level copy: the thread may be adding to it
        if errors != link.counted_errors:
            for err, count in errors.items():
                self._send_failed(err, count - link.counted_errors.get(err, 0))
            link.counted_errors = errors
        self._sync_gate_waits(link)
        if not any(growth):
            return
        link.last = values
        (
            bytes_in,
            frames_in,
            datagrams_in,
            datagrams_out,
            bytes_out,
            duplicates,
            gaps,
            gap_sequences,
            send_waits,
            denied_group,
            denied_port,
            oversize,
            observed,
        ) = growth
        self.bytes_in += bytes_in
        self.frames_in += frames_in
        self.datagrams_in += datagrams_in
        self.datagrams_out += datagrams_out
        self.bytes_out += bytes_out
        self.duplicates += duplicates
        self.send_waits += send_waits
        self.dropped[Destination.GROUP_NOT_ALLOWED.reason] += denied_group
        self.dropped[Destination.PORT_NOT_ALLOWED.reason] += denied_port
        if oversize:
            self.dropped[OVERSIZE] += oversize
            self.rlog.warning(
                OVERSIZE,
                "%s: dropped %d datagrams larger than max_datagram_size (%d bytes), %d so far",
                self.name,
                oversize,
                link.max_datagram_size,
                self.dropped[OVERSIZE],
            )
        if datagrams_in:
            self.last_datagram_at = trio_time_of(counters.last_rx_ns)
        if datagrams_out and counters.last_send_ok:
            self._sent_since_failure = True
        if observed:
            buckets = list(counters.latency)
            before = link.latency or [0] * len(buckets)
            self.latency.add_counts(
                [a - b for a, b in zip(buckets, before, strict=True)],
                counters.latency_sum_ns - link.latency_sum_ns,
            )
            link.latency = buckets
            link.latency_sum_ns = counters.latency_sum_ns
        if gaps:
            self.gaps += gaps
            self.gap_sequences += gap_sequences
            self.rlog.warning(
                f"gap:{link.session_hex}",
                "%s: session %s skipped %d sequence numbers (capture side dropped them)",
                self.name,
                link.session_hex,
                gap_sequences,
            )

    def _sync_gate_waits(self, link: PumpLink) -> None:
        waits = link.gate_waits
        self.gated += waits.times - link.counted_gate_times
        link.counted_gate_times = waits.times
        seconds = waits.total(time.monotonic())
        if seconds > link.counted_gate_seconds:
            self.gated_seconds += seconds - link.counted_gate_seconds
            link.counted_gate_seconds = seconds

    # -- sending ---------------------------------------------------------------------------

    def _send_failed(self, err: int, count: int) -> None:
        """``count`` multicast sends failed with ``err`` (those datagrams are dropped)."""
        if count <= 0:
            return
        self._send_failed_at = trio.current_time()
        self._sent_since_failure = False
        name = errno.errorcode.get(err, str(err))
        strerror = os.strerror(err)
        self.send_errors[name] = self.send_errors.get(name, 0) + count
        self.dropped[_SEND_ERROR] += count
        self.last_error = f"multicast send: {name} ({strerror})"
        self.rlog.warning(
            f"send:{name}", "%s: multicast send failed: %s (%s)", self.name, strerror, name
        )

    def queued_errors(self, errors: list[int]) -> None:
        """Count what a multicast socket's error queue held (``netif.drain_error_queue``)."""
        for err in set(errors):
            self._send_failed(err, errors.count(err))

    def sending_failed(self) -> bool:
        """From a failed send until ``SEND_RECOVERY`` seconds without one and a successful
        send since, or ``FAILING_HOLD`` seconds without any send (an idle standby)."""
        failed_at = self._send_failed_at
        if failed_at is None:
            return False
        since = trio.current_time() - failed_at
        if since >= FAILING_HOLD or (self._sent_since_failure and since >= SEND_RECOVERY):
            self._send_failed_at = None
            return False
        return True

    def tick(self, now: float) -> None:
        """Feed the rate windows (Trio clock)."""
        self.sync()
        self._rate_out.update(self.datagrams_out, now)
        self._rate_in_bytes.update(self.bytes_in, now)

    def rates(self) -> tuple[float, float]:
        """Datagrams out and bytes in per second."""
        return self._rate_out.per_second(), self._rate_in_bytes.per_second()

    # -- metrics -------------------------------------------------------------------------

    def samples(self) -> Iterator[Sample]:
        """The counters (the feed adds its gauges)."""
        feed = (("feed", self.name),)

        def counter(name: str, help_text: str, value: float, *extra: tuple[str, str]) -> Sample:
            return Sample(name, "counter", help_text, feed + extra, value)

        yield counter("frames_in", "Frames received from capture connections.", self.frames_in)
        yield counter("bytes_in", "TCP bytes received from capture connections.", self.bytes_in)
        yield counter("datagrams_in", "DATA frames received.", self.datagrams_in)
        yield counter("datagrams_out", "Datagrams sent as multicast.", self.datagrams_out)
        yield counter("bytes_out", "Payload bytes sent as multicast.", self.bytes_out)
        for reason, value in self.dropped.items():
            yield counter(
                "datagrams_dropped", "Datagrams not emitted, by reason.", value, ("reason", reason)
            )
        yield counter(
            "duplicates", "DATA frames already emitted in their session.", self.duplicates
        )
        yield counter(
            "gaps",
            "Jumps in a session's sequence numbers within a connection (where a connection "
            "resumes is no gap: the capture side counts a loss there, capture_resume_lost).",
            self.gaps,
        )
        yield counter(
            "gap_sequences",
            "Sequence numbers missing in the jumps counted by gaps.",
            self.gap_sequences,
        )
        yield counter(
            "connections_accepted", "Connections accepted past HELLO.", self.connections_accepted
        )
        for rejected, value in self.rejected.items():
            yield counter(
                "connections_rejected",
                "Connections refused before streaming, by reason.",
                value,
                ("reason", rejected.value),
            )
        for closed, value in self.closed.items():
            yield counter(
                "connections_closed",
                "Streaming connections that ended, by reason.",
                value,
                ("reason", closed.value),
            )
        for change, value in self.session_changes.items():
            yield counter(
                "session_changes",
                "HELLOs for a capture session other than the latest one, by how the latest "
                "ended (possible_loss: without the capture side's goodbye).",
                value,
                ("result", change.value),
            )
        yield counter(
            "send_waits",
            "Times the multicast socket's send buffer was full and the feed waited for room.",
            self.send_waits,
        )
        yield counter(
            "emit_gated",
            "Times a datagram to emit found the feed's emit gate closed (a claim in progress, "
            "a stale lease after a freeze or a starved observer, or standby) and was held back.",
            self.gated,
        )
        yield counter(
            "emit_gated_seconds",
            "Seconds the feed's pumps waited at its closed emit gate, summed over connections.",
            self.gated_seconds,
        )
        yield counter(
            "decode_errors", "Connections that sent undecodable bytes.", self.decode_errors
        )
        for name, value in sorted(self.send_errors.items()):
            yield counter(
                "send_errors", "Failed multicast sends, by errno.", value, ("errno", name)
            )
        yield from self.latency.samples(
            "capture_to_emit_latency_seconds",
            feed,
            "Capture timestamp to multicast send of each chunk's last datagram, in seconds.",
        )
