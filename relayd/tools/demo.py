"""``relayd demo``: the whole relay on loopback, in one process, with no root and no setup.

A player sends Deribit-shaped multicast (the bundled sample capture when it is there, else
synthetic traffic) from 127.0.0.2; a capture feed joins the groups on 127.0.0.1 and streams
them over TCP to an emit feed on 127.0.0.1, which re-emits them as multicast (loop on, TTL 1);
a receiver counts what the emit feed sent and shows live rates, end-to-end latency and loss.

On one host the re-emitted copies go to the very groups and ports the capture feed joined, so
every join here is source-specific (``IP_ADD_SOURCE_MEMBERSHIP``): the capture feed takes only
datagrams sent from the player's address, the receiver only those sent from the emit feed's,
and nothing is relayed twice. Both addresses are picked at random in 127.0.0.0/8 for each run
(all of it is loopback on Linux), and so is the first port, so two demos running at once do
not see each other's traffic. The groups are remapped into 239.255.77.0/24 (organisation-local
scope, ports 16100-16999), so the demo cannot collide with a real feed.

Two latencies, because they measure different things. The relay's own (capture feed receive to
emit feed send) comes from the emit feed's latency histogram, the figure relayd exports as
``relayd_capture_to_emit_latency_seconds``; it is given as the upper bound of its log2 bucket.
End to end (player send to receiver receive) also holds this demo's own Python player and
receiver, Trio tasks in the same process as the feeds, so it is several times larger: the
player keeps each datagram's send time under its group, port and payload (byte-identical at the
receiver).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import logging
import math
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import TextIO

import attrs
import trio

from relayd.capture import CaptureFeedRuntime
from relayd.config import CaptureFeed, EmitFeed, Endpoint, GroupPort
from relayd.emit import EmitFeedRuntime
from relayd.metrics import sample_name
from relayd.netif import (
    ANCBUFSIZE,
    MAX_DATAGRAM,
    GroupReceiver,
    open_group_receivers,
    open_multicast_sender,
    parse_ancillary,
)
from relayd.tools import samples
from relayd.tools.pcapng import CapturedDatagram, PcapngError, iter_datagrams
from relayd.tools.player import synth_deribit

__all__ = ["DEMO_NETWORK", "Remap", "main"]

log = logging.getLogger("relayd.tools.demo")

LOOPBACK = IPv4Address("127.0.0.1")
DEMO_NETWORK = IPv4Network("239.255.77.0/24")
DEMO_PORTS = range(16100, 17000, 8)  # first port of a run; a capture rarely has 8 ports
FEED = "demo"
LEGEND = """\
columns: sent/s, relayed/s  datagrams per second in the last second (relayed: seen by the receiver)
         relayed/sent      totals since the start
         pending           sent, not seen by the receiver yet: in flight now, lost only if still
                           missing at the end (the summary counts those)
         relay p50/p99     capture feed receive -> emit feed send, in µs: relayd's own latency,
                           from the emit feed's histogram (log2 buckets, so "<=" a bound)
         e2e p50/p99       player send -> receiver, in ms: adds this demo's Python player and
                           receiver, scheduled with the feeds in one process"""
HEADER = (
    f"{'time':>6}  {'sent/s':>7}  {'relayed/s':>9}  {'relayed/sent':>17}  {'pending':>7}"
    f"  {'relay p50/p99 µs':>16}  {'e2e p50/p99 ms':>15}"
)
LATENCY_FAMILY = "relayd_capture_to_emit_latency_seconds"
_REPORT_EVERY = 1.0
_RESERVOIR = 100_000
_DRAIN_GRACE = 1.0  # after the last send, wait this long for stragglers
_PENDING_MAX_AGE_NS = 5_000_000_000


def _random_source(rng: random.Random, second_octet: int) -> IPv4Address:
    return IPv4Address(f"127.{second_octet}.{rng.randrange(256)}.{rng.randrange(1, 255)}")


@attrs.define
class Remap:
    """Maps captured group:port pairs into the demo range, one-to-one, in first-seen order."""

    port_base: int = DEMO_PORTS[0]
    ports: dict[int, int] = attrs.field(factory=dict)
    groups: dict[IPv4Address, IPv4Address] = attrs.field(factory=dict)

    def __call__(self, group: IPv4Address, port: int) -> tuple[IPv4Address, int]:
        new_port = self.ports.get(port)
        if new_port is None:
            new_port = self.ports[port] = self.port_base + len(self.ports)
        new_group = self.groups.get(group)
        if new_group is None:
            if len(self.groups) >= DEMO_NETWORK.num_addresses - 2:
                raise ValueError("too many groups for the demo range")
            new_group = self.groups[group] = DEMO_NETWORK[len(self.groups) + 1]
        return new_group, new_port


def find_sample() -> Path | None:
    """The Deribit sample capture next to the project, if this is a source checkout."""
    folder = samples.deribit_dir()
    return None if folder is None else folder / samples.DERIBIT_SAMPLE


def load_traffic(
    pcap: Path | None, rate: int | None, port_base: int = DEMO_PORTS[0]
) -> tuple[list[CapturedDatagram], str, Remap]:
    """One pass of traffic, remapped into the demo range, and a description of it."""
    remap = Remap(port_base)
    if pcap is not None:
        source = list(iter_datagrams(pcap))
        if not source:
            raise PcapngError(f"{pcap} holds no multicast UDP datagrams")
        what = f"{pcap} ({len(source)} datagrams)"
    else:
        source = list(synth_deribit(4000, rate=float(rate or 63), start_ns=0))
        what = (
            "synthetic Deribit-shaped traffic (the Deribit sample was not found at"
            " ../shared/testdata/deribit/ next to this checkout; --pcap replays a capture)"
        )
    out = []
    for index, datagram in enumerate(source):
        group, port = remap(datagram.group, datagram.port)
        ts = datagram.ts_ns if rate is None else index * 1_000_000_000 // rate
        out.append(CapturedDatagram(ts, group, port, datagram.payload))
    base = out[0].ts_ns
    out = [d._replace(ts_ns=d.ts_ns - base) for d in out]
    if rate is not None:
        what += f" at {rate} datagrams/s"
    return out, what, remap


def endless(traffic: Sequence[CapturedDatagram], speed: float) -> Iterator[tuple[float, int]]:
    """``(due time in seconds from the start, index)`` for the traffic repeated forever."""
    if len(traffic) > 1:
        step = traffic[-1].ts_ns + (traffic[-1].ts_ns - traffic[0].ts_ns) // (len(traffic) - 1)
    else:
        step = 1_000_000
    step = max(step, 1)
    for loop in itertools.count():
        offset = loop * step
        for index, datagram in enumerate(traffic):
            yield (offset + datagram.ts_ns) / 1e9 / speed, index


@attrs.define
class Stats:
    sent: int = 0
    received: int = 0
    unknown: int = 0  # received but never sent (would mean corruption)
    duplicates: int = 0
    latency_max_ns: int = 0
    window: list[int] = attrs.field(factory=list)
    reservoir: list[int] = attrs.field(factory=list)
    seen: int = 0
    rng: random.Random = attrs.field(factory=lambda: random.Random(7))

    def observe(self, ns: int) -> None:
        self.window.append(ns)
        self.latency_max_ns = max(self.latency_max_ns, ns)
        self.seen += 1
        if len(self.reservoir) < _RESERVOIR:
            self.reservoir.append(ns)
        else:
            slot = self.rng.randrange(self.seen)
            if slot < _RESERVOIR:
                self.reservoir[slot] = ns


def percentile(values: Sequence[int], fraction: float) -> float:
    """Nearest-rank percentile of sorted ``values`` in ms (NaN when empty)."""
    if not values:
        return math.nan
    rank = min(len(values) - 1, max(0, math.ceil(fraction * len(values)) - 1))
    return values[rank] / 1e6


def _fmt_ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


async def _until(predicate: Callable[[], bool], interval: float = 0.005) -> None:
    """Poll ``predicate`` (state of other components, which offer no events)."""
    while True:
        if predicate():
            return
        await trio.sleep(interval)


class Relay:
    """The two feeds of the demo: every use of the feed classes is here."""

    def __init__(self, emit_source: IPv4Address, player_source: IPv4Address) -> None:
        self.player_source = player_source
        self.emit = EmitFeedRuntime(
            EmitFeed(
                name=FEED,
                listen=Endpoint(str(LOOPBACK), 0),
                interface=str(emit_source),
                ttl=1,
                loop=True,
                allowed_sources=(IPv4Network("127.0.0.0/8"),),
                allowed_groups=(DEMO_NETWORK,),
            )
        )
        self.capture: CaptureFeedRuntime | None = None

    async def start(self, nursery: trio.Nursery, pairs: Sequence[tuple[IPv4Address, int]]) -> int:
        """Start both feeds and wait until the capture feed streams; the emit feed's port."""
        emit = self.emit
        await nursery.start(emit.run)
        assert emit.listen_port is not None
        capture = self.capture = CaptureFeedRuntime(
            CaptureFeed(
                name=FEED,
                interface=str(LOOPBACK),
                groups=tuple(GroupPort(g, p) for g, p in pairs),
                targets=(Endpoint(str(LOOPBACK), emit.listen_port),),
                receive_buffer=8 * 1024 * 1024,
                replay_max_bytes=32 * 1024 * 1024,
                sources=(self.player_source,),
            )
        )
        await nursery.start(capture.run)
        with trio.fail_after(5):
            await _until(lambda: capture.connected)
        return emit.listen_port

    def latency_buckets(self) -> list[tuple[float, int]]:
        """The emit feed's capture-to-emit histogram: (upper bound s, cumulative count)."""
        out = []
        for sample in self.emit.samples():
            if sample_name(sample) != LATENCY_FAMILY + "_bucket":
                continue
            bound = dict(sample.labels)["le"]
            out.append((math.inf if bound == "+Inf" else float(bound), int(sample.value)))
        return sorted(out)

    def summary(self) -> str:
        capture = self.capture
        if capture is None:
            return ""
        health = capture.health().detail
        return (
            f"  capture feed: {capture.datagrams_in} datagrams in, kernel drops "
            f"{health.get('kernel_drops')}, replay drops {health.get('replay_dropped_datagrams')},"
            f" acked {health.get('acked_seq')}"
        )


