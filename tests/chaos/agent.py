"""Misbehaving peers for the chaos tests, run as a script inside a namespace.

    python agent.py storm --target HOST:PORT --rate R --duration S [--syn-from NET]
    python agent.py stall --target HOST:PORT --feed NAME --key FILE --group G:P --rate R
    python agent.py health --target HOST:PORT --idle N --slow M --duration S
    python agent.py authflood --target HOST:PORT --feed NAME --duration S
    python agent.py silent --target HOST:PORT --rate R --duration S
    python agent.py delay --listen HOST:PORT --target HOST:PORT --delay SECONDS

``storm``: R new connections per second, round robin over four kinds: connect and close,
connect and stay silent (held until the relay closes them, at most 2000 at once), connect and
send garbage (HTTP, TLS, random bytes, a header announcing a huge frame), and half-open: a raw
TCP SYN from a spoofed address on the local subnet that never answers the SYN-ACK.

``stall``: a capture peer with the right key and a tiny receive buffer that streams DATA of its
own session and never reads, so the emit side's ACKs fill its window.

``health``: idle connections and slow ("slowloris") requests against the health port.

``authflood``: HELLOs for the right feed with a wrong key, one connection after another.

``silent``: R connections a second that never say a word (a host inside ``allowed_sources``
without the key), each held for up to a second.

``delay``: a TCP proxy that holds each direction back by SECONDS (netem is not in every
kernel); SIGUSR1 resets every connection it carries, a path failure. It prints "ready" first.

Each prints one JSON line with its counts when it ends (``duration`` or SIGTERM).
"""

from __future__ import annotations

import argparse
import collections
import errno
import ipaddress
import json
import os
import queue
import random
import resource
import select
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any

from relayd.wire import (
    Ack,
    CaptureConnection,
    Challenge,
    Error,
    encode_datagram,
)

_stop: list[int] = []


def _on_term(*_: Any) -> None:
    _stop.append(1)


def _address(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


# -- storm -------------------------------------------------------------------------------------

GARBAGE = (
    b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n",
    bytes.fromhex("16030100a5010000a10303") + os.urandom(32),  # a TLS ClientHello's start
    b"\xff\xff\x01" + os.urandom(64),  # DATA announcing a 65535-byte frame
    b"\x00\x1d\x11RLYD\x01\x04prod" + os.urandom(16),  # a HELLO cut short
)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def syn_packet(src: str, dst: str, sport: int, dport: int) -> bytes:
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    seq = random.getrandbits(32)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = s + d + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, random.getrandbits(16), 0, 64,
                     socket.IPPROTO_TCP, 0, s, d)  # fmt: skip
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return ip + tcp


def storm(args: argparse.Namespace) -> dict[str, Any]:
    target = _address(args.target)
    kinds = ["close", "silent", "garbage"] + (["syn"] if args.syn_from else [])
    counts: collections.Counter[str] = collections.Counter()
    raw = None
    spoof: list[str] = []
    if args.syn_from:
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        net = ipaddress.IPv4Network(args.syn_from)
        spoof = [str(h) for h in list(net.hosts())[100:200]]
    connecting: dict[socket.socket, tuple[str, float]] = {}
    silent: collections.deque[socket.socket] = collections.deque()
    closing: dict[socket.socket, float] = {}
    start = time.monotonic()
    opened = 0
    n = 0
    while not _stop and time.monotonic() - start < args.duration:
        due = int((time.monotonic() - start) * args.rate)
        while opened < due:
            kind = kinds[n % len(kinds)]
            n += 1
            opened += 1
            counts[f"{kind}_attempts"] += 1
            if kind == "syn":
                assert raw is not None
                src = random.choice(spoof)
                packet = syn_packet(src, target[0], random.randrange(1024, 65535), target[1])
                raw.sendto(packet, (target[0], 0))
                continue
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            err = sock.connect_ex(target)
            if err not in (0, errno.EINPROGRESS):
                counts["connect_errors"] += 1
                sock.close()
                continue
            connecting[sock] = (kind, time.monotonic())
        now = time.monotonic()
        writable = list(connecting)
        if writable:
            _, ready, _ = select.select([], writable, [], 0)
        else:
            ready = []
        for sock in ready:
            kind, _ = connecting.pop(sock)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                counts["connect_errors"] += 1
                sock.close()
                continue
            counts[f"{kind}_connected"] += 1
            if kind == "close":
                sock.close()
            elif kind == "silent":
                silent.append(sock)
                while len(silent) > 2000:
                    silent.popleft().close()
            else:
                try:
                    sock.send(GARBAGE[counts["garbage_connected"] % len(GARBAGE)])
                except OSError:
                    counts["garbage_send_errors"] += 1
                closing[sock] = now + 1.0
        for sock, (_, began) in list(connecting.items()):
            if now - began > 3.0:  # never connected (listen queue full): give up
                counts["connect_timeouts"] += 1
                del connecting[sock]
                sock.close()
        for sock, when in list(closing.items()):
            if now >= when:
                del closing[sock]
                sock.close()
        # Silent connections the relay closed: count them and let them go.
        if silent:
            readable, _, _ = select.select(list(silent)[:500], [], [], 0)
            for sock in readable:
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    counts["silent_closed_by_relay"] += 1
                    silent.remove(sock)
                    sock.close()
        time.sleep(0.005)
    counts["silent_open_at_end"] = len(silent)
    for sock in [*connecting, *silent, *closing]:
        sock.close()
    return {"elapsed": round(time.monotonic() - start, 3), **counts}


