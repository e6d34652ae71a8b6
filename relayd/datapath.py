"""The data plane: the one interface the feeds call for their per-datagram loops.

Three loops run in data-path threads, each behind an object of this interface: the emit pump
(:class:`EmitPump`: receive a connection's stream, decode, dedup, multicast, write ACKs and
HEARTBEATs), the capture receiver (:class:`CaptureReceiver`: receive a socket's datagrams and
frame them, a batch at a time) and the capture ACK reader (:class:`AckReader`). Two leaves
implement it: C (relayd/fastpath/ over relayd/_fastpath.c, production) and Python
(relayd/pyplane/, for machines without a compiler). Both follow the rules of
relayd/session.py. :func:`select` picks the leaf (``RELAYD_DATAPATH``).

The GIL rule, stated once: a data-path thread holds the GIL only while it runs Python; every
call into the C leaf releases it (ctypes.CDLL), blocking calls and the batch alike, and no lock
of a feed is held across a blocking call (a capture feed's numbering is held from a batch to
its hand-back, never across the wait), so a Trio task never waits for a receive thread's
batch.

Threads rather than Trio tasks, by measurement (docs/PERFORMANCE.md). Supervision stays
structured: a loop blocks only in ``poll`` on its sockets and a stop pipe, and when the Trio
task that started it (:func:`run_stoppable`) is cancelled, the pipe becomes readable and the
loop returns.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, Protocol, TypeVar, cast

import trio

from relayd.arbitration import ArbitrationConfig, ChannelPosition, Verdict
from relayd.arbitration.headers import DeribitLayout
from relayd.session import Destination
from relayd.units import format_duration
from relayd.wire import CaptureConnection, EmitConnection, Event, ProtocolError

__all__ = [
    "CLAIM_CLOSED",
    "CLAIM_HELD",
    "AckReader",
    "Beat",
    "CaptureNumbering",
    "CaptureReceiver",
    "ClaimWord",
    "DataPlane",
    "EmitCounters",
    "EmitGate",
    "EmitPump",
    "EmitStart",
    "FeedArbiter",
    "UpstreamChannel",
    "UpstreamCounter",
    "UpstreamTotals",
    "Why",
    "current_beat",
    "data_threads_alive",
    "log_latency_mode",
    "run_stoppable",
    "select_plane",
    "trio_time_of",
    "wait_writable",
]

T = TypeVar("T")

#: Bytes an emit pump reads per ``recv`` (about 1400 DATA frames of 160-byte payloads).
EMIT_RECEIVE_SIZE = 256 * 1024
#: Frame buffer per capture socket; a batch ends when less than a maximal frame fits.
CAPTURE_BATCH_SIZE = 512 * 1024
#: A capture batch is held open (``CaptureReceiver.next``) only while wake-ups come less than
#: this apart (above about 1k datagrams/s): a rarer stream ends each batch at its wake-up, not
#: at a timer. Above it, holding cut relay CPU by a sixth to a quarter at 5k-10k/s; its median
#: cost at those rates showed only on some machines with capture and emit on shared cores
#: (docs/PERFORMANCE.md, fourth and seventh rounds).
CAPTURE_HOLD_GAP = 1e-3
#: Bytes a capture ACK reader reads per ``recv``.
ACK_READ_SIZE = 64 * 1024
#: A capture connection's claim word (:class:`ClaimWord`) holds its fd, or one of these.
CLAIM_CLOSED = -1  # no receive thread may write to the connection now
CLAIM_HELD = -2  # a receive thread writes a batch to it now


class Why(enum.IntEnum):
    """Why a data-plane call returned (the C leaf's RD_* codes, compared at load)."""

    STOPPED = 1  # the stop pipe became readable
    EOF = 2  # the peer closed the TCP connection
    RESET = 3  # recv failed: err
    IDLE = 4  # nothing received for the idle timeout
    CONTROL = 5  # a frame the loop does not handle: ``control()`` has the decoder's verdict
    NEED_DEST = 6  # DATA for ``need_key``, a destination not judged yet
    SEND_ERROR = 7  # a multicast send to need_key failed (err); that datagram is consumed
    SLOW = 8  # an ACK or HEARTBEAT could not be written for the idle timeout
    EMPTY = 9  # capture: the socket has no more datagrams
    FULL = 10  # capture: the frame buffer has no room for another datagram
    ERROR = 11  # capture: recvmsg or poll failed: err
    GATED = 12  # emit: the feed's gate is closed (``EmitGate``); the datagram at hand waits


#: The emit pump's counters, only ever growing; the feed adds their growth to its own.
EMIT_COUNTERS = (
    "bytes_in",
    "frames_in",
    "datagrams_in",
    "datagrams_out",
    "bytes_out",
    "duplicates",
    "gaps",
    "gap_sequences",
    "send_waits",
    "denied_group",
    "denied_port",
    "oversize",
    "latency_count",
)


class EmitCounters(Protocol):
    """What an emit pump has counted (``EMIT_COUNTERS`` and these; read from any thread)."""

    @property
    def latency(self) -> Sequence[int]: ...  # metrics.LatencyHistogram's buckets

    @property
    def latency_sum_ns(self) -> int: ...

    @property
    def last_rx_ns(self) -> int: ...  # CLOCK_MONOTONIC of the latest chunk received

    @property
    def last_send_ok(self) -> int: ...  # 1 when the latest send succeeded


class EmitPump(Protocol):
    """One streaming emit connection's data path. ``run`` blocks in its thread; the other
    members may be read from any thread."""

    need_key: int  # after NEED_DEST or SEND_ERROR: group << 16 | port
    err: int  # after RESET or SEND_ERROR: the errno

    @property
    def counters(self) -> EmitCounters: ...

    @property
    def highest(self) -> int: ...  # highest sequence emitted or deliberately skipped

    @property
    def acked(self) -> int: ...  # highest sequence ACKed to the peer, -1 before the welcome

    def run(self) -> Why: ...

    def set_destination(self, key: int, verdict: Destination, fd: int) -> None:
        """The verdict on ``need_key`` (after NEED_DEST): ``fd`` is a socket connected to the
        allowed destination, or -1."""

    def clear_destinations(self) -> None:
        """Forget every verdict before the next chunk (the allowlist changed); any thread."""

    def control(self) -> list[Event] | ProtocolError:
        """After CONTROL: the decoder's verdict on the frames the pump handed back."""

    def unsent(self) -> bytes:
        """After the end: the rest of a control frame the pump could not finish writing."""


class ClaimWord(Protocol):
    """A capture connection's claim word (relayd/capture/uplink.py keeps it): the connection's
    fd while a receive thread may write its next batch to it at once, ``CLAIM_CLOSED`` while it
    may not, ``CLAIM_HELD`` while a thread writes a batch to it. Only the holder stores over
    ``CLAIM_HELD``; everyone else swaps, so a receiver claims it without the uplink's lock."""

    def load(self) -> int: ...

    def swap(self, expect: int, value: int) -> int:
        """``value`` when the word is ``expect`` (atomically); returns what it was."""

    def store(self, value: int) -> None:
        """By the thread that holds the word only."""


class CaptureNumbering(Protocol):
    """A capture feed's sequence, shared by the receivers of its sockets (one batch at a time:
    a receiver numbers a batch under its lock and keeps it until ``next`` or ``done``)."""

    def close(self) -> None: ...


class CaptureReceiver(Protocol):
    """One capture socket's data path, one batch per ``next``."""

    first: int  # the batch's first sequence number
    count: int  # datagrams in the batch
    payload_bytes: int
    claimed: bool  # the batch claimed the connection (the claim word is held) and went to it
    sent: int  # bytes of the batch written (fewer than the batch: the socket was full)
    send_err: int  # errno of a failed write, else 0
    drops: int | None  # the socket's cumulative kernel drop counter (SO_RXQ_OVFL), if it came
    err: int  # after ERROR: the errno

    def next(self) -> Why:
        """Hand the previous batch's numbering back, wait until the socket is readable
        (unless the last batch was FULL: then only look at the stop pipe), then receive every
        waiting datagram as DATA frames numbered from the feed's next sequence number, until
        the socket is EMPTY or the buffer FULL (or ERROR: ``err``). When the claim word holds
        the connection's fd, claim it and write the frames to it at once, before returning.
        With a ``hold``, a batch so written may go on over further waits for up to that long
        (each datagram written as it comes) while wake-ups come less than
        ``CAPTURE_HOLD_GAP`` apart, so one Python pass covers several wake-ups; it ends early
        at a longer gap, the stop pipe, a write that is not whole, or a second socket on the
        numbering. STOPPED: the stop pipe is readable. The numbering is held after EMPTY, FULL, and
        ERROR with datagrams, until the next call or ``done``."""

    def done(self) -> None:
        """Hand the numbering back (the thread ends)."""

    def frames(self) -> bytes:
        """The batch's frames (the one copy of the data)."""


class AckReader(Protocol):
    """What the emit side sends back on one capture connection: ACKs (the highest kept, for
    the receive threads to apply) and HEARTBEATs, in a thread of its own."""

    err: int

    @property
    def acked(self) -> int: ...  # the highest ACK received, 0 for none (any thread)

    def run(self) -> Why:
        """Until STOPPED, CONTROL, EOF, RESET (``err``) or IDLE."""

    def control(self) -> list[Event] | ProtocolError:
        """After CONTROL: the decoder's verdict on what the reader handed back."""


#: What a feed arbiter counts (``FeedArbiter.counts``): relayd.arbitration.ArbiterStats'
#: counters, then gauges (datagrams held and their bytes now, channels tracked, live sources).
ARBITER_COUNTERS = (
    "offered",
    "sent",
    "duplicates",
    "held",
    "released",
    "gaps",
    "missing",
    "snapshot_gaps",
    "resets",
    "overlaps",
    "heartbeats",
    "skipped_heartbeats",
    "unsequenced",
    "malformed",
    "observed",
    "hold_overflows",
    "channel_evictions",
    "content_evictions",
    "held_now",
    "held_bytes",
    "channels",
    "live_sources",
)
#: Sources (capture sessions) an arbiter counts apart; higher source numbers share the last.
ARBITER_SOURCES = 16


class FeedArbiter(Protocol):
    """One emit feed's A/B arbiter, shared by all its pumps: the decisions of
    ``relayd.arbitration.Arbiter`` (the specification) behind a lock. Every method is
    thread-safe. Times are ``time.monotonic()`` seconds (CLOCK_MONOTONIC, the pumps' clock).

    The pumps call it per datagram themselves (the C leaf without leaving C); the rest is for
    the feed, for observers and for tests."""

    def observe(self, group: int, port: int, payload: bytes, now: float) -> None:
        """A datagram another relay emitted on the feed's groups: not to be sent again."""

    def set_live_sources(self, count: int) -> None:
        """How many capture sessions stream the feed now (below 2: holes are gaps at once)."""

    def counts(self) -> dict[str, int]:
        """``ARBITER_COUNTERS`` by name."""

    def sent_by_source(self) -> list[int]:
        """Datagrams sent per source number (``ARBITER_SOURCES`` entries)."""

    def offer(
        self,
        source: int,
        group: int,
        port: int,
        payload: bytes,
        now: float,
        owner: int = 0,
        frame: int = 0,
    ) -> Verdict:
        """``Arbiter.offer`` (a ``Verdict``), for tests: what it releases waits in
        ``take_released``."""

    def floor(self, owner: int) -> int | None:
        """``Arbiter.pending_floor``: the lowest frame of session ``owner`` held or released
        and not sent yet (None: nothing); its ACKs stay below it (``session.ack_point``)."""

    def flush(self, mcast: socket.socket) -> tuple[int, int]:
        """The last session ended: give up every hole, send what that releases on ``mcast``
        without waiting; (sent, failed)."""

    def take_released(self) -> list[tuple[int, int, int, bytes, int]]:
        """Released datagrams not sent yet: (source, group, port, payload, gap), for tests."""

    def expire(self, now: float) -> int: ...

    def next_deadline(self) -> float | None: ...

    @property
    def gap_size(self) -> int: ...

    def close(self) -> None:
        """Free it (no pump may use it any more)."""


#: Ports whose Deribit FRAME_V1 channels are snapshot channels (their gaps counted apart).
UPSTREAM_SNAPSHOT_PORTS = (6101,)
#: Channels an upstream counter tracks at most (least recently used evicted first).
UPSTREAM_MAX_CHANNELS = 4096
#: A sequence below what was next this long ago is an exchange reset, not a late copy.
UPSTREAM_STALE_HORIZON_NS = 60 * 10**9


class UpstreamTotals(NamedTuple):
    """What an upstream counter counted (relayd.arbitration's ``UpstreamStats``, and more)."""

    datagrams: int
    gaps: int
    missing: int  # sequence numbers skipped by the gaps
    snapshot_gaps: int  # gaps on snapshot channels (also in gaps)
    duplicates: int
    resets: int
    overlaps: int
    heartbeats: int
    unsequenced: int
    malformed: int
    evictions: int  # channels evicted from the table (their own counters with them)
    channels: int  # channels tracked now
    last_gap: tuple[int, int, int, int] | None  # (group, port, channel, missing) of the latest


class UpstreamChannel(NamedTuple):
    """One channel's counters: (group, port, channel id) as the exchange numbers them."""

    group: int
    port: int
    channel: int
    snapshot: bool
    datagrams: int
    gaps: int
    missing: int
    duplicates: int
    resets: int
    overlaps: int


class UpstreamCounter(Protocol):
    """A capture feed's count of the exchange's own gaps, duplicates and resets per channel
    (relayd.arbitration's ``UpstreamMonitor`` is the specification), before anything is
    relayed. One per feed, shared by its receive threads (thread-safe); a receiver given one
    scans every batch it receives, after writing it to TCP."""

    def scan(self, frames: bytes | memoryview, count: int, now_ns: int) -> None:
        """See the datagrams of ``count`` DATA frames at CLOCK_MONOTONIC ``now_ns``."""

    def totals(self) -> UpstreamTotals: ...

    def channels(self, lossy: bool = False) -> list[UpstreamChannel]:
        """Every tracked channel, least recently used first; ``lossy``: only those with a
        gap, duplicate, reset or overlap."""

    def positions(self) -> list[ChannelPosition]:
        """Where every tracked channel's sequence stands (``UpstreamMonitor.positions``)."""

    def resume(self, positions: Iterable[ChannelPosition], now_ns: int) -> int:
        """``UpstreamMonitor.resume`` each of ``positions``; how many were taken."""

    def close(self) -> None:
        """Release it (no receiver may use it any more)."""


class EmitGate(ctypes.Structure):
    """``struct rd_gate``: one emit feed's permission to emit, shared by its pumps (both
    data planes read it before every datagram; relayd/emit/observer.py writes it).

    A lease on CLOCK_MONOTONIC: a pump emits only while the clock is before
    ``open_until_ns`` and otherwise returns GATED without consuming the datagram."""

    _fields_ = (("open_until_ns", ctypes.c_int64),)

    def open_until(self, monotonic: float) -> None:
        """Open until ``monotonic`` (seconds on ``time.monotonic``'s clock); 0 closes."""
        self.open_until_ns = int(monotonic * 1e9)

    def is_open(self) -> bool:
        return time.monotonic_ns() < self.open_until_ns


class EmitStart(NamedTuple):
    """What an emit pump starts from."""

    tcp: socket.socket  # the capture connection, past its HELLO
    mcast: socket.socket  # the shared multicast sender
    stop_fd: int
    proto: EmitConnection  # its decoder holds what the handshake read past the HELLO
    highest: int  # the session's highest sequence emitted
    acked: int  # highest sequence ACKed on this connection, -1: not even the welcome ACK
    idle: float  # seconds: nothing received (IDLE) or a control frame not written (SLOW)
    heartbeat: float  # seconds without output before a HEARTBEAT
    ack_interval: float  # seconds between two control frames at least
    max_datagram_size: int  # larger payloads are dropped (``session.oversize``)
    arbiter: FeedArbiter | None = None  # the feed's, from this plane's ``arbiter``; None: none
    source: int = 0  # this connection's source number for the arbiter
    #: seconds to poll without sleeping after data (latency mode, C plane only; 0: off)
    busy_poll: float = 0.0
    gate: EmitGate | None = None  # None: always open
    #: the session's owner number at the arbiter (its held datagrams hold its ACKs back)
    owner: int = 0


class DataPlane(Protocol):
    """A leaf: builds the three loops of one connection or socket."""

    name: str  # "C" or "Python", for the log
    #: True when ``set_destination``'s fd is used (a socket connected per destination)
    connects_destinations: bool
    #: True when the loops honour ``busy_poll`` (the latency mode)
    busy_polls: bool

    def emit_pump(self, start: EmitStart) -> EmitPump:
        """Raises ProtocolError when what the handshake left over cannot be a frame."""

    def capture_numbering(self, seq: int) -> CaptureNumbering:
        """A feed's numbering, the highest sequence assigned so far being ``seq``."""

    def claim_word(self) -> ClaimWord:
        """A connection's claim word, closed, for this plane's receivers."""

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
    ) -> CaptureReceiver:
        """``numbering``, ``claim`` (None: never write a batch) and ``upstream`` (scan every
        batch) are this plane's. ``busy_poll``: seconds to poll without sleeping after a
        batch (latency mode; the Python plane ignores it). ``hold``: seconds a batch written
        whole to the claimed connection may stay open for more datagrams while the socket is
        its numbering's only one (``CaptureReceiver.next``; the Python plane ignores it)."""

    def upstream_counter(
        self,
        layout: DeribitLayout,
        max_channels: int = UPSTREAM_MAX_CHANNELS,
        stale_horizon_ns: int = UPSTREAM_STALE_HORIZON_NS,
    ) -> UpstreamCounter: ...

    def arbiter(self, config: ArbitrationConfig) -> FeedArbiter:
        """A feed's arbiter for this leaf's pumps. Raises MemoryError when it cannot be made."""

    def ack_reader(
        self, tcp: socket.socket, stop_fd: int, conn: CaptureConnection, idle: float
    ) -> AckReader:
        """Raises ProtocolError when what the handshake left over cannot be a frame."""


