"""Differential fuzzing of the C data plane (relayd/_fastpath.c) against the Python decoder.

The C loops parse bytes from the network inside the relay process, so a memory-safety bug there
takes every feed down at once. Each test here calls one C entry point directly through ctypes
(``fastpath.load()`` with ``RELAYD_DATAPATH=c``) on real descriptors (a ``socketpair`` for the
TCP side, a pipe for the stop fd, UDP sockets on loopback for the multicast side) and checks it
against ``relayd.wire.Decoder`` and a plain Python model of the emit feed's rules (``_emit`` in
relayd/emit.py):

- ``rd_emit_pump`` consumes exactly the DATA and HEARTBEAT frames the decoder (with the emit
  side's streaming set: DATA, HEARTBEAT, ERROR) accepts, stops with ``RD_CONTROL`` exactly where
  the decoder raises or yields an ERROR, counts like the model, sends byte-identical payloads
  in order to exactly the allowed destinations (payloads over the size limit dropped and
  counted), and writes only well-formed ACKs/HEARTBEATs back;
- ``rd_capture_read`` consumes ACKs and HEARTBEATs, keeps the highest ACK, and hands anything
  else back where the Python capture connection refuses it or sees an ERROR;
- ``rd_capture_next`` frames received datagrams of every size (0 to 65507) into frames that
  decode to exactly those payloads with consecutive sequence numbers, and never writes past
  ``cap``.

Streams are built from valid frames of every type (the ``relayd.wire`` encoders), garbage,
truncations, wrong lengths, bad flags and huge lengths, written in arbitrary pieces while the
pump runs. ``test_sanitized_fuzz_session`` compiles the library with AddressSanitizer and
UndefinedBehaviorSanitizer and runs the same fuzz tests against it in a child process.

The budget is ``RELAYD_FUZZ_EXAMPLES`` examples per test (default 300; ``make fuzz`` sets more;
the sanitizer child runs a quarter of it, the table test a twentieth).
The tests at the end pin values at the edges of u64 (stamps, sequences and ACKs above
2**63) and the library's refusal of buffers too small for its frames and of a size limit
outside 1..65507.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import itertools
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import relayd
from relayd import fastpath, session
from relayd.datapath import CLAIM_CLOSED, CLAIM_HELD, Why
from relayd.netif import IP_PKTINFO, SO_RXQ_OVFL
from relayd.session import Destination
from relayd.wire import (
    FROM_EMIT,
    MAX_PAYLOAD,
    Ack,
    CaptureConnection,
    Challenge,
    Datagram,
    Decoder,
    Error,
    Event,
    FrameType,
    Heartbeat,
    Hello,
    ProtocolError,
    State,
    encode_ack,
    encode_datagram,
    encode_error,
    encode_event,
    encode_heartbeat,
)

SO_RCVBUFFORCE = 33  # Linux; the socket module does not export it (relayd/netif.py)

#: examples per test; ``make fuzz`` raises it, the sanitizer child gets its own share
FUZZ_EXAMPLES = int(os.environ.get("RELAYD_FUZZ_EXAMPLES", "300"))
SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: set in the sanitizer child (which runs from a scratch directory): no example database
IN_CHILD = bool(os.environ.get("RELAYD_FUZZ_CHILD"))
if IN_CHILD:
    SETTINGS = settings(SETTINGS, database=None)
#: the emit side's decoder while streaming (relayd/wire.py EmitConnection._accept)
STREAMING = frozenset({FrameType.DATA, FrameType.HEARTBEAT, FrameType.ERROR})
EMIT_CAP = 256 * 1024  # relayd/emit.py RECEIVE_SIZE
READER_CAP = 64 * 1024  # relayd/capture.py _RECV_SIZE
MAX_FRAME = 2 + 65535
SAFETY_NS = 10_000_000_000  # idle_ns: a pump that waits this long has lost its way
U64 = 2**64 - 1
I64 = 2**63 - 1
GUARD = 4096  # bytes after cap that rd_capture_next must never touch
LOOPBACK = IPv4Address("127.0.0.1")


def _check(condition: bool, message: str) -> None:
    """An assertion that also holds under ``python -O`` (the sanitizer child)."""
    if not condition:
        raise AssertionError(message)


@functools.cache
def _load() -> fastpath.CPlane | str:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RELAYD_DATAPATH", "c")
        try:
            plane = fastpath.load()
        except fastpath.DataPathError as exc:
            return f"{exc} (build it: make relayd/_fastpath.so)"
    return plane if plane is not None else "fastpath.load() returned None"


def plane() -> fastpath.CPlane:
    """The C data plane; skips the test when it cannot be loaded."""
    loaded = _load()
    if isinstance(loaded, str):
        pytest.skip(f"C data plane not loadable: {loaded}")
    return loaded


def key_of(group: IPv4Address | int, port: int) -> int:
    return int(group) << 16 | port


def at(buffer: ctypes.Array[ctypes.c_uint8], start: int, end: int) -> bytes:
    return ctypes.string_at(ctypes.addressof(buffer) + start, max(0, end - start))


# -- loopback destinations ---------------------------------------------------------------------


@attrs.define
class Loopback:
    """UDP receivers on 127.0.0.1 and 127.0.0.2, two ports each: the emit pump's allowed
    destinations. ``set_dest`` builds the sendto address from ``group << 16 | port``, so a
    payload arriving at the receiver bound to that address proves the key was mapped right."""

    receivers: dict[int, socket.socket]  # key -> socket bound to exactly that address
    denied: dict[int, Destination]  # key -> a refusal
    #: a socket connected to each receiver, for rd_emit_set_dest's fd (else sendto)
    connected: dict[int, socket.socket] = attrs.Factory(dict)
    #: allowed keys whose sends fail: the limited broadcast address without SO_BROADCAST
    failing: dict[int, int] = attrs.Factory(
        lambda: {key_of(IPv4Address("255.255.255.255"), 30001): errno.EACCES}
    )

    @property
    def allowed(self) -> list[int]:
        return sorted(self.receivers)

    def verdict(self, key: int) -> int:
        if key in self.receivers or key in self.failing:
            return Destination.ALLOWED
        if key in self.denied:
            return self.denied[key]
        # anything else (random keys from mutated headers) is refused; never sent anywhere
        return Destination.PORT_NOT_ALLOWED if key >> 40 == 127 else Destination.GROUP_NOT_ALLOWED

    def drain(self, want: int, timeout: float = 2.0) -> dict[int, list[bytes]]:
        """Everything received, per key: waits until ``want`` datagrams arrived, then takes
        whatever else is queued (extra datagrams are a failure the caller sees)."""
        got: dict[int, list[bytes]] = {key: [] for key in self.receivers}
        deadline = time.monotonic() + timeout
        count = 0
        while True:
            for key, sock in self.receivers.items():
                while True:
                    try:
                        got[key].append(sock.recv(70000))
                        count += 1
                    except BlockingIOError:
                        break
            left = deadline - time.monotonic()
            if count >= want or left <= 0:
                return got
            select.select(list(self.receivers.values()), [], [], min(left, 0.05))

    @classmethod
    @contextlib.contextmanager
    def open(cls) -> Iterator[Loopback]:
        socks: list[socket.socket] = []
        try:
            receivers: dict[int, socket.socket] = {}
            for _ in range(2):
                ports = cls._port_pair(socks)
                for host in ("127.0.0.1", "127.0.0.2"):
                    for port, sock in ports.get(host, []):
                        receivers[key_of(IPv4Address(host), port)] = sock
            denied = {
                key_of(IPv4Address("239.255.77.1"), 30001): Destination.GROUP_NOT_ALLOWED,
                key_of(IPv4Address("10.1.2.3"), 30001): Destination.GROUP_NOT_ALLOWED,
                key_of(LOOPBACK, 9): Destination.PORT_NOT_ALLOWED,
            }
            connected = {}
            for key in receivers:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(sock)
                sock.setblocking(False)
                sock.connect((str(IPv4Address(key >> 16)), key & 0xFFFF))
                connected[key] = sock
            yield cls(receivers, denied, connected)
        finally:
            for sock in socks:
                sock.close()

    @staticmethod
    def _port_pair(socks: list[socket.socket]) -> dict[str, list[tuple[int, socket.socket]]]:
        """One port bound on both 127.0.0.1 and 127.0.0.2 (retried while taken)."""
        for _ in range(50):
            first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(first)
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            second = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(second)
            try:
                second.bind(("127.0.0.2", port))
            except OSError:
                continue
            for sock in (first, second):
                sock.setblocking(False)
                _big_receive_buffer(sock)
            return {"127.0.0.1": [(port, first)], "127.0.0.2": [(port, second)]}
        raise RuntimeError("no port free on both 127.0.0.1 and 127.0.0.2")


def _big_receive_buffer(sock: socket.socket, size: int = 32 * 1024 * 1024) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:  # not root: net.core.rmem_max caps it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


@functools.cache
def max_big_payloads() -> int:
    """Payloads over 40 bytes per emit example: as many as the receivers surely hold (a
    datagram of 64 KiB takes about 128 KiB of receive buffer; they are read after the run)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _big_receive_buffer(sock)
        room = int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    return 3 if room >= 4 * 1024 * 1024 else 1


