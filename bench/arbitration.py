"""CPU per datagram of relayd.arbitration (`python -m bench.arbitration [--quick]`).

Each case offers two copies of the same traffic, interleaved datagram by datagram (copy A,
then copy B), to one Arbiter, so half the offers are duplicates, as on an emit host fed by two
capture hosts; the capture side's UpstreamMonitor sees one copy. Traffic: the Deribit sample
capture (8-byte headers; from ../shared/testdata/deribit/ relative to the repository, or
--sample), and synthetic SBE traffic (64 channels, 1-4 messages per packet, 160-byte payloads).
Figures are CPU ns (process time) per offered datagram, median of --rounds, in one sitting.
"""

from __future__ import annotations

import argparse
import random
import statistics
import struct
import time
from collections.abc import Callable
from pathlib import Path

from relayd.arbitration import (
    SBE_INCREMENTAL,
    Arbiter,
    ArbitrationConfig,
    ArbitrationMode,
    DeribitLayout,
    UpstreamMonitor,
)
from relayd.tools.pcapng import read_datagrams

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE = REPO_ROOT.parent / "shared" / "testdata" / "deribit" / "sample_capture_v1_6.pcapng"

Traffic = list[tuple[int, int, bytes]]


def sample_traffic(path: Path, repeat: int) -> Traffic:
    """The sample ``repeat`` times, each channel's sequence continued on every repetition
    (the sample has no gap), so every round is new data."""
    base = [(int(d.group), d.port, d.payload) for d in read_datagrams(path)]
    spans: dict[tuple[int, int, int], int] = {}
    for group, port, payload in base:
        _, channel, _ = struct.unpack_from("<HHI", payload)
        spans[group, port, channel] = spans.get((group, port, channel), 0) + 1
    out = []
    for r in range(repeat):
        for group, port, payload in base:
            length, channel, seq = struct.unpack_from("<HHI", payload)
            shifted = seq + r * spans[group, port, channel]
            out.append((group, port, struct.pack("<HHI", length, channel, shifted) + payload[8:]))
    return out


def sbe_traffic(count: int, channels: int = 64) -> Traffic:
    rng = random.Random(1)
    seqs = [1000] * channels
    out = []
    for i in range(count):
        channel = rng.randrange(channels)
        messages = rng.randint(1, 4)
        header = struct.pack("<qqiHH", i, seqs[channel], channel, SBE_INCREMENTAL, messages)
        seqs[channel] += messages
        body = bytes(160 - len(header))
        out.append((0xEF6F6F00 + channel % 22, 6100, header + body))
    return out


def time_arbiter(config: ArbitrationConfig, traffic: Traffic) -> float:
    """ns per offered datagram, two interleaved copies."""
    arbiter = Arbiter(config)
    offer = arbiter.offer
    released = arbiter.released
    now = 0.0
    start = time.process_time_ns()
    for index, (group, port, payload) in enumerate(traffic):
        now += 2e-5  # 50k/s
        offer(0, group, port, payload, now)
        offer(1, group, port, payload, now)
        if released:
            released.clear()
        if not index & 63:  # once per batch, as a data plane would
            arbiter.expire(now)
    elapsed = time.process_time_ns() - start
    return elapsed / (2 * len(traffic))


def time_monitor(layout: DeribitLayout, traffic: Traffic) -> float:
    monitor = UpstreamMonitor(layout)
    see = monitor.see
    now = 0.0
    start = time.process_time_ns()
    for group, port, payload in traffic:
        now += 2e-5
        see(group, port, payload, now)
    return (time.process_time_ns() - start) / len(traffic)


def median_of(rounds: int, measure: Callable[..., float], *args: object) -> float:
    return statistics.median(measure(*args) for _ in range(rounds))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sample", type=Path, default=SAMPLE)
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    synthetic = sbe_traffic(20_000 if args.quick else 100_000)
    cases: list[tuple[str, Traffic, DeribitLayout]] = [
        ("synthetic SBE", synthetic, DeribitLayout.SBE)
    ]
    if args.sample.is_file():
        sample = sample_traffic(args.sample, 1 if args.quick else 10)
        cases.insert(0, ("Deribit sample", sample, DeribitLayout.FRAME_V1))
    else:
        print(f"sample not found ({args.sample.name}): synthetic traffic only")
    print(f"CPU ns per offered datagram (two interleaved copies), median of {rounds} round(s)")
    columns = ("traffic", "datagrams", "none", "content", "deribit", "capture")
    print(f"{columns[0]:<16} {columns[1]:>10} " + " ".join(f"{c:>8}" for c in columns[2:]))
    for name, traffic, layout in cases:
        figures = [
            median_of(rounds, time_arbiter, ArbitrationConfig(mode=mode, layout=layout), traffic)
            for mode in ArbitrationMode
        ]
        figures.append(median_of(rounds, time_monitor, layout, traffic))
        print(f"{name:<16} {len(traffic):>10} " + " ".join(f"{f:>8.0f}" for f in figures))
    print("capture: UpstreamMonitor.see per datagram (one copy)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
