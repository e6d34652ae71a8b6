"""A capture feed whose first target welcomes and heartbeats but never reads (issue 13 item 6).

On loopback, no root: a multicast sender at ``--rate`` datagrams/s into one capture feed with
the default configuration (64 MiB / 30 s replay buffer, ``ack_timeout`` its default where the
version has it) and two targets: a deaf emit stand-in (CHALLENGE, welcome ACK, a HEARTBEAT
every 0.5 s, never reads) and a working one (ACKs what it receives). Prints, once a second,
the feed's health state and replay figures, then what the working target got: the datagrams
captured and never delivered there are the loss.

    .venv/bin/python -m bench.capture_stall [--rate 20000] [--seconds 30]

Run it in an older tree (``git archive``) to compare versions: it uses only APIs both have.
"""

from __future__ import annotations

import argparse
import os
import time
from ipaddress import IPv4Address

import trio

from relayd import wire
from relayd.capture import CaptureFeedRuntime
from relayd.config import CaptureFeed, Endpoint, GroupPort
from relayd.netif import open_multicast_sender

FEED = "bench"
GROUPS = [(f"239.255.77.{i + 1}", 23456) for i in range(4)]


class Target:
    """An emit stand-in; ``deaf``: never reads after the welcome, only heartbeats."""

    def __init__(self, deaf: bool) -> None:
        self.deaf = deaf
        self.hellos = 0
        self.seqs: set[int] = set()
        self.hello_at: float | None = None

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = wire.EmitConnection(FEED, (), os.urandom(16))
        welcomed = False
        try:
            await stream.send_all(conn.challenge())
            highest = 0
            while True:
                data = await stream.receive_some(1 << 16)
                if not data:
                    return
                events = conn.receive(data)
                if conn.state is wire.State.STREAMING and not welcomed:
                    welcomed = True
                    self.hellos += 1
                    self.hello_at = time.monotonic()
                    await stream.send_all(wire.encode_ack(0))
                    while self.deaf:
                        await trio.sleep(0.5)
                        await stream.send_all(wire.encode_heartbeat(time.time_ns()))
                for event in events:
                    if isinstance(event, wire.Datagram):
                        self.seqs.add(event.seq)
                        highest = max(highest, event.seq)
                if highest:
                    await stream.send_all(wire.encode_ack(highest))
        except (trio.BrokenResourceError, trio.ClosedResourceError, wire.ProtocolError):
            return
        finally:
            await stream.aclose()


async def serve(nursery: trio.Nursery, target: Target) -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = int(listeners[0].socket.getsockname()[1])
    nursery.start_soon(trio.serve_listeners, target.handle, listeners)
    return port


async def main(rate: int, seconds: float) -> None:
    deaf, good = Target(deaf=True), Target(deaf=False)
    async with trio.open_nursery() as nursery:
        ports = [await serve(nursery, deaf), await serve(nursery, good)]
        config = CaptureFeed(
            name=FEED,
            interface="127.0.0.1",
            groups=tuple(GroupPort(IPv4Address(g), p) for g, p in GROUPS),
            targets=tuple(Endpoint("127.0.0.1", p) for p in ports),
        )
        feed = CaptureFeedRuntime(config)
        await nursery.start(feed.run)
        while not feed.connected:
            await trio.sleep(0.01)
        sender = open_multicast_sender(IPv4Address("127.0.0.1"), 1, True, 4 << 20)
        payload = bytes(160)
        start = time.monotonic()
        sent = 0
        states: dict[str, int] = {}
        next_report = start + 1.0
        while (now := time.monotonic()) < start + seconds:
            due = int((now - start) * rate)
            while sent < due:
                group, port = GROUPS[sent % len(GROUPS)]
                try:
                    sender.sendto(payload, (group, port))
                except BlockingIOError:
                    break
                sent += 1
            if now >= next_report:
                next_report += 1.0
                health = feed.health()
                states[health.state] = states.get(health.state, 0) + 1
                print(
                    f"t={now - start:5.1f}s state={health.state:<11} healthy={health.healthy!s:<5}"
                    f" replay_bytes={feed.replay.total_bytes:>9} "
                    f"replay_dropped={feed.replay.dropped_datagrams:>7} "
                    f"good_target={len(good.seqs):>7}",
                    flush=True,
                )
            await trio.sleep(0.002)
        await trio.sleep(3.0)  # let the working target catch up
        captured = feed.receive.seq
        delivered = len(good.seqs)
        moved = None if good.hello_at is None else round(good.hello_at - start, 1)
        print(
            f"sent {sent}, captured {captured}, kernel drops {feed.kernel_drops}; "
            f"moved to the working target after {moved} s; delivered there {delivered}; "
            f"lost {captured - delivered}; replay dropped {feed.replay.dropped_datagrams}; "
            f"health samples {states}"
        )
        sender.close()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=20000)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    trio.run(main, args.rate, args.seconds)