def select_plane() -> DataPlane:
    """The data plane feeds started now use: C when it loads (``RELAYD_DATAPATH``:
    ``auto``, ``c`` or ``python``). Raises fastpath.DataPathError as ``fastpath.load``."""
    from relayd import fastpath, pyplane  # noqa: PLC0415 - the leaves import this module

    plane = fastpath.load()
    return plane if plane is not None else pyplane.PLANE


def log_latency_mode(log: logging.Logger, feed: str, busy_poll: float, plane: DataPlane) -> None:
    """Say at a feed's start what its ``busy_poll`` (latency mode) does on ``plane``."""
    if not busy_poll:
        return
    if plane.busy_polls:
        log.info(
            "feed %s: latency mode: the data-path threads poll without sleeping for %s after "
            "data (busy_poll)",
            feed,
            format_duration(busy_poll),
        )
    else:
        log.warning(
            "feed %s: busy_poll ignored: the %s data plane has no latency mode (C only)",
            feed,
            plane.name,
        )


def trio_time_of(monotonic_ns: int) -> float:
    """A data-path thread's CLOCK_MONOTONIC stamp on Trio's clock (in Trio): the one place
    where the threads' clock meets Trio's."""
    return trio.current_time() - (time.monotonic_ns() - monotonic_ns) / 1e9