# -- stall -------------------------------------------------------------------------------------


def stall(args: argparse.Namespace) -> dict[str, Any]:
    target = _address(args.target)
    group_text, port_text = args.group.rsplit(":", 1)
    group, port = int(ipaddress.IPv4Address(group_text)), int(port_text)
    key = open(args.key, "rb").read().strip()  # noqa: SIM115
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
    sock.settimeout(5)
    sock.connect(target)
    conn = CaptureConnection(args.feed, os.urandom(16), key)
    welcome = None
    while welcome is None:
        for event in conn.receive(sock.recv(4096)):
            if isinstance(event, Challenge):
                sock.sendall(conn.hello(event))
            elif isinstance(event, Ack):
                welcome = event.seq
            elif isinstance(event, Error):
                return {"refused": [event.code, event.message]}
    print(json.dumps({"streaming": True}), flush=True)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # many small chunks: many ACKs
    start = time.monotonic()
    seq = 0
    sent = 0
    result: dict[str, Any] = {"welcome": welcome}
    while not _stop and time.monotonic() - start < args.duration:
        due = int((time.monotonic() - start) * args.rate)
        frames = []
        while seq < due:
            seq += 1
            payload = seq.to_bytes(8, "big") * 4
            frames.append(encode_datagram(seq, group, port, time.time_ns(), payload))
        try:
            for frame in frames:  # one segment each, so that the relay ACKs often
                if sock.send(frame) != len(frame):
                    raise BlockingIOError
                sent += 1
        except BlockingIOError:
            result["blocked"] = True  # our own send buffer full: the relay stopped reading?
        except OSError as exc:
            result["closed_after"] = round(time.monotonic() - start, 3)
            result["error"] = errno.errorcode.get(exc.errno or 0, str(exc))
            break
        time.sleep(0.002)
    result["sent"] = sent
    sock.close()
    return result


# -- authflood --------------------------------------------------------------------------------


def authflood(args: argparse.Namespace) -> dict[str, Any]:
    """HELLOs for the right feed with a wrong key, one connection after another."""
    target = _address(args.target)
    counts: collections.Counter[str] = collections.Counter()
    start = time.monotonic()
    while not _stop and time.monotonic() - start < args.duration:
        try:
            with socket.create_connection(target, timeout=2) as sock:
                conn = CaptureConnection(args.feed, os.urandom(16), os.urandom(32))
                done = False
                while not done:
                    data = sock.recv(4096)
                    if not data:
                        counts["closed_without_error"] += 1
                        break
                    for event in conn.receive(data):
                        if isinstance(event, Challenge):
                            sock.sendall(conn.hello(event))
                        elif isinstance(event, Error):
                            counts["auth_failed" if event.code == 4 else f"error_{event.code}"] += 1
                            done = True
                        elif isinstance(event, Ack):
                            counts["accepted"] += 1  # must never happen
                            done = True
        except OSError:
            counts["connect_errors"] += 1
    return {"elapsed": round(time.monotonic() - start, 3), **counts}


# -- health ------------------------------------------------------------------------------------


def health(args: argparse.Namespace) -> dict[str, Any]:
    target = _address(args.target)
    counts: collections.Counter[str] = collections.Counter()
    idle: list[socket.socket] = []
    slow: list[socket.socket] = []

    def connect() -> socket.socket | None:
        try:
            return socket.create_connection(target, timeout=2)
        except OSError:
            counts["connect_errors"] += 1
            return None

    start = time.monotonic()
    next_drip = start
    while not _stop and time.monotonic() - start < args.duration:
        while len(idle) < args.idle and (sock := connect()):
            idle.append(sock)
            counts["idle_opened"] += 1
        while len(slow) < args.slow and (sock := connect()):
            counts["slow_opened"] += 1
            try:
                sock.send(b"GET /healthz HTTP/1.1\r\n")
            except OSError:  # shed by the server at once
                counts["slow_closed_by_server"] += 1
                sock.close()
                continue
            slow.append(sock)
        if time.monotonic() >= next_drip:
            next_drip += 1.0
            for sock in list(slow):
                try:
                    sock.send(b"X")  # one byte of a header that never ends
                except OSError:
                    counts["slow_closed_by_server"] += 1
                    slow.remove(sock)
                    sock.close()
        everyone = idle + slow
        for chunk in range(0, len(everyone), 500):
            readable, _, _ = select.select(everyone[chunk : chunk + 500], [], [], 0)
            for sock in readable:
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    which = "idle" if sock in idle else "slow"
                    counts[f"{which}_closed_by_server"] += 1
                    (idle if which == "idle" else slow).remove(sock)
                    sock.close()
        time.sleep(0.05)
    counts["open_at_end"] = len(idle) + len(slow)
    for sock in idle + slow:
        sock.close()
    return {"elapsed": round(time.monotonic() - start, 3), **counts}