# -- the Python verdict ------------------------------------------------------------------------


def python_frames(
    stream: bytes, allowed: frozenset[int], consumed: tuple[type, ...]
) -> tuple[list[Event], int, bool]:
    """Walk ``stream`` frame by frame with fresh Python decoders: the events of the frames C
    should consume (types in ``consumed``), the offset where it should stop, and whether it
    stops at a frame for Python (True: a frame the decoder refuses or one of another type)
    or at the end of the complete frames (False: nothing more, or an incomplete frame)."""
    events: list[Event] = []
    off = 0
    while len(stream) - off >= 3:
        length = stream[off] << 8 | stream[off + 1]
        end = off + 2 + length
        try:
            got = Decoder(allowed).feed(stream[off : max(end, off + 3)])
        except ProtocolError:
            return events, off, True
        if not got:
            return events, off, False  # incomplete: the decoder waits for more
        (event,) = got
        if not isinstance(event, consumed):
            return events, off, True
        events.append(event)
        off = end
    return events, off, False


def refused_by_python(frames: bytes, *, capture_side: bool) -> bool:
    """What relayd's Python code makes of the bytes C handed back: True when a fresh
    connection decoder in the streaming state raises ProtocolError or yields an ERROR first."""
    try:
        if capture_side:
            conn = CaptureConnection("fuzz", bytes(16))
            conn.state = State.STREAMING
            events = conn.receive(frames)
        else:
            events = Decoder(STREAMING).feed(frames)
    except ProtocolError:
        return True
    return bool(events) and isinstance(events[0], Error)


# -- stream generation -------------------------------------------------------------------------

_TYPES = [int(t) for t in FrameType] + [0, 5, 0x0F, 0x12, 0x7F, 0xFF]
_LENGTHS = [0, 1, 2, 3, 8, 9, 10, 23, 24, 25, 1027, 1028, 65531, 65532, 65535]
_BIG_SIZES = [512, 1472, 8972, 65507, 65508, 65511]
#: max_datagram_size: no limit (twice as likely), the default, either side of a big size, tiny
_LIMITS = [MAX_PAYLOAD, MAX_PAYLOAD, session.TGW_MULTICAST_MTU, 8971, 8972, 20, 1]
u64 = st.integers(0, U64)


def payload_of(index: int, size: int) -> bytes:
    tag = index.to_bytes(4, "big")
    return (tag * (size // 4 + 1))[:size]


@st.composite
def timestamps(draw: st.DrawFn) -> int:
    """0 (no stamp), now-ish, limits, and the whole u64 range."""
    kind = draw(st.sampled_from(["zero", "now", "edge", "any"]))
    if kind == "zero":
        stamp = 0
    elif kind == "now":
        stamp = time.time_ns() - draw(st.integers(-(10**9), 10**10))
    elif kind == "edge":
        stamp = draw(st.sampled_from([1, I64, 2**63, 2**63 + 1, 2**63 + 2**62, U64]))
    else:
        stamp = draw(u64)
    return stamp


def other_frame(draw: st.DrawFn) -> bytes:
    """A frame of any type, valid or not: what a broken or hostile peer sends."""
    kind = draw(
        st.sampled_from(
            ["error", "ack", "challenge", "hello", "garbage", "header", "short", "error_cut"]
        )
    )
    if kind == "error":
        return encode_error(draw(st.integers(0, 65535)), draw(st.text(max_size=40)))
    if kind == "ack":
        return encode_ack(draw(u64))
    if kind == "challenge":
        return encode_event(Challenge(1, draw(st.booleans()), bytes(16)))
    if kind == "hello":
        return encode_event(Hello(1, "fuzz", bytes(16), b""))
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=64))
    if kind == "header":  # any type and length, then some body (maybe shorter than declared)
        length = draw(st.sampled_from(_LENGTHS) | st.integers(0, 65535))
        body = draw(st.binary(max_size=40))
        return struct.pack("!HB", length, draw(st.sampled_from(_TYPES))) + body
    if kind == "short":  # a frame cut to fewer than 3 bytes
        return draw(st.binary(min_size=1, max_size=2))
    # an ERROR with a declared text longer than the stream holds
    return struct.pack("!HBH", draw(st.integers(3, 1027)), FrameType.ERROR, 1) + b"x"


@attrs.frozen
class EmitCase:
    stream: bytes
    pieces: tuple[bytes, ...]
    pauses: tuple[bool, ...]
    highest: int
    acked: int
    cap: int
    ack_interval_ns: int
    heartbeat_ns: int
    clear_on_need: bool
    connected: bool = False  # allowed destinations get a connected socket (else sendto)
    max_payload: int = MAX_PAYLOAD  # max_datagram_size: larger payloads are dropped
    stop_after: int | None = None  # write to the stop pipe after this many pieces
    resuming: bool = False  # a new connection: its first DATA past highest is no gap

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(show_case(self))


def show_case(case: EmitCase | ReaderCase) -> str:
    """A failing case, short enough to read (hypothesis prints it; 64 KiB payloads would
    make a repr of megabytes): the stream in hex up to 4 KiB, the piece sizes, the rest."""
    fields = attrs.asdict(case, recurse=False)
    stream = fields.pop("stream")
    fields["pieces"] = [len(piece) for piece in fields["pieces"]]
    shown = stream.hex() if len(stream) <= 4096 else f"{stream[:4096].hex()}..."
    rest = ", ".join(f"{name}={value!r}" for name, value in fields.items())
    return f"{type(case).__name__}(stream=bytes.fromhex({shown!r}) ({len(stream)} bytes), {rest})"


def split(draw: st.DrawFn, stream: bytes) -> tuple[tuple[bytes, ...], tuple[bool, ...]]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(stream)), max_size=8))))
    bounds = [0, *cuts, len(stream)]
    pieces = tuple(stream[a:b] for a, b in itertools.pairwise(bounds) if b > a)
    pauses = tuple(draw(st.lists(st.booleans(), min_size=len(pieces), max_size=len(pieces))))
    return pieces, pauses


