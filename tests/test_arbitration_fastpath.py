"""Differential tests of the C arbiter (relayd/_fastpath.c, section "A/B arbitration") against
its specification, ``relayd.arbitration.Arbiter``.

Both get the same operations (offers from several sources, observations of another relay,
expiries, changes of the number of live sources) at the same times, and must agree after every
one: the verdict, the datagrams released and their order, the size of a gap, every counter,
the next deadline. Streams are random multi-source copies of sequenced Deribit traffic in both
layouts (loss, reordering between copies, resets, heartbeats, overlaps, snapshots, malformed
datagrams) and content-mode traffic, with tables small enough that evictions and overflows
happen; and a replay of the Deribit sample through two lossy copies.
"""

from __future__ import annotations

import math
import random
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd import fastpath
from relayd.arbitration import (
    SBE_INCREMENTAL,
    SBE_RETRANSMIT,
    SBE_SNAPSHOT,
    Arbiter,
    ArbitrationConfig,
    ArbitrationMode,
    DeribitLayout,
)
from relayd.datapath import ARBITER_COUNTERS, ARBITER_SOURCES
from relayd.pyplane import LockedArbiter
from relayd.tools.pcapng import read_datagrams

GROUPS = (0xEF6F6F01, 0xEF6F6F02)
PORTS = (6100, 6101)


@pytest.fixture(scope="module")
def cplane() -> fastpath.CPlane:
    try:
        return fastpath.open_library(fastpath.LIBRARY)
    except fastpath.DataPathError as exc:
        pytest.skip(f"no C data plane: {exc}")


def v1(channel: int, seq: int, body: bytes) -> bytes:
    return struct.pack("<HHI", len(body), channel, seq & 0xFFFFFFFF) + body


def sbe(channel: int, seq: int, count: int, stamp: int, kind: int, body: bytes) -> bytes:
    return struct.pack("<qqiHH", stamp, seq, channel, kind, count) + b"\0" * 16 * count + body


