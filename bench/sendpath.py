"""CPU per datagram of a multicast sender, several ways (``python -m bench.sendpath
[--count N]``, root).

Sends 160-byte datagrams round robin to 4 groups over the benchmark's direct veth to the C
receiver (``bench/recv.c``), each way twice over, alternating, and prints the sender's CPU time
per datagram. From Python: ``sendto`` against ``sendmmsg`` (ctypes). From C
(``bench/sendpath.c``, what the emit side's C data plane can do): ``sendto`` on one socket,
``send`` on a socket connected to each group (the kernel keeps the route instead of looking it
up per datagram), and ``sendmmsg`` in batches of 8. It answers which way the emit side should
send on the benchmark's veth: the kernel's per-packet work, which on a veth includes the
receiving side's stack, dominates; the connected sockets save a little of it.

Internally the same module is run as the sender inside the generator namespace:
``python -m bench.sendpath --send sendto|sendmmsg --count N --iface ADDR``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import resource
import socket
import struct
import sys
import time
from collections.abc import Sequence

from bench.relay.harness import GROUPS, PORT, REPO, build, compile_c
from bench.topology import Topology, cannot_run, stop

SIZE = 160
BATCH = 64
_SO_SNDBUFFORCE = 32


class _IoVec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class _MsgHdr(ctypes.Structure):
    _fields_ = (
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    )


class _MMsgHdr(ctypes.Structure):
    _fields_ = (("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint))


def _payloads(count: int) -> bytearray:
    data = bytearray(SIZE * count)
    for i in range(count):
        struct.pack_into("<QQIHH", data, i * SIZE, i + 1, time.time_ns(), 7, i % 4, SIZE)
    return data


def send(way: str, count: int, iface: str) -> str:
    """Send ``count`` datagrams one way; return the sender's CPU per datagram as a line."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(iface))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
    sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, 8 << 20)
    dests = [(group, PORT) for group in GROUPS]
    data = _payloads(count)
    view = memoryview(data)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if way == "sendto":
        sendto = sock.sendto
        for i in range(count):
            sendto(view[i * SIZE : (i + 1) * SIZE], dests[i & 3])
    else:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        names = [
            (ctypes.c_char * 16).from_buffer_copy(
                struct.pack("=H", socket.AF_INET)
                + struct.pack("!H", port)
                + socket.inet_aton(group)
                + bytes(8)
            )
            for group, port in dests
        ]
        name_addrs = [ctypes.addressof(name) for name in names]
        iovs = (_IoVec * BATCH)()
        msgs = (_MMsgHdr * BATCH)()
        for j in range(BATCH):
            msgs[j].msg_hdr.msg_iov = ctypes.addressof(iovs[j])
            msgs[j].msg_hdr.msg_iovlen = 1
            msgs[j].msg_hdr.msg_namelen = 16
        base = ctypes.addressof((ctypes.c_char * len(data)).from_buffer(data))
        fd = sock.fileno()
        entry = ctypes.sizeof(_MMsgHdr)
        i = 0
        while i < count:
            n = min(BATCH, count - i)
            for j in range(n):
                iovs[j].iov_base = base + (i + j) * SIZE
                iovs[j].iov_len = SIZE
                msgs[j].msg_hdr.msg_name = name_addrs[(i + j) & 3]
            done = 0
            while done < n:
                sent = libc.sendmmsg(fd, ctypes.c_void_p(ctypes.addressof(msgs) + done * entry),
                                     n - done, 0)  # fmt: skip
                if sent < 0:
                    raise OSError(ctypes.get_errno(), "sendmmsg")
                done += sent
            i += n
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    user = (after.ru_utime - before.ru_utime) / count * 1e6
    system = (after.ru_stime - before.ru_stime) / count * 1e6
    sock.close()
    return (
        f"Python {way:9s} {count / elapsed / 1000:6.0f}k/s  CPU {user + system:5.2f} µs/dgram"
        f" (user {user:.2f}, system {system:.2f})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sendpath", description=__doc__)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--send", choices=("sendto", "sendmmsg"), help=argparse.SUPPRESS)
    parser.add_argument("--iface", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.send:
        print(send(args.send, args.count, args.iface), flush=True)
        return 0
    if cannot_run("bench.sendpath"):
        return 0
    _, recv = build()
    sender_c = compile_c("sendpath")
    ways = ("sendto", "sendmmsg", "c:sendto", "c:connected", "c:sendmmsg")
    with Topology(-10) as topo:
        link = topo.links["g1"]
        for way in ways * int(os.environ.get("SENDPATH_ROUNDS", "2")):
            receiver = topo.popen(
                "recv",
                [str(recv), "--iface", link.b_ip, "--groups", ",".join(GROUPS), "--port",
                 str(PORT), "--count", str(args.count), "--run-id", "7", "--idle-ms", "1000"],
            )  # fmt: skip
            assert receiver.stdout is not None
            receiver.stdout.readline()  # "ready"
            if way.startswith("c:"):
                argv = [str(sender_c), way[2:], str(args.count), link.a_ip, str(PORT), *GROUPS]
            else:
                argv = [sys.executable, "-m", "bench.sendpath", "--send", way, "--count",
                        str(args.count), "--iface", link.a_ip]  # fmt: skip
            sender = topo.run("gen", argv, timeout=300, cwd=REPO)
            try:
                out, _ = receiver.communicate(timeout=60)
            except Exception:
                stop(receiver)
                raise
            got = out.split()
            received = got[got.index("received") + 1] if "received" in got else "?"
            print(f"{sender.stdout.strip() or sender.stderr.strip()}  received {received}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
