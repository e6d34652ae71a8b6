"""Capture rate of one feed on loopback (`python -m bench.capture [--quick]`).

The capture feed runs in this process and joins 4 test groups on 127.0.0.1. A child process
sends multicast to them at a fixed rate (payloads of 153 bytes, the Deribit median, round
robin); another child is the emit side: it answers the handshake, reads the stream, checks
that the sequence numbers are complete, ACKs every read and samples the capture-to-socket
latency from the DATA header's capture time. Neither child's CPU counts here.

Per rate: datagrams sent, captured, streamed; kernel drops on the capture sockets; replay
drops; this process's CPU per datagram; and the latency from the capture stamp to the sink's
read (p50/p99). The zero-loss rate is the highest rate with no kernel drop and a complete
stream.

``--upstream-check on`` runs the feed with ``upstream_check = "deribit"``; ``alternate`` runs
every point off, then on, ``--rounds`` times in the same sitting, and prints the medians and the
ratio of CPU per datagram. With either (or ``--deribit``) the payloads are Deribit frame-v1
packets: 32 channels over the 4 groups, each numbered 1, 2, 3, ... so the check does its whole
work per datagram (a channel lookup, an in-order sequence).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import time
from ipaddress import IPv4Address

import trio

from relayd.capture import CaptureFeedRuntime
from relayd.config import CaptureFeed, Endpoint, GroupPort

GROUPS = [f"239.255.78.{i}" for i in range(1, 5)]
PAYLOAD = 153

SENDER = r"""
import socket, struct, sys, time
rate, duration, port = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
deribit = sys.argv[4] == "1"
groups = sys.argv[5:]
header = struct.Struct("<HHI")
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
payload = bytes(range(153))
addresses = [(g, port) for g in groups]
total = int(rate * duration)
start = time.perf_counter()
sent = 0
while sent < total:
    due = int((time.perf_counter() - start) * rate) + 1
    while sent < min(due, total):
        if deribit:  # channel sent % 32 on group sent % 4, numbered 1, 2, 3, ...
            payload = bytearray(payload)
            header.pack_into(payload, 0, 145, sent & 31, (sent >> 5) + 1)
        try:
            sock.sendto(payload, addresses[sent & 3])
        except BlockingIOError:
            continue
        sent += 1
    if sent < due:
        continue
    pause = (sent / rate) - (time.perf_counter() - start)
    if pause > 0.0002:
        time.sleep(pause)
print(sent, time.perf_counter() - start, flush=True)
"""

SINK = r"""
import os, socket, struct, sys, time
from relayd.wire import EmitConnection, Hello, encode_ack
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
proto = EmitConnection("bench", [], os.urandom(16))
conn.sendall(proto.challenge())
buf = b""
while proto.hello is None:
    buf = conn.recv(65536)
    proto.receive(buf)
conn.sendall(encode_ack(0))
seq_at = struct.Struct("!QQ")
pending = b""
expected = 1
bad = 0
latencies = []
count = int(sys.argv[1])
while expected <= count:
    data = conn.recv(1 << 20)
    if not data:
        break
    now = time.time_ns()
    data = pending + data
    off = 0
    last = None
    size = len(data)
    while size - off >= 3:
        end = off + 2 + ((data[off] << 8) | data[off + 1])
        if end > size:
            break
        if data[off + 2] == 1:
            seq, ts = seq_at.unpack_from(data, off + 10)
            if seq != expected:
                bad += 1
            expected = seq + 1
            last = ts
        off = end
    pending = data[off:]
    if last is not None:
        latencies.append(now - last)
        conn.sendall(encode_ack(expected - 1))
latencies.sort()
def pct(p):
    return latencies[min(len(latencies) - 1, int(p * len(latencies)))] / 1e3 if latencies else 0
