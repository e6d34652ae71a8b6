"""The two data paths do the same thing: the C data plane (relayd/_fastpath.c) and the Python
one it replaces when the library is missing (``RELAYD_DATAPATH``, relayd/fastpath/).

Each test plays one input on real sockets once per data path and compares what came out:
for an emit feed, a stream written by the test with the wire encoders into its TCP listener on
loopback, and the multicast it sends out of 127.0.0.1 (helpers of test_emit.py); for a capture
feed, multicast sent to the groups it joined on 127.0.0.1, and the DATA frames it streams to a
test peer (helpers of test_capture.py). Besides the output, the counters (``samples()``, what
``/metrics`` shows) and the frames sent back to the peer (ACK, ERROR) must be the same on both
paths, and match what the input implies.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import TypeVar

import attrs
import pytest
import trio

from relayd import wire
from relayd.capture import CaptureFeedRuntime
from relayd.config import EmitFeed, PortRange
from relayd.emit import ACK_INTERVAL, EmitFeedRuntime
from relayd.emit.stats import SEND_RECOVERY
from relayd.netif import open_multicast_sender
from relayd.runtime import Sample
from relayd.session import (
    DUPLICATE,
    TGW_MULTICAST_MTU,
    Allowlist,
    Destination,
    accept,
    oversize,
)
from relayd.wire import (
    DATA_HEADER_SIZE,
    MAX_PAYLOAD,
    Ack,
    Error,
    ErrorCode,
    Heartbeat,
    encode_ack,
    encode_datagram,
    encode_error,
    encode_heartbeat,
    encode_hello,
)
from tests.helpers.capture_standin import Peer, Receivers, make_config, pick_groups, running
from tests.helpers.datapath import DATAPATHS, use_datapath
from tests.helpers.emit_standin import Peer as EmitStandIn
from tests.helpers.emit_standin import Server, feed_config, groups_for, serve
from tests.helpers.loopback import FEED, LOOPBACK, per_group, wait_for

T = TypeVar("T")
BROADCAST = IPv4Address("255.255.255.255")
#: Counters that depend on the kernel (a full send buffer), not on the input; and the
#: observer's sample of the feed's groups (relayd/emit/observer.py), which depends on timing.
# The gate holds emission back only when the observer thread is starved past its lease (a
# loaded machine), on either path: how often is timing, not input (tests/test_emit_gate.py
# counts it on purpose).
_UNSTABLE_COUNTERS = frozenset(
    {"send_waits", "emit_observed_datagrams", "emit_gated", "emit_gated_seconds"}
)

Datagrams = list[tuple[int, IPv4Address, int, bytes]]
Output = dict[tuple[IPv4Address, int], list[bytes]]


async def on_both_paths(
    monkeypatch: pytest.MonkeyPatch, scenario: Callable[[str], Awaitable[T]]
) -> T:
    """``scenario(path)`` on the C data path, then on the Python one; their results must be
    equal. Skips when the C data path cannot be loaded."""
    results: dict[str, T] = {}
    for choice in DATAPATHS:
        use_datapath(monkeypatch, choice)
        try:
            results[choice] = await scenario(choice)
        except BaseException:
            print(f"failed on the {choice} data path")  # in the report's captured stdout
            raise
    c, python = results["c"], results["python"]
    assert c == python, difference(c, python)
    return python


def difference(c: object, python: object) -> str:
    """The fields (and counters) in which two results differ, as ``name: C != Python``."""
    if not isinstance(c, (EmitResult, CaptureResult, ReaderResult)) or type(python) is not type(c):
        return f"C {c!r} != Python {python!r}"
    lines = []
    for field in attrs.fields(type(c)):
        a, b = getattr(c, field.name), getattr(python, field.name)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                if a.get(key) != b.get(key):
                    lines.append(f"{field.name}[{key}]: C {a.get(key)!r} != Python {b.get(key)!r}")
        else:
            lines.append(f"{field.name}: C {a!r} != Python {b!r}")
    return "differs between the data paths:\n" + "\n".join(line[:600] for line in lines)


def counters(samples: Iterable[Sample]) -> dict[str, float]:
    """Every counter of a feed as ``name{label=value,...}``, but the ones that depend on the
    kernel's timing rather than on the input."""
    out: dict[str, float] = {}
    for sample in samples:
        if sample.type != "counter" or sample.name in _UNSTABLE_COUNTERS:
            continue
        extra = ",".join(f"{k}={v}" for k, v in sample.labels if k != "feed")
        out[f"{sample.name}{{{extra}}}" if extra else sample.name] = sample.value
    return out


# -- emit --------------------------------------------------------------------------------------


def encode(datagrams: Iterable[tuple[int, IPv4Address, int, bytes]]) -> list[bytes]:
    """One DATA frame per datagram (the capture timestamp is derived from the sequence)."""
    return [
        encode_datagram(seq, int(group), port, 1_700_000_000_000_000_000 + seq, payload)
        for seq, group, port, payload in datagrams
    ]


def payloads(
    groups: Sequence[tuple[IPv4Address, int]], sizes: Iterable[int], seed: int
) -> list[tuple[IPv4Address, int, bytes]]:
    rng = random.Random(seed)
    out = []
    for size in sizes:
        group, port = groups[rng.randrange(len(groups))]
        out.append((group, port, rng.randbytes(size)))
    return out


def numbered(items: Sequence[tuple[IPv4Address, int, bytes]], first: int = 1) -> Datagrams:
    return [(first + i, group, port, payload) for i, (group, port, payload) in enumerate(items)]


