"""The far ends of a relay, as a script the tests run (also inside network namespaces).

    python run_peer.py send --connect HOST:PORT --feed NAME --groups G:P,G:P --count N
        [--rate R] [--first-seq S] [--linger SECONDS]
    python run_peer.py receive --interface ADDR --groups G:P,... [--count N] [--duration S]

``send`` plays the capture side with relayd's own wire codec: CHALLENGE, HELLO, welcome ACK,
then N DATA frames (payload: the sequence as 8 bytes, padded to 160 bytes) round-robin over
the groups at R datagrams/s, waits for the ACK of the last one, optionally lingers (sending
heartbeats) to see how relayd closes, and prints one JSON line: sent, acked, errors, closed.

``receive`` joins the groups and prints ``ready`` once joined, then one JSON line with every
datagram seen as [group, port, seq] in arrival order.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import time
from ipaddress import IPv4Address
from typing import Any

from relayd.netif import drain, open_group_receivers
from relayd.wire import (
    Ack,
    CaptureConnection,
    Challenge,
    Error,
    Event,
    encode_datagram,
    encode_heartbeat,
)

PAYLOAD_SIZE = 160


def parse_groups(text: str) -> list[tuple[IPv4Address, int]]:
    out = []
    for item in text.split(","):
        host, port = item.rsplit(":", 1)
        out.append((IPv4Address(host), int(port)))
    return out


def payload(seq: int) -> bytes:
    return seq.to_bytes(8, "big") + bytes((seq + i) & 0xFF for i in range(PAYLOAD_SIZE - 8))


class Peer:
    def __init__(self, sock: socket.socket, conn: CaptureConnection) -> None:
        self.sock = sock
        self.conn = conn
        self.acked = 0
        self.welcome: int | None = None
        self.errors: list[tuple[int, str]] = []
        self.closed = False

    def pump(self, timeout: float) -> list[Event]:
        """Read what is there (waiting at most ``timeout``); track ACKs and ERRORs."""
        if self.closed:
            return []
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return []
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            data = b""
        if not data:
            self.closed = True
            return []
        events = self.conn.receive(data)
        for event in events:
            if isinstance(event, Ack):
                if self.welcome is None:
                    self.welcome = event.seq
                self.acked = max(self.acked, event.seq)
            elif isinstance(event, Error):
                self.errors.append((event.code, event.message))
        return events


def send(args: argparse.Namespace) -> dict[str, Any]:
    host, port = args.connect.rsplit(":", 1)
    groups = parse_groups(args.groups)
    sock = socket.create_connection((host, int(port)), timeout=5)
    peer = Peer(sock, CaptureConnection(args.feed, os.urandom(16)))
    deadline = time.monotonic() + 5
    while peer.welcome is None and not peer.closed and time.monotonic() < deadline:
        for event in peer.pump(0.5):
            if isinstance(event, Challenge):
                sock.sendall(peer.conn.hello(event))
    result: dict[str, Any] = {"sent": 0, "welcome": peer.welcome}
    if peer.welcome is not None:
        start = time.monotonic()
        last = args.first_seq + args.count - 1
        seq = args.first_seq
        batch = max(1, int(args.rate / 100))  # one write per 10 ms
        while seq <= last and not peer.closed:
            frames = []
            for s in range(seq, min(seq + batch, last + 1)):
                group, gport = groups[s % len(groups)]
                frames.append(encode_datagram(s, int(group), gport, time.time_ns(), payload(s)))
            sock.sendall(b"".join(frames))
            result["sent"] += len(frames)
            seq += len(frames)
            due = start + (seq - args.first_seq) / args.rate
            while not peer.closed and (left := due - time.monotonic()) > 0:
                peer.pump(left)
        deadline = time.monotonic() + 10
        while peer.acked < last and not peer.closed and time.monotonic() < deadline:
            peer.pump(0.2)
        result["acked"] = peer.acked
        if args.linger:
            print(json.dumps({"streamed": peer.acked}), flush=True)
            deadline = time.monotonic() + args.linger
            while not peer.closed and time.monotonic() < deadline:
                peer.pump(0.5)
                if not peer.closed:
                    try:
                        sock.sendall(encode_heartbeat(time.time_ns()))
                    except OSError:
                        peer.closed = True
    result["errors"] = peer.errors
    result["closed"] = peer.closed
    sock.close()
    return result


def receive(args: argparse.Namespace) -> dict[str, Any]:
    groups = parse_groups(args.groups)
    receivers = open_group_receivers(groups, IPv4Address(args.interface), 8 * 1024 * 1024)
    print("ready", flush=True)
    got: list[tuple[str, int, int]] = []
    drops = 0
    deadline = time.monotonic() + args.duration
    quiet_since = time.monotonic()
    while time.monotonic() < deadline and (args.count == 0 or len(got) < args.count):
        ready, _, _ = select.select([r.sock for r in receivers], [], [], 0.1)
        for receiver in receivers:
            if receiver.sock not in ready:
                continue
            for group, port, data, dropped in drain(receiver):
                got.append((str(group), port, int.from_bytes(data[:8], "big")))
                drops = max(drops, dropped or 0)
                quiet_since = time.monotonic()
        if args.quiet and got and time.monotonic() - quiet_since > args.quiet:
            break
    for receiver in receivers:
        receiver.close()
    return {"got": got, "drops": drops}


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("send")
    s.add_argument("--connect", required=True)
    s.add_argument("--feed", required=True)
    s.add_argument("--groups", required=True)
    s.add_argument("--count", type=int, default=100)
    s.add_argument("--rate", type=float, default=1000.0)
    s.add_argument("--first-seq", type=int, default=1)
    s.add_argument("--linger", type=float, default=0.0)
    r = sub.add_parser("receive")
    r.add_argument("--interface", required=True)
    r.add_argument("--groups", required=True)
    r.add_argument("--count", type=int, default=0)
    r.add_argument("--duration", type=float, default=10.0)
    r.add_argument("--quiet", type=float, default=0.0, help="stop after this long without data")
    args = parser.parse_args()
    result = send(args) if args.command == "send" else receive(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
