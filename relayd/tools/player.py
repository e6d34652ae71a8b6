"""Replay captured datagrams as real multicast, and synthesise Deribit-like traffic.

``replay`` sends a sequence of ``CapturedDatagram`` through a multicast sender socket at the
capture's own pacing (times a speed factor): it sleeps until the next datagram is due, then
sends every datagram that is due with non-blocking ``sendto`` and no await per datagram.

``synth_deribit`` generates traffic shaped like the Deribit sample (8-byte frame header:
payload length u16, channel u16, sequence u32, little-endian; mostly 153-byte datagrams with
bursts), so the demo needs no capture file.

Run as ``python -m relayd.tools.player`` it replays a pcapng file (or synthetic traffic) from the
command line; the namespace tests use it as their data-centre feed.
"""

from __future__ import annotations

import math
import random
import socket
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from ipaddress import IPv4Address

import attrs
import trio

from relayd.tools.pcapng import CapturedDatagram

__all__ = [
    "DERIBIT_HEADER",
    "SYNTH_GROUPS",
    "ReplayStats",
    "replay",
    "synth_deribit",
]

#: The Deribit frame header: payload length after the header (u16), channel (u16), sequence
#: (u32), little-endian.
DERIBIT_HEADER = struct.Struct("<HHI")

#: Default groups of synthetic traffic: organisation-local scope, away from real feeds.
SYNTH_GROUPS: tuple[tuple[IPv4Address, int], ...] = tuple(
    (IPv4Address(f"239.255.73.{i}"), 26100) for i in range(8)
)

# payload sizes of the Deribit sample and how often they occur (percent, rounded)
_SIZES = (153, 52, 75, 220, 327, 20, 24, 428, 345)
_SIZE_WEIGHTS = (65.6, 9.2, 7.1, 7.0, 4.4, 1.2, 1.2, 0.8, 0.7)
_TAIL_WEIGHT = 3.0  # the rest: uniform between 446 and 1458 bytes
_CHECKPOINT_EVERY = 256  # as-fast-as-possible replay yields to trio this often


@attrs.define
class ReplayStats:
    """What ``replay`` did."""

    datagrams: int = 0
    bytes: int = 0
    elapsed: float = 0.0
    #: the latest any datagram went out after its due time, seconds
    max_late: float = 0.0
    #: times the socket was full (EAGAIN) and the player waited for it
    waits: int = 0


async def _send(sock: socket.socket, payload: bytes, address: tuple[str, int]) -> int:
    """Send one datagram, waiting for writability only when the socket is full."""
    waits = 0
    while True:
        try:
            sock.sendto(payload, address)
        except BlockingIOError:
            waits += 1
            await trio.lowlevel.wait_writable(sock)
        else:
            return waits


async def replay(
    sock: socket.socket,
    datagrams: Iterable[CapturedDatagram],
    *,
    speed: float = 1.0,
    skip: frozenset[int] = frozenset(),
    stats: ReplayStats | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> ReplayStats:
    """Send ``datagrams`` to their group:port through ``sock`` at their capture pacing.

    ``speed`` multiplies the pace (100 = a hundred times faster); 0 or ``math.inf`` sends as
    fast as the socket takes them. ``skip`` holds indexes (0-based, in input order) that are
    not sent, to make a gap on purpose. The input may be a lazy (even endless) iterator.
    ``stats`` (a fresh one by default) is kept current, so a caller that cancels the replay
    still knows what went out.
    """
    if speed < 0 or math.isnan(speed):
        raise ValueError(f"speed must be positive, 0 or inf, not {speed}")
    flat_out = speed == 0 or math.isinf(speed)
    scale = 0.0 if flat_out else 1e-9 / speed
    addresses: dict[tuple[IPv4Address, int], tuple[str, int]] = {}
    stats = ReplayStats() if stats is None else stats
    task_status.started()
    start = trio.current_time()
    now = start
    first_ts: int | None = None
    since_checkpoint = 0
    try:
        for index, datagram in enumerate(datagrams):
            if first_ts is None:
                first_ts = datagram.ts_ns
            if flat_out:
                since_checkpoint += 1
                if since_checkpoint >= _CHECKPOINT_EVERY:
                    since_checkpoint = 0
                    await trio.lowlevel.checkpoint()
            else:
                due = start + (datagram.ts_ns - first_ts) * scale
                if due > now:
                    await trio.sleep_until(due)
                    now = trio.current_time()
                    stats.max_late = max(stats.max_late, now - due)
            if index in skip:
                continue
            key = (datagram.group, datagram.port)
            address = addresses.get(key)
            if address is None:
                address = addresses[key] = (str(datagram.group), datagram.port)
            try:
                sock.sendto(datagram.payload, address)
            except BlockingIOError:
                stats.waits += await _send(sock, datagram.payload, address)
            stats.datagrams += 1
            stats.bytes += len(datagram.payload)
    finally:
        stats.elapsed = trio.current_time() - start
    return stats


def _payload_size(rng: random.Random) -> int:
    if rng.random() * 100.0 < _TAIL_WEIGHT:
        return rng.randint(446, 1458)
    return rng.choices(_SIZES, _SIZE_WEIGHTS)[0]


def synth_deribit(
    count: int | None = None,
    *,
    groups: Sequence[tuple[IPv4Address, int]] = SYNTH_GROUPS,
    rate: float = 63.0,
    burst: float = 8.0,
    seed: int = 0,
    start_ns: int | None = None,
) -> Iterator[CapturedDatagram]:
    """Deribit-like datagrams: ``count`` of them, or endless when ``count`` is None.

    Each group carries one channel (channel id = index + 1) whose sequence starts at 1 and
    counts up by one. Datagrams come in bursts (mean ``burst`` datagrams, 20 us apart) whose
    starts form a Poisson process, for ``rate`` datagrams/s on average. Sizes follow the
    Deribit sample (mostly 153 bytes, 20 to 1458). Deterministic for a given ``seed``.
    """
    if not groups:
        raise ValueError("synth_deribit needs at least one group")
    if rate <= 0 or burst < 1:
        raise ValueError("rate must be > 0 and burst >= 1")
    rng = random.Random(seed)
    sequences = [0] * len(groups)
    weights = [1.0 / (i + 1) for i in range(len(groups))]  # a few busy groups, many quiet
    ts = time.time_ns() if start_ns is None else start_ns
    burst_rate = rate / burst
    produced = 0
    filler = rng.randbytes(1458)
    while count is None or produced < count:
        ts += int(rng.expovariate(burst_rate) * 1e9)
        size_of_burst = 1 + int(rng.expovariate(1.0 / (burst - 1))) if burst > 1 else 1
        for position in range(size_of_burst):
            if count is not None and produced >= count:
                return
            index = rng.choices(range(len(groups)), weights)[0]
            sequences[index] += 1
            size = _payload_size(rng)
            head = DERIBIT_HEADER.pack(size - DERIBIT_HEADER.size, index + 1, sequences[index])
            offset = rng.randrange(0, 1458 - size + DERIBIT_HEADER.size + 1)
            body = filler[offset : offset + size - DERIBIT_HEADER.size]
            group, port = groups[index]
            produced += 1
            yield CapturedDatagram(ts + position * 20_000, group, port, head + body)
        ts += size_of_burst * 20_000
