"""Cost of A/B arbitration in the emit data path (`python -m bench.arbitration_emit [--quick]`).

An emit feed runs in this process; capture stand-ins in child processes (their CPU is not
counted) write pre-encoded DATA frames of Deribit packets (8-byte headers, 160-byte bodies, 4
groups, 2 channels each) paced at --rate datagrams/s. Cases, alternated round by round in one
sitting so that the machine's load hits all alike:

- one copy, ``arbitration = "none"`` against ``"deribit"``: what the arbiter adds per datagram
  when there is nothing to merge;
- two copies (two capture sessions streaming the same packets at --rate each), ``"none"``
  (every datagram goes out twice) against ``"deribit"`` (once).

Figures: this process's CPU time (process time) from the first welcome to the last datagram
sent, per datagram received from the capture side and per datagram sent; medians of --rounds.
The data path is the one ``RELAYD_DATAPATH`` selects (C when built). Last, the C arbiter's own
cost per offer (bench/arbitration_offer.c: the lock, a clock read and ``arb_offer``, without
the rest of the pump), median of --rounds runs.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs
import trio

from bench import emit as emit_bench
from relayd import fastpath
from relayd.config import EmitFeed
from relayd.emit import EmitFeedRuntime

GROUPS = ("239.255.78.1", "239.255.78.2", "239.255.78.3", "239.255.78.4")
UDP_PORT = 46200
BODY = 160

# A capture stand-in: encodes the frames, connects, says HELLO, writes them paced at ``rate``.
CLIENT = (
    r"""
import socket, struct, sys, time
from relayd.wire import FROM_EMIT, Ack, Challenge, Decoder, encode_datagram, encode_hello

port, count, rate = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
session = bytes.fromhex(sys.argv[4])
groups = [int.from_bytes(socket.inet_aton(g), "big") for g in sys.argv[5].split(",")]
seqs = {}
frames = []
for i in range(count):
    g, channel = i % len(groups), (i // len(groups)) % 2
    seqs[g, channel] = seq = seqs.get((g, channel), 0) + 1
    body = struct.pack("<I", i) * 40
    payload = struct.pack("<HHI", len(body), channel, seq) + body
    frames.append(encode_datagram(i + 1, groups[g], 46200, i, payload))
size = len(frames[0])
blob = memoryview(b"".join(frames))
"""
    + emit_bench.CONNECT
    + r"""
start = time.perf_counter()
sent = 0
while sent < count:
    due = min(count, int((time.perf_counter() - start) * rate) + 1)
    if due > sent:
        sock.sendall(blob[sent * size : due * size])
        sent = due
    else:
        time.sleep(0.0005)
"""
    + emit_bench.AWAIT_LAST_ACK
)


def config(arbitration: str) -> EmitFeed:
    """``bench.emit``'s feed with ``arbitration``."""
    return attrs.evolve(emit_bench.config(), arbitration=arbitration)  # type: ignore[arg-type]


async def one_run(arbitration: str, copies: int, count: int, rate: float) -> tuple[float, float]:
    """(CPU s per datagram received, CPU s per datagram sent) of one run."""
    feed = EmitFeedRuntime(config(arbitration), keys=())
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    expected_out = count * (copies if arbitration == "none" else 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(feed.run)
        assert feed.listen_port is not None
        argv = [sys.executable, "-c", CLIENT, str(feed.listen_port), str(count), str(rate)]
        for _ in range(copies):
            session = os.urandom(16).hex()
            command = [*argv, session, ",".join(GROUPS)]
            nursery.start_soon(functools.partial(trio.run_process, command, env=env))
        while feed.stats.connections_accepted < 1:  # the first welcome: writing starts
            await trio.sleep(0.0005)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        with trio.fail_after(count / rate * 4 + 30):
            while feed.stats.datagrams_out < expected_out:
                await trio.sleep(0.002)
                feed.stats.sync()
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - wall0
        with trio.fail_after(30):
            while feed.stats.connections_accepted < copies or feed.sessions.active:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    if wall > count / rate * 1.5:
        print(f"  (note: {arbitration} x{copies} fell behind: {wall:.1f}s for {count / rate:.1f}s)")
    return cpu / (count * copies), cpu / expected_out


def offer_cost(rounds: int) -> str:
    """The C arbiter's CPU per offer (bench/arbitration_offer.c), or why not measured."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return "no C compiler: the arbiter's own cost not measured"
    source = Path(__file__).with_name("arbitration_offer.c")
    with tempfile.TemporaryDirectory() as scratch:
        binary = Path(scratch) / "offer"
        build = [compiler, "-O2", "-std=c11", "-Wall", "-Wextra", "-pthread", "-o", str(binary)]
        subprocess.run([*build, str(source)], check=True, timeout=120)
        lines = [
            subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
            for _ in range(rounds)
        ]
    figures = sorted(float(line.split()[0]) for line in lines)
    runs = ", ".join(f"{f:.1f}" for f in figures)
    return (
        f"C arbiter alone (lock, clock read, arb_offer; two copies, half duplicates): "
        f"{statistics.median(figures):.1f} ns per offer, median of runs {runs}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate", type=float, default=50_000.0, help="datagrams/s per copy")
    parser.add_argument("--count", type=int, help="datagrams per copy and run")
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    count = args.count or (50_000 if args.quick else 150_000)
    cases = [("none", 1), ("deribit", 1), ("none", 2), ("deribit", 2)]
    results: dict[tuple[str, int], list[tuple[float, float]]] = {case: [] for case in cases}
    print(
        f"emit data path {fastpath.describe()}: {count:,} Deribit datagrams per copy at "
        f"{args.rate:,.0f}/s per copy, {rounds} round(s), cases alternated"
    )
    for _ in range(rounds):
        for arbitration, copies in cases:
            results[arbitration, copies].append(
                trio.run(one_run, arbitration, copies, count, args.rate)
            )
    print(f"{'arbitration':<12} {'copies':>6} {'CPU us/received':>16} {'CPU us/sent':>12}")
    medians = {}
    for (arbitration, copies), runs in results.items():
        per_in = statistics.median(r[0] for r in runs) * 1e6
        per_out = statistics.median(r[1] for r in runs) * 1e6
        medians[arbitration, copies] = (per_in, per_out)
        runs_text = ", ".join(f"{r[0] * 1e6:.2f}" for r in runs)
        print(f"{arbitration:<12} {copies:>6} {per_in:>16.2f} {per_out:>12.2f}   runs: {runs_text}")
    one = medians["deribit", 1][0] / medians["none", 1][0]
    two = medians["deribit", 2][0] / medians["none", 2][0]
    print(f"deribit / none, CPU per datagram received: one copy {one:.3f}, two copies {two:.3f}")
    print(
        "deribit with two copies per datagram sent against none with one copy: "
        f"{medians['deribit', 2][1] / medians['none', 1][1]:.3f}"
    )
    print(offer_cost(rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
