"""CPU per datagram of the capture side's upstream check (`python -m bench.upstream`).

The data planes' upstream counters (``upstream_check = "deribit"``) over capture batches of 64
DATA frames, as ``rd_capture_next`` hands them over: C (``rd_upstream_scan``, one ctypes call
per batch, the bytes copy of the batch included) and Python (relayd.arbitration's
UpstreamMonitor, the specification). Traffic as in bench.arbitration: the Deribit sample ten
times over (8-byte headers, every channel's sequence continued) and synthetic SBE traffic (64
channels). CPU ns (process time) per datagram, median of --rounds, in one sitting. The cost in
a running capture feed (CPU per datagram with the check on and off, alternated) is
``python -m bench.capture --upstream-check alternate``; the data path alone (receive, frame,
scan, no TCP), with the check off and on alternated, is the second table here.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import time
from pathlib import Path

from bench.arbitration import Traffic, sample_traffic, sbe_traffic
from relayd import fastpath, pyplane, wire
from relayd.arbitration import DeribitLayout
from relayd.datapath import DataPlane
from relayd.tools import samples

BATCH = 64
SO_RCVBUFFORCE = 33  # Linux; not in Python's socket module


def batches(traffic: Traffic) -> list[tuple[bytes, int]]:
    out = []
    for start in range(0, len(traffic), BATCH):
        chunk = traffic[start : start + BATCH]
        frames = b"".join(
            wire.encode_datagram(start + i + 1, group, port, 0, payload)
            for i, (group, port, payload) in enumerate(chunk)
        )
        out.append((frames, len(chunk)))
    return out


def time_counter(plane: DataPlane, layout: DeribitLayout, work: list[tuple[bytes, int]]) -> float:
    counter = plane.upstream_counter(layout)
    try:
        scan = counter.scan
        total = sum(count for _, count in work)
        start = time.process_time_ns()
        for now, (frames, count) in enumerate(work):
            scan(frames, count, now)
        elapsed = time.process_time_ns() - start
        assert counter.totals().gaps == 0
    finally:
        counter.close()
    return elapsed / total


def time_receive(plane: DataPlane, check: bool, rounds: int, count: int = 2000) -> list[float]:
    """CPU ns per datagram of the capture data path (``CaptureReceiver.next`` until the socket
    is empty: recvmsg, stamp, frame, and with ``check`` the upstream scan) over ``count``
    Deribit frame-v1 datagrams queued on a loopback socket beforehand; one figure per round."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stop_r, stop_w = os.pipe()
    counter = plane.upstream_counter(DeribitLayout.FRAME_V1) if check else None
    try:
        try:
            rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
        except PermissionError:
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        address = rx.getsockname()
        numbering = plane.capture_numbering(0)
        receiver = plane.capture_receiver(rx, address[1], stop_r, numbering, None, counter)
        header = struct.Struct("<HHI")
        payload = bytearray(153)
        sent = 0
        figures = []
        for _ in range(rounds):
            for _ in range(count):  # 32 channels, each numbered 1, 2, 3, ...
                header.pack_into(payload, 0, 145, sent & 31, (sent >> 5) + 1)
                tx.sendto(payload, address)
                sent += 1
            got = 0
            start = time.process_time_ns()
            while got < count:
                receiver.next()
                got += receiver.count
            receiver.done()
            figures.append((time.process_time_ns() - start) / count)
        if counter is not None:
            assert counter.totals().gaps == 0, counter.totals()
        return figures
    finally:
        if counter is not None:
            counter.close()
        rx.close()
        tx.close()
        os.close(stop_r)
        os.close(stop_w)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sample", type=Path, default=None, help="the Deribit sample capture")
    args = parser.parse_args(argv)
    if args.sample is None:
        found = samples.deribit_dir()
        args.sample = Path() if found is None else found / samples.DERIBIT_SAMPLE
    planes: list[tuple[str, DataPlane]] = []
    c_plane = fastpath.load()
    if c_plane is not None:
        planes.append(("C", c_plane))
    planes.append(("Python", pyplane.PLANE))
    cases: list[tuple[str, DeribitLayout, Traffic]] = []
    if args.sample.is_file():
        cases.append(
            (
                "Deribit sample x10 (frame-v1)",
                DeribitLayout.FRAME_V1,
                sample_traffic(args.sample, 10),
            )
        )
    cases.append(("synthetic SBE, 64 channels", DeribitLayout.SBE, sbe_traffic(100_000)))
    print(
        f"{'traffic':<32} {'datagrams':>9} "
        + " ".join(f"{name + ' ns/dg':>14}" for name, _ in planes)
    )
    for title, layout, traffic in cases:
        work = batches(traffic)
        figures = []
        for _, plane in planes:
            rounds = [time_counter(plane, layout, work) for _ in range(args.rounds)]
            figures.append(statistics.median(rounds))
        print(f"{title:<32} {len(traffic):>9} " + " ".join(f"{f:>14.0f}" for f in figures))
    print()
    print("capture data path (batch until empty, 2,000 datagrams queued per round), check off/on")
    print("alternated round by round; CPU ns per datagram, median (and range) of --rounds x 4:")
    for name, plane in planes:
        off: list[float] = []
        on: list[float] = []
        for _ in range(args.rounds * 4):
            off += time_receive(plane, False, 1)
            on += time_receive(plane, True, 1)
        low, high = statistics.median(off), statistics.median(on)
        print(
            f"  {name:<7} off {low:>6.0f} ({min(off):.0f}-{max(off):.0f})  "
            f"on {high:>6.0f} ({min(on):.0f}-{max(on):.0f})  on-off {high - low:>+5.0f}  "
            f"on/off {high / low:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
