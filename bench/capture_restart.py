"""A capture feed restarted mid-stream, as a reload that adds a group did (issue 13 item 7),
or (``--live``) changed in place as a reload now does.

On loopback, no root, in one process: a multicast sender at ``--rate`` datagrams/s into a
capture feed streaming to a real emit feed (``loop`` off, so nothing it emits comes back).
After ``--before`` seconds the capture runtime is stopped (SHUTTING_DOWN, as a reload does)
and a new one with one more group starts at once. Prints what was sent, what the emit side
emitted (the loss is the difference, kernel drops apart), and what each side counted of the
restart: every figure the version has, "-" for those it lacks.

    .venv/bin/python -m bench.capture_restart [--rate 20000] [--before 3] [--after 3] [--runs 5]
        [--live]

Run it in an older tree (``git archive``) to compare versions: it uses only APIs both have.
"""

from __future__ import annotations

import argparse
import time
from ipaddress import IPv4Address, IPv4Network

import trio

from relayd.capture import CaptureFeedRuntime
from relayd.config import CaptureFeed, EmitFeed, Endpoint, GroupPort
from relayd.emit import EmitFeedRuntime
from relayd.netif import open_multicast_sender

FEED = "bench"
SOURCE = IPv4Address("127.0.0.2")
GROUPS = [(f"239.255.78.{i + 1}", 23457) for i in range(4)]


def figure(samples: object, name: str, **labels: str) -> str:
    for sample in samples:  # type: ignore[attr-defined]
        if sample.name == name and all((k, v) in sample.labels for k, v in labels.items()):
            return str(int(sample.value))
    return "-"


async def send(sender: object, rate: int, seconds: float) -> int:
    payload = bytes(160)
    start = time.monotonic()
    sent = 0
    while (now := time.monotonic()) < start + seconds:
        due = int((now - start) * rate)
        while sent < due:
            group, port = GROUPS[sent % len(GROUPS)]
            try:
                sender.sendto(payload, (group, port))  # type: ignore[attr-defined]
            except BlockingIOError:
                break
            sent += 1
        await trio.sleep(0.002)
    return sent


async def one_run(name: str, rate: int, before: float, after: float, live: bool) -> str:
    emit = EmitFeedRuntime(
        EmitFeed(
            name=name,
            listen=Endpoint("127.0.0.1", 0),
            interface="127.0.0.1",
            loop=False,
            allowed_sources=(IPv4Network("127.0.0.0/8"),),
            allowed_groups=(IPv4Network("239.255.0.0/16"),),
        )
    )
    # Sent from 127.0.0.2 and joined source-specific: what the emit feed sends out on the
    # loopback interface (from 127.0.0.1) is not captured again.
    sender = open_multicast_sender(IPv4Address("127.0.0.1"), 1, True, 4 << 20)
    sender.bind((str(SOURCE), 0))
    async with trio.open_nursery() as nursery:
        await nursery.start(emit.run)

        def capture(groups: list[tuple[str, int]]) -> CaptureFeedRuntime:
            return CaptureFeedRuntime(
                CaptureFeed(
                    name=name,
                    interface="127.0.0.1",
                    groups=tuple(GroupPort(IPv4Address(g), p) for g, p in groups),
                    targets=(Endpoint("127.0.0.1", emit.listen_port or 0),),
                    sources=(SOURCE,),
                )
            )

        first = capture(GROUPS)
        counts: list[int] = []

        async def sending() -> None:
            counts.append(await send(sender, rate, before + after))

        more = [*GROUPS, ("239.255.78.99", 23457)]
        if live:  # what a reload does now: the running feed takes the new configuration
            await nursery.start(first.run)
            while not first.connected:
                await trio.sleep(0.01)
            nursery.start_soon(sending)
            await trio.sleep(before)
            update = first.prepare_update(capture(more).config)
            assert update is not None
            update.apply()
            second = first
        else:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as inner:
                    await inner.start(first.run)
                    while not first.connected:
                        await trio.sleep(0.01)
                    nursery.start_soon(sending)
                    await trio.sleep(before)
                    first.set_close_reason(6, "reload")
                    scope.cancel()
            second = capture(more)
            try:  # the supervisor hands the previous runtime over (versions that take it)
                second.open(first)
            except TypeError:
                second.open()
            await nursery.start(second.run)
        while not counts:
            await trio.sleep(0.05)
        sent = counts[0]
        await trio.sleep(1.0)
        emitted = int(emit.health().datagrams or 0)
        drops = first.kernel_drops + (0 if second is first else second.kernel_drops)
        c = list(second.samples())
        e = list(emit.samples())
        line = (
            f"sent {sent}, emitted {emitted}, lost {sent - emitted} (kernel drops {drops}); "
            f"capture_session_restarts {figure(c, 'capture_session_restarts')}, "
            f"capture_session_lost_datagrams {figure(c, 'capture_session_lost_datagrams')}; "
            f"emit session_changes clean {figure(e, 'session_changes', result='clean')}, "
            f"possible_loss {figure(e, 'session_changes', result='possible_loss')}"
        )
        nursery.cancel_scope.cancel()
    sender.close()
    return line


async def main(rate: int, before: float, after: float, runs: int, live: bool) -> None:
    for run in range(runs):  # a feed name per run: the capture side's counts are per name
        print(await one_run(f"{FEED}{run}", rate, before, after, live), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=20000)
    parser.add_argument("--before", type=float, default=3.0)
    parser.add_argument("--after", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--live", action="store_true", help="change the running feed in place")
    args = parser.parse_args()
    trio.run(main, args.rate, args.before, args.after, args.runs, args.live)