class Pair:
    """The specification and the C arbiter, driven together and compared after each step."""

    def __init__(self, plane: fastpath.CPlane, config: ArbitrationConfig) -> None:
        self.spec = LockedArbiter(config)
        self.c = plane.arbiter(config)
        self.sent: list[bytes] = []  # what the C side sent, in order
        self.frames: dict[int, int] = {}  # owner -> its latest frame number

    def close(self) -> None:
        self.c.close()

    def _compare(self, what: str) -> None:
        # what each session's ACKs wait for: held, or released and not taken yet
        for owner in (*self.frames, 99):
            assert self.c.floor(owner) == self.spec.floor(owner), f"floor({owner}) {what}"
        spec_released = self.spec.take_released()
        c_released = self.c.take_released()
        assert c_released == spec_released, what
        self.sent.extend(item[3] for item in c_released)
        assert self.c.counts() == self.spec.counts(), what
        assert self.c.next_deadline() == self.spec.next_deadline(), what

    def offer(self, source: int, group: int, port: int, payload: bytes, now: float) -> None:
        # each source's datagrams are a session's frames, numbered in turn; a session change
        # (a new owner) now and then
        owner = source + 1 + 10 * (len(self.sent) // 500)
        frame = self.frames[owner] = self.frames.get(owner, 0) + 1
        expected = self.spec.offer(source, group, port, payload, now, owner, frame)
        got = self.c.offer(source, group, port, payload, now, owner, frame)
        what = f"offer({source}, {group:x}, {port}, {payload!r:.60}, {now}, {owner}, {frame})"
        assert got is expected, what
        if got.sends:
            self.sent.append(payload)
        if got.name == "GAP":
            assert self.c.gap_size == self.spec.gap_size, what
        self._compare(what)

    def observe(self, group: int, port: int, payload: bytes, now: float) -> None:
        self.spec.observe(group, port, payload, now)
        self.c.observe(group, port, payload, now)
        self._compare(f"observe({group:x}, {port}, {payload!r:.60}, {now})")

    def expire(self, now: float) -> None:
        assert self.c.expire(now) == self.spec.expire(now), f"expire({now})"
        self._compare(f"expire({now})")

    def live(self, count: int) -> None:
        self.spec.set_live_sources(count)
        self.c.set_live_sources(count)
        self._compare(f"live({count})")

    def finish(self) -> None:
        self.expire(math.inf)
        assert self.c.sent_by_source() == self.spec.sent_by_source()
        assert self.c.counts()["held_now"] == 0


def _stream(layout: DeribitLayout, rng: random.Random, channels: int, length: int) -> list[bytes]:
    """The exchange's traffic: per channel in sequence, with heartbeats, snapshots,
    retransmits and a reset now and then (SBE ranges of 0-3 messages)."""
    seqs = [rng.choice([0, 1, 1000, 2**32 - 3, 2**62]) for _ in range(channels)]
    stamp = 1
    out = []
    for i in range(length):
        channel = rng.randrange(channels)
        body = b"%d" % i
        stamp += rng.choice([0, 1, 5])
        if rng.random() < 0.02:
            seqs[channel] = rng.randrange(50)  # the exchange restarts the channel
        if layout is DeribitLayout.FRAME_V1:
            seqs[channel] += 1
            out.append(v1(channel, seqs[channel], body))
            continue
        kind = rng.choice([SBE_INCREMENTAL] * 8 + [SBE_SNAPSHOT, SBE_RETRANSMIT | 1, 0])
        count = rng.choice([0, 1, 1, 2, 3]) if kind == SBE_INCREMENTAL else 1
        out.append(sbe(channel, seqs[channel], count, stamp, kind, body))
        if kind == SBE_INCREMENTAL:
            seqs[channel] += count
    return out


def _copies(
    stream: list[bytes], rng: random.Random, sources: int, loss: float, skew: int
) -> list[list[bytes]]:
    copies = []
    for _ in range(sources):
        copy = [p for p in stream if rng.random() >= loss]
        for _ in range(len(copy) // 20):  # a little reordering within a copy
            i = rng.randrange(max(1, len(copy) - 1))
            copy[i : i + 2] = copy[i : i + 2][::-1]
        copies.append(copy[rng.randrange(skew + 1) :] if skew else copy)
    return copies


def _operations(
    copies: list[list[bytes]], rng: random.Random, garbage: float
) -> Iterator[tuple[str, Any]]:
    positions = [0] * len(copies)
    while any(pos < len(copy) for pos, copy in zip(positions, copies, strict=True)):
        source = rng.choice([i for i, copy in enumerate(copies) if positions[i] < len(copy)])
        payload = copies[source][positions[source]]
        positions[source] += 1
        group = GROUPS[0] if rng.random() < 0.9 else GROUPS[1]
        port = PORTS[0] if rng.random() < 0.8 else PORTS[1]
        yield (
            "step",
            rng.choice([0, 0, 0, 0.001, 0.02, 0.06, 0.3, 70.0 if rng.random() < 0.05 else 0]),
        )
        roll = rng.random()
        if roll < garbage:
            yield "offer", (source, group, port, rng.randbytes(rng.randrange(40)))
        elif roll < garbage + 0.03:
            yield "observe", (group, port, payload)
        elif roll < garbage + 0.05:
            yield "expire", None
        elif roll < garbage + 0.06:
            yield "live", rng.choice([1, 2, 3])
        elif roll < garbage + 0.09 and len(payload) >= 24:
            # the same messages cut into another range (as another copy's packetizer might)
            stamp, seq, channel, kind, count = struct.unpack_from("<qqiHH", payload)
            if kind == SBE_INCREMENTAL and seq > 0:
                reshaped = sbe(channel, seq - 1, count + 2, stamp, kind, b"r")
                yield "offer", (source, group, port, reshaped)
        yield "offer", (source, group, port, payload)


def _run(pair: Pair, operations: Iterator[tuple[str, Any]]) -> None:
    now = 0.0
    for op, arg in operations:
        if op == "step":
            now += arg
        elif op == "offer":
            source, group, port, payload = arg
            pair.offer(source, group, port, payload, now)
        elif op == "observe":
            group, port, payload = arg
            pair.observe(group, port, payload, now)
        elif op == "expire":
            pair.expire(now)
        else:
            pair.live(arg)
    pair.finish()


def _config(mode: ArbitrationMode, layout: DeribitLayout, small: bool, hold: float) -> Any:
    bounds: dict[str, Any] = {}
    if small:
        bounds = {
            "max_channels": 4,
            "max_held": 6,
            "max_held_bytes": 300,
            "content_window_entries": 8,
            "content_window": 0.1,
        }
    return ArbitrationConfig(mode=mode, layout=layout, hold_timeout=hold, **bounds)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    layout=st.sampled_from(list(DeribitLayout)),
    sources=st.integers(1, 4),
    channels=st.integers(1, 8),
    loss=st.sampled_from([0.0, 0.05, 0.3]),
    skew=st.integers(0, 10),
    garbage=st.sampled_from([0.0, 0.02, 0.2]),
    small=st.booleans(),
    hold=st.sampled_from([0.0, 0.05, 1.0]),
)
def test_c_arbiter_matches_the_specification_on_deribit_copies(
    cplane: fastpath.CPlane,
    seed: int,
    layout: DeribitLayout,
    sources: int,
    channels: int,
    loss: float,
    skew: int,
    garbage: float,
    small: bool,
    hold: float,
) -> None:
    rng = random.Random(seed)
    stream = _stream(layout, rng, channels, 150)
    pair = Pair(cplane, _config(ArbitrationMode.DERIBIT, layout, small, hold))
    try:
        _run(pair, _operations(_copies(stream, rng, sources, loss, skew), rng, garbage))
    finally:
        pair.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    sources=st.integers(1, 3),
    distinct=st.integers(1, 40),
    small=st.booleans(),
    mode=st.sampled_from([ArbitrationMode.CONTENT, ArbitrationMode.NONE]),
)
def test_c_arbiter_matches_the_specification_by_content(
    cplane: fastpath.CPlane,
    seed: int,
    sources: int,
    distinct: int,
    small: bool,
    mode: ArbitrationMode,
) -> None:
    rng = random.Random(seed)
    pool = [rng.randbytes(rng.randrange(30)) for _ in range(distinct)]
    stream = [rng.choice(pool) for _ in range(120)]
    pair = Pair(cplane, _config(mode, DeribitLayout.FRAME_V1, small, 0.05))
    try:
        _run(pair, _operations(_copies(stream, rng, sources, 0.1, 3), rng, 0.0))
    finally:
        pair.close()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), loss=st.sampled_from([0.0, 0.1, 0.4]))
