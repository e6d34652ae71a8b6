"""The replay buffer: bounds, ACK trimming, age, and resend order after a reconnect."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relayd import session, wire
from relayd.replay import Chunk, Evicted, ReplayBuffer


def chunk(first: int, last: int, size: int = 100, time: float = 0.0) -> Chunk:
    """``size`` bytes standing for the frames ``first..last`` (sizes and order only)."""
    return Chunk(first, last, time, bytes(size))


def framed(first: int, last: int, payload: int = 10, time: float = 0.0) -> Chunk:
    """Real DATA frames ``first..last`` with ``payload`` bytes each."""
    data = b"".join(
        wire.encode_datagram(seq, 0xEFFF0001, 5000, 0, bytes(payload))
        for seq in range(first, last + 1)
    )
    return Chunk(first, last, time, data)


def seqs(data: bytes) -> list[int]:
    """The sequences of the DATA frames in ``data``, which must end at a frame boundary."""
    decoder = wire.Decoder()
    events = decoder.feed(data)
    assert decoder.buffered == 0
    return [e.seq for e in events if isinstance(e, wire.Datagram)]


def drain(buffer: ReplayBuffer) -> list[tuple[int, int]]:
    out = []
    while (c := buffer.next_unsent()) is not None:
        out.append((c.first_seq, c.last_seq))
    return out


def test_append_and_send_in_order() -> None:
    buffer = ReplayBuffer(10_000, 30.0)
    buffer.append(chunk(1, 3))
    buffer.append(chunk(4, 4))
    assert drain(buffer) == [(1, 3), (4, 4)]
    before = buffer.caught_up
    buffer.append(chunk(5, 9))
    after = buffer.caught_up
    assert (before, after) == (True, False)
    assert drain(buffer) == [(5, 9)]
    assert buffer.total_bytes == 300
    assert buffer.unacked_datagrams == 9


def test_chunks_must_follow_each_other() -> None:
    buffer = ReplayBuffer(10_000, 30.0)
    buffer.append(chunk(1, 3))
    with pytest.raises(ValueError, match="does not follow"):
        buffer.append(chunk(3, 5))
    with pytest.raises(ValueError, match="does not follow"):
        buffer.append(chunk(6, 5))


def test_ack_trims_whole_chunks_only() -> None:
    buffer = ReplayBuffer(10_000, 30.0)
    for first in range(1, 30, 3):
        buffer.append(chunk(first, first + 2))
    buffer.ack(7)  # chunk 7..9 is partly acked and stays
    assert [c.first_seq for c in buffer][:2] == [7, 10]
    assert buffer.unacked_datagrams == 30 - 7
    buffer.ack(5)  # an older ACK changes nothing
    assert buffer.acked_seq == 7
    buffer.ack(30)
    assert len(buffer) == 0
    assert buffer.total_bytes == 0
    assert buffer.unacked_datagrams == 0
    assert buffer.dropped_datagrams == 0


def test_byte_bound_drops_oldest_and_counts() -> None:
    buffer = ReplayBuffer(1000, 30.0)
    for i in range(1, 21):
        buffer.append(chunk(2 * i - 1, 2 * i, size=100))
    assert buffer.total_bytes == 1000
    assert len(buffer) == 10
    assert next(iter(buffer)).first_seq == 21
    assert buffer.dropped_chunks == 10
    assert buffer.dropped_datagrams == 20
    assert buffer.dropped_bytes == 1000
    assert buffer.dropped_unsent_datagrams == 20


def test_a_chunk_larger_than_the_bound_is_kept_alone() -> None:
    buffer = ReplayBuffer(1000, 30.0)
    buffer.append(chunk(1, 1, size=10))
    buffer.append(chunk(2, 50, size=5000))
    assert [c.first_seq for c in buffer] == [2]
    assert buffer.dropped_datagrams == 1


def test_age_bound() -> None:
    buffer = ReplayBuffer(1_000_000, 2.0)
    for i in range(10):
        buffer.append(chunk(i + 1, i + 1, time=float(i)))
    assert buffer.expire(5.0) == 3  # captured at 0, 1, 2 < 5 - 2
    assert next(iter(buffer)).first_seq == 4
    assert buffer.expire(5.0) == 0
    assert buffer.expire(100.0) == 7
    assert len(buffer) == 0
    assert buffer.dropped_datagrams == 10


def test_sent_then_dropped_is_not_counted_as_unsent() -> None:
    buffer = ReplayBuffer(1000, 30.0)
    buffer.append(chunk(1, 5, size=600))
    assert drain(buffer) == [(1, 5)]
    buffer.append(chunk(6, 6, size=600))
    assert buffer.dropped_datagrams == 5
    assert buffer.dropped_unsent_datagrams == 0


def test_partly_acked_drop_counts_only_the_unacked_part() -> None:
    buffer = ReplayBuffer(1000, 30.0)
    buffer.append(chunk(1, 10, size=600))
    buffer.ack(4)
    buffer.append(chunk(11, 11, size=600))
    assert buffer.dropped_datagrams == 6


def test_resend_after_reconnect() -> None:
    buffer = ReplayBuffer(100_000, 30.0)
    for first in range(1, 100, 10):
        buffer.append(framed(first, first + 9))
    assert len(drain(buffer)) == 10
    buffer.ack(20)
    # The connection broke; the new host (failover) has emitted nothing: everything held
    # is resent, in order.
    assert buffer.rewind(0) == 80
    assert drain(buffer) == [(f, f + 9) for f in range(21, 100, 10)]
    # A reconnect to a host that emitted up to 45: resume with exactly 46, mid-chunk.
    assert buffer.rewind(45) == 55
    assert drain(buffer) == [(46, 50), *((f, f + 9) for f in range(51, 100, 10))]
    assert next(iter(buffer)).first_seq == 41


def test_exact_resume_never_resends_what_was_acknowledged() -> None:
    """The old host acknowledged half a chunk; a new host greets with ACK 0: the resend
    starts at the first unacknowledged frame, byte for byte the frames as captured."""
    buffer = ReplayBuffer(100_000, 30.0)
    whole = framed(1, 10, payload=33)
    buffer.append(whole)
    buffer.append(framed(11, 20))
    drain(buffer)
    buffer.ack(5)
    assert buffer.rewind(0) == 15
    first = buffer.next_unsent()
    assert first is not None
    assert (first.first_seq, first.last_seq) == (6, 10)
    assert seqs(first.data) == [6, 7, 8, 9, 10]
    assert first.data == whole.data[5 * (wire.DATA_HEADER_SIZE + 33) :]
    rest = buffer.next_unsent()
    assert rest is not None
    assert seqs(rest.data) == list(range(11, 21))
    # the ACK of the last frame of a chunk trims it whole
    buffer.ack(10)
    assert buffer.rewind(0) == 10
    assert drain(buffer) == [(11, 20)]


def test_drops_are_counted_by_the_bound_that_evicted_them() -> None:
    buffer = ReplayBuffer(1000, 5.0)
    for i in range(1, 11):
        buffer.append(chunk(i, i, size=100, time=float(i)))
    buffer.ack(2)
    buffer.append(chunk(11, 12, size=400, time=11.0))  # 1200 bytes: evicts 3 and 4
    assert buffer.dropped_by == {Evicted.BYTES: 2, Evicted.AGE: 0}
    assert buffer.expire(12.5) == 3  # 5, 6, 7 captured more than 5 s before
    assert buffer.dropped_by == {Evicted.BYTES: 2, Evicted.AGE: 3}
    assert buffer.dropped_datagrams == 5


def test_drops_during_the_resend_move_the_cursor() -> None:
    buffer = ReplayBuffer(1000, 30.0)
    for i in range(1, 11):
        buffer.append(chunk(i, i, size=100))
    drain(buffer)
    buffer.rewind(0)
    assert buffer.next_unsent() == chunk(1, 1)
    for i in range(11, 16):
        buffer.append(chunk(i, i, size=100))  # drops 1..5
    assert [c.first_seq for c in iter(buffer.next_unsent, None)] == list(range(6, 16))


@settings(max_examples=300, deadline=None)
@given(
    max_bytes=st.integers(1, 5000),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(1, 8), st.integers(0, 1500)),
            st.tuples(st.just("ack"), st.integers(0, 60), st.just(0)),
            st.tuples(st.just("send"), st.integers(0, 5), st.just(0)),
            st.tuples(st.just("rewind"), st.integers(0, 60), st.just(0)),
            st.tuples(st.just("tick"), st.integers(0, 3), st.just(0)),
        ),
        max_size=80,
    ),
)
def test_model(max_bytes: int, ops: list[tuple[str, int, int]]) -> None:
    """Bounds hold after every step; every sequence is acked, dropped or held; and the
    chunks handed out after a rewind are exactly the held chunks past the ACK, in order."""
    max_age = 5.0
    buffer = ReplayBuffer(max_bytes, max_age)
    now = 0.0
    seq = 0
    largest = 0
    for op, a, b in ops:
        if op == "append":
            added = framed(seq + 1, seq + a, b // a, now)
            buffer.append(added)
            seq += a
            largest = max(largest, len(added.data))
        elif op == "ack":
            target = min(a, seq)
            buffer.ack(target)
            assert all(c.last_seq > target for c in buffer)
        elif op == "send":
            for _ in range(a):
                buffer.next_unsent()
        elif op == "rewind":
            target = min(max(a, buffer.acked_seq), seq)
            expected = [s for c in buffer for s in seqs(c.data) if s > target]
            buffer.rewind(target)
            handed = list(iter(buffer.next_unsent, None))
            assert [s for c in handed for s in seqs(c.data)] == expected
            assert all(seqs(c.data) == list(range(c.first_seq, c.last_seq + 1)) for c in handed)
        else:
            now += a
            buffer.expire(now)
            assert all(c.time >= now - max_age for c in buffer)
        held = list(buffer)
        assert buffer.total_bytes == sum(len(c.data) for c in held)
        assert buffer.total_bytes <= max(max_bytes, largest)
        assert len(held) <= 1 or buffer.total_bytes <= max_bytes
        for before, after in itertools.pairwise(held):
            assert after.first_seq == before.last_seq + 1
        # conservation: every sequence appended is acked, dropped, or still held
        lowest_held = held[0].first_seq - 1 if held else seq
        dropped_or_acked = seq - buffer.unacked_datagrams
        assert dropped_or_acked >= buffer.dropped_datagrams
        assert buffer.unacked_datagrams == seq - max(buffer.acked_seq, lowest_held)


def test_a_chunk_written_at_once_is_appended_sent_even_when_an_ack_came_first() -> None:
    """The receive thread writes a batch before it appends it; the emit side may ACK part of
    it before that: appending it as sent moves the cursor past it, and nothing is cut. Only a
    caught-up buffer takes a chunk that way."""
    buffer = ReplayBuffer(100_000, 30.0)
    buffer.ack(3)
    batch = framed(1, 5)
    buffer.append(batch, sent=True)
    assert buffer.caught_up
    assert buffer.next_unsent() is None
    assert list(buffer) == [batch]
    buffer.append(framed(6, 6))
    with pytest.raises(ValueError, match="sent out of turn"):
        buffer.append(framed(7, 7), sent=True)


# the false gap of issue 14: back to a host after the other one emitted (and ACKed) meanwhile
@example(
    max_bytes=3000,
    hosts=2,
    ops=[
        *[("append", 5, 100), ("reconnect", 0, False), ("send", 4), ("deliver",), ("ack",)],
        *[("reconnect", 1, False), ("append", 5, 100), ("send", 4), ("deliver",), ("ack",)],
        *[("reconnect", 0, False), ("append", 5, 100), ("send", 4), ("deliver",)],
    ],
)
# a loss at the resume: dropped while disconnected, counted by the capture side alone
@example(
    max_bytes=300,
    hosts=1,
    ops=[
        *[("append", 1, 100), ("reconnect", 0, False), ("send", 1), ("deliver",), ("ack",)],
        *[("reconnect", 0, True), ("append", 2, 200), ("append", 2, 200)],
    ],
)
# a jump within a connection that dies before the frame after the jump arrives
@example(
    max_bytes=300,
    hosts=1,
    ops=[
        *[("reconnect", 0, False), ("append", 1, 100), ("send", 1), ("deliver",)],
        *[("append", 1, 100), ("send", 1), ("append", 2, 200), ("append", 2, 200)],
        *[("send", 1), ("reconnect", 0, False)],
    ],
)
@settings(max_examples=500, deadline=None)
@given(
    max_bytes=st.integers(100, 3000),
    hosts=st.integers(1, 2),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(1, 6), st.integers(0, 900)),
            st.tuples(st.just("send"), st.integers(0, 4)),
            st.tuples(st.just("deliver")),
            st.tuples(st.just("ack")),
            st.tuples(st.just("reconnect"), st.integers(0, 1), st.booleans()),
            st.tuples(st.just("tick"), st.integers(0, 3)),
        ),
        max_size=80,
    ),
)
def test_every_loss_is_counted_once_at_the_resume_or_by_the_emit_side(
    max_bytes: int, hosts: int, ops: list[tuple[object, ...]]
) -> None:
    """The capture side's ``resume_lost_datagrams`` plus the emit hosts' gaps (``accept``:
    within a connection only) are exactly the sequences no emit host ever got, whichever host
    each connection reaches, with frames handed out and lost in a connection that dies (a
    host greets with the highest sequence it emitted, and ACKs all it got before the capture
    side leaves it)."""
    buffer = ReplayBuffer(max_bytes, 5.0)
    highest = [0] * hosts  # what each emit host emitted of the session
    gaps = [0] * hosts
    got: set[int] = set()
    seq = 0
    now = 0.0
    host: int | None = None  # the connection's host, None: disconnected
    resuming = True
    inflight: list[int] = []  # handed out, not yet at the host

    def deliver() -> None:
        nonlocal resuming
        assert host is not None
        for s in inflight:
            verdict = session.accept(highest[host], s, resuming)
            resuming = False
            if verdict != session.DUPLICATE:
                gaps[host] += verdict
                highest[host] = s
                got.add(s)
        inflight.clear()

    def connect(to: int) -> None:
        nonlocal host, resuming
        if host is not None:
            buffer.ack(highest[host])  # its ACKs (its final one) before the capture side left
        inflight.clear()  # what the dying connection still carried never arrives
        host, resuming = to, True
        buffer.rewind(highest[to])

    for op in ops:
        if op[0] == "append":
            count, size = int(op[1]), int(op[2])  # type: ignore[call-overload]
            buffer.append(framed(seq + 1, seq + count, size // count, now))
            seq += count
        elif op[0] == "send" and host is not None:
            for _ in range(int(op[1])):  # type: ignore[call-overload]
                chunk = buffer.next_unsent()
                if chunk is None:
                    break
                inflight.extend(seqs(chunk.data))
        elif op[0] == "deliver" and host is not None:
            deliver()
        elif op[0] == "ack" and host is not None:
            buffer.ack(highest[host])
        elif op[0] == "reconnect":
            target = int(op[1]) % hosts  # type: ignore[call-overload]
            connect(target)
            if op[2]:  # a link that never came up: the capture side is disconnected
                buffer.ack(highest[target])
                host = None
        elif op[0] == "tick":
            now += float(op[1])  # type: ignore[arg-type]
            buffer.expire(now)
    connect(0)  # the end: everything still held goes out
    while (chunk := buffer.next_unsent()) is not None:
        inflight.extend(seqs(chunk.data))
    deliver()
    lost = seq - len(got)
    assert buffer.resume_lost_datagrams + sum(gaps) == lost


def test_a_chunk_written_at_once_and_acked_whole_before_it_was_appended_is_not_held() -> None:
    """The emit side may ACK all of a batch the receive thread wrote before the thread
    appends it: no later ACK covers it any more, so it is not held (it would stay in the
    buffer, counted unacknowledged, until the age bound)."""
    buffer = ReplayBuffer(100_000, 30.0)
    buffer.ack(5)
    buffer.append(framed(1, 5), sent=True)
    assert len(buffer) == 0
    assert buffer.total_bytes == 0
    assert buffer.unacked_datagrams == 0
    assert buffer.caught_up
    later = framed(6, 7)
    buffer.append(later, sent=True)
    assert list(buffer) == [later]
