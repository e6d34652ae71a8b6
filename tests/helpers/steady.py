"""A multicast sender thread at a steady rate whose payloads carry a per-group sequence, and
what a receiver checks against it: every datagram once, in order."""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from ipaddress import IPv4Address

from relayd.netif import open_multicast_sender
from tests.helpers.emit_standin import Peer
from tests.helpers.loopback import LOOPBACK

#: datagrams per second the sender keeps up (in bursts every 2 ms)
RATE = 4000


def fresh_groups(count: int) -> list[tuple[str, int]]:
    """``count`` loopback groups on one port that another test is unlikely to use now."""
    port = 20000 + (os.getpid() * 13 + random.randrange(5000)) % 20000
    third = random.randrange(100, 200)
    return [(f"239.77.{third}.{i + 1}", port) for i in range(count)]


class SteadySender:
    """A thread sending to each of ``groups`` in turn at ``RATE``; each payload carries its
    group's own sequence (8 bytes, from 1). ``add``/``drop`` change the groups it sends to."""

    def __init__(
        self,
        groups: list[tuple[str, int]],
        interface: IPv4Address = LOOPBACK,
        rate: int = RATE,
    ) -> None:
        self.groups = list(groups)
        self.sent: dict[tuple[str, int], int] = dict.fromkeys(groups, 0)
        self.rate = rate
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = open_multicast_sender(interface, 8, True, 4 * 1024 * 1024)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SteadySender:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()

    def add(self, group: tuple[str, int]) -> None:
        with self._lock:
            self.groups.append(group)
            self.sent.setdefault(group, 0)

    def drop(self, group: tuple[str, int]) -> None:
        with self._lock:
            self.groups.remove(group)

    def total(self) -> int:
        with self._lock:
            return sum(self.sent.values())

    def _run(self) -> None:
        burst = max(1, self.rate // 500)
        next_at = time.monotonic()
        i = 0
        while not self._stop.is_set():
            with self._lock:
                for _ in range(burst):
                    group = self.groups[i % len(self.groups)]
                    i += 1
                    seq = self.sent[group] + 1
                    payload = seq.to_bytes(8, "big") + b"m" * 92
                    while True:
                        try:
                            self._sock.sendto(payload, group)
                            break
                        except BlockingIOError:
                            time.sleep(0.0005)
                    self.sent[group] = seq
            next_at += 0.002
            time.sleep(max(0.0, next_at - time.monotonic()))


def received(peers: list[Peer]) -> dict[tuple[str, int], list[int]]:
    """The payload sequences each group's datagrams carried, in arrival order, over peers."""
    out: dict[tuple[str, int], list[int]] = {}
    for peer in peers:
        for d in peer.datagrams:
            group = (str(IPv4Address(d.group)), d.port)
            out.setdefault(group, []).append(int.from_bytes(d.payload[:8], "big"))
    return out


def lost_and_duplicated(
    got: dict[tuple[str, int], list[int]], sent: dict[tuple[str, int], int]
) -> tuple[int, int, bool]:
    """Datagrams sent and never received, received more than once, and whether each group's
    arrived in the order sent."""
    lost = duplicated = 0
    ordered = True
    for group, count in sent.items():
        seqs = got.get(group, [])
        lost += len(set(range(1, count + 1)) - set(seqs))
        duplicated += len(seqs) - len(set(seqs))
        ordered = ordered and seqs == sorted(seqs)
    return lost, duplicated, ordered


def main() -> None:
    """``python -m tests.helpers.steady --interface ADDR --groups G:P,... --rate R --seconds S``:
    send from ADDR, then print ``{"sent": [[group, port, count], ...]}``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--interface", required=True)
    parser.add_argument("--groups", required=True)
    parser.add_argument("--rate", type=int, default=RATE)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    groups = [(g, int(p)) for g, _, p in (x.rpartition(":") for x in args.groups.split(","))]
    with SteadySender(groups, IPv4Address(args.interface), args.rate) as sender:
        print("sending", flush=True)
        time.sleep(args.seconds)
    print(json.dumps({"sent": [[g, p, n] for (g, p), n in sender.sent.items()]}), flush=True)


if __name__ == "__main__":
    main()