def test_c_arbiter_matches_the_specification_on_the_deribit_sample(
    cplane: fastpath.CPlane, deribit_sample: Path, seed: int, loss: float
) -> None:
    """Two lossy, delayed copies of the sample's 5,066 datagrams, as two capture hosts."""
    rng = random.Random(seed)
    datagrams = list(read_datagrams(deribit_sample))
    copies = []
    for _ in range(2):
        arrivals, last = [], 0.0
        for d in datagrams:
            if rng.random() < loss:
                continue
            last = max(last, d.ts_ns / 1e9 + rng.uniform(0, 0.02))
            arrivals.append((last, d))
        copies.append(arrivals)
    events = sorted(
        (at, source, i, d) for source, copy in enumerate(copies) for i, (at, d) in enumerate(copy)
    )
    config = ArbitrationConfig(mode=ArbitrationMode.DERIBIT, hold_timeout=0.05)
    pair = Pair(cplane, config)
    try:
        for at, source, _, d in events:
            pair.expire(at)
            pair.offer(source, int(d.group), d.port, d.payload, at)
        pair.finish()
        assert len(pair.sent) == len(set(pair.sent)), "a datagram was sent twice"
    finally:
        pair.close()


def test_c_arbiter_counts_sources_apart_up_to_its_table(cplane: fastpath.CPlane) -> None:
    pair = Pair(cplane, ArbitrationConfig(mode=ArbitrationMode.NONE))
    try:
        for source in (0, 1, 1, ARBITER_SOURCES - 1, ARBITER_SOURCES, 1000):
            pair.offer(source, GROUPS[0], 6100, b"x", 0.0)
        pair.finish()
        by_source = pair.c.sent_by_source()
        assert by_source[:2] == [1, 2]
        assert by_source[-1] == 3  # the last entry takes every higher source number
    finally:
        pair.close()


def test_c_arbiter_refuses_an_impossible_configuration(cplane: fastpath.CPlane) -> None:
    with pytest.raises(ValueError, match="snapshot ports"):
        cplane.arbiter(
            ArbitrationConfig(mode=ArbitrationMode.DERIBIT, snapshot_ports=frozenset(range(9)))
        )


def test_every_counter_is_in_both_planes() -> None:
    assert set(LockedArbiter(ArbitrationConfig()).counts()) == set(ARBITER_COUNTERS)
    assert Arbiter(ArbitrationConfig()).live_sources == 2