@attrs.define
class EmitModel:
    """What an emit feed must do with DATA: per session, emit sequences above the highest
    one seen (in order), count the rest as duplicates, count jumps as gaps (not before the
    first DATA of a session), drop destinations outside the allowlist by reason, then
    payloads over ``max_datagram_size`` as oversize, and refused sends as send errors."""

    allowed_groups: tuple[IPv4Network, ...]
    allowed_ports: tuple[PortRange, ...]
    max_datagram_size: int
    highest: dict[bytes, int] = attrs.field(factory=dict)
    out: list[tuple[IPv4Address, int, bytes]] = attrs.field(factory=list)
    datagrams_in: int = 0
    duplicates: int = 0
    gaps: int = 0
    gap_sequences: int = 0
    dropped: dict[str, int] = attrs.field(
        factory=lambda: {
            "group_not_allowed": 0,
            "port_not_allowed": 0,
            "oversize": 0,
            "send_error": 0,
        }
    )

    @classmethod
    def of(cls, config: EmitFeed) -> EmitModel:
        return cls(config.allowed_groups, config.allowed_ports, config.max_datagram_size)

    def reconfigure(self, config: EmitFeed) -> None:
        self.allowed_groups = config.allowed_groups
        self.allowed_ports = config.allowed_ports

    def feed(
        self, session: bytes, datagrams: Iterable[tuple[int, IPv4Address, int, bytes]]
    ) -> None:
        for seq, group, port, payload in datagrams:
            self.datagrams_in += 1
            skipped = accept(self.highest.get(session, 0), seq)
            if skipped == DUPLICATE:
                self.duplicates += 1
                continue
            if skipped:
                self.gaps += 1
                self.gap_sequences += skipped
            self.highest[session] = seq
            verdict = Allowlist(self.allowed_groups, self.allowed_ports).verdict(int(group), port)
            if verdict is not Destination.ALLOWED:
                self.dropped[verdict.reason] += 1
            elif oversize(len(payload), self.max_datagram_size):
                self.dropped["oversize"] += 1
            elif group == BROADCAST:  # sendto refuses it without SO_BROADCAST: EACCES
                self.dropped["send_error"] += 1
            else:
                self.out.append((group, port, payload))

    def check(self, feed: EmitFeedRuntime, got: Sequence[tuple[IPv4Address, int, bytes]]) -> None:
        assert per_group(got) == per_group(self.out)
        assert len(got) == len(self.out)
        seen = counters(feed.samples())
        assert seen["datagrams_in"] == self.datagrams_in
        assert seen["datagrams_out"] == len(self.out)
        assert seen["bytes_out"] == sum(len(payload) for _, _, payload in self.out)
        assert seen["duplicates"] == self.duplicates
        assert seen["gaps"] == self.gaps
        assert seen["gap_sequences"] == self.gap_sequences
        for reason, count in self.dropped.items():
            assert seen[f"datagrams_dropped{{reason={reason}}}"] == count, reason


@attrs.frozen
class EmitResult:
    """What an emit feed did with one input: multicast out (per group:port, in order), the
    frames the peers heard (normalised), every counter."""

    multicast: Output
    heard: tuple[object, ...]
    counters: dict[str, float]


async def send_pieces(peer: Peer, pieces: Iterable[bytes], pause: float = 0.001) -> None:
    """One ``send`` per piece with a short pause after each, so the pieces mostly arrive as
    separate reads on the other side."""
    for piece in pieces:
        if piece:
            await peer.stream.send_all(piece)
            await trio.sleep(pause)


async def heard_until_closed(peer: Peer, timeout: float = 5.0) -> tuple[int | None, Error | None]:
    """Read to EOF: the last ACK (ACKs must grow) and the ERROR the connection ended with."""
    last: int | None = None
    error: Error | None = None
    while True:
        event = await peer.next_event(timeout)
        if event is None:
            return last, error
        assert error is None, f"{event} after {error}"
        if isinstance(event, Ack):
            assert last is None or event.seq > last, (last, event)
            last = event.seq
        elif isinstance(event, Error):
            error = event
        else:
            assert isinstance(event, Heartbeat), event