print(expected - 1, bad, pct(0.5), pct(0.99), flush=True)
conn.close()
"""


def _python(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _one(
    rate: int, duration: float, udp_port: int, upstream: bool = False, deribit: bool = False
) -> dict[str, float]:
    total = int(rate * duration)
    sink = _python(SINK, str(total))
    assert sink.stdout is not None
    tcp_port = int(sink.stdout.readline())
    feed = CaptureFeedRuntime(
        CaptureFeed(
            name="bench",
            interface="127.0.0.1",
            groups=tuple(GroupPort(IPv4Address(g), udp_port) for g in GROUPS),
            targets=(Endpoint("127.0.0.1", tcp_port),),
            receive_buffer=4 * 1024 * 1024,
            upstream_check="deribit" if upstream else "none",
        )
    )
    result: dict[str, float] = {"rate": rate, "upstream_check": int(upstream)}
    async with trio.open_nursery() as nursery:
        await nursery.start(feed.run)
        with trio.fail_after(10):
            while not feed.connected:
                await trio.sleep(0.01)
        cpu0 = _cpu()
        sender = _python(
            SENDER, str(rate), str(duration), str(udp_port), str(int(deribit)), *GROUPS
        )
        while sender.poll() is None:
            await trio.sleep(0.05)
        assert sender.stdout is not None
        sent_text, elapsed_text = sender.stdout.read().split()
        sent = int(sent_text)
        with trio.move_on_after(5):
            while feed.datagrams_in + feed.kernel_drops < sent or feed.replay.acked_seq < (
                feed.datagrams_in
            ):
                await trio.sleep(0.01)
        cpu = _cpu() - cpu0
        if feed.upstream is not None:
            totals = feed.upstream.totals()
            result.update(upstream_gaps=totals.gaps, upstream_malformed=totals.malformed)
        nursery.cancel_scope.cancel()
    out, _ = sink.communicate(timeout=10)
    streamed, bad, p50, p99 = out.split()
    result.update(
        sent=sent,
        achieved=sent / float(elapsed_text),
        captured=feed.datagrams_in,
        streamed=int(streamed),
        out_of_order=int(bad),
        kernel_drops=feed.kernel_drops,
        replay_drops=feed.replay.dropped_datagrams,
        cpu_us_per_datagram=cpu / max(feed.datagrams_in, 1) * 1e6,
        latency_p50_us=float(p50),
        latency_p99_us=float(p99),
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two short points")
    parser.add_argument("--rates", type=int, nargs="+", default=None)
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--json", action="store_true", help="one JSON object per point")
    parser.add_argument(
        "--upstream-check",
        choices=("off", "on", "alternate"),
        default="off",
        help="upstream_check = deribit on the feed; alternate: off, then on, --rounds times",
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds with alternate")
    parser.add_argument("--deribit", action="store_true", help="Deribit-shaped payloads")
    args = parser.parse_args(argv)
    if args.upstream_check == "alternate":
        return _alternate(args)
    logging.basicConfig(level=logging.ERROR)  # the sink's close at the end of a point is normal
    rates = args.rates or ([20_000, 50_000] if args.quick else [20_000, 50_000, 100_000, 150_000])
    duration = args.duration or (1.0 if args.quick else 3.0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        udp_port = probe.getsockname()[1]
    if not args.json:
        print(
            f"{'rate/s':>8} {'achieved':>9} {'captured':>9} {'streamed':>9} {'k.drops':>8} "
            f"{'cpu us/dg':>9} {'lat p50 us':>10} {'p99 us':>8}"
        )
    zero_loss = 0
    upstream = args.upstream_check == "on"
    deribit = upstream or args.deribit
    for rate in rates:
        point = trio.run(_one, rate, duration, udp_port, upstream, deribit)
        complete = (
            point["kernel_drops"] == 0
            and point["streamed"] == point["sent"] == point["captured"]
            and point["out_of_order"] == 0
        )
        if complete:
            zero_loss = max(zero_loss, int(point["achieved"]))
        if args.json:
            print(json.dumps({**point, "complete": complete}), flush=True)
        else:
            print(
                f"{rate:>8} {point['achieved']:>9.0f} {point['captured']:>9.0f} "
                f"{point['streamed']:>9.0f} {point['kernel_drops']:>8.0f} "
                f"{point['cpu_us_per_datagram']:>9.2f} {point['latency_p50_us']:>10.0f} "
                f"{point['latency_p99_us']:>8.0f}",
                flush=True,
            )
        time.sleep(0.2)
    if not args.json:
        print(f"highest complete rate (no kernel drop, nothing missing): {zero_loss}/s")
    return 0


def _alternate(args: argparse.Namespace) -> int:
    """Each rate off, then on, ``--rounds`` times; medians of CPU per datagram and latency."""
    logging.basicConfig(level=logging.ERROR)
    rates = args.rates or [50_000, 100_000]
    duration = args.duration or 3.0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        udp_port = probe.getsockname()[1]
    points: dict[tuple[int, bool], list[dict[str, float]]] = {}
    for round_ in range(args.rounds):
        for rate in rates:
            for upstream in (False, True):
                point = trio.run(_one, rate, duration, udp_port, upstream, True)
                points.setdefault((rate, upstream), []).append(point)
                if args.json:
                    print(json.dumps({**point, "round": round_}), flush=True)
                time.sleep(0.2)

    def median(values: list[float]) -> float:
        ordered = sorted(values)
        middle = len(ordered) // 2
        return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2

    print(
        f"{'rate/s':>8} {'check':>6} {'cpu us/dg':>9} {'lat p50 us':>10} {'p99 us':>8} "
        f"{'k.drops':>8} {'gaps':>5}  cpu us/dg per round"
    )
    for rate in rates:
        cpu = {}
        for upstream in (False, True):
            got = points[rate, upstream]
            cpu[upstream] = median([p["cpu_us_per_datagram"] for p in got])
            print(
                f"{rate:>8} {'on' if upstream else 'off':>6} {cpu[upstream]:>9.3f} "
                f"{median([p['latency_p50_us'] for p in got]):>10.0f} "
                f"{median([p['latency_p99_us'] for p in got]):>8.0f} "
                f"{sum(p['kernel_drops'] for p in got):>8.0f} "
                f"{sum(p.get('upstream_gaps', 0) for p in got):>5.0f}  "
                + " ".join(f"{p['cpu_us_per_datagram']:.3f}" for p in got)
            )
        print(f"{rate:>8} on/off CPU per datagram: {cpu[True] / cpu[False]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