def bucket_quantile(
    buckets: Sequence[tuple[float, int]], fraction: float, base: Sequence[tuple[float, int]] = ()
) -> float:
    """The upper bound (s) of the bucket holding the ``fraction`` quantile of cumulative
    ``buckets`` minus an earlier reading ``base``; NaN when empty."""
    before = dict(base)
    counts = [(bound, count - before.get(bound, 0)) for bound, count in buckets]
    total = counts[-1][1] if counts else 0
    if total <= 0:
        return math.nan
    for bound, cumulative in counts:
        if cumulative >= fraction * total:
            return bound
    return math.inf


def _fmt_us(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return ">33s" if math.isinf(seconds) else f"<={seconds * 1e6:.0f}"


class Demo:
    def __init__(
        self,
        traffic: list[CapturedDatagram],
        speed: float,
        duration: float | None,
        out: TextIO,
        rng: random.Random,
    ) -> None:
        self.player_source = _random_source(rng, 2)
        self.emit_source = _random_source(rng, 3)
        self.traffic = traffic
        self.speed = speed
        self.duration = duration
        self.out = out
        self.stats = Stats()
        # (group, port, payload) -> send times not yet matched, oldest first
        self.pending: dict[tuple[int, int, bytes], collections.deque[int]] = {}
        self.keys = [(int(d.group), d.port, d.payload) for d in traffic]
        self.pairs = sorted({(d.group, d.port) for d in traffic})
        self.relay = Relay(self.emit_source, self.player_source)
        self.first_relayed_at: float | None = None  # seconds after the player started
        self.started_ns = time.time_ns()
        self.sending_done = False
        self._stop_sending = trio.CancelScope()

    async def run(self) -> int:
        pairs = self.pairs
        receivers = open_group_receivers(
            pairs, LOOPBACK, 8 * 1024 * 1024, sources=(self.emit_source,)
        )
        player = open_multicast_sender(LOOPBACK, 1, True, 4 * 1024 * 1024)
        try:
            player.bind((str(self.player_source), 0))
            async with trio.open_nursery() as nursery:
                port = await self.relay.start(nursery, pairs)
                for receiver in receivers:
                    nursery.start_soon(self._receive, receiver)
                print(
                    f"relayd demo: player {self.player_source} -> capture feed (joins on "
                    f"127.0.0.1 for that source) -> TCP 127.0.0.1:{port} -> emit "
                    f"feed -> multicast from {self.emit_source} to {len(pairs)} groups in "
                    f"{DEMO_NETWORK} -> receiver. Ctrl-C stops.\n{LEGEND}\n{HEADER}",
                    file=self.out,
                    flush=True,
                )
                nursery.start_soon(self._report_loop)
                nursery.start_soon(self._signals, nursery.cancel_scope)
                await self._send(player)
                self.sending_done = True
                with trio.move_on_after(_DRAIN_GRACE):
                    await _until(lambda: self.stats.received >= self.stats.sent)
                nursery.cancel_scope.cancel()
        finally:
            player.close()
            for receiver in receivers:
                receiver.close()
        self._summary()
        return 0

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                self.sending_done = True
                self._stop_sending.cancel()
                return

    async def _send(self, sock: socket.socket) -> None:
        traffic = self.traffic
        keys = self.keys
        pending = self.pending
        stats = self.stats
        addresses = {(d.group, d.port): (str(d.group), d.port) for d in traffic}
        dests = [addresses[d.group, d.port] for d in traffic]
        time_ns = time.time_ns
        with self._stop_sending:
            if self.duration is not None:
                self._stop_sending.deadline = trio.current_time() + self.duration
            start = trio.current_time()
            self.started_ns = time_ns()
            sent_since_checkpoint = 0
            for due, index in endless(traffic, self.speed):
                when = start + due
                now = trio.current_time()
                if when > now:
                    await trio.sleep_until(when)
                    sent_since_checkpoint = 0
                elif sent_since_checkpoint >= 256:
                    await trio.lowlevel.checkpoint()
                    sent_since_checkpoint = 0
                key = keys[index]
                queue = pending.get(key)
                if queue is None:
                    queue = pending[key] = collections.deque()
                while True:
                    stamp = time_ns()
                    try:
                        sock.sendto(traffic[index].payload, dests[index])
                        break
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(sock)
                queue.append(stamp)
                stats.sent += 1
                sent_since_checkpoint += 1

    async def _receive(self, receiver: GroupReceiver) -> None:
        sock = receiver.sock
        port = receiver.port
        recvmsg = sock.recvmsg
        pending = self.pending
        stats = self.stats
        time_ns = time.time_ns
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    payload, ancdata, _flags, _addr = recvmsg(MAX_DATAGRAM, ANCBUFSIZE)
                except (BlockingIOError, InterruptedError):
                    break
                now = time_ns()
                group, _drops = parse_ancillary(ancdata)
                queue = pending.get((group, port, payload))
                if queue:
                    if not stats.received:
                        self.first_relayed_at = (now - self.started_ns) / 1e9
                    stats.received += 1
                    stats.observe(now - queue.popleft())
                elif queue is None:
                    stats.unknown += 1
                else:
                    stats.duplicates += 1

    def _expire(self) -> None:
        """Forget send times older than a few seconds (lost datagrams) to bound memory."""
        limit = time.time_ns() - _PENDING_MAX_AGE_NS
        for queue in self.pending.values():
            while queue and queue[0] < limit:
                queue.popleft()

    async def _report_loop(self) -> None:
        started = trio.current_time()
        last = (started, 0, 0)
        relay_before = self.relay.latency_buckets()
        while True:
            await trio.sleep(_REPORT_EVERY)
            now = trio.current_time()
            stats = self.stats
            window = sorted(stats.window)
            stats.window.clear()
            relay_now = self.relay.latency_buckets()
            then, sent_before, received_before = last
            elapsed = max(now - then, 1e-9)
            relay = "/".join(
                _fmt_us(bucket_quantile(relay_now, q, relay_before)) for q in (0.5, 0.99)
            )
            e2e = "/".join(_fmt_ms(percentile(window, q)) for q in (0.5, 0.99))
            print(
                f"{now - started:5.1f}s  {(stats.sent - sent_before) / elapsed:7.0f}"
                f"  {(stats.received - received_before) / elapsed:9.0f}"
                f"  {f'{stats.received}/{stats.sent}':>17}  {stats.sent - stats.received:7d}"
                f"  {relay:>16}  {e2e:>15}",
                file=self.out,
                flush=True,
            )
            last = (now, stats.sent, stats.received)
            relay_before = relay_now
            self._expire()

    def _summary(self) -> None:
        stats = self.stats
        values = sorted(stats.reservoir)
        lost = stats.sent - stats.received
        share = lost / stats.sent * 100 if stats.sent else 0.0
        relay = self.relay.latency_buckets()
        first = "-" if self.first_relayed_at is None else f"{self.first_relayed_at * 1e3:.1f} ms"
        lines = [
            "summary:",
            f"  sent {stats.sent} datagrams, relayed {stats.received}, lost {lost} ({share:.3f} %),"
            f" duplicates {stats.duplicates}, unknown {stats.unknown}",
            f"  first datagram relayed {first} after the player started",
            f"  relay latency µs (capture feed receive -> emit feed send, relayd's histogram):"
            f" p50 {_fmt_us(bucket_quantile(relay, 0.5))}"
            f"  p99 {_fmt_us(bucket_quantile(relay, 0.99))}"
            f"  p99.9 {_fmt_us(bucket_quantile(relay, 0.999))}",
            f"  end-to-end latency ms (Python player -> Python receiver, both in this process):"
            f" p50 {_fmt_ms(percentile(values, 0.5))}"
            f"  p99 {_fmt_ms(percentile(values, 0.99))}"
            f"  p99.9 {_fmt_ms(percentile(values, 0.999))}"
            f"  max {_fmt_ms(stats.latency_max_ns / 1e6 if values else math.nan)}",
            "  the gap between the two is the demo's own player and receiver, not the relay;"
            " docs/PERFORMANCE.md measures the relay with a C sender and receiver",
        ]
        relay_facts = self.relay.summary()
        if relay_facts:
            lines.append(relay_facts)
        print("\n".join(lines), file=self.out, flush=True)


def _describe_groups(remap: Remap) -> str:
    pairs = [f"{old}->{new}" for old, new in itertools.islice(remap.groups.items(), 3)]
    more = "" if len(remap.groups) <= 3 else f", ... ({len(remap.groups)} groups)"
    ports = ", ".join(f"{old}->{new}" for old, new in remap.ports.items())
    return f"groups {', '.join(pairs)}{more}; ports {ports}"


def main(args: argparse.Namespace) -> int:
    """Run the demo; 0 at the end of ``--duration`` or on Ctrl-C."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    pcap_arg: str | None = args.pcap
    pcap = Path(pcap_arg) if pcap_arg else find_sample()
    speed = float(getattr(args, "speed", 1.0) or 1.0)
    rate: int | None = getattr(args, "rate", None)
    duration: float | None = getattr(args, "duration", None)
    rng = random.Random()
    try:
        traffic, what, remap = load_traffic(pcap, rate, rng.choice(DEMO_PORTS))
    except (OSError, PcapngError) as exc:
        print(f"relayd demo: {exc}", file=sys.stderr)
        return 2
    print(f"relayd demo: replaying {what} at {speed:g}x", flush=True)
    print(f"relayd demo: mapped into the demo range: {_describe_groups(remap)}", flush=True)
    demo = Demo(traffic, speed, duration, sys.stdout, rng)
    try:
        return trio.run(demo.run)
    except OSError as exc:
        print(f"relayd demo: {exc}", file=sys.stderr)
        return 1
