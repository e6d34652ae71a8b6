"""One relay hop two ways: a Trio task against a data-path thread with blocking sockets
(``python -m bench.hop [--rates 10000,50000] [--seconds S]``, root).

The hop is the capture side's data path reduced to its I/O: receive the generator's multicast
on the capture namespace's veth, drain the socket until EAGAIN into one buffer, write the batch
to a TCP connection (to a sink in the same namespace) with one ``send``. Two ways:

* ``trio``: ``await wait_readable`` then drain non-blocking, as relayd's feeds do;
* ``thread``: a thread blocks in ``recv_into`` for the first datagram, drains the rest with
  ``MSG_DONTWAIT``, sends, and loops; started and stopped from Trio with ``trio.to_thread``.

Each way reports its CPU per datagram (utime + stime of the hop process) and the hop latency
(CLOCK_REALTIME after the ``send`` returned minus the generator's stamp in the datagram), so
the issue's question "is Trio's scheduling what limits a hop?" is answered by measurement.

Internally: ``python -m bench.hop --serve trio|thread --iface ADDR --count N``.
"""

from __future__ import annotations

import argparse
import resource
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence

import trio

from bench.relay.harness import GROUPS, PORT, REPO, build
from bench.topology import Topology, cannot_run, stop

BUFFER = 256 * 1024
STAMP = struct.Struct("<QQ")  # sequence, send time (ns) at the start of each datagram


def _receiver(iface: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
    sock.bind(("0.0.0.0", PORT))
    for group in GROUPS:
        mreq = socket.inet_aton(group) + socket.inet_aton(iface)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    return sock


def _sink() -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """A TCP connection on loopback whose far end another process reads and discards (so its
    CPU is not counted as the hop's)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    reader = subprocess.Popen(
        [sys.executable, "-c", _DISCARD, str(port)], stdout=subprocess.DEVNULL
    )
    listener.settimeout(10)
    out, _ = listener.accept()
    listener.close()
    out.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return out, reader


_DISCARD = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
while s.recv(1 << 20):
    pass
"""


class _Hop:
    def __init__(self, count: int) -> None:
        self.count = count
        self.seen = 0
        self.latencies: list[int] = []
        self.buffer = bytearray(BUFFER)
        self.view = memoryview(self.buffer)

    def drained(self, out: socket.socket, offsets: list[int], end: int) -> None:
        """Send one batch, then note the latency of each of its datagrams."""
        out.sendall(self.view[:end])
        now = time.time_ns()
        for offset in offsets:
            _seq, stamp = STAMP.unpack_from(self.buffer, offset)
            self.latencies.append(now - stamp)
        self.seen += len(offsets)


def _drain(hop: _Hop, sock: socket.socket, first: int) -> tuple[list[int], int]:
    offsets = [0] if first else []
    end = first
    while end < BUFFER - 2048:
        try:
            size = sock.recv_into(hop.view[end:], 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        offsets.append(end)
        end += size
    return offsets, end


def serve_trio(hop: _Hop, sock: socket.socket, out: socket.socket) -> None:
    async def run() -> None:
        sock.setblocking(False)
        while hop.seen < hop.count:
            with trio.move_on_after(3):
                await trio.lowlevel.wait_readable(sock)
            offsets, end = _drain(hop, sock, 0)
            if not offsets:
                if hop.seen:
                    return  # the generator is done and nothing came for 3 s
                continue
            hop.drained(out, offsets, end)
            await trio.lowlevel.checkpoint()

    trio.run(run)


def serve_thread(hop: _Hop, sock: socket.socket, out: socket.socket) -> None:
    def data_path() -> None:
        sock.setblocking(True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 3, 0))
        while hop.seen < hop.count:
            try:
                first = sock.recv_into(hop.view, 0)
            except BlockingIOError:
                if hop.seen:
                    return
                continue
            offsets, end = _drain(hop, sock, first)
            hop.drained(out, offsets, end)

    async def run() -> None:
        await trio.to_thread.run_sync(data_path)

    trio.run(run)


def serve(way: str, iface: str, count: int) -> str:
    sock = _receiver(iface)
    out, reader = _sink()
    hop = _Hop(count)
    print("ready", flush=True)
    before = resource.getrusage(resource.RUSAGE_SELF)
    (serve_trio if way == "trio" else serve_thread)(hop, sock, out)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1e6
    out.close()
    reader.wait(timeout=10)
    lat = sorted(hop.latencies)
    if not lat:
        return f"{way}: nothing received"
    q = [lat[min(len(lat) - 1, int(f * len(lat)))] / 1e3 for f in (0.5, 0.99, 0.999)]
    return (
        f"{way:6s} {hop.seen:>8,} datagrams  CPU {cpu / max(hop.seen, 1):5.1f} µs/dgram"
        f"  hop latency p50 {q[0]:6.1f}  p99 {q[1]:7.1f}  p999 {q[2]:7.1f} µs"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hop", description=__doc__)
    parser.add_argument("--rates", default="10000,50000")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--serve", choices=("trio", "thread"), help=argparse.SUPPRESS)
    parser.add_argument("--iface", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        print(serve(args.serve, args.iface, args.count), flush=True)
        return 0
    if cannot_run("bench.hop"):
        return 0
    gen, _ = build()
    with Topology(-10) as topo:
        link = topo.links["g0"]
        for rate in (int(r) for r in args.rates.split(",") if r):
            count = int(rate * args.seconds)
            for way in ("trio", "thread") * 3:
                server = topo.popen(
                    "cap",
                    [sys.executable, "-m", "bench.hop", "--serve", way, "--iface", link.b_ip,
                     "--count", str(count)],
                    cwd=REPO,
                )  # fmt: skip
                assert server.stdout is not None
                server.stdout.readline()  # "ready"
                topo.run(
                    "gen",
                    [str(gen), "--iface", link.a_ip, "--groups", ",".join(GROUPS), "--port",
                     str(PORT), "--rate", str(rate), "--count", str(count), "--run-id", "9"],
                    timeout=args.seconds * 3 + 10,
                )  # fmt: skip
                try:
                    out, err = server.communicate(timeout=30)
                except Exception:
                    stop(server)
                    raise
                line = out.strip().splitlines()[-1] if out.strip() else err.strip()[-200:]
                print(f"{rate:>7,}/s  {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
