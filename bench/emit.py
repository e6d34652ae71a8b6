"""Emit rate of one feed from one TCP connection on loopback (`python -m bench.emit`).

The emit feed runs in this process, the capture side in a child process (so its CPU is not
counted here): it connects, says HELLO and writes pre-encoded DATA frames of 160-byte payloads
as fast as TCP takes them. The feed sends each datagram as multicast to a test group out of
127.0.0.1 with loop off (nobody receives; the send path is the same as on a real interface up
to the driver). A run is timed from the welcome ACK to the last datagram sent; the rate is the
median of the runs, and the CPU per datagram is this process's CPU time over the same span.
``--no-gate`` runs the pumps without the feed's emit gate (relayd/emit/observer.py), to
compare the gate's cost per datagram (run both alternately).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from ipaddress import IPv4Network
from pathlib import Path

import trio

from relayd.config import EmitFeed, Endpoint
from relayd.emit import EmitFeedRuntime

PAYLOAD_SIZE = 160
GROUP = "239.255.77.1"
UDP_PORT = 46100

# Capture stand-in script parts: connect to ``port`` and say HELLO with ``session`` (then
# ``next_event()`` reads what the emit side sends); wait for the ACK of ``count``, close.
CONNECT = r"""
sock = socket.create_connection(("127.0.0.1", port))
decoder = Decoder(FROM_EMIT)
events = []
def next_event():
    while not events:
        events.extend(decoder.feed(sock.recv(65536)))
    return events.pop(0)
assert isinstance(next_event(), Challenge)
sock.sendall(encode_hello("bench", session))
assert isinstance(next_event(), Ack)
"""
AWAIT_LAST_ACK = r"""
while True:
    event = next_event()
    if isinstance(event, Ack) and event.seq == count:
        break
sock.close()
"""

# The capture side: encodes COUNT frames first, then connects and writes them in 64 KiB writes.
CLIENT = (
    r"""
import socket, sys
from relayd.wire import FROM_EMIT, Ack, Challenge, Decoder, encode_datagram, encode_hello

port, count, session = int(sys.argv[1]), int(sys.argv[2]), bytes.fromhex(sys.argv[3])
group = int.from_bytes(socket.inet_aton(sys.argv[4]), "big")
payload = bytes(range(160))
blob = b"".join(encode_datagram(s, group, 46100, s, payload) for s in range(1, count + 1))
"""
    + CONNECT
    + r"""
view = memoryview(blob)
for start in range(0, len(view), 65536):
    sock.sendall(view[start:start + 65536])
"""
    + AWAIT_LAST_ACK
)


def config() -> EmitFeed:
    return EmitFeed(
        name="bench",
        listen=Endpoint("127.0.0.1", 0),
        interface="127.0.0.1",
        loop=False,
        ttl=1,
        allowed_sources=(IPv4Network("127.0.0.0/8"),),
        allowed_groups=(IPv4Network("239.255.0.0/16"),),
        send_buffer=4 * 1024 * 1024,
        idle_timeout=30.0,
    )


async def one_run(feed: EmitFeedRuntime, count: int) -> tuple[float, float]:
    """(datagrams/s, CPU seconds per datagram) of one connection sending ``count``."""
    assert feed.listen_port is not None
    before = feed.stats.datagrams_out
    accepted = feed.stats.connections_accepted
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    argv = [
        sys.executable,
        "-c",
        CLIENT,
        str(feed.listen_port),
        str(count),
        os.urandom(16).hex(),
        GROUP,
    ]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            lambda task_status: trio.run_process(argv, env=env, task_status=task_status)
        )
        while feed.stats.connections_accepted == accepted:  # welcomed: the client writes now
            await trio.sleep(0.0005)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        while feed.stats.datagrams_out - before < count:
            await trio.sleep(0.002)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        with trio.fail_after(30):
            await process.wait()
    return count / wall, cpu / count


async def bench(count: int, runs: int, gate: bool = True) -> None:
    feed = EmitFeedRuntime(config(), keys=())
    async with trio.open_nursery() as nursery:
        await nursery.start(feed.run)
        if not gate:  # pumps started from now on get no gate (and no role check)
            streams = feed._streams
            assert streams is not None
            streams.role = None
        results = [await one_run(feed, count) for _ in range(runs)]
        nursery.cancel_scope.cancel()
    rates = [rate for rate, _ in results]
    cpus = [cpu for _, cpu in results]
    errors = sum(feed.stats.send_errors.values())
    print(
        f"emit: {count} datagrams of {PAYLOAD_SIZE} B from one TCP connection, {runs} runs, "
        f"gate {'on' if gate else 'off'}"
    )
    print("  runs (datagrams/s): " + ", ".join(f"{r:,.0f}" for r in rates))
    print(f"  median: {statistics.median(rates):,.0f} datagrams/s")
    print(
        f"  CPU per datagram (emit process): {statistics.median(cpus) * 1e6:.2f} us"
        f"  -> {1 / statistics.median(cpus):,.0f} datagrams/s per core"
    )
    print(f"  ACK samples: {feed.stats.latency.count}, send errors: {errors}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer datagrams")
    parser.add_argument("--count", type=int, help="datagrams per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-gate", action="store_true", help="pumps without the emit gate")
    args = parser.parse_args()
    count = args.count or (100_000 if args.quick else 500_000)
    trio.run(bench, count, args.runs, not args.no_gate)


if __name__ == "__main__":
    main()