def emit_streams(keys: Sequence[int]) -> st.SearchStrategy[EmitCase]:
    @st.composite
    def build(draw: st.DrawFn) -> EmitCase:
        highest = draw(st.sampled_from([0, 0, 1, 1000, I64 - 3, U64 - 2]) | u64)
        seq = highest
        parts: list[bytes] = []
        big = 0
        for index in range(draw(st.integers(0, 40))):
            kind = draw(st.sampled_from(["data"] * 6 + ["heartbeat", "other"]))
            if kind == "heartbeat":
                parts.append(encode_heartbeat(draw(u64)))
                continue
            if kind == "other":
                parts.append(other_frame(draw))
                continue
            step = draw(st.sampled_from(["next"] * 4 + ["dup", "jump", "abs"]))
            if step == "next":
                seq = (seq + 1) & U64
            elif step == "dup":
                seq = max(0, seq - draw(st.integers(0, 3)))
            elif step == "jump":
                seq = min(U64, seq + draw(st.integers(2, 1000)))
            else:
                seq = draw(u64)
            size = draw(st.integers(0, 40) | st.sampled_from(_BIG_SIZES))
            if size > 40:
                big += 1
                if big > max_big_payloads():
                    size = 0
            if draw(st.integers(0, 9)) == 0:
                key = draw(st.integers(0, 2**48 - 1))  # random group and port
            else:
                key = draw(st.sampled_from(keys))
            frame = bytearray(
                encode_datagram(0, 0, 0, draw(timestamps()), b"")[:26] + payload_of(index, size)
            )
            struct.pack_into("!HBBHIQ", frame, 0, 24 + size, 1, 0, key & 0xFFFF, key >> 16, seq)
            if draw(st.integers(0, 19)) == 0:
                frame[3] = draw(st.integers(1, 255))  # unknown flags
            parts.append(bytes(frame))
        stream = bytearray(b"".join(parts))
        for _ in range(draw(st.integers(0, 2))):  # mutations anywhere
            if not stream:
                break
            pos = draw(st.integers(0, len(stream) - 1))
            mutation = draw(st.sampled_from(["bit", "cut", "insert"]))
            if mutation == "bit":
                stream[pos] ^= 1 << draw(st.integers(0, 7))
            elif mutation == "cut":
                del stream[pos:]
            else:
                stream[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        pieces, pauses = split(draw, bytes(stream))
        return EmitCase(
            stream=bytes(stream),
            pieces=pieces,
            pauses=pauses,
            highest=highest,
            acked=draw(st.sampled_from([-1, -1, 0])),
            cap=draw(st.sampled_from([EMIT_CAP, 2 * MAX_FRAME, 2 * MAX_FRAME + 100])),
            ack_interval_ns=draw(st.sampled_from([0, 1_000_000])),
            heartbeat_ns=draw(st.sampled_from([1_000_000, 10**12])),
            clear_on_need=draw(st.integers(0, 9)) == 0,
            connected=draw(st.booleans()),
            max_payload=draw(st.sampled_from(_LIMITS)),
            resuming=draw(st.booleans()),
        )

    return build()


# -- the emit pump -----------------------------------------------------------------------------


@attrs.define
class EmitModel:
    """The rules of relayd/session.py applied to decoded events."""

    highest: int
    max_payload: int = MAX_PAYLOAD
    resuming: bool = False
    frames_in: int = 0
    datagrams_in: int = 0
    datagrams_out: int = 0
    bytes_out: int = 0
    duplicates: int = 0
    gaps: int = 0
    gap_sequences: int = 0
    denied_group: int = 0
    denied_port: int = 0
    oversize: int = 0
    send_errors: list[int] = attrs.Factory(list)
    sent: dict[int, list[bytes]] = attrs.Factory(dict)
    last_ts: int = 0  # capture stamp of the latest datagram sent (or refused by the kernel)
    ack_values: set[int] = attrs.Factory(set)

    def run(self, events: Sequence[Event], net: Loopback) -> None:
        self.sent = {key: [] for key in net.receivers}
        self.ack_values.add(self.highest)
        for event in events:
            self.frames_in += 1
            if isinstance(event, Heartbeat):
                continue
            assert isinstance(event, Datagram)
            self.datagrams_in += 1
            skipped = session.accept(self.highest, event.seq, self.resuming)
            self.resuming = False
            if skipped == session.DUPLICATE:
                self.duplicates += 1
                continue
            if skipped:
                self.gaps += 1
                self.gap_sequences += skipped
            key = key_of(event.group, event.port)
            verdict = net.verdict(key)
            if verdict == Destination.ALLOWED and session.oversize(
                len(event.payload), self.max_payload
            ):
                self.oversize += 1  # never sent: neither a send error nor a stamp
            elif verdict == Destination.ALLOWED:
                if key in net.failing:
                    self.send_errors.append(net.failing[key])
                else:
                    self.sent[key].append(event.payload)
                    self.datagrams_out += 1
                    self.bytes_out += len(event.payload)
                self.last_ts = event.ts_ns
            elif verdict == Destination.GROUP_NOT_ALLOWED:
                self.denied_group += 1
            else:
                self.denied_port += 1
            self.highest = event.seq
            self.ack_values.add(event.seq)


@attrs.define
class EmitRun:
    why: int
    state: fastpath.EmitState
    undecoded: bytes
    replies: bytes
    send_errors: list[int]


def _writer(
    sock: socket.socket,
    pieces: Sequence[bytes],
    pauses: Sequence[bool],
    stop: tuple[int, int] | None = None,
) -> None:
    """Write the pieces, then shut down; ``stop`` (after, fd): write to the stop pipe after
    that many pieces."""
    with contextlib.suppress(OSError):  # the pump may stop reading (RD_CONTROL) and close
        for index, (piece, pause) in enumerate(zip(pieces, pauses, strict=True)):
            if stop is not None and index == stop[0]:
                os.write(stop[1], b"x")
            sock.sendall(piece)
            if pause:
                time.sleep(0.0002)
        if stop is not None and stop[0] >= len(pieces):
            os.write(stop[1], b"x")
        sock.shutdown(socket.SHUT_WR)


def run_emit(lib: fastpath.CPlane, net: Loopback, case: EmitCase) -> EmitRun:
    """Write ``case``'s pieces from a thread while ``rd_emit_pump`` runs; answer RD_NEED_DEST
    with the loopback verdicts as the feed does, go on after RD_SEND_ERROR, stop at anything
    else."""
    pump_side, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stop_r, stop_w = os.pipe()
    mcast = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    mcast.setblocking(False)
    buffer = (ctypes.c_uint8 * case.cap)()
    state = fastpath.EmitState(
        tcp_fd=pump_side.fileno(),
        stop_fd=stop_r,
        mcast_fd=mcast.fileno(),
        buf=ctypes.addressof(buffer),
        cap=case.cap,
        idle_ns=SAFETY_NS,
        ack_interval_ns=case.ack_interval_ns,
        heartbeat_ns=case.heartbeat_ns,
        max_payload=case.max_payload,
        highest=case.highest,
        acked=max(case.acked, 0),
        acked_any=case.acked >= 0,
        resuming=case.resuming,
    )
    ref = ctypes.byref(state)
    stop = None if case.stop_after is None else (case.stop_after, stop_w)
    writer = threading.Thread(target=_writer, args=(peer, case.pieces, case.pauses, stop))
    send_errors: list[int] = []
    try:
        writer.start()
        needs = 0
        while True:
            why = lib.rd_emit_pump(ref)
            if why == Why.NEED_DEST:
                needs += 1
                _check(needs < 100_000, "RD_NEED_DEST without end")
                key = state.need_key
                connected = net.connected.get(key) if case.connected else None
                fd = connected.fileno() if connected is not None else -1
                lib.rd_emit_set_dest(ref, key, net.verdict(key), fd)
                if case.clear_on_need and needs % 7 == 0:
                    state.clear_dests = 1  # a reload: the table is rebuilt from scratch
                continue
            if why == Why.SEND_ERROR:
                send_errors.append(int(state.err))
                continue
            break
        undecoded = at(buffer, state.start, state.end)
        pump_side.shutdown(socket.SHUT_RDWR)
        writer.join(10)
        _check(not writer.is_alive(), "writer thread stuck")
        replies = b""
        peer.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while chunk := peer.recv(65536):
                replies += chunk
    finally:
        pump_side.close()
        writer.join(10)
        peer.close()
        os.close(stop_r)
        os.close(stop_w)
        mcast.close()
    return EmitRun(why, state, undecoded, replies, send_errors)


def check_emit(lib: fastpath.CPlane, net: Loopback, case: EmitCase) -> None:
    net.drain(0, timeout=0)  # leftovers of a failed example
    events, stop, control = python_frames(case.stream, STREAMING, (Datagram, Heartbeat))
    run = run_emit(lib, net, case)
    s = run.state
    consumed = s.bytes_in - len(run.undecoded)
    where = f"(stream {case.stream[:64].hex()}..., {len(case.stream)} bytes)"
    if run.why == Why.STOPPED and case.stop_after is not None:
        # stopped anywhere: after a whole frame of the Python walk, no further than it goes
        ends = list(itertools.accumulate(frame_size(e) for e in events))
        _check(consumed in (0, *ends), f"stopped at {consumed}, inside a frame {where}")
        events = events[: ends.index(consumed) + 1 if consumed else 0]
    elif control:
        _check(run.why == Why.CONTROL, f"pump returned {run.why}, want RD_CONTROL {where}")
        _check(
            refused_by_python(run.undecoded, capture_side=False),
            f"RD_CONTROL on bytes Python accepts: {run.undecoded[:32].hex()} {where}",
        )
        _check(consumed == stop, f"C consumed {consumed} bytes, Python {stop} {where}")
    else:
        _check(run.why == Why.EOF, f"pump returned {run.why}, want RD_EOF {where}")
        _check(s.bytes_in == len(case.stream), f"bytes_in {s.bytes_in} {where}")
        _check(consumed == stop, f"C consumed {consumed} bytes, Python {stop} {where}")
    _check(
        run.undecoded == case.stream[consumed : s.bytes_in],
        f"buf[start:end] is not the stream's undecoded bytes {where}",
    )
    model = EmitModel(case.highest, case.max_payload, case.resuming)
    model.run(events, net)
    got = {
        "highest": s.highest,
        "frames_in": s.frames_in,
        "datagrams_in": s.datagrams_in,
        "datagrams_out": s.datagrams_out,
        "bytes_out": s.bytes_out,
        "duplicates": s.duplicates,
        "gaps": s.gaps,
        "gap_sequences": s.gap_sequences,
        "denied_group": s.denied_group,
        "denied_port": s.denied_port,
        "oversize": s.oversize,
        "send_errors": s.send_errors,
    }
    want = {name: getattr(model, name) for name in got if name != "send_errors"}
    want["send_errors"] = len(model.send_errors)
    _check(got == want, f"counters {got} != model {want} {where}")
    _check(run.send_errors == model.send_errors, f"send errors {run.send_errors} {where}")
    _check(s.dest_count <= fastpath.DEST_SLOTS // 2, f"dest_count {s.dest_count}")
    _check(sum(s.latency) == s.latency_count, "latency buckets do not add up")
    if model.last_ts:
        _check(s.last_ts_ns == model.last_ts, "last_ts")
    sent = net.drain(model.datagrams_out)
    _check(sent == model.sent, f"sent payloads differ from the model's {where}")
    check_replies(run, case, model)


def frame_size(event: Event) -> int:
    return 26 + len(event.payload) if isinstance(event, Datagram) else 11


def check_replies(run: EmitRun, case: EmitCase, model: EmitModel) -> None:
    """What the pump wrote back: only ACKs and HEARTBEATs, each ACK a sequence it emitted
    (or the session's start), increasing, as many as it counted."""
    events = Decoder(FROM_EMIT).feed(run.replies)
    _check(len(events) * 11 == len(run.replies), "replies are not whole ACK/HEARTBEAT frames")
    acks = [e.seq for e in events if isinstance(e, Ack)]
    beats = [e for e in events if isinstance(e, Heartbeat)]
    _check(len(acks) + len(beats) == len(events), f"unexpected reply {events}")
    s = run.state
    _check((len(acks), len(beats)) == (s.acks_sent, s.heartbeats_sent), "reply counts")
    _check(all(a < b for a, b in itertools.pairwise(acks)), f"ACKs {acks}")
    _check(set(acks) <= model.ack_values, f"ACK of a sequence never emitted: {acks}")
    if acks:
        _check(s.acked == acks[-1], "acked")
    if case.ack_interval_ns == 0 and run.why == Why.EOF:
        # everything received was processed before the EOF: its ACK went out first
        _check(s.acked == s.highest, f"acked {s.acked} != highest {s.highest}")


def test_emit_pump_matches_the_python_decoder() -> None:
    lib = plane()
    with Loopback.open() as net:
        keys = [*net.allowed, *net.denied, *net.failing]

        @SETTINGS
        @given(case=emit_streams(keys))
        def fuzz(case: EmitCase) -> None:
            check_emit(lib, net, case)

        fuzz()


def test_emit_pump_stopped_anywhere() -> None:
    """The stop pipe becomes readable at any point of the stream: the pump returns
    RD_STOPPED (or RD_CONTROL, if it reached a frame for Python first) after a whole frame,
    having counted and sent exactly the frames before it."""
    lib = plane()
    with Loopback.open() as net:
        keys = [*net.allowed, *net.denied, *net.failing]

        @SETTINGS
        @given(case=emit_streams(keys), stop_after=st.integers(0, 10))
        def fuzz(case: EmitCase, stop_after: int) -> None:
            check_emit(lib, net, attrs.evolve(case, stop_after=stop_after))

        fuzz()


def test_emit_pump_with_more_destinations_than_its_table_holds() -> None:
    """Hundreds of distinct keys: the table is cleared when half full, so verdicts are asked
    again; every datagram for an allowed key still goes out, and nothing else does."""
    lib = plane()
    with Loopback.open() as net:

        @settings(SETTINGS, max_examples=max(5, FUZZ_EXAMPLES // 20))
        @given(
            keys=st.lists(st.integers(0, 2**48 - 1), min_size=600, max_size=1500, unique=True),
            every=st.integers(2, 50),
        )
        def fuzz(keys: list[int], every: int) -> None:
            frames = []
            for index, drawn in enumerate(keys, start=1):
                key = net.allowed[index % len(net.allowed)] if index % every == 0 else drawn
                payload = payload_of(index, index % 30)
                frames.append(encode_datagram(index, key >> 16, key & 0xFFFF, 1, payload))
            stream = b"".join(frames)
            case = EmitCase(stream, (stream,), (False,), 0, -1, EMIT_CAP, 0, 10**12, False)
            check_emit(lib, net, attrs.evolve(case, connected=every % 2 == 0))

        fuzz()


# -- the capture side's reader -----------------------------------------------------------------


@attrs.frozen
class ReaderCase:
    stream: bytes
    pieces: tuple[bytes, ...]
    pauses: tuple[bool, ...]
    cap: int

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(show_case(self))


def reader_streams(ack_values: st.SearchStrategy[int]) -> st.SearchStrategy[ReaderCase]:
    @st.composite
    def build(draw: st.DrawFn) -> ReaderCase:
        parts: list[bytes] = []
        for _ in range(draw(st.integers(0, 40))):
            kind = draw(st.sampled_from(["ack"] * 4 + ["heartbeat"] * 2 + ["data", "other"]))
            if kind == "ack":
                parts.append(encode_ack(draw(ack_values)))
            elif kind == "heartbeat":
                parts.append(encode_heartbeat(draw(u64)))
            elif kind == "data":
                parts.append(encode_datagram(1, 0, 0, 0, draw(st.binary(max_size=30))))
            else:
                parts.append(other_frame(draw))
        stream = bytearray(b"".join(parts))
        if stream and draw(st.booleans()):
            pos = draw(st.integers(0, len(stream) - 1))
            stream[pos] ^= 1 << draw(st.integers(0, 7))
        if stream and draw(st.integers(0, 3)) == 0:
            del stream[draw(st.integers(0, len(stream) - 1)) :]
        pieces, pauses = split(draw, bytes(stream))
        cap = draw(st.sampled_from([READER_CAP, 4096, 4097, 8192]))
        return ReaderCase(bytes(stream), pieces, pauses, cap)

    return build()


def run_reader(
    lib: fastpath.CPlane, case: ReaderCase
) -> tuple[int, fastpath.CaptureReaderState, bytes]:
    reader_side, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stop_r, stop_w = os.pipe()
    buffer = (ctypes.c_uint8 * case.cap)()
    state = fastpath.CaptureReaderState(
        tcp_fd=reader_side.fileno(),
        stop_fd=stop_r,
        idle_ns=SAFETY_NS,
        buf=ctypes.addressof(buffer),
        cap=case.cap,
    )
    writer = threading.Thread(target=_writer, args=(peer, case.pieces, case.pauses))
    try:
        writer.start()
        why = lib.rd_capture_read(ctypes.byref(state))
        undecoded = at(buffer, state.start, state.end)
        reader_side.shutdown(socket.SHUT_RDWR)
        writer.join(10)
        _check(not writer.is_alive(), "writer thread stuck")
    finally:
        reader_side.close()
        writer.join(10)
        peer.close()
        os.close(stop_r)
        os.close(stop_w)
    return why, state, undecoded


def check_reader(lib: fastpath.CPlane, case: ReaderCase) -> None:
    events, stop, control = python_frames(case.stream, FROM_EMIT, (Ack, Heartbeat))
    why, s, undecoded = run_reader(lib, case)
    where = f"(stream {case.stream[:64].hex()}..., {len(case.stream)} bytes, cap {case.cap})"
    consumed = s.bytes_in - len(undecoded)
    if control:
        _check(why == Why.CONTROL, f"reader returned {why}, want RD_CONTROL {where}")
        _check(
            refused_by_python(undecoded, capture_side=True),
            f"RD_CONTROL on bytes Python accepts: {undecoded[:32].hex()} {where}",
        )
    else:
        _check(why == Why.EOF, f"reader returned {why}, want RD_EOF {where}")
        _check(s.bytes_in == len(case.stream), f"bytes_in {s.bytes_in} {where}")
    _check(consumed == stop, f"C consumed {consumed} bytes, Python {stop} {where}")
    _check(undecoded == case.stream[consumed : s.bytes_in], f"undecoded bytes differ {where}")
    acks = [e.seq for e in events if isinstance(e, Ack)]
    beats = sum(isinstance(e, Heartbeat) for e in events)
    want = (max(acks, default=0), len(acks), beats)
    got = (s.acked, s.acks, s.heartbeats)
    _check(got == want, f"(acked, acks, heartbeats) {got} != {want} {where}")


def test_capture_reader_matches_the_python_decoder() -> None:
    lib = plane()

    # ACK sequences up to 2**63 - 1; above, see test_capture_reader_keeps_an_ack_above_2_63
    @SETTINGS
    @given(case=reader_streams(u64 | st.sampled_from([0, 1, I64, 2**63, U64])))
    def fuzz(case: ReaderCase) -> None:
        check_reader(lib, case)

    fuzz()


# -- the capture batch -------------------------------------------------------------------------


@contextlib.contextmanager
def capture_socket() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A UDP receiver on loopback set up like relayd/netif.py's (IP_PKTINFO, SO_RXQ_OVFL, a
    big buffer), and a sender connected to it."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        receiver.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        receiver.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        _big_receive_buffer(receiver)
        receiver.bind(("127.0.0.1", 0))
        receiver.setblocking(False)
        sender.connect(receiver.getsockname())
        yield receiver, sender
    finally:
        receiver.close()
        sender.close()


@attrs.frozen
class BatchCase:
    sizes: tuple[int, ...]
    cap: int
    first_seq: int
    port: int
    direct: bool  # the claim word open: the batch is sent to a socketpair at once


ROOM = 26 + MAX_PAYLOAD  # relayd/capture.py _FRAME_ROOM

batch_cases = st.builds(
    BatchCase,
    sizes=st.lists(
        st.integers(0, 64)
        | st.sampled_from([0, 1, 1472, 8972, 65506, 65507])
        | st.integers(0, 65507),
        max_size=30,
    ).map(tuple),
    cap=st.sampled_from([ROOM, ROOM + 1, ROOM + 200, 2 * ROOM - 1, 512 * 1024]),
    first_seq=st.sampled_from([1, 2**32, U64 - 40]) | st.integers(1, 2**40),
    port=st.integers(0, 65535),
    direct=st.booleans(),
)


def check_batch(lib: fastpath.CPlane, case: BatchCase) -> None:
    payloads = [payload_of(i, size) for i, size in enumerate(case.sizes)]
    buffer = (ctypes.c_uint8 * (case.cap + GUARD))()
    ctypes.memset(buffer, 0xA5, case.cap + GUARD)
    stop_r, stop_w = os.pipe()
    tcp, tcp_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    tcp_peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    try:
        with capture_socket() as (receiver, sender):
            # what the receive buffer surely holds (about twice a datagram's size each)
            room = int(receiver.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)) // 2
            while sum(2 * len(p) + 1024 for p in payloads) > room:
                payloads.pop()
            before = time.time_ns()
            for payload in payloads:
                sender.send(payload)
            if not payloads:  # nothing to receive: the call returns when asked to stop
                os.write(stop_w, b"x")
            open_word = tcp.fileno() if case.direct else CLAIM_CLOSED
            word = ctypes.c_int64(open_word)
            numbering = lib.rd_numbering_new(case.first_seq - 1)
            state = fastpath.CaptureState(
                fd=receiver.fileno(),
                stop_fd=stop_r,
                buf=ctypes.addressof(buffer),
                cap=case.cap,
                room=ROOM,
                port=case.port,
                numbering=numbering,
                claim=ctypes.addressof(word),
            )
            frames = b""
            seq = case.first_seq
            try:
                for _ in range(len(payloads) + 2):
                    why = lib.rd_capture_next(ctypes.byref(state))
                    if not payloads:
                        _check(why == Why.STOPPED and state.held == 0, f"stop: {why}")
                        break
                    _check(why in (Why.EMPTY, Why.FULL), f"capture_next: {why}")
                    _check(state.held == 1, "the numbering is not held after a batch")
                    _check(state.first == seq, f"first {state.first}, want {seq}")
                    _check(at(buffer, case.cap, case.cap + GUARD) == b"\xa5" * GUARD, "past cap")
                    _check(state.offset <= case.cap, f"offset {state.offset} > cap {case.cap}")
                    batch = at(buffer, 0, state.offset)
                    if case.direct and state.count:
                        _check(state.claimed == 1 and word.value == CLAIM_HELD, "not claimed")
                        _check(state.send_err == 0, f"send_err {state.send_err}")
                        sent = b""
                        while len(sent) < state.sent:
                            sent += tcp_peer.recv(state.sent - len(sent))
                        _check(sent == batch[: state.sent], "sent bytes are not the batch's")
                        word.value = open_word  # the uplink's hand-back
                    else:
                        _check(state.claimed == 0 and state.sent == 0, "sent without a claim")
                        _check(word.value == open_word, "the claim word changed")
                    frames += batch
                    seq += state.count
                    if why == Why.EMPTY:
                        break
            finally:
                lib.rd_capture_done(ctypes.byref(state))
                _check(state.held == 0, "the numbering is held after done")
                lib.rd_numbering_free(numbering)
            after = time.time_ns()
        _check(why == (Why.EMPTY if payloads else Why.STOPPED), "the socket never reported empty")
        events = Decoder({FrameType.DATA}).feed(frames)
        _check(len(events) == len(payloads), f"{len(events)} frames for {len(payloads)}")
        for n, (event, payload) in enumerate(zip(events, payloads, strict=True)):
            assert isinstance(event, Datagram)
            _check(event.payload == payload, f"payload {n} of {len(payload)} bytes differs")
            _check(event.seq == case.first_seq + n, f"seq {event.seq}, want {case.first_seq + n}")
            _check(event.group == int(LOOPBACK), f"group {IPv4Address(event.group)}")
            _check(event.port == case.port, f"port {event.port}")
            _check(before <= event.ts_ns <= after, f"stamp {event.ts_ns} outside the run")
        _check(state.drops_seen in (0, 1) and state.drops == 0, "drops reported on loopback")
    finally:
        os.close(stop_r)
        os.close(stop_w)
        tcp.close()
        tcp_peer.close()


def test_capture_batch_frames_every_datagram_size() -> None:
    lib = plane()

    @SETTINGS
    @given(case=batch_cases)
    @example(case=BatchCase((0, MAX_PAYLOAD, 0, MAX_PAYLOAD, 1), ROOM, 1, 0, True))
    @example(case=BatchCase((MAX_PAYLOAD,) * 12 + (0,) * 3, 512 * 1024, U64 - 20, 65535, False))
    def fuzz(case: BatchCase) -> None:
        check_batch(lib, case)

    fuzz()


#: A hold no test waits out: a held call ends at its stop pipe.
LONG_HOLD_NS = 60 * 10**9


@attrs.define
class HoldRig:
    """A capture socket's C state that holds batches open (``hold_ns``), its stop pipe, and
    a caught-up connection (a socket pair) whose far end the test reads."""

    lib: Any
    numbering: int
    receiver: socket.socket
    sender: socket.socket
    tcp: socket.socket
    peer: socket.socket
    stop_r: int
    stop_w: int
    word: ctypes.c_int64 = attrs.field(init=False)
    buffer: ctypes.Array[ctypes.c_uint8] = attrs.field(init=False)
    state: Any = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.word = ctypes.c_int64(self.tcp.fileno())
        self.buffer = (ctypes.c_uint8 * (512 * 1024))()
        self.state = self.capture_state(self.buffer, self.receiver, self.stop_r, self.word)

    def capture_state(
        self,
        buffer: ctypes.Array[ctypes.c_uint8],
        receiver: socket.socket,
        stop_fd: int,
        word: ctypes.c_int64,
        hold_gap_ns: int = LONG_HOLD_NS,
    ) -> Any:
        """A state on this rig's numbering, as if it had just woken (the rate counts as high
        while wake-ups come less than ``hold_gap_ns`` apart)."""
        return fastpath.CaptureState(
            fd=receiver.fileno(),
            stop_fd=stop_fd,
            buf=ctypes.addressof(buffer),
            cap=len(buffer),
            room=ROOM,
            port=7,
            hold_ns=LONG_HOLD_NS,
            hold_gap_ns=hold_gap_ns,
            last_wake_ns=time.monotonic_ns(),
            numbering=self.numbering,
            claim=ctypes.addressof(word),
        )

    def next(self) -> int:
        """``rd_capture_next``, then the uplink's hand-back of the claim word."""
        why = int(self.lib.rd_capture_next(ctypes.byref(self.state)))
        if self.state.claimed:
            self.word.value = self.tcp.fileno()
        return why

    def next_unheld(self) -> int:
        """``next``, which must return by itself: held by mistake it would end only at the
        stop pipe, which a guard writes after 20 s (and the test sees written)."""
        guard = threading.Timer(20, os.write, (self.stop_w, b"x"))
        guard.start()
        try:
            return self.next()
        finally:
            guard.cancel()
            assert not select.select([self.stop_r], [], [], 0)[0], "the batch waited for the stop"

    def datagrams(self, count: int) -> list[Datagram]:
        """The next ``count`` DATA frames on the connection (at most 10 s)."""
        self.peer.settimeout(10)
        decoder = Decoder({FrameType.DATA})
        got: list[Datagram] = []
        while len(got) < count:
            data = self.peer.recv(1 << 16)
            assert data, "the connection closed"
            got += [e for e in decoder.feed(data) if isinstance(e, Datagram)]
        return got

    def frames(self, count: int) -> list[bytes]:
        """The payloads of the next ``count`` DATA frames on the connection."""
        return [d.payload for d in self.datagrams(count)]

    def held(self) -> list[bytes]:
        """The payloads of the batch in the buffer."""
        events = Decoder({FrameType.DATA}).feed(at(self.buffer, 0, self.state.offset))
        return [e.payload for e in events if isinstance(e, Datagram)]

    def feed_then_stop(self, *steps: bytes | float) -> threading.Thread:
        """A thread that sends each payload and waits for its frame on the connection (or
        sleeps a float's seconds), then writes the stop pipe."""

        def run() -> None:
            try:
                for step in steps:
                    if isinstance(step, float):
                        time.sleep(step)
                    else:
                        self.sender.send(step)
                        self.frames(1)
            finally:
                os.write(self.stop_w, b"x")

        thread = threading.Thread(target=run)
        thread.start()
        return thread


@contextlib.contextmanager
def hold_rig() -> Iterator[HoldRig]:
    lib = plane()
    stop_r, stop_w = os.pipe()
    tcp, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    numbering = lib.rd_numbering_new(0)
    try:
        with capture_socket() as (receiver, sender):
            rig = HoldRig(lib, numbering, receiver, sender, tcp, peer, stop_r, stop_w)
            try:
                yield rig
            finally:
                lib.rd_capture_done(ctypes.byref(rig.state))
    finally:
        lib.rd_numbering_free(numbering)
        os.close(stop_r)
        os.close(stop_w)
        tcp.close()
        peer.close()


def test_capture_after_a_single_datagram_writes_the_first_one_early_and_the_rest_after() -> None:
    """At a low rate (the last batch was one datagram) ``rd_capture_next`` writes the first
    datagram of a batch to the claimed connection before it receives the rest: the stream is
    still the batch's frames, whole and in order, and a batch that claims nothing sends none."""
    with hold_rig() as rig:
        rig.state.hold_ns = 0
        for batch in ([b"one"], [b"two", b"three", b"four"], [b"five"], [b"six", b"seven"]):
            for payload in batch:
                rig.sender.send(payload)
            while True:  # what the kernel has queued so far may come in more than one batch
                why = rig.lib.rd_capture_next(ctypes.byref(rig.state))
                assert why in (Why.EMPTY, Why.FULL)
                assert rig.state.claimed == 1
                assert rig.word.value == CLAIM_HELD
                assert rig.state.sent == rig.state.offset
                assert rig.state.send_err == 0
                rig.word.value = rig.tcp.fileno()  # the uplink's hand-back
                if why == Why.EMPTY:
                    break
        rig.word.value = CLAIM_CLOSED
        rig.sender.send(b"eight")
        assert rig.lib.rd_capture_next(ctypes.byref(rig.state)) == Why.EMPTY
        assert rig.state.count == 1
        assert rig.state.claimed == 0
        assert rig.state.sent == 0
        streamed = rig.datagrams(7)
        assert not select.select([rig.peer], [], [], 0.1)[0], "more than the claimed batches"
    payloads = [b"one", b"two", b"three", b"four", b"five", b"six", b"seven"]
    assert [d.payload for d in streamed] == payloads
    assert [d.seq for d in streamed] == list(range(1, 8))


def test_capture_hold_keeps_a_written_batch_open_across_wake_ups() -> None:
    """With ``hold_ns``, a batch written whole to the claimed connection takes in what comes
    on later wake-ups, each datagram written as it arrives (the far end reads one before the
    next is sent), until the hold ends (here: the stop pipe, which the next call then
    reports). Without the hold the call returns after the first datagram."""
    with hold_rig() as rig:
        feeder = rig.feed_then_stop(b"one", b"two", b"three")
        try:
            why = rig.next()
        finally:
            feeder.join()
        assert why == Why.EMPTY
        assert (rig.state.first, rig.state.count) == (1, 3)
        assert rig.state.claimed == 1
        assert rig.state.sent == rig.state.offset
        assert rig.state.send_err == 0
        assert rig.held() == [b"one", b"two", b"three"]
        assert rig.next() == Why.STOPPED


def test_capture_hold_is_off_while_another_socket_numbers_with_it() -> None:
    """A second receive thread on the feed's numbering turns the hold off (the other socket's
    datagrams would wait for the numbering): the call returns with its one datagram. Once the
    other thread is done, batches are held again."""
    other_stop_r, other_stop_w = os.pipe()
    other_buffer = (ctypes.c_uint8 * (512 * 1024))()
    try:
        with hold_rig() as rig, capture_socket() as (other, _):
            os.write(other_stop_w, b"x")  # the other thread joins, then stops at once
            other_word = ctypes.c_int64(CLAIM_CLOSED)
            other_state = rig.capture_state(other_buffer, other, other_stop_r, other_word)
            assert rig.lib.rd_capture_next(ctypes.byref(other_state)) == Why.STOPPED
            rig.sender.send(b"one")
            assert rig.next_unheld() == Why.EMPTY
            assert (rig.state.count, rig.state.claimed) == (1, 1)
            assert rig.frames(1) == [b"one"]
            rig.lib.rd_capture_done(ctypes.byref(other_state))  # the other thread ends
            feeder = rig.feed_then_stop(b"two", b"three")
            try:
                assert rig.next() == Why.EMPTY
            finally:
                feeder.join()
            assert (rig.state.first, rig.state.count) == (2, 2)  # held again
    finally:
        os.close(other_stop_r)
        os.close(other_stop_w)


def test_capture_hold_needs_wake_ups_close_together() -> None:
    """A batch is held only while wake-ups come less than ``hold_gap_ns`` apart: a datagram
    after a longer gap still joins the batch, then the call returns (no stop needed); a
    first wake-up long after the one before holds nothing."""
    gap = 0.05
    with hold_rig() as rig:
        rig.state.hold_gap_ns = int(gap * 1e9)
        rig.sender.send(b"one")

        def two_after_a_gap() -> None:
            rig.frames(1)
            time.sleep(4 * gap)
            rig.sender.send(b"two")

        feeder = threading.Thread(target=two_after_a_gap)
        feeder.start()
        try:
            assert rig.next_unheld() == Why.EMPTY
        finally:
            feeder.join()
        assert (rig.state.first, rig.state.count) == (1, 2)
        time.sleep(4 * gap)
        rig.sender.send(b"three")
        assert rig.next_unheld() == Why.EMPTY
        assert (rig.state.first, rig.state.count) == (3, 1)
        assert rig.frames(2) == [b"two", b"three"]


def test_capture_hold_ends_when_the_connection_is_not_written_whole() -> None:
    """A batch whose write to the connection stopped short (the socket is full) is not held:
    the call returns, so Python hands the rest to the uplink's sender at once."""
    with hold_rig() as rig:
        rig.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        rig.tcp.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                rig.tcp.send(bytes(4096))
        rig.sender.send(b"one")
        assert rig.next_unheld() == Why.EMPTY
        assert rig.state.claimed == 1
        assert rig.state.sent < rig.state.offset


def test_capture_hold_ends_at_its_time_when_nothing_more_comes() -> None:
    """A hold ends ``hold_ns`` after it began when no datagram follows: the call returns by
    itself with the batch (the stop pipe is not needed)."""
    hold = 0.2
    with hold_rig() as rig:
        rig.state.hold_ns = int(hold * 1e9)
        rig.sender.send(b"one")
        started = time.monotonic()
        why = rig.next_unheld()
        elapsed = time.monotonic() - started
        assert why == Why.EMPTY
        assert (rig.state.first, rig.state.count, rig.state.claimed) == (1, 1, 1)
        assert rig.frames(1) == [b"one"]
        assert hold * 0.9 <= elapsed < 10


def test_emit_pump_heartbeats_on_time_while_idle() -> None:
    """With nothing to receive the pump writes a HEARTBEAT every ``heartbeat_ns`` (its own
    deadline wakes it, no traffic does) and returns RD_IDLE after ``idle_ns``."""
    lib = plane()
    heartbeat, idle = 0.05, 0.5
    pump_side, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stop_r, stop_w = os.pipe()
    mcast = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    buffer = (ctypes.c_uint8 * EMIT_CAP)()
    state = fastpath.EmitState(
        tcp_fd=pump_side.fileno(),
        stop_fd=stop_r,
        mcast_fd=mcast.fileno(),
        buf=ctypes.addressof(buffer),
        cap=EMIT_CAP,
        idle_ns=int(idle * 1e9),
        ack_interval_ns=int(heartbeat / 5 * 1e9),
        heartbeat_ns=int(heartbeat * 1e9),
        max_payload=MAX_PAYLOAD,
        acked_any=1,
    )
    try:
        started = time.monotonic()
        why = lib.rd_emit_pump(ctypes.byref(state))
        elapsed = time.monotonic() - started
        peer.setblocking(False)
        events = Decoder(FROM_EMIT).feed(peer.recv(1 << 16))
        assert why == Why.IDLE
        assert idle * 0.9 <= elapsed < 10
        assert all(isinstance(e, Heartbeat) for e in events), events
        # one per interval over the idle time (a slow machine may send fewer, never more)
        assert 3 <= len(events) <= idle / heartbeat + 1, len(events)
    finally:
        for sock in (pump_side, peer, mcast):
            sock.close()
        os.close(stop_r)
        os.close(stop_w)


def _timerfds() -> set[int]:
    """The timerfds this process has open (other tests' threads may hold some, and close
    them when they end)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[timerfd]":
                found.add(int(fd))
    return found


def test_a_data_thread_keeps_one_timer_for_its_deadlines_and_closes_it_when_it_ends() -> None:
    """Waits for one deadline after the first use the thread's own timerfd, set once for it:
    a hold still ends on time; a later deadline given up (the stop pipe) does not hold up an
    earlier one, nor does its expiry, unread, end a later hold early; the timer is closed when
    the thread ends."""
    seen: dict[str, Any] = {}

    with hold_rig() as rig:
        rig.state.hold_gap_ns = int(1e9)  # every wake-up here counts as a high rate
        rig.state.last_wake_ns = time.monotonic_ns()

        def hold(seconds: float, *then: bytes | float) -> tuple[int, float]:
            """A batch of one datagram held open for ``seconds`` while a feeder sends
            ``then`` (payloads, or pauses; b"stop": the stop pipe)."""

            def feed() -> None:
                for step in then:
                    if isinstance(step, float):
                        time.sleep(step)
                    elif step == b"stop":
                        os.write(rig.stop_w, b"x")
                    else:
                        rig.sender.send(step)

            rig.state.hold_ns = int(seconds * 1e9)
            rig.sender.send(b"first")
            feeder = threading.Thread(target=feed)
            feeder.start()
            started = time.monotonic()
            why = rig.next()
            elapsed = time.monotonic() - started
            feeder.join()
            with contextlib.suppress(BlockingIOError):
                os.set_blocking(rig.stop_r, False)
                os.read(rig.stop_r, 1)
            rig.frames(rig.state.count)
            return why, elapsed

        def thread() -> None:
            seen["on time"] = hold(0.3, 0.02, b"b", 0.02, b"c", 0.02, b"d")
            seen["count on time"] = rig.state.count
            seen["timerfds while it runs"] = _timerfds()
            hold(5.0, 0.02, b"b", 0.02, b"c", 0.02, b"stop")  # the timer is set 5 s ahead
            seen["after a later deadline"] = hold(0.2, 0.02, b"b", 0.02, b"c")
            hold(0.1, 0.02, b"b", 0.02, b"c", 0.02, b"stop", 0.2)  # expires unread
            seen["after an unread expiry"] = hold(0.3, 0.02, b"b", 0.02, b"c")

        before = _timerfds()
        runner = threading.Thread(target=thread)
        runner.start()
        runner.join(60)
        assert not runner.is_alive()
        assert seen["on time"][0] == Why.EMPTY
        assert 0.27 <= seen["on time"][1] < 3, seen
        assert seen["count on time"] == 4  # first, b, c, d: one batch
        (own,) = seen["timerfds while it runs"] - before  # one, this thread's
        assert 0.18 <= seen["after a later deadline"][1] < 3, seen
        assert 0.27 <= seen["after an unread expiry"][1] < 3, seen
        # closed with the thread: join() returns once Python is done with the thread, a
        # moment before the thread itself exits and runs its key destructors
        deadline = time.monotonic() + 5
        while own in _timerfds() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert own not in _timerfds()


# -- the sanitizer build ---------------------------------------------------------------------

#: the fuzz tests the sanitizer child runs (its own examples budget)
SANITIZED_TESTS = (
    "test_emit_pump_matches_the_python_decoder",
    "test_emit_pump_stopped_anywhere",
    "test_emit_pump_with_more_destinations_than_its_table_holds",
    "test_capture_reader_matches_the_python_decoder",
    "test_capture_batch_frames_every_datagram_size",
    "test_capture_hold_keeps_a_written_batch_open_across_wake_ups",
    "test_capture_hold_is_off_while_another_socket_numbers_with_it",
)
SANITIZER_FLAGS = (
    "-O1",
    "-g",
    "-std=c11",
    "-fPIC",
    "-shared",
    "-fno-omit-frame-pointer",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
)
CHILD = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    from relayd import fastpath, session
    assert str(fastpath.LIBRARY).startswith(sys.argv[1]), fastpath.LIBRARY
    import test_fastpath_fuzz as tests
    for name in sys.argv[3:]:
        print("running", name, flush=True)
        getattr(tests, name)()
    print("sanitized fuzz session passed", flush=True)
    """
)


def _sanitizer_runtime() -> tuple[str, Path] | str:
    """(compiler, libasan) or why there is none."""
    compiler = shutil.which("gcc")
    if compiler is None:
        return "gcc not found"
    out = subprocess.run(
        [compiler, "-print-file-name=libasan.so"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not out or not Path(out).is_absolute() or not Path(out).exists():
        return "gcc has no libasan.so (install libasan / gcc's sanitizer runtime)"
    return compiler, Path(out).resolve()


def sanitized_package(directory: Path, compiler: str) -> Path:
    """A copy of the relayd package whose ``_fastpath.so`` is built with ASan and UBSan."""
    source = Path(relayd.__file__).resolve().parent
    package = directory / "relayd"
    shutil.copytree(source, package, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
    build = subprocess.run(
        [
            compiler,
            *SANITIZER_FLAGS,
            "-o",
            str(package / "_fastpath.so"),
            str(source / "_fastpath.c"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if build.returncode != 0:
        pytest.fail(f"sanitized build failed:\n{build.stderr}")
    return directory


def sanitizer_env(libasan: Path, **extra: str) -> dict[str, str]:
    """The environment of a child that loads a ``sanitized_package`` on the C plane."""
    return {
        **os.environ,
        "LD_PRELOAD": str(libasan),
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        "RELAYD_DATAPATH": "c",
        "PYTHONDONTWRITEBYTECODE": "1",
        **extra,
    }


def run_sanitized(
    tests: Sequence[str], examples: int, timeout: float
) -> subprocess.CompletedProcess[str]:
    runtime = _sanitizer_runtime()
    if isinstance(runtime, str):
        pytest.skip(f"no sanitizer build: {runtime}")
    compiler, libasan = runtime
    if isinstance(_load(), str):
        pytest.skip(f"C data plane not loadable: {_load()}")
    with tempfile.TemporaryDirectory(prefix="relayd-asan-") as scratch:
        root = sanitized_package(Path(scratch), compiler)
        env = sanitizer_env(libasan, RELAYD_FUZZ_EXAMPLES=str(examples), RELAYD_FUZZ_CHILD="1")
        return subprocess.run(
            [sys.executable, "-c", CHILD, str(root), str(Path(__file__).parent), *tests],
            env=env,
            cwd=scratch,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )


SANITIZER_REPORT = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer", "SUMMARY:")


def test_sanitized_fuzz_session() -> None:
    """The fuzz tests above against an ASan+UBSan build, in a child process: any sanitizer
    report (or any failure) fails this test, with the child's output."""
    examples = max(30, FUZZ_EXAMPLES // 4)
    child = run_sanitized(SANITIZED_TESTS, examples, timeout=max(600, examples * 2))
    report = child.stdout + child.stderr
    _check(
        not any(marker in report for marker in SANITIZER_REPORT) and child.returncode == 0,
        f"sanitized fuzz session failed (exit {child.returncode}):\n{report[-6000:]}",
    )


# -- known bugs --------------------------------------------------------------------------------


def stamp_above_2_63() -> None:
    """One DATA frame for an allowed destination stamped 2**63 (run in the sanitizer child)."""
    lib = plane()
    with Loopback.open() as net:
        key = net.allowed[0]
        stream = encode_datagram(1, key >> 16, key & 0xFFFF, 2**63, b"stamp")
        case = EmitCase(stream, (stream,), (False,), 0, -1, EMIT_CAP, 0, 10**12, False)
        check_emit(lib, net, case)


def test_sanitized_latency_of_a_stamp_above_2_63() -> None:
    child = run_sanitized(("stamp_above_2_63",), 1, timeout=120)
    report = child.stdout + child.stderr
    _check(
        not any(marker in report for marker in SANITIZER_REPORT) and child.returncode == 0,
        f"sanitizer report (exit {child.returncode}):\n{report[-3000:]}",
    )


def test_capture_reader_keeps_an_ack_above_2_63() -> None:
    lib = plane()
    stream = encode_ack(5) + encode_ack(2**63)
    case = ReaderCase(stream, (stream,), (False,), READER_CAP)
    why, state, _ = run_reader(lib, case)
    _check(why == Why.EOF, f"reader returned {why}")
    _check(state.acks == 2, f"{state.acks} ACKs counted")
    _check(state.acked % 2**64 == 2**63, f"acked {state.acked}, the Python path has 2**63")


def test_emit_pump_drops_payloads_over_its_limit() -> None:
    """Payloads at, under and over ``max_payload`` to allowed destinations, to one whose
    sends fail and to a refused one: the model's counts (``session.oversize`` after the
    destination verdict, before the send) and the payloads under the limit out, in order."""
    lib = plane()
    with Loopback.open() as net:
        allowed, failing = net.allowed[0], next(iter(net.failing))
        refused = next(iter(net.denied))
        for limit in (1, 20, session.TGW_MULTICAST_MTU, MAX_PAYLOAD):
            over = min(limit + 1, MAX_PAYLOAD)
            sizes = sorted({0, 1, 2, limit - 1, limit, over, MAX_PAYLOAD})
            frames = [
                encode_datagram(seq, key >> 16, key & 0xFFFF, 1, payload_of(seq, size))
                for seq, (key, size) in enumerate(
                    [*((allowed, size) for size in sizes), (failing, over), (refused, 1)],
                    start=1,
                )
            ]
            stream = b"".join(frames)
            case = EmitCase(stream, (stream,), (False,), 0, -1, EMIT_CAP, 0, 10**12, False)
            check_emit(lib, net, attrs.evolve(case, max_payload=limit))


def test_emit_pump_acks_a_sequence_above_2_63() -> None:
    lib = plane()
    with Loopback.open() as net:
        key = net.allowed[0]
        stream = encode_datagram(2**63, key >> 16, key & 0xFFFF, 0, b"x")
        case = EmitCase(stream, (stream,), (False,), 0, 0, EMIT_CAP, 0, 10**12, False)
        run = run_emit(lib, net, case)
        net.drain(1)
    _check(run.why == Why.EOF, f"pump returned {run.why}")
    _check(run.state.highest == 2**63, f"highest {run.state.highest}")
    acks = [e.seq for e in Decoder(FROM_EMIT).feed(run.replies) if isinstance(e, Ack)]
    _check(acks == [2**63], f"ACKs sent: {acks}, the Python path sends ACK 2**63")


def test_buffers_too_small_for_a_frame_are_refused() -> None:
    """The library checks what the Python callers always give it: an emit buffer holding two
    maximal frames, a reader buffer holding an ERROR with room to spare, a capture batch with
    room for a maximal datagram. Anything less is EINVAL, never a misread stream."""
    lib = plane()
    emit = fastpath.EmitState(
        cap=2 * MAX_FRAME - 10, tcp_fd=-1, stop_fd=-1, mcast_fd=-1, max_payload=MAX_PAYLOAD
    )
    assert lib.rd_emit_pump(ctypes.byref(emit)) == Why.RESET
    assert emit.err == errno.EINVAL
    for limit in (0, MAX_PAYLOAD + 1):  # max_datagram_size outside 1..65507
        emit = fastpath.EmitState(
            cap=EMIT_CAP, tcp_fd=-1, stop_fd=-1, mcast_fd=-1, max_payload=limit
        )
        assert lib.rd_emit_pump(ctypes.byref(emit)) == Why.RESET
        assert emit.err == errno.EINVAL
    reader = fastpath.CaptureReaderState(cap=4095, tcp_fd=-1, stop_fd=-1)
    assert lib.rd_capture_read(ctypes.byref(reader)) == Why.RESET
    assert reader.err == errno.EINVAL
    numbering = lib.rd_numbering_new(0)
    batch = fastpath.CaptureState(cap=ROOM, room=ROOM - 1, fd=-1, stop_fd=-1, numbering=numbering)
    assert lib.rd_capture_next(ctypes.byref(batch)) == Why.ERROR
    assert batch.err == errno.EINVAL
    assert batch.count == 0
    assert batch.held == 0
    lib.rd_numbering_free(numbering)
