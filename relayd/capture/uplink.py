"""A capture feed's TCP side: the replay buffer and what goes out on the current connection.

Shared by the receive threads (they append each batch and, when the connection is caught up,
write it at once) and Trio (the sender task that takes over when the socket is full, the
heartbeat task, the connection loop), under a lock of its own that is only ever held for
bookkeeping. A receive thread claims the socket for a batch without that lock, through the
connection's claim word (relayd/datapath.py ``ClaimWord``): the uplink keeps the socket's fd in
it exactly while the connection is caught up with nothing else to write, so the data plane
claims it and writes the batch right after receiving it, before any Python runs. The thread
hands the socket back with the batch (:meth:`Uplink.append`). Whoever else writes closes the
word first (under the lock), so while a batch is being written nobody else writes to the
socket, and a connection that ends meanwhile is closed by the thread when it hands it back.

Time here is ``time.monotonic`` (the threads' clock): replay ages and the last write.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
import time

from relayd import pyplane, wire
from relayd.datapath import CLAIM_CLOSED, CLAIM_HELD, AckReader, ClaimWord, DataPlane
from relayd.logs import RateLimitedLogger
from relayd.replay import Chunk, ReplayBuffer

__all__ = ["SendFailedError", "Uplink"]


class SendFailedError(Exception):
    """The connection broke while writing to it."""


class Uplink:
    """The replay buffer, the connection's send state and the counters of what was sent."""

    def __init__(
        self,
        name: str,
        replay: ReplayBuffer,
        limited: RateLimitedLogger,
        plane: DataPlane = pyplane.PLANE,  # the receive threads' (``claim_word``)
    ) -> None:
        self.name = name
        self.replay = replay
        self._limited = limited
        self._lock = threading.Lock()
        self._plane = plane
        # the socket's fd while a receive thread may claim it (the module's docstring)
        self._word: ClaimWord = plane.claim_word()
        self._sock: socket.socket | None = None
        self._rest: memoryview | None = None  # the rest of a frame sequence partly written
        self._queued: collections.deque[bytes] = collections.deque()  # HEARTBEATs to write
        self._blocked = False  # the socket was full; the sender task waits for writability
        self._claims_refused = False  # the connection ends with a goodbye: no more claims
        self._close_after_claim: socket.socket | None = None
        self._send_error: OSError | None = None
        self._highest_sent = 0
        # ACK progress on the current connection (monotonic): the highest sequence handed to
        # it, and since when data sent has waited for an ACK that does not come (None: nothing
        # is waiting, or the last ACK covered it all)
        self._sent_seq = 0
        self._waiting_since: float | None = None
        self._reported_drops = 0
        self.reader: AckReader | None = None  # the current connection's ACK reader
        self.last_send = 0.0
        self.frames_sent = 0
        self.bytes_sent = 0
        self.resent_datagrams = 0

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def claim_word(self, plane: DataPlane) -> ClaimWord:
        """The claim word, for a receiver of ``plane`` (made anew, closed, when the uplink
        was made for another plane: before any receive thread runs)."""
        with self._lock:
            if plane is not self._plane:
                self._plane, self._word = plane, plane.claim_word()
                self._regate()
            return self._word

    # -- the connection --------------------------------------------------------------------

    def attach(self, sock: socket.socket, welcome: int) -> int:
        """Stream to ``sock`` from the chunk after ``welcome`` on; returns how many datagrams
        will be resent."""
        with self._lock:
            self._expire(time.monotonic())  # nothing older than replay_max_age is resent
            resend = self.replay.rewind(welcome)
            self._rest = None
            self._queued.clear()
            self._blocked = False
            self._send_error = None
            self.last_send = time.monotonic()
            self._sent_seq = self.replay.acked_seq
            self._waiting_since = None
            self._claims_refused = False
            self._sock = sock
            self._regate()
        return resend

    def release(self, sock: socket.socket, goodbye: bytes | None) -> tuple[bool, bool]:
        """The connection on ``sock`` ends: say ``goodbye`` first when the stream is at a frame
        boundary, then close it (now, or when a receive thread hands it back). Returns whether
        ``sock`` was the current connection, and whether the goodbye went out whole: then the
        socket is left open (write side shut) for the caller to read the final ACK and close."""
        said = False
        with self._lock:
            current = self._sock is sock
            claimed = False
            if current:
                claimed = not self._close_word()
                if goodbye is not None and not claimed:
                    said = self._say(sock, goodbye)
                self._sock = None
                self._rest = None
                self._waiting_since = None
            if claimed:
                self._close_after_claim = sock
                return current, False
        if not said:
            sock.close()
        return current, said

    def refuse_claims(self) -> bool:
        """From now on no receive thread writes to the socket itself (their batches go
        through the buffer, written under the lock, whole): the connection is about to end
        with a goodbye, which must follow a whole frame. True while a thread still holds it
        (``claimed``)."""
        with self._lock:
            self._claims_refused = True
            return not self._close_word()

    @property
    def claimed(self) -> bool:
        return self._word.load() == CLAIM_HELD

    def _say(self, sock: socket.socket, frame: bytes) -> bool:
        try:
            if self._rest is not None:
                sent = sock.send(self._rest)
                if sent < len(self._rest):
                    return False
            if sock.send(frame) < len(frame):
                return False
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return False
        return True

    def set_replay_bounds(self, max_bytes: int, max_age: float) -> None:
        """New replay bounds (a reload): a smaller one evicts, counted, from the next batch."""
        with self._lock:
            self.replay.max_bytes = max_bytes
            self.replay.max_age = max_age
            self._regate()

    # -- receive threads -------------------------------------------------------------------

    def claim(self) -> socket.socket | None:
        """The socket, for a receive thread to write its next batch to at once, when the
        connection is caught up (else None: the batch goes through the replay buffer). The
        data plane's receiver claims the word itself; this is for the other sites of a
        feed with several (relayd/capture/sites.py)."""
        with self._lock:
            word, sock = self._word, self._sock
            fd = word.load()
            if sock is None or fd < 0 or word.swap(fd, CLAIM_HELD) != fd:
                return None
            return sock

    def append(self, chunk: Chunk | None, claimed: bool, sent: int, err: int) -> bool:
        """A receive thread's batch (None: it got nothing), of which ``sent`` bytes were
        written to the claimed socket (``err``: the write failed). True when the sender task
        must be woken.

        The one lock pass of a batch, so only what must follow the batch at once is here:
        replay chunks past ``replay_max_age`` are dropped by Trio (:meth:`heartbeat`,
        :meth:`apply_acks`, :meth:`attach`), not once per batch."""
        with self._lock:
            held = claimed  # the word, until _regate(held) at the end hands it back
            gone = False
            if claimed and self._close_after_claim is not None:
                self._close_after_claim.close()
                self._close_after_claim = None
                self._word.store(CLAIM_CLOSED)
                held = claimed = False  # the connection is gone: the chunk waits in the buffer
                gone = True
            if chunk is None:
                self._regate(held)
                return False
            self._apply_acks()
            replay = self.replay
            if not claimed:
                replay.append(chunk)
                if gone:  # what the thread wrote did go out (and goes again, as a resend)
                    self.bytes_sent += sent
                    if sent == len(chunk.data):
                        self._count_sent(chunk, chunk.time)
                wake = self._kick()
            else:  # written by the thread (it was the only unsent chunk): account for it
                replay.append(chunk, sent=True)
                self._count_sent(chunk, chunk.time)
                self.bytes_sent += sent
                if sent:
                    self.last_send = chunk.time
                wake = False
                if err:
                    self._send_error = OSError(err, os.strerror(err))
                    self._blocked = wake = True
                elif sent < len(chunk.data):
                    self._rest = memoryview(chunk.data)[sent:]
                    self._blocked = wake = True
            if replay.dropped_datagrams != self._reported_drops:  # the byte bound evicted
                self._note_replay_drops()
            self._regate(held)
            return wake

    # -- Trio ------------------------------------------------------------------------------

    def flush(self) -> bool:
        """The sender task's turn: write what is waiting; True when all is written (or a
        receive thread is writing), False when the socket is full. Raises SendFailedError."""
        with self._lock:
            if self._send_error is not None:
                raise SendFailedError(f"send failed: {self._send_error}")
            if not self._close_word():
                return True  # the thread's hand-back goes on from there
            try:
                done = self._write()
            except OSError as exc:
                raise SendFailedError(f"send failed: {exc}") from None
            self._blocked = not done
            self._regate()
            return done

    def kick(self) -> bool:
        """Write now what the socket takes; True when the sender task must be woken."""
        with self._lock:
            wake = self._kick()
            self._regate()
            return wake

    def heartbeat(self, interval: float) -> tuple[bool, float]:
        """Write a HEARTBEAT when nothing was written for ``interval``; apply ACKs and expire
        old chunks. Returns whether the sender task must be woken and the seconds until the
        next HEARTBEAT may be due."""
        now = time.monotonic()
        wake = False
        with self._lock:
            due = self.last_send + interval
            if now >= due:
                self.last_send = now
                if not self._blocked and self._rest is None and self._close_word():
                    self._queued.append(wire.encode_heartbeat(time.time_ns()))
                    wake = self._kick()
                due = now + interval
            self._apply_acks()
            self._expire(now)
            self._regate()
        return wake, max(0.0, due - now)

    def apply_acks(self) -> None:
        """Bring the replay buffer up to date (ACKs, age) before a report."""
        with self._lock:
            self._apply_acks()
            self._expire(time.monotonic())

    def ack_wait(self) -> tuple[float, int]:
        """How long data sent on the current connection has waited without any ACK progress
        (0.0: nothing waits), and how many datagrams sent are unacknowledged."""
        with self._lock:
            self._apply_acks()
            since = self._waiting_since
            if since is None or self._sock is None:
                return 0.0, 0
            return time.monotonic() - since, self._sent_seq - self.replay.acked_seq

    def ack(self, seq: int) -> None:
        """An ACK received outside the reader (during the handshake)."""
        with self._lock:
            self.replay.ack(seq)

    # -- under the lock ----------------------------------------------------------------------

    def _apply_acks(self) -> None:
        """Trim the replay buffer to the latest ACK the reader saw: the receive threads do it
        once per batch, Trio when idle and before it reports."""
        reader = self.reader
        if reader is not None:
            acked = reader.acked
            if acked > self.replay.acked_seq:
                self.replay.ack(acked)
                self._waiting_since = time.monotonic() if self._sent_seq > acked else None

    def _expire(self, now: float) -> None:
        self.replay.expire(now)
        if self.replay.dropped_datagrams != self._reported_drops:
            self._note_replay_drops()

    def _regate(self, held: bool = False) -> None:
        """Open the claim word when a receive thread may write its next batch at once (the
        connection caught up, nothing else to write), else close it. A word held stays held,
        unless ``held``: the holder's hand-back (a plain store: nobody else writes it then).
        Under the lock, after every change."""
        sock = self._sock
        if (
            sock is None
            or self._claims_refused
            or self._blocked
            or self._rest is not None
            or self._queued
            or not self.replay.caught_up
        ):
            if held:
                self._word.store(CLAIM_CLOSED)
            else:
                self._close_word()
            return
        word, fd = self._word, sock.fileno()
        if held:
            word.store(fd)
            return
        while True:
            now = word.load()
            if now in (fd, CLAIM_HELD) or word.swap(now, fd) == now:
                return

    def _close_word(self) -> bool:
        """Close the claim word so no receive thread claims the socket; False when one holds
        it (it writes a batch now). Under the lock, before anyone else writes."""
        word = self._word
        now = word.load()
        while now >= 0:
            before = word.swap(now, CLAIM_CLOSED)
            if before == now:
                return True
            now = before
        return now != CLAIM_HELD

    def _kick(self) -> bool:
        if self._sock is None or self._blocked or not self._close_word():
            return False
        try:
            done = self._write()
        except OSError as exc:
            self._send_error = exc
            self._blocked = True
            return True
        if not done:
            self._blocked = True
            return True
        return False

    def _count_sent(self, chunk: Chunk, now: float) -> None:
        first, last = chunk.first_seq, chunk.last_seq
        if first <= self._highest_sent:
            self.resent_datagrams += min(last, self._highest_sent) - first + 1
        self._highest_sent = max(self._highest_sent, last)
        if self._waiting_since is None and last > self.replay.acked_seq:
            self._waiting_since = now
        self._sent_seq = max(self._sent_seq, last)
        self.frames_sent += last - first + 1

    def _write(self) -> bool:
        """Write the rest of a frame sequence, queued HEARTBEATs, then unsent chunks; True when
        all is written, False when the socket is full. Raises OSError when it broke."""
        sock = self._sock
        if sock is None:
            return True
        replay = self.replay
        send = sock.send
        while True:
            data = self._rest
            if data is None:
                if self._queued:
                    data = memoryview(self._queued.popleft())
                else:
                    chunk = replay.next_unsent()
                    if chunk is None:
                        return True
                    self._count_sent(chunk, time.monotonic())
                    data = memoryview(chunk.data)
            try:
                sent = send(data)
            except BlockingIOError:
                self._rest = data
                return False
            self.bytes_sent += sent
            self.last_send = time.monotonic()
            self._rest = data[sent:] if sent < len(data) else None

    def _note_replay_drops(self) -> None:
        dropped = self.replay.dropped_datagrams
        if dropped != self._reported_drops:
            self._reported_drops = dropped
            self._limited.warning(
                f"{self.name}:replay-drops",
                "feed %s: replay buffer full or too old, dropped %d unacknowledged datagrams "
                "(%d bytes) so far",
                self.name,
                dropped,
                self.replay.dropped_bytes,
            )