class Beat:
    """A data-path thread's sign of life, for the systemd watchdog (:func:`data_threads_alive`).

    The thread bumps ``count`` once per turn of its loop and says when it blocks by design
    (``waiting``: in ``poll`` on its sockets and stop pipe, where it may stay as long as
    nothing arrives). A thread that neither moves nor waits is wedged. Only the loops that
    asked for their beat (``current_beat``) are judged."""

    __slots__ = ("count", "seen", "waiting", "watched")

    def __init__(self) -> None:
        self.count = 0
        self.seen = -1  # ``count`` at the previous check (the watchdog task's)
        self.waiting = False
        self.watched = False

    def wait(self) -> Beat:
        """Around a blocking call that waits by design: ``with beat.wait(): ...`` (a plain
        context manager, not a generator one: it runs once per batch of every data thread)."""
        self.waiting = True
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self.waiting = False
        self.count += 1


_beats: set[Beat] = set()
_beats_lock = threading.Lock()
_local = threading.local()


def current_beat() -> Beat:
    """The calling data-path thread's beat (a detached one outside :func:`run_stoppable`)."""
    beat = getattr(_local, "beat", None)
    if not isinstance(beat, Beat):
        return Beat()
    beat.watched = True
    return beat


def data_threads_alive() -> bool:
    """True when every data-path thread moved since the previous call or waits by design
    (the watchdog task asks before each ping, so a wedged thread stops the pings)."""
    with _beats_lock:
        beats = list(_beats)
    alive = True
    for beat in beats:
        if not beat.watched:
            continue
        count = beat.count
        if count == beat.seen and not beat.waiting:
            alive = False
        beat.seen = count
    return alive


