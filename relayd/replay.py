"""The capture side's bounded buffer of framed DATA not yet acknowledged (sans-I/O).

The capture hot path frames a batch of datagrams into one ``bytes`` object and appends it here
as one chunk; the emit side's ACKs trim whole chunks whose last sequence is acknowledged. After
a reconnect, ``rewind(welcome_ack)`` moves the send cursor back to the first chunk that holds
anything past the highest acknowledgement (the new host's welcome ACK or an earlier host's
ACK, whichever is higher), and ``next_unsent`` hands out the chunks from there.

Exact resume: a chunk handed out while partly acknowledged is cut at the first DATA frame past
the acknowledgement (frames are length-prefixed, relayd/wire.py), so nothing acknowledged is
ever sent again, whatever the new host remembers.

Memory is bounded twice: by the bytes held (``max_bytes``; the oldest chunks go first, and the
newest chunk is always kept, so the bound is ``max_bytes`` plus one batch) and by age
(``max_age`` seconds, checked by ``expire``). Every chunk dropped unacknowledged is counted, by
the bound that evicted it (:class:`Evicted`), so the caller can report and log the loss.

Counting each loss once: ``dropped_datagrams`` is an upper bound (a dropped frame may have been
emitted, just not acknowledged yet). What was really never sent is counted where the stream
jumps: a jump at the start of a connection here (``resume_lost_datagrams``: the frames between
the highest ACK held and the first one still held, which no emit host acknowledged and which
cannot be resent), a jump within a connection by the emit side (its ``gap_sequences``; the emit
side never counts the jump at a connection's first frame, relayd/session.py ``accept``).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator
from typing import NamedTuple

__all__ = ["Chunk", "Evicted", "ReplayBuffer"]


class Evicted(enum.Enum):
    """Which bound dropped unacknowledged datagrams (``replay_dropped_datagrams{reason}``)."""

    BYTES = "bytes"  # replay_max_bytes
    AGE = "age"  # replay_max_age


def _frames_size(data: bytes, count: int) -> int:
    """Bytes taken by the first ``count`` frames of ``data`` (each ``u16 length`` + body)."""
    offset = 0
    for _ in range(count):
        offset += 2 + int.from_bytes(data[offset : offset + 2], "big")
    return offset


class Chunk(NamedTuple):
    """Whole DATA frames of consecutive sequences ``first_seq..last_seq``."""

    first_seq: int
    last_seq: int
    time: float  # when it was captured, in the caller's clock (seconds)
    data: bytes

    @property
    def datagrams(self) -> int:
        return self.last_seq - self.first_seq + 1


class ReplayBuffer:
    """Chunks in sequence order, a send cursor, and byte and age bounds."""

    __slots__ = (
        "_base",
        "_chunks",
        "_counted",
        "_cursor",
        "_handed",
        "acked_seq",
        "dropped_by",
        "dropped_bytes",
        "dropped_chunks",
        "dropped_datagrams",
        "dropped_unsent_datagrams",
        "last_appended_at",
        "last_seq",
        "max_age",
        "max_bytes",
        "resume_lost_datagrams",
        "total_bytes",
    )

    def __init__(self, max_bytes: int, max_age: float) -> None:
        if max_bytes <= 0 or max_age <= 0:
            raise ValueError("max_bytes and max_age must be positive")
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._chunks: deque[Chunk] = deque()
        # Absolute index of _chunks[0]; the cursor is absolute too, so dropping from the left
        # never moves what it points at.
        self._base = 0
        self._cursor = 0
        self.total_bytes = 0
        self.acked_seq = 0
        self.last_seq = 0  # highest sequence ever appended
        self.last_appended_at: float | None = None  # the newest chunk's time; None: never
        self.dropped_chunks = 0
        self.dropped_datagrams = 0
        self.dropped_bytes = 0
        self.dropped_by: dict[Evicted, int] = dict.fromkeys(Evicted, 0)
        #: dropped before they were ever handed out by ``next_unsent`` (lost for sure)
        self.dropped_unsent_datagrams = 0
        #: never acknowledged and gone from the buffer when a connection resumed: its first
        #: frame jumps past them (the emit side counts only jumps after a connection's first)
        self.resume_lost_datagrams = 0
        self._counted = 0  # the highest sequence counted in resume_lost_datagrams
        self._handed = False  # a frame was handed out since the last rewind

    def __len__(self) -> int:
        return len(self._chunks)

    def __iter__(self) -> Iterator[Chunk]:
        return iter(self._chunks)

    @property
    def unacked_datagrams(self) -> int:
        if not self._chunks:
            return 0
        return self.last_seq - max(self.acked_seq, self._chunks[0].first_seq - 1)

    @property
    def caught_up(self) -> bool:
        """True when every chunk held has been handed out since the last rewind."""
        return self._cursor >= self._base + len(self._chunks)

    def append(self, chunk: Chunk, *, sent: bool = False) -> None:
        """Add the newest chunk; drops the oldest while the byte bound is exceeded. ``sent``:
        its producer has written it whole (the receive thread writes a batch at once when the
        connection is caught up), so the cursor moves past it. An ACK of part of it may have
        come before it was appended; it is not cut, it went out."""
        if chunk.first_seq <= self.last_seq or chunk.last_seq < chunk.first_seq:
            raise ValueError(
                f"chunk {chunk.first_seq}..{chunk.last_seq} does not follow {self.last_seq}"
            )
        if sent:
            if self._cursor != self._base + len(self._chunks):
                raise ValueError(f"chunk {chunk.first_seq}..{chunk.last_seq} sent out of turn")
            self._cursor += 1
            self._handed = True
        self._chunks.append(chunk)
        self.total_bytes += len(chunk.data)
        self.last_seq = chunk.last_seq
        self.last_appended_at = chunk.time
        if sent and chunk.last_seq <= self.acked_seq:  # ACKed before it was appended:
            self.ack(self.acked_seq)  # no later ACK would trim it
        while self.total_bytes > self.max_bytes and len(self._chunks) > 1:
            self._drop_oldest(Evicted.BYTES)

    def expire(self, now: float) -> int:
        """Drop chunks captured more than ``max_age`` before ``now``; returns datagrams dropped."""
        limit = now - self.max_age
        dropped = 0
        chunks = self._chunks
        while chunks and chunks[0].time < limit:
            dropped += self._drop_oldest(Evicted.AGE)
        return dropped

    def ack(self, seq: int) -> None:
        """The emit side emitted everything up to ``seq``: forget the chunks it covers."""
        self.acked_seq = max(self.acked_seq, seq)
        chunks = self._chunks
        while chunks and chunks[0].last_seq <= seq:
            self._drop_oldest(None)

    def rewind(self, after_seq: int) -> int:
        """Point the cursor at the first chunk holding a sequence above ``after_seq`` and the
        highest ACK so far.

        Called with the welcome ACK of a new connection. Returns how many datagrams the chunks
        from the cursor hold past both (what is about to be resent). Unacknowledged frames no
        longer held (dropped while no connection could take them) are where the connection's
        first frame jumps: counted in ``resume_lost_datagrams``.
        """
        self.ack(after_seq)
        self._cursor = self._base
        self._handed = False
        self._count_jump(self._chunks[0].first_seq if self._chunks else self.last_seq + 1)
        return self.unacked_datagrams

    def _count_jump(self, first: int) -> None:
        """The connection resumes at ``first``: what lies between the highest ACK and it, and
        was not counted before, is lost (no emit host acknowledged it, none will get it)."""
        through = max(self.acked_seq, self._counted)
        if first - 1 > through:
            self.resume_lost_datagrams += first - 1 - through
            self._counted = first - 1

    def next_unsent(self) -> Chunk | None:
        """The chunk at the cursor (and move past it), or None when caught up."""
        index = self._cursor - self._base
        if index < 0:  # chunks dropped before they could be sent: the stream jumps here
            index = 0
            self._cursor = self._base
            if not self._handed:  # the connection's first frame jumps: counted here
                self._count_jump(self._chunks[0].first_seq if self._chunks else self.last_seq + 1)
            # else the emit side counts the jump when it gets the frame after it (a gap within
            # the connection); if the connection dies first, the next rewind counts what its
            # ACKs do not cover
        if index >= len(self._chunks):
            return None
        self._cursor += 1
        self._handed = True
        chunk = self._chunks[index]
        acked = self.acked_seq
        if chunk.first_seq > acked:
            return chunk
        # partly acknowledged (a resend): from the first frame past the ACK
        skip = _frames_size(chunk.data, acked - chunk.first_seq + 1)
        return Chunk(acked + 1, chunk.last_seq, chunk.time, chunk.data[skip:])

    def _drop_oldest(self, evicted: Evicted | None) -> int:
        """Drop the oldest chunk: acknowledged (``evicted`` None) or evicted by a bound."""
        chunk = self._chunks.popleft()
        self.total_bytes -= len(chunk.data)
        unsent = self._cursor <= self._base
        self._base += 1
        if evicted is None:
            return 0
        count = chunk.last_seq - max(chunk.first_seq - 1, self.acked_seq)
        if count <= 0:
            return 0
        self.dropped_chunks += 1
        self.dropped_datagrams += count
        self.dropped_by[evicted] += count
        self.dropped_bytes += len(chunk.data)
        if unsent:
            self.dropped_unsent_datagrams += count
        return count