_SANITIZED_CHILD = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from pathlib import Path
from relayd import fastpath
assert str(fastpath.LIBRARY).startswith(sys.argv[1]), fastpath.LIBRARY
import pytest
emit = str(Path(sys.argv[2]) / "tests" / "test_emit_arbitration.py")
code = pytest.main([emit, "-q", "-p", "no:cacheprovider", "-k", "c]", "--rootdir", sys.argv[2]])
assert code == 0, f"the pumps' arbitration tests failed under the sanitizers ({code})"
import tests.test_arbitration_fastpath as t
plane = fastpath.open_library(fastpath.LIBRARY)
t.test_c_arbiter_matches_the_specification_on_deribit_copies(cplane=plane)
t.test_c_arbiter_matches_the_specification_by_content(cplane=plane)
t.test_c_arbiter_counts_sources_apart_up_to_its_table(plane)
print("sanitized arbiter session passed", flush=True)
"""


def test_sanitized_arbiter_session() -> None:
    """The differential tests above, and the pumps' arbitration on real sockets
    (tests/test_emit_arbitration.py, C), against an ASan+UBSan build of the library, in a
    child process: any sanitizer report (or failure) fails this test, with the child's output."""
    from tests.test_fastpath_fuzz import (  # noqa: PLC0415 - its build helpers
        SANITIZER_REPORT,
        _sanitizer_runtime,
        sanitized_package,
        sanitizer_env,
    )

    runtime = _sanitizer_runtime()
    if isinstance(runtime, str):
        pytest.skip(f"no sanitizer build: {runtime}")
    compiler, libasan = runtime
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="relayd-asan-arb-") as scratch:
        root = sanitized_package(Path(scratch), compiler)
        env = sanitizer_env(libasan)
        child = subprocess.run(
            [sys.executable, "-c", _SANITIZED_CHILD, str(root), str(repo)],
            env=env,
            cwd=scratch,
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )
    report = child.stdout + child.stderr
    assert child.returncode == 0, report[-6000:]
    assert not any(marker in report for marker in SANITIZER_REPORT), report[-6000:]
    assert "sanitized arbiter session passed" in report


@pytest.mark.parametrize("leaf", ["c", "python"])
def test_concurrent_copies_from_threads_are_sent_exactly_once(leaf: str) -> None:
    """Four threads offer four complete copies of one stream at once (the C calls release the
    GIL), a fifth observes: every datagram is sent exactly once (at once or released)."""
    import threading  # noqa: PLC0415
    import time  # noqa: PLC0415

    config = ArbitrationConfig(mode=ArbitrationMode.DERIBIT, hold_timeout=5.0)
    if leaf == "c":
        try:
            arbiter: Any = fastpath.open_library(fastpath.LIBRARY).arbiter(config)
        except fastpath.DataPathError as exc:
            pytest.skip(f"no C data plane: {exc}")
    else:
        arbiter = LockedArbiter(config)
    rng = random.Random(5)
    seqs = [rng.randrange(1 << 20) for _ in range(16)]
    stream = []
    for i in range(4000):
        channel = rng.randrange(16)
        seqs[channel] += 1
        stream.append(v1(channel, seqs[channel], b"%d" % i))
    firsts: dict[int, bytes] = {}
    for payload in stream:
        firsts.setdefault(struct.unpack_from("<H", payload, 2)[0], payload)
    for payload in firsts.values():  # every channel's start known, as after a failover
        arbiter.observe(GROUPS[0], 6100, payload, time.monotonic())
    body = [p for p in stream if p not in firsts.values()]
    sent: list[bytes] = []
    lock = threading.Lock()

    def copy(source: int) -> None:
        mine = []
        for payload in body:
            if arbiter.offer(source, GROUPS[0], 6100, payload, time.monotonic()).sends:
                mine.append(payload)
        with lock:
            sent.extend(mine)

    def observer() -> None:  # another relay's traffic on another group, meanwhile
        for payload in body:
            arbiter.observe(GROUPS[1], 6100, payload, time.monotonic())

    threads = [threading.Thread(target=copy, args=(s,)) for s in range(4)]
    threads.append(threading.Thread(target=observer))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    arbiter.expire(math.inf)
    sent += [item[3] for item in arbiter.take_released()]
    counts = arbiter.counts()
    arbiter.close()
    assert sorted(sent) == sorted(body)  # each once
    assert counts["observed"] == len(firsts) + len(body)
    assert counts["offered"] == 4 * len(body)
    assert counts["held_now"] == 0


def test_c_arbiter_gives_a_hole_left_after_another_was_filled_its_own_wait(
    cplane: fastpath.CPlane,
) -> None:
    """As tests/test_arbitration.py's test of the same name, C against the specification."""
    pair = Pair(cplane, _config(ArbitrationMode.DERIBIT, DeribitLayout.FRAME_V1, False, 0.2))
    group, port = GROUPS[0], PORTS[0]
    steps: list[tuple[str, Any]] = [
        ("live", 2),
        ("offer", (0, group, port, v1(1, 1, b"a"))),
        ("offer", (0, group, port, v1(1, 3, b"c"))),
        ("step", 0.15),
        ("offer", (0, group, port, v1(1, 5, b"e"))),
        ("step", 0.01),
        ("offer", (1, group, port, v1(1, 2, b"b"))),
        ("step", 0.09),
        ("expire", None),
        ("step", 0.05),
        ("offer", (1, group, port, v1(1, 4, b"d"))),
    ]
    _run(pair, iter(steps))
    assert pair.c.counts()["gaps"] == 0