async def wait_metric(feed: EmitFeedRuntime, key: str, value: float, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while counters(feed.samples()).get(key) != value:
            await trio.sleep(0.01)


async def wait_idle(feed: EmitFeedRuntime) -> None:
    """Until no connection is active (the feed noticed every close)."""
    with trio.fail_after(5):
        while feed.health().detail["connections"]:
            await trio.sleep(0.01)


def awkward_pieces(frames: Sequence[bytes], seed: int) -> list[bytes]:
    """The stream of ``frames`` cut at awkward places: the first three frames one byte at a
    time, the fourth alone in its piece, then 27 frames cut at each offset 0..26 of their DATA
    header in turn, then random cuts of up to 70 kB (so large frames span several reads)."""
    pieces = [bytes([b]) for b in b"".join(frames[:3])]
    pieces.append(frames[3])
    carry = b""
    header_cut = frames[4 : 4 + DATA_HEADER_SIZE + 1]
    for offset, frame in enumerate(header_cut):
        pieces.append(carry + frame[:offset])
        carry = frame[offset:]
    rest = carry + b"".join(frames[4 + len(header_cut) :])
    rng = random.Random(seed)
    pos = 0
    while pos < len(rest):
        step = rng.choice((1, 2, 3, 25, 26, 27, rng.randrange(1, 70000)))
        pieces.append(rest[pos : pos + step])
        pos += step
    assert b"".join(pieces) == b"".join(frames)
    return pieces


@pytest.mark.parametrize("busy_poll", [0.0, 200e-6], ids=["sleeps", "latency-mode"])
async def test_a_stream_cut_at_awkward_places(
    monkeypatch: pytest.MonkeyPatch, busy_poll: float
) -> None:
    """Also in the latency mode (``busy_poll``: the C pump polls without sleeping after data;
    the Python plane ignores it), which must not change what comes out."""
    groups = pick_groups(4)
    sizes = [0, 5, 40, 160] + [160 + i for i in range(DATA_HEADER_SIZE + 1)]
    sizes += [random.Random(5).choice((0, 1, 153, 1200, 8000)) for _ in range(150)]
    sizes[60] = sizes[100] = MAX_PAYLOAD  # the largest frames: 65533 bytes each
    datagrams = numbered(payloads(groups, sizes, seed=4))
    frames = encode(datagrams)
    pieces = awkward_pieces(frames, seed=6)
    config = make_config(max_datagram_size=MAX_PAYLOAD, busy_poll=busy_poll)  # every size

    async def scenario(path: str) -> EmitResult:
        model = EmitModel.of(config)
        rx = Receivers(groups)
        try:
            with trio.fail_after(30):
                async with running(config) as feed:
                    assert feed.listen_port
                    peer = await Peer.start(feed.listen_port)
                    assert await peer.welcome() == 0
                    await send_pieces(peer, pieces)
                    model.feed(peer.session, datagrams)
                    await peer.wait_ack(len(datagrams))
                    got = await rx.settle()
                    await peer.aclose()
                    await wait_metric(feed, "connections_closed{reason=eof}", 1)
                    model.check(feed, got)
                    seen = counters(feed.samples())
                    hello = len(encode_hello(FEED, peer.session))
                    assert seen["bytes_in"] == hello + sum(map(len, frames))
                    assert seen["frames_in"] == 1 + len(frames)
                    return EmitResult(per_group(got), (), seen)
        finally:
            rx.close()

    await on_both_paths(monkeypatch, scenario)


async def test_duplicates_gaps_and_reconnects_of_a_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    groups = pick_groups(3)
    pool = numbered(payloads(groups, [random.Random(8).randrange(300) for _ in range(60)], 9))
    by_seq = {d[0]: d for d in pool}

    def seqs(*ranges: Iterable[int]) -> Datagrams:
        return [by_seq[s] for r in ranges for s in r]

    config = make_config()

    async def scenario(path: str) -> EmitResult:
        model = EmitModel.of(config)
        session = os.urandom(16)
        heard: list[object] = []
        rx = Receivers(groups)
        try:
            with trio.fail_after(20):
                async with running(config) as feed:
                    port = feed.listen_port
                    assert port
                    # back (8..10, 18), forward (16..19 skipped)
                    first = await Peer.start(port, session=session)
                    heard.append(await first.welcome())
                    stream = seqs(range(1, 11), range(8, 16), range(20, 26), [18, 26])
                    await first.stream.send_all(b"".join(encode(stream)))
                    model.feed(session, stream)
                    await first.wait_ack(26)
                    await first.aclose()
                    await wait_idle(feed)
                    # the same session again: resumes after 26, resends from before it
                    second = await Peer.start(port, session=session)
                    heard.append(await second.welcome())
                    stream = seqs(range(24, 31), [35, 33, 36])
                    await send_pieces(second, encode(stream))
                    model.feed(session, stream)
                    await second.wait_ack(36)
                    # and once more while the second is still open: it supersedes it
                    third = await Peer.start(port, session=session)
                    heard.append(await third.welcome())
                    heard.append(await second.closed_with(ErrorCode.TOO_MANY_CONNECTIONS))
                    stream = seqs(range(36, 41), [39, 45])
                    await third.stream.send_all(b"".join(encode(stream)))
                    model.feed(session, stream)
                    await third.wait_ack(45)
                    # a new session: its first DATA counts no gap
                    other = await Peer.start(port)
                    heard.append(await other.welcome())
                    stream = seqs(range(5, 8), [7, 9])
                    await other.stream.send_all(b"".join(encode(stream)))
                    model.feed(other.session, stream)
                    await other.wait_ack(9)
                    got = await rx.settle()
                    await third.aclose()
                    await other.aclose()
                    await wait_metric(feed, "connections_closed{reason=eof}", 3)
                    model.check(feed, got)
                    seen = counters(feed.samples())
                    assert seen["connections_closed{reason=superseded}"] == 1
                    assert seen["connections_accepted"] == 4
                    return EmitResult(per_group(got), tuple(heard), seen)
        finally:
            rx.close()

    result = await on_both_paths(monkeypatch, scenario)
    welcome_error = Error(ErrorCode.TOO_MANY_CONNECTIONS, "superseded by a newer connection")
    assert result.heard == (0, 26, 36, welcome_error, 0)


async def test_destinations_outside_the_allowlist_mixed_with_allowed_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Allowed, refused groups and refused ports interleaved, with more distinct refused
    destinations than the C data path's per-connection table holds (it is cleared then);
    then a reload that allows the refused port."""
    (group, port), (other_group, _) = pick_groups(2)
    allowed = [(group, port), (other_group, port)]
    bad_port = [(group, port + 1)]
    outside = [(IPv4Address(f"239.1.{i // 250}.{1 + i % 250}"), port) for i in range(700)]
    rng = random.Random(12)
    items = []
    for i in range(1400):
        kind = rng.random()
        if kind < 0.4:
            dest = allowed[rng.randrange(2)]
        elif kind < 0.5:
            dest = bad_port[0]
        else:
            dest = outside[i // 2]
        items.append((*dest, i.to_bytes(4, "big") + rng.randbytes(rng.randrange(200))))
    datagrams = numbered(items)
    config = make_config(allowed_ports=(PortRange(port, port),))
    reloaded = attrs.evolve(config, allowed_ports=(PortRange(port, port + 1),))

    async def scenario(path: str) -> EmitResult:
        model = EmitModel.of(config)
        rx = Receivers([*allowed, *bad_port])
        try:
            with trio.fail_after(20):
                async with running(config) as feed:
                    assert feed.listen_port
                    peer = await Peer.start(feed.listen_port)
                    assert await peer.welcome() == 0
                    part = datagrams[:1000]
                    await send_pieces(peer, awkward_pieces(encode(part), seed=13)[:40], 0)
                    await peer.stream.send_all(b"".join(awkward_pieces(encode(part), 13)[40:]))
                    model.feed(peer.session, part)
                    await peer.wait_ack(1000)
                    feed.reconfigure(reloaded)
                    model.reconfigure(reloaded)
                    part = datagrams[1000:]
                    await peer.stream.send_all(b"".join(encode(part)))
                    model.feed(peer.session, part)
                    await peer.wait_ack(len(datagrams))
                    got = await rx.settle()
                    model.check(feed, got)
                    assert model.dropped["group_not_allowed"] > 600
                    assert model.dropped["port_not_allowed"] > 50
                    return EmitResult(per_group(got), (), counters(feed.samples()))
        finally:
            rx.close()

    await on_both_paths(monkeypatch, scenario)


def flagged_data() -> bytes:
    frame = bytearray(encode_datagram(99, int(IPv4Address("239.255.0.1")), 5000, 1, b"x"))
    frame[3] = 0x01
    return bytes(frame)


#: Bytes that end a connection with ERROR PROTOCOL, and the ERROR's message.
MALFORMED = {
    "unknown_type": (b"\x00\x09\x77" + bytes(9), "unknown frame type 0x77"),
    "data_flags": (flagged_data(), "DATA frame with unknown flags 0x01"),
    "data_short": (
        b"\x00\x10\x01" + bytes(16),
        "DATA frame of 16 bytes is shorter than its header",
    ),
    "heartbeat_length": (b"\x00\x05\x02" + bytes(5), "HEARTBEAT frame of 5 bytes outside 9..9"),
    "ack_from_capture": (encode_ack(3), "ACK frame not allowed here"),
    "hello_again": (encode_hello(FEED, bytes(16)), "HELLO frame not allowed here"),
    "error_length": (b"\x00\x02\x04\x00\x01", "ERROR frame of 2 bytes outside 3..1027"),
}


async def bad_input_scenario(
    datagrams: Datagrams,
    tail: Callable[[Peer], Awaitable[None]],
    *,
    ack_first: bool = True,
    in_tail: Sequence[tuple[int, IPv4Address, int, bytes]] = (),
) -> EmitResult:
    """Stream ``datagrams`` (and wait for their ACK when ``ack_first``; otherwise ``tail``
    sends them), then let ``tail`` send what ends the connection (with ``in_tail``, DATA that
    must go out too); returns what went out and how it ended."""
    groups = sorted({(group, port) for _, group, port, _ in [*datagrams, *in_tail]})
    config = make_config()
    model = EmitModel.of(config)
    rx = Receivers(groups)
    try:
        with trio.fail_after(15):
            async with running(config) as feed:
                assert feed.listen_port
                peer = await Peer.start(feed.listen_port)
                assert await peer.welcome() == 0
                if ack_first:
                    await peer.stream.send_all(b"".join(encode(datagrams)))
                    await peer.wait_ack(len(datagrams))
                model.feed(peer.session, [*datagrams, *in_tail])
                await tail(peer)
                heard = await heard_until_closed(peer)
                got = await rx.settle()
                await wait_idle(feed)
                model.check(feed, got)
                return EmitResult(per_group(got), heard, counters(feed.samples()))
    finally:
        rx.close()


@pytest.mark.parametrize("delivery", ["whole", "byte_by_byte"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_malformed_input_after_valid_data(
    monkeypatch: pytest.MonkeyPatch, case: str, delivery: str
) -> None:
    """The datagrams before the bad frame go out; the connection ends with the same ERROR
    PROTOCOL and message, and the same counters, on both paths."""
    bad, message = MALFORMED[case]
    datagrams = numbered(payloads(pick_groups(2), [10, 0, 300, 20], seed=14))

    async def tail(peer: Peer) -> None:
        if delivery == "whole":
            await peer.stream.send_all(bad)
        else:
            await send_pieces(peer, [bytes([b]) for b in bad], 0.005)

    async def scenario(path: str) -> EmitResult:
        result = await bad_input_scenario(datagrams, tail)
        if delivery == "whole":
            return result
        # Byte by byte, how many bytes one read takes depends on the scheduler: under load
        # two pieces arrive together and the bytes read past the decoder's verdict differ.
        counted = {k: v for k, v in result.counters.items() if k != "bytes_in"}
        return attrs.evolve(result, counters=counted)

    result = await on_both_paths(monkeypatch, scenario)
    assert result.heard == (None, Error(ErrorCode.PROTOCOL, message))  # ACKs read before
    assert result.counters["connections_closed{reason=protocol}"] == 1
    assert result.counters["decode_errors"] == 1


@pytest.mark.parametrize("datapath", ["c", "python"], indirect=True)
async def test_malformed_frame_in_the_same_read_as_valid_data(datapath: str) -> None:
    """Valid DATA and an unknown frame type in one write (one read on loopback): the DATA
    before the bad frame still goes out and is counted."""
    datagrams = numbered(payloads(pick_groups(2), [10, 0, 300, 20], seed=15))

    async def tail(peer: Peer) -> None:
        await peer.stream.send_all(b"".join(encode(datagrams)) + MALFORMED["unknown_type"][0])

    result = await bad_input_scenario(datagrams, tail, ack_first=False)
    # what went out is ACKed in front of the ERROR (a final ACK), then the ERROR
    assert result.heard == (len(datagrams), Error(ErrorCode.PROTOCOL, "unknown frame type 0x77"))


PEER_ERROR = encode_error(ErrorCode.SHUTTING_DOWN, "capture side shutting down")


@pytest.mark.parametrize(
    "delivery", ["whole", "byte_by_byte", "header_then_text", "with_data_in_one_write"]
)
async def test_error_from_the_peer(monkeypatch: pytest.MonkeyPatch, delivery: str) -> None:
    """An ERROR from the capture side after valid data ends the connection as peer_shutdown,
    with no ERROR sent back, the same way on both paths: complete, arriving in pieces, or
    in one write with a HEARTBEAT and DATA before it and DATA after it (never emitted)."""
    (group, port), *_ = groups = pick_groups(1)
    datagrams = numbered(payloads(groups, [10, 0, 300, 20], seed=16))
    late = (len(datagrams) + 1, group, port, b"late")
    never = (len(datagrams) + 2, group, port, b"never")

    async def tail(peer: Peer) -> None:
        if delivery == "whole":
            await peer.stream.send_all(PEER_ERROR)
        elif delivery == "byte_by_byte":
            await send_pieces(peer, [bytes([b]) for b in PEER_ERROR], 0.005)
        elif delivery == "header_then_text":
            await send_pieces(peer, [PEER_ERROR[:3], PEER_ERROR[3:10], PEER_ERROR[10:]], 0.05)
        else:
            (late_frame, never_frame) = encode([late, never])
            await peer.stream.send_all(encode_heartbeat(0) + late_frame + PEER_ERROR + never_frame)

    async def scenario(path: str) -> EmitResult:
        in_tail = [late] if delivery == "with_data_in_one_write" else []
        return await bad_input_scenario(datagrams, tail, in_tail=in_tail)

    async def compared(path: str) -> EmitResult:
        # frames_in differs (test_an_error_frame_from_the_peer_counts_in_frames_in)
        result = await scenario(path)
        rest = {k: v for k, v in result.counters.items() if k != "frames_in"}
        return attrs.evolve(result, counters=rest)

    result = await on_both_paths(monkeypatch, compared)
    # the ACK of the datagrams was read before; DATA in the ERROR's write gets the final ACK
    final = len(datagrams) + 1 if delivery == "with_data_in_one_write" else None
    assert result.heard == (final, None)
    # SHUTTING_DOWN is the capture side's clean stop (test_emit.py::
    # test_a_capture_side_that_stops_cleanly_is_not_a_peer_error)
    assert result.counters["connections_closed{reason=peer_shutdown}"] == 1
    assert result.counters["decode_errors"] == 0


@pytest.mark.parametrize("datapath", ["c", "python"], indirect=True)
async def test_an_error_frame_from_the_peer_counts_in_frames_in(datapath: str) -> None:
    datagrams = numbered(payloads(pick_groups(1), [10, 0, 300, 20], seed=16))

    async def tail(peer: Peer) -> None:
        await peer.stream.send_all(PEER_ERROR)

    result = await bad_input_scenario(datagrams, tail)
    assert result.counters["frames_in"] == 1 + len(datagrams) + 1  # HELLO, DATA, ERROR


async def test_heartbeats_when_idle_and_coalesced_acks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The welcome ACK first; HEARTBEATs (current CLOCK_REALTIME) while the stream is idle,
    never more often than heartbeat_interval; ACKs while streaming at most one per
    ACK_INTERVAL, growing, reaching the last sequence soon after the stream stops; then
    HEARTBEATs again, and no ACK repeated."""
    interval = 0.05
    config = make_config(heartbeat_interval=interval, idle_timeout=3.0)
    groups = pick_groups(2)
    datagrams = numbered(payloads(groups, [100] * 2000, seed=17))
    frames = encode(datagrams)

    async def idle_phase(peer: Peer, length: float) -> int:
        beats: list[float] = []
        deadline = trio.current_time() + length
        while trio.current_time() < deadline:
            with trio.move_on_at(deadline):
                event = await peer.next_event()
                assert isinstance(event, Heartbeat), event
                assert abs(event.ts_ns - time.time_ns()) < 5e9
                beats.append(event.ts_ns / 1e9)
        # apart by when they were sent (their own timestamps): two that a loaded machine
        # delivers together did not go out together
        gaps = [b - a for a, b in itertools.pairwise(beats)]
        assert all(gap > interval * 0.8 for gap in gaps), gaps
        return len(beats)

    async def scenario(path: str) -> EmitResult:
        rx = Receivers(groups)
        try:
            with trio.fail_after(20):
                async with running(config) as feed:
                    assert feed.listen_port
                    peer = await Peer.start(feed.listen_port)
                    assert await peer.welcome() == 0
                    assert await idle_phase(peer, 0.5) >= 3
                    start = trio.current_time()
                    for i in range(0, len(frames), 100):  # 20 writes
                        await peer.stream.send_all(b"".join(frames[i : i + 100]))
                        await trio.sleep(0.002)
                    acks: list[int] = []
                    with trio.fail_after(5):
                        while not acks or acks[-1] < len(datagrams):
                            event = await peer.next_event()
                            if isinstance(event, Ack):
                                assert not acks or event.seq > acks[-1], (acks, event)
                                acks.append(event.seq)
                    elapsed = trio.current_time() - start
                    assert acks[-1] == len(datagrams)
                    assert len(acks) <= 2 + elapsed / ACK_INTERVAL, (len(acks), elapsed)
                    assert await idle_phase(peer, 0.3) >= 2  # and no ACK again
                    got = await rx.settle()
                    assert len(got) == len(datagrams)
                    return EmitResult(per_group(got), (), counters(feed.samples()))
        finally:
            rx.close()

    await on_both_paths(monkeypatch, scenario)


def frame_of(datagram: tuple[int, IPv4Address, int, bytes]) -> bytes:
    """``encode``, also for payloads larger than UDP allows (the frame length still fits
    its 16 bits; the wire encoder refuses them)."""
    seq, group, port, payload = datagram
    if len(payload) <= MAX_PAYLOAD:
        return encode([datagram])[0]
    frame = bytearray(DATA_HEADER_SIZE) + payload
    wire.pack_datagram_header(frame, 0, seq, int(group), port, 1, len(payload))
    return bytes(frame)


async def test_send_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A datagram the kernel refuses (EACCES: an allowed broadcast address, no SO_BROADCAST)
    is counted as a send error and acknowledged; the datagrams around it still go out; the
    feed is unhealthy from a failed send until SEND_RECOVERY seconds without one (a
    successful send in between does not make it healthy); the same on both paths."""
    groups = pick_groups(2)
    (_, port), _ = groups
    stream = numbered(payloads(groups, [10, 20, 30, 40, 50, 60], seed=22))
    for seq in (3, 5):
        stream[seq - 1] = (seq, BROADCAST, port, b"refused")

    async def scenario(path: str) -> EmitResult:
        config = make_config(
            allowed_groups=(IPv4Network("239.255.0.0/16"), IPv4Network(f"{BROADCAST}/32"))
        )
        model = EmitModel.of(config)
        health: list[object] = []
        rx = Receivers(groups)
        try:
            with trio.fail_after(15):
                async with running(config) as feed:
                    assert feed.listen_port
                    peer = await Peer.start(feed.listen_port)
                    assert await peer.welcome() == 0
                    for first, last in ((1, 4), (5, 5), (6, 6)):
                        part = stream[first - 1 : last]
                        await peer.stream.send_all(b"".join(map(frame_of, part)))
                        model.feed(peer.session, part)
                        await peer.wait_ack(last)
                        now = feed.health()
                        health.append((now.healthy, now.state, now.detail["last_error"]))
                    await trio.sleep(SEND_RECOVERY)
                    now = feed.health()
                    health.append((now.healthy, now.state, now.detail["last_error"]))
                    got = await rx.settle()
                    model.check(feed, got)
                    seen = counters(feed.samples())
                    return EmitResult(per_group(got), tuple(health), seen)
        finally:
            rx.close()

    result = await on_both_paths(monkeypatch, scenario)
    error = "multicast send: EACCES (Permission denied)"
    assert result.heard == (
        (False, "failing", error),
        (False, "failing", error),
        (False, "failing", error),
        (True, "streaming", error),
    )
    assert result.counters["send_errors{errno=EACCES}"] == 2


@pytest.mark.parametrize("limit", [TGW_MULTICAST_MTU, 200])
async def test_oversize_datagrams_are_dropped_and_counted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, limit: int
) -> None:
    """A payload over ``max_datagram_size`` (by default the Transit Gateway's multicast MTU)
    to an allowed destination is dropped, counted as ``oversize``, logged and acknowledged,
    and the datagrams after it go out; one exactly at the limit goes out; an oversize datagram
    to a refused group counts as refused (the destination is judged first); the same on both
    paths."""
    groups = pick_groups(2)
    (group, port), _ = groups
    sizes = [100, TGW_MULTICAST_MTU, TGW_MULTICAST_MTU + 1, 200, MAX_PAYLOAD, 300, 201]
    items = payloads(groups, sizes, seed=31)
    items.append((IPv4Address("239.1.0.1"), port, bytes(TGW_MULTICAST_MTU + 1)))  # refused
    items.append((group, port, b"next"))
    stream = numbered(items)
    config = make_config(max_datagram_size=limit)
    if limit == TGW_MULTICAST_MTU:
        assert make_config().max_datagram_size == limit  # the default
    dropped = sum(len(payload) > limit for _, _, payload in items[:-2])

    async def scenario(path: str) -> EmitResult:
        caplog.clear()
        model = EmitModel.of(config)
        rx = Receivers(groups)
        try:
            with trio.fail_after(15):
                async with running(config) as feed:
                    assert feed.listen_port
                    peer = await Peer.start(feed.listen_port)
                    assert await peer.welcome() == 0
                    await send_pieces(peer, encode(stream))
                    model.feed(peer.session, stream)
                    await peer.wait_ack(len(stream))
                    got = await rx.settle()
                    model.check(feed, got)
                    seen = counters(feed.samples())
                    assert seen["datagrams_dropped{reason=oversize}"] == dropped
                    assert seen["datagrams_dropped{reason=group_not_allowed}"] == 1
                    assert seen["datagrams_out"] == len(items) - 1 - dropped
                    assert per_group(got)[(group, port)][-1] == b"next"
                    logged = [r.getMessage() for r in caplog.records]
                    want = f"larger than max_datagram_size ({limit} bytes), {dropped} so far"
                    assert any(want in line for line in logged), logged
                    return EmitResult(per_group(got), (), seen)
        finally:
            rx.close()

    await on_both_paths(monkeypatch, scenario)


@pytest.mark.parametrize("datapath", ["c", "python"], indirect=True)
async def test_a_peer_reset_is_counted_as_reset(datapath: str) -> None:
    """Capture sides that reset their connection (close with unread HEARTBEATs, SO_LINGER 0)
    while the emit side is writing HEARTBEATs: every one ends as "reset", none as an
    internal error."""
    config = make_config(heartbeat_interval=0.001, idle_timeout=1.0)
    count = 20
    with trio.fail_after(20):
        async with running(config) as feed:
            assert feed.listen_port
            for _ in range(count):
                peer = await Peer.start(feed.listen_port)
                assert await peer.welcome() == 0
                await trio.sleep(0.02)  # HEARTBEATs arrive and stay unread
                linger = struct.pack("ii", 1, 0)
                peer.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                await peer.aclose()
            await wait_idle(feed)
            seen = counters(feed.samples())
            assert seen["connections_closed{reason=internal_error}"] == 0
            assert seen["connections_closed{reason=reset}"] == count


# -- capture -----------------------------------------------------------------------------------


@attrs.frozen
class CaptureResult:
    """What a capture feed streamed for one input: (group, port, payload) per DATA frame in
    arrival order at the peer, and every counter."""

    frames: tuple[tuple[str, int, bytes], ...]
    counters: dict[str, float]


def blast(sock: socket.socket, sends: Iterable[tuple[str, int, bytes]]) -> None:
    for group, port, payload in sends:
        while True:
            try:
                sock.sendto(payload, (group, port))
                break
            except BlockingIOError:
                time.sleep(0.0005)


async def capture_streaming(
    nursery: trio.Nursery, groups: Sequence[tuple[str, int]], **overrides: object
) -> tuple[Server, CaptureFeedRuntime]:
    """A capture feed joined to ``groups``, connected to an emit stand-in and streaming."""
    server = await serve(nursery, EmitStandIn())
    settings: dict[str, object] = {"heartbeat_interval": 30.0, "idle_timeout": 60.0}
    settings.update(overrides)
    feed = CaptureFeedRuntime(feed_config(groups, [server.port], **settings))
    await nursery.start(feed.run)
    await wait_for(lambda: feed.connected)
    return server, feed


def acked(feed: CaptureFeedRuntime) -> object:
    """The highest sequence the emit side acknowledged, as the health endpoint shows it."""
    return feed.health().detail["acked_seq"]


def check_frames(peer: EmitStandIn, count: int, before_ns: int, after_ns: int) -> None:
    """DATA frames numbered 1..count in arrival order, each byte-identical to its encoding,
    stamped between ``before_ns`` and ``after_ns`` (CLOCK_REALTIME)."""
    got = peer.datagrams
    assert [d.seq for d in got] == list(range(1, count + 1))
    for frame, d in zip(peer.frames, got, strict=True):
        assert frame == encode_datagram(d.seq, d.group, d.port, d.ts_ns, d.payload)
        assert before_ns <= d.ts_ns <= after_ns


@pytest.mark.parametrize("busy_poll", [0.0, 200e-6], ids=["sleeps", "latency-mode"])
async def test_capture_frames_the_same_datagrams_the_same_way(
    monkeypatch: pytest.MonkeyPatch, busy_poll: float
) -> None:
    """25 groups on one port (two sockets) and 3 on another (a third socket); sizes from
    empty to the largest UDP payload. Also in the latency mode (``busy_poll``), where the C
    receive loops poll without sleeping after each batch; it still stops when cancelled."""
    base = 20000 + (os.getpid() * 11 + random.randrange(1000)) % 20000
    groups = groups_for(base, 25, third=31) + groups_for(base + 1, 3, third=32)
    rng = random.Random(18)
    sends = []
    for i in range(900):
        group, port = groups[i % len(groups)]
        size = rng.choice((0, 1, 4, 100, 1400, 9000))
        sends.append((group, port, rng.randbytes(size)))
    sends[450] = (*groups[3], rng.randbytes(MAX_PAYLOAD))
    total = sum(len(payload) for _, _, payload in sends)

    async def scenario(path: str) -> CaptureResult:
        sender = open_multicast_sender(LOOPBACK, 1, True, 4 * 1024 * 1024)
        try:
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    server, feed = await capture_streaming(nursery, groups, busy_poll=busy_poll)
                    assert len(feed.receivers) == 3
                    before = time.time_ns()
                    for i in range(0, len(sends), 100):
                        blast(sender, sends[i : i + 100])
                        await trio.sleep(0.005)
                    await wait_for(lambda: acked(feed) == len(sends))
                    after = time.time_ns()
                    peer = server.peer
                    check_frames(peer, len(sends), before, after)
                    seen = counters(feed.samples())
                    nursery.cancel_scope.cancel()
            got = tuple((str(IPv4Address(d.group)), d.port, d.payload) for d in peer.datagrams)
            # per socket, arrival order is sending order
            assert per_group(got) == per_group(sends)
            assert seen["capture_datagrams_in"] == len(sends)
            assert seen["capture_bytes_in"] == total
            assert seen["capture_frames_sent"] == len(sends)
            assert seen["capture_bytes_sent"] == total + DATA_HEADER_SIZE * len(sends)
            assert seen["capture_kernel_drops"] == 0
            return CaptureResult(tuple(sorted(got)), seen)
        finally:
            sender.close()

    await on_both_paths(monkeypatch, scenario)


async def test_capture_counts_kernel_drops(monkeypatch: pytest.MonkeyPatch) -> None:
    """A receive buffer of a few datagrams and a data-path thread held up (the test holds the
    uplink's lock, which the thread needs to hand back its batch of a first datagram, as it
    would wait for a long batch of another socket): the kernel drops, the feed counts every
    drop, and what it did receive is numbered without a hole."""
    base = 20000 + (os.getpid() * 13 + random.randrange(1000)) % 20000
    groups = groups_for(base, 1, third=33)
    burst = [(*groups[0], i.to_bytes(4, "big") + bytes(996)) for i in range(60)]

    async def scenario(path: str) -> CaptureResult:
        sender = open_multicast_sender(LOOPBACK, 1, True, 4 * 1024 * 1024)
        try:
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    server, feed = await capture_streaming(nursery, groups, receive_buffer=4096)
                    with feed.uplink._lock:  # no await in here: Trio takes it too
                        blast(sender, [(*groups[0], b"first")])
                        deadline = time.monotonic() + 10
                        while feed.datagrams_in < 1:  # the thread waits for the lock now
                            assert time.monotonic() < deadline
                            time.sleep(0.001)
                        blast(sender, burst)
                    await trio.sleep(0.2)
                    queued = feed.datagrams_in - 1  # of the burst
                    assert 0 < queued < len(burst)
                    # the socket reports its drop count with the next datagram it queues
                    blast(sender, [(*groups[0], b"last")])
                    await wait_for(lambda: feed.datagrams_in == queued + 2)
                    await wait_for(lambda: acked(feed) == queued + 2)
                    peer = server.peer
                    assert [d.seq for d in peer.datagrams] == list(range(1, queued + 3))
                    assert peer.datagrams[-1].payload == b"last"
                    seen = counters(feed.samples())
                    nursery.cancel_scope.cancel()
            assert seen["capture_kernel_drops"] == len(burst) - queued
            assert feed.health().detail["kernel_drops"] == len(burst) - queued
            got = tuple((str(IPv4Address(d.group)), d.port, d.payload) for d in peer.datagrams)
            return CaptureResult(got, seen)
        finally:
            sender.close()

    await on_both_paths(monkeypatch, scenario)


@pytest.mark.parametrize("datapath", ["c", "python"], indirect=True)
async def test_metrics_show_the_latest_ack_when_the_stream_stops(datapath: str) -> None:
    """The emit side acknowledged everything: ``capture_acked_seq`` says so (only the ACK
    can move it here: no heartbeat tick within the test, and health() is not called)."""
    base = 20000 + (os.getpid() * 17 + random.randrange(1000)) % 20000
    groups = groups_for(base, 2, third=34)
    sender = open_multicast_sender(LOOPBACK, 1, True, 4 * 1024 * 1024)

    def gauge(feed: CaptureFeedRuntime, name: str) -> float:
        return next(s.value for s in feed.samples() if s.name == name)

    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                server, feed = await capture_streaming(nursery, groups)
                blast(sender, [(*groups[i % 2], bytes(100)) for i in range(10)])
                await wait_for(lambda: server.peer.emitted.get(feed.link.session_id) == 10)
                await wait_for(lambda: gauge(feed, "capture_acked_seq") == 10, timeout=3)
                assert gauge(feed, "capture_unacked_datagrams") == 0
                nursery.cancel_scope.cancel()
    finally:
        sender.close()


@attrs.define
class Misbehaving:
    """An emit side that welcomes the capture side, acknowledges ``after`` datagrams, then
    sends ``tail`` (whole or one byte at a time) on its first connection; later connections
    are welcomed with ACK ``after`` and read."""

    tail: bytes
    byte_by_byte: bool
    after: int
    eof: bool = False  # close after the tail
    connections: int = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        first = self.connections == 1
        conn = wire.EmitConnection(FEED, (), os.urandom(16))
        try:
            await stream.send_all(conn.challenge())
            while conn.state is not wire.State.STREAMING:
                conn.receive(await stream.receive_some(65536))
            await stream.send_all(encode_ack(0 if first else self.after))
            seen = 0
            while first and seen < self.after:
                data = await stream.receive_some(65536)
                if not data:
                    return
                seen += sum(isinstance(e, wire.Datagram) for e in conn.receive(data))
            if first:
                pieces = [bytes([b]) for b in self.tail] if self.byte_by_byte else [self.tail]
                for piece in pieces:
                    await stream.send_all(piece)
                    await trio.sleep(0.002)
                if self.eof:
                    return
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await stream.aclose()


#: What an emit side sends after the ACK, and the reason the capture side ends with.
EMIT_SIDE_TAILS = {
    "error": (
        encode_error(ErrorCode.SHUTTING_DOWN, "emit going away"),
        "ERROR 6 (SHUTTING_DOWN) from the emit side: emit going away",
    ),
    "unknown_type": (
        b"\x00\x09\x77" + bytes(9),
        "protocol error from the emit side: unknown frame type 0x77",
    ),
    "data_from_emit": (
        encode_datagram(1, int(IPv4Address("239.255.0.1")), 5000, 1, b"x"),
        "protocol error from the emit side: DATA frame not allowed here",
    ),
    "challenge_again": (
        wire.encode_challenge(bytes(16), auth_required=False),
        "protocol error from the emit side: CHALLENGE frame not allowed here",
    ),
    "ack_length": (
        b"\x00\x05\x03" + bytes(5),
        "protocol error from the emit side: ACK frame of 5 bytes outside 9..9",
    ),
    "eof": (b"", "closed by the emit side"),
}


@attrs.frozen
class ReaderResult:
    """How the capture side's connections ended (the logged reasons, in order), and every
    counter."""

    reasons: tuple[str, ...]
    counters: dict[str, float]


@pytest.mark.parametrize(
    ("case", "delivery"),
    [
        (case, delivery)
        for case in sorted(EMIT_SIDE_TAILS)
        for delivery in ("whole", "byte_by_byte")
    ],
)
async def test_capture_side_reads_the_emit_side_alike(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, case: str, delivery: str
) -> None:
    """After a HEARTBEAT and an ACK (split like the rest), what the emit side sends ends the
    connection with the same reason on both paths; the ACK before it counts, the capture
    side reconnects."""
    tail, reason = EMIT_SIDE_TAILS[case]
    base = 20000 + (os.getpid() * 19 + random.randrange(1000)) % 20000
    groups = groups_for(base, 1, third=35)
    count = 5

    async def scenario(path: str) -> ReaderResult:
        caplog.clear()
        emit = Misbehaving(
            encode_heartbeat(1) + encode_ack(count) + tail,
            delivery == "byte_by_byte",
            count,
            eof=case == "eof",
        )
        sender = open_multicast_sender(LOOPBACK, 1, True, 4 * 1024 * 1024)
        try:
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    listeners = await nursery.start(
                        functools.partial(trio.serve_tcp, emit.handle, 0, host="127.0.0.1")
                    )
                    port = listeners[0].socket.getsockname()[1]
                    config = feed_config(groups, [port], heartbeat_interval=30.0, idle_timeout=60.0)
                    feed = CaptureFeedRuntime(config)
                    await nursery.start(feed.run)
                    await wait_for(lambda: feed.connected)
                    blast(sender, [(*groups[0], bytes(10))] * count)
                    await wait_for(lambda: emit.connections == 2 and feed.connected)
                    await wait_for(lambda: acked(feed) == count)
                    seen = counters(feed.samples())
                    nursery.cancel_scope.cancel()
        finally:
            sender.close()
        ended = [
            r.getMessage().split(" ended: ", 1)[1]
            for r in caplog.records
            if r.name == "relayd.capture" and " ended: " in r.getMessage()
        ]
        return ReaderResult(tuple(ended), seen)

    result = await on_both_paths(monkeypatch, scenario)
    assert result.reasons[0] == reason
    assert result.counters["capture_connects{result=ok}"] == 2
