"""One capture feed, two sites (London and Tokyo, issue 14 item 5): is London slowed while
Tokyo is down or blocked, and how fast does Tokyo catch up?

On loopback, no root, in one process: a multicast sender thread at ``--rate`` datagrams/s
(each payload carries its group's own sequence), one capture feed with two sites, and two
emit-side stand-ins (tests/helpers/emit_standin.py) that stamp each DATA frame's arrival.
Per phase it prints London's delivery latency (arrival minus the capture timestamp, so the
stand-in's own scheduling is in it: compare phases, not absolute values) and what London and
Tokyo received. Phases: both up; Tokyo's host gone (``--outage`` s, then back: its catch-up
time); Tokyo's host connected but reading nothing.

    .venv/bin/python -m bench.capture_sites [--rate 5000] [--phase 4] [--outage 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from relayd.capture import CaptureFeedRuntime
from relayd.config import CaptureSite, Endpoint
from tests.helpers.emit_standin import Peer, feed_config, serve, stop
from tests.helpers.steady import SteadySender, fresh_groups, lost_and_duplicated, received


class Stamped(list[Any]):
    """A stand-in's list of datagrams that also keeps each one's arrival (ns, wall clock)."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived: list[int] = []

    def append(self, item: Any) -> None:
        super().append(item)
        self.arrived.append(time.time_ns())


def latencies(peer: Peer, since_ns: int, until_ns: int) -> str:
    stamped = peer.datagrams
    assert isinstance(stamped, Stamped)
    ms = [
        (arrived - d.ts_ns) / 1e6
        for d, arrived in zip(stamped, stamped.arrived, strict=True)
        if since_ns <= arrived < until_ns
    ]
    if not ms:
        return "none arrived"
    ms.sort()
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return (
        f"{len(ms)} datagrams, latency median {statistics.median(ms):.2f} ms, "
        f"p99 {p99:.2f} ms, max {ms[-1]:.2f} ms"
    )


async def two_sites(
    nursery: trio.Nursery,
    groups: Sequence[tuple[str, int]],
    london_port: int,
    tokyo_port: int,
    **overrides: object,
) -> CaptureFeedRuntime:
    """A capture feed of ``groups`` streaming to a London and a Tokyo site, once both are
    connected. ``overrides``: more settings for ``feed_config``."""
    config = attrs.evolve(
        feed_config(groups, [london_port], **overrides),
        targets=(),
        site=(
            CaptureSite(name="london", targets=(Endpoint("127.0.0.1", london_port),)),
            CaptureSite(name="tokyo", targets=(Endpoint("127.0.0.1", tokyo_port),)),
        ),
    )
    feed = CaptureFeedRuntime(config)
    await nursery.start(feed.run)
    while not (feed.sites[0].uplink.connected and feed.sites[1].uplink.connected):
        await trio.sleep(0.01)
    return feed


async def run(rate: int, phase: float, outage: float) -> None:
    groups = fresh_groups(2)
    london = Peer(datagrams=Stamped())
    tokyo = Peer(datagrams=Stamped())
    async with trio.open_nursery() as nursery:
        london_server = await serve(nursery, london)
        tokyo_server = await serve(nursery, tokyo)
        feed = await two_sites(nursery, groups, london_server.port, tokyo_server.port)
        with SteadySender(groups, rate=rate) as sender:
            t0 = time.time_ns()
            await trio.sleep(phase)
            t1 = time.time_ns()
            stop(tokyo_server)
            await trio.sleep(outage)
            t2 = time.time_ns()
            tokyo_server = await serve(nursery, tokyo, port=tokyo_server.port)
            back = time.monotonic()
            while feed.sites[1].replay.acked_seq < feed.receive.seq - rate // 10:
                await trio.sleep(0.01)
            caught_up = time.monotonic() - back
            held = feed.sites[1].replay.dropped_datagrams
            t3 = time.time_ns()
            await trio.sleep(phase)
            t4 = time.time_ns()
        total = sum(sender.sent.values())
        with trio.move_on_after(30):
            while len(london.datagrams) < total or len(tokyo.datagrams) < total:
                await trio.sleep(0.05)
        print(f"rate {rate}/s, {total} datagrams sent over two groups")
        print(f"  both up ({phase:g} s):      London {latencies(london, t0, t1)}")
        print(f"  Tokyo down ({outage:g} s):   London {latencies(london, t1, t2)}")
        print(f"  Tokyo catching up:     London {latencies(london, t2, t3)}")
        print(f"  after ({phase:g} s):        London {latencies(london, t3, t4)}")
        print(
            f"  Tokyo back: caught up within {caught_up:.2f} s "
            f"(to within 0.1 s of data), replay drops {held}"
        )
        for name, peer in (("London", london), ("Tokyo", tokyo)):
            lost, duplicated, ordered = lost_and_duplicated(received([peer]), sender.sent)
            print(f"  {name}: lost {lost}, duplicated {duplicated}, in order {ordered}")
        nursery.cancel_scope.cancel()

    # Tokyo connected but reading nothing for a whole phase.
    groups = fresh_groups(2)
    london = Peer(datagrams=Stamped())
    deaf = Peer(read=False, heartbeat=0.2)
    async with trio.open_nursery() as nursery:
        london_server = await serve(nursery, london)
        deaf_server = await serve(nursery, deaf)
        feed = await two_sites(
            nursery,
            groups,
            london_server.port,
            deaf_server.port,
            ack_timeout=3600.0,
            idle_timeout=60.0,
        )
        with SteadySender(groups, rate=rate) as sender:
            t0 = time.time_ns()
            await trio.sleep(phase)
            t1 = time.time_ns()
        total = sum(sender.sent.values())
        with trio.move_on_after(30):
            while len(london.datagrams) < total:
                await trio.sleep(0.05)
        lost, duplicated, _ = lost_and_duplicated(received([london]), sender.sent)
        print(f"  Tokyo reads nothing ({phase:g} s): London {latencies(london, t0, t1)}")
        print(
            f"    London lost {lost}, duplicated {duplicated}; Tokyo holds "
            f"{feed.sites[1].replay.unacked_datagrams} unacknowledged in its own buffer"
        )
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--phase", type=float, default=4.0)
    parser.add_argument("--outage", type=float, default=10.0)
    args = parser.parse_args()
    trio.run(run, args.rate, args.phase, args.outage)
