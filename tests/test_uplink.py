"""The capture uplink's replay bookkeeping outside the receive threads' batches.

The receive threads only append (one lock pass per batch); chunks older than
``replay_max_age`` are dropped on the Trio side: before a report and before a new connection
is streamed to, so neither shows nor resends data past the bound after a quiet spell.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import pytest

from relayd import wire
from relayd.capture.uplink import Uplink
from relayd.datapath import CLAIM_CLOSED, CLAIM_HELD, select_plane
from relayd.logs import RateLimitedLogger
from relayd.replay import Chunk, ReplayBuffer

MAX_AGE = 0.05


def _chunk(seq: int, at: float) -> Chunk:
    return Chunk(seq, seq, at, wire.encode_datagram(seq, 0xEF000001, 5000, 0, b"x" * 10))


@pytest.fixture
def uplink() -> Uplink:
    return Uplink("t", ReplayBuffer(1 << 20, MAX_AGE), RateLimitedLogger(logging.getLogger("t")))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_a_report_drops_chunks_past_the_age_bound_without_a_new_batch(
    uplink: Uplink, caplog: pytest.LogCaptureFixture
) -> None:
    uplink.append(_chunk(1, time.monotonic()), False, 0, 0)
    time.sleep(2 * MAX_AGE)  # nothing more is received while disconnected
    uplink.apply_acks()
    assert len(uplink.replay) == 0
    assert uplink.replay.dropped_datagrams == 1
    assert "dropped 1 unacknowledged datagrams" in caplog.text


def test_a_new_connection_is_not_sent_chunks_past_the_age_bound(
    uplink: Uplink, pair: tuple[socket.socket, socket.socket]
) -> None:
    uplink.append(_chunk(1, time.monotonic()), False, 0, 0)
    time.sleep(2 * MAX_AGE)  # a quiet spell while disconnected
    assert uplink.attach(pair[0], 0) == 0
    fresh = _chunk(2, time.monotonic())
    assert uplink.append(fresh, False, 0, 0) is False
    assert pair[1].recv(4096) == fresh.data  # the stream starts with what is within the bound


def test_a_batch_written_before_its_connection_ended_counts_as_sent(
    uplink: Uplink, pair: tuple[socket.socket, socket.socket]
) -> None:
    """The connection ends while a receive thread writes a batch to it: what it wrote is
    counted as sent when it hands the socket back (whatever the timing), and the batch is
    sent again, as a resend, on the next connection."""
    uplink.attach(pair[0], 0)
    assert uplink.claim() is pair[0]
    chunk = _chunk(1, time.monotonic())
    pair[0].send(chunk.data)  # the thread's write ...
    assert uplink.release(pair[0], None) == (True, False)  # ... the connection ends meanwhile
    uplink.append(chunk, True, len(chunk.data), 0)
    assert (uplink.frames_sent, uplink.bytes_sent) == (1, len(chunk.data))
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        assert uplink.attach(a, 0) == 1
        assert uplink.kick() is False
        assert b.recv(4096) == chunk.data
    assert (uplink.frames_sent, uplink.resent_datagrams) == (2, 1)


@pytest.mark.usefixtures("datapath")
def test_the_claim_word_holds_the_socket_only_while_a_batch_may_go_straight_out(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """The receive threads' data plane claims the connection through the claim word without
    the uplink's lock: the word holds the socket's fd only while nothing else is to be
    written; a HEARTBEAT is not written while a thread holds it; the hand-back reopens it, or
    leaves it closed while the rest of a batch waits."""
    plane = select_plane()
    uplink = Uplink("t", ReplayBuffer(1 << 20, 60.0), RateLimitedLogger(logging.getLogger("t")))
    word = uplink.claim_word(plane)
    assert word.load() == CLAIM_CLOSED  # not connected
    a, b = pair
    b.setblocking(False)
    uplink.attach(a, 0)
    fd = a.fileno()
    assert word.load() == fd
    assert word.swap(fd, CLAIM_HELD) == fd  # a receiver claims it, as the data plane does
    first = _chunk(1, time.monotonic())
    a.send(first.data)
    uplink.heartbeat(0.0)  # due, but the thread writes: nothing else is written meanwhile
    assert uplink.claimed
    assert uplink.append(first, True, len(first.data), 0) is False  # the hand-back
    assert word.load() == fd
    assert b.recv(4096) == first.data
    uplink.heartbeat(0.0)  # written by Trio: closed while it writes, open again after
    assert wire.Decoder({wire.FrameType.HEARTBEAT}).feed(b.recv(4096))
    assert word.load() == fd
    second = _chunk(2, time.monotonic())
    assert word.swap(fd, CLAIM_HELD) == fd
    a.send(second.data[:3])  # the socket took only part of the batch
    assert uplink.append(second, True, 3, 0) is True  # the sender task writes the rest
    assert word.load() == CLAIM_CLOSED
    assert uplink.flush() is True
    assert word.load() == fd
    assert b.recv(4096) == second.data