# -- silent: a host inside allowed_sources, without the key, opening silent connections ----------


def silent(args: argparse.Namespace) -> dict[str, Any]:
    """Open ``rate`` connections a second that never say a word, for ``duration`` seconds;
    each is kept open (up to one second's worth), as a real flooder's would be."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard == resource.RLIM_INFINITY else min(hard, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    keep = max(100, min(int(args.rate), resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 100))
    target = _address(args.target)
    counts: collections.Counter[str] = collections.Counter()
    held: collections.deque[socket.socket] = collections.deque()
    start = time.monotonic()
    opened = 0
    while not _stop and time.monotonic() - start < args.duration:
        due = int((time.monotonic() - start) * args.rate)
        while opened < due:
            opened += 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            err = sock.connect_ex(target)
            if err not in (0, errno.EINPROGRESS):
                counts["connect_errors"] += 1
                sock.close()
                continue
            counts["attempts"] += 1
            held.append(sock)
            while len(held) > keep:
                held.popleft().close()
        time.sleep(0.002)
    for sock in held:
        sock.close()
    return {"elapsed": round(time.monotonic() - start, 3), "rate": args.rate, **counts}


# -- delay: a TCP proxy that delays each direction (for kernels without netem) ---------------


def delay(args: argparse.Namespace) -> dict[str, Any]:
    """Forward connections from ``listen`` to ``target``, each direction ``delay`` seconds
    late, until SIGTERM; SIGUSR1 cuts every connection open at the time (a path failure)."""
    listen, target = _address(args.listen), _address(args.target)
    server = socket.create_server(listen, reuse_port=False)
    counts: collections.Counter[str] = collections.Counter()
    live: list[tuple[socket.socket, socket.socket]] = []
    lock = threading.Lock()

    def reset(sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        except OSError:
            pass

    def cut(*_: Any) -> None:
        with lock:
            counts["cuts"] += 1
            counts["connections_cut"] += len(live)
            for a, b in live:
                reset(a)
                reset(b)
            live.clear()

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        late: queue.Queue[tuple[float, bytes]] = queue.Queue()

        def write() -> None:
            while True:
                due, data = late.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(data)
                except OSError:
                    return

        threading.Thread(target=write, daemon=True).start()
        while True:
            try:
                data = src.recv(262144)
            except OSError:
                data = b""
            late.put((time.monotonic() + args.delay, data))
            if not data:
                return

    def serve() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(target, timeout=5)
            except OSError:
                counts["upstream_errors"] += 1
                client.close()
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with lock:
                live.append((client, upstream))
                counts["connections"] += 1
            threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()

    signal.signal(signal.SIGUSR1, cut)
    threading.Thread(target=serve, daemon=True).start()
    print("ready", flush=True)
    while not _stop:
        time.sleep(0.05)
    server.close()
    return dict(counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("storm")
    s.add_argument("--target", required=True)
    s.add_argument("--rate", type=float, default=300)
    s.add_argument("--duration", type=float, default=10)
    s.add_argument("--syn-from", default="")
    t = sub.add_parser("stall")
    t.add_argument("--target", required=True)
    t.add_argument("--feed", required=True)
    t.add_argument("--key", required=True)
    t.add_argument("--group", required=True)
    t.add_argument("--rate", type=float, default=1000)
    t.add_argument("--rcvbuf", type=int, default=1024)
    t.add_argument("--duration", type=float, default=20)
    a = sub.add_parser("authflood")
    a.add_argument("--target", required=True)
    a.add_argument("--feed", required=True)
    a.add_argument("--duration", type=float, default=10)
    h = sub.add_parser("health")
    h.add_argument("--target", required=True)
    h.add_argument("--idle", type=int, default=200)
    h.add_argument("--slow", type=int, default=50)
    h.add_argument("--duration", type=float, default=10)
    q = sub.add_parser("silent")
    q.add_argument("--target", required=True)
    q.add_argument("--rate", type=float, default=4000)
    q.add_argument("--duration", type=float, default=10)
    d = sub.add_parser("delay")
    d.add_argument("--listen", required=True)
    d.add_argument("--target", required=True)
    d.add_argument("--delay", type=float, default=0.02)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    commands = {
        "storm": storm,
        "stall": stall,
        "health": health,
        "authflood": authflood,
        "silent": silent,
        "delay": delay,
    }
    result = commands[args.command](args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