async def run_stoppable(
    loop: Callable[[int, trio.lowlevel.TrioToken], T],
    *,
    limiter: trio.CapacityLimiter | None = None,
) -> T:
    """Run ``loop(stop_fd, trio_token)`` in a worker thread and return its result (or raise
    its exception, as it is).

    ``loop`` must return soon after ``stop_fd`` becomes readable; that happens when this task is
    cancelled, and the cancellation is then raised here once the thread has returned.

    Without ``limiter`` the thread has a limiter of its own: data-path threads never take a
    token of Trio's default limiter (40 threads), so no number of sockets can keep a loop from
    starting or starve what else runs in threads (reading the configuration on reload). The
    thread's :class:`Beat` is ``current_beat()`` inside ``loop``.
    """
    if limiter is None:
        limiter = trio.CapacityLimiter(1)

    def call(stop_fd: int, token: trio.lowlevel.TrioToken) -> tuple[bool, T | Exception]:
        beat = _local.beat = Beat()
        with _beats_lock:
            _beats.add(beat)
        try:
            return True, loop(stop_fd, token)
        except Exception as exc:  # raised below, outside the nursery: not in an ExceptionGroup
            return False, exc
        finally:
            with _beats_lock:
                _beats.discard(beat)
            _local.beat = None

    stop_r, stop_w = os.pipe()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_when_cancelled, stop_w)
            ok, result = await trio.to_thread.run_sync(
                call, stop_r, trio.lowlevel.current_trio_token(), limiter=limiter
            )
            nursery.cancel_scope.cancel()
        if not ok:
            assert isinstance(result, Exception)
            raise result
        return cast(T, result)
    finally:
        os.close(stop_r)
        os.close(stop_w)


async def _stop_when_cancelled(stop_fd: int) -> None:
    try:
        await trio.sleep_forever()
    finally:
        os.write(stop_fd, b"x")


def wait_writable(sock: socket.socket, stop_fd: int) -> bool:
    """Block until ``sock`` is writable (True) or ``stop_fd`` readable (False)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    poller.register(stop_fd, select.POLLIN)
    while True:
        ready = poller.poll()
        if any(fd == stop_fd for fd, _ in ready):
            return False
        if ready:
            return True
