"""``relayd send``: send test multicast to the groups of a configuration, to check an install
end to end (``relayd send`` on the data-centre host, ``relayd listen`` at the customer).

What: a pcapng capture (``FILE.pcapng``, at its own pacing times ``--speed``) or synthetic
Deribit-shaped traffic (``--rate`` datagrams/s). Where: ``--group`` when given; else the groups
of one feed of ``--config`` (a capture feed's ``groups``, or addresses inside an emit feed's
``allowed_groups`` and ``allowed_ports``, which the emit side lets through), a capture's
datagrams mapped one-to-one onto them in first-seen order unless already among them; a capture
without either goes to the groups it was captured on, synthetic traffic to the default
configuration's.

Exit status: 0 when everything was sent (also after Ctrl-C or SIGTERM), 1 on a send error, 2 for
bad arguments or an unusable configuration.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import socket
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from ipaddress import IPv4Address
from pathlib import Path

import trio

from relayd.config import (
    DEFAULT_CONFIG_PATH,
    CaptureFeed,
    ConfigError,
    EmitFeed,
    load_config,
)
from relayd.netif import InterfaceError, open_multicast_sender, resolve_interface
from relayd.tools.pcapng import CapturedDatagram, PcapngError, iter_datagrams
from relayd.tools.player import ReplayStats, replay, synth_deribit

__all__ = ["SendError", "feed_groups", "main", "map_groups", "pick_feed"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

GroupKey = tuple[IPv4Address, int]
#: addresses taken from each ``allowed_groups`` network of an emit feed
EMIT_GROUPS_PER_NETWORK = 8


class SendError(Exception):
    """A command-line value or configuration that cannot be used."""


def pick_feed(
    capture: Sequence[CaptureFeed], emit: Sequence[EmitFeed], name: str | None
) -> CaptureFeed | EmitFeed:
    """The feed named ``name``, or the only (else the first capture) feed."""
    feeds: list[CaptureFeed | EmitFeed] = [*capture, *emit]
    if name is not None:
        for feed in feeds:
            if feed.name == name:
                return feed
        known = ", ".join(sorted({f.name for f in feeds})) or "none"
        raise SendError(f"no feed named {name!r} (feeds: {known})")
    if not feeds:
        raise SendError("the configuration has no feeds")
    return feeds[0]


def feed_groups(feed: CaptureFeed | EmitFeed) -> tuple[GroupKey, ...]:
    """The groups a capture feed joins, or groups an emit feed allows (a few per network, on
    the lowest allowed port)."""
    if isinstance(feed, CaptureFeed):
        return tuple((g.group, g.port) for g in feed.groups)
    port = min(r.lo for r in feed.allowed_ports)
    out: list[GroupKey] = []
    for network in feed.allowed_groups:
        hosts = list(itertools.islice(network.hosts(), EMIT_GROUPS_PER_NETWORK))
        out.extend((address, port) for address in hosts or [network.network_address])
    return tuple(out)


def map_groups(
    traffic: Iterable[CapturedDatagram], targets: Sequence[GroupKey]
) -> Iterator[CapturedDatagram]:
    """``traffic`` sent to ``targets``: a datagram whose group:port is a target keeps it, the
    others are mapped one-to-one in first-seen order (wrapping when there are fewer targets)."""
    wanted = set(targets)
    mapping: dict[GroupKey, GroupKey] = {}
    for datagram in traffic:
        key = (datagram.group, datagram.port)
        if key in wanted:
            yield datagram
            continue
        target = mapping.get(key)
        if target is None:
            target = mapping[key] = targets[len(mapping) % len(targets)]
        yield datagram._replace(group=target[0], port=target[1])


def _targets(args: argparse.Namespace) -> tuple[tuple[GroupKey, ...], str, str | None]:
    """(groups, where they come from, the feed's interface when they come from a config)."""
    if args.group:
        return tuple(dict.fromkeys((g.group, g.port) for g in args.group)), "--group", None
    if args.config is None and args.capture is not None:
        return (), "as captured", None
    path: Path = args.config or DEFAULT_CONFIG_PATH
    if args.config is None and not path.is_file():
        raise SendError(f"no --group, no --config and no {path}: where should it go?")
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise SendError(f"{path}: {exc.errors[0]}") from None
    feed = pick_feed(config.capture, config.emit, args.feed)
    kind = "capture" if isinstance(feed, CaptureFeed) else "emit"
    groups = feed_groups(feed)
    return groups, f"{kind} feed {feed.name!r} of {path}", feed.interface


def _traffic(
    args: argparse.Namespace, groups: Sequence[GroupKey]
) -> tuple[Iterable[CapturedDatagram], str]:
    if args.capture is not None:
        datagrams = list(iter_datagrams(args.capture))
        if not datagrams:
            raise SendError(f"{args.capture} holds no multicast UDP datagrams")
        what = f"{args.capture} ({len(datagrams)} datagrams, speed {args.speed:g}x)"
        return (map_groups(datagrams, groups) if groups else datagrams), what
    synthetic = synth_deribit(args.count, groups=groups, rate=args.rate)
    amount = f"{args.count} " if args.count else ""
    return synthetic, f"{amount}synthetic Deribit-shaped datagrams at {args.rate:g}/s"


def _limit(traffic: Iterable[CapturedDatagram], count: int | None) -> Iterable[CapturedDatagram]:
    return traffic if count is None else itertools.islice(traffic, count)


async def _send(
    sock: socket.socket,
    traffic: Iterable[CapturedDatagram],
    args: argparse.Namespace,
    stats: ReplayStats,
) -> bool:
    """Replay until done, ``--duration`` or SIGINT/SIGTERM; True when a signal stopped it."""
    interrupted = False

    async def signals(scope: trio.CancelScope) -> None:
        nonlocal interrupted
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
            async for _ in received:
                interrupted = True
                scope.cancel()
                return

    with trio.CancelScope() as scope:
        if args.duration is not None:
            scope.deadline = trio.current_time() + args.duration
        async with trio.open_nursery() as nursery:
            if threading.current_thread() is threading.main_thread():
                nursery.start_soon(signals, scope)
            await replay(sock, traffic, speed=args.speed, skip=frozenset(args.skip), stats=stats)
            nursery.cancel_scope.cancel()
    return interrupted


def main(args: argparse.Namespace) -> int:
    """``relayd send [FILE.pcapng] [--config PATH [--feed NAME] | --group G:P ...]``."""
    try:
        groups, origin, feed_interface = _targets(args)
        interface_text = args.interface or feed_interface or "0.0.0.0"
        interface = resolve_interface(interface_text)
        traffic, what = _traffic(args, groups)
        sock = open_multicast_sender(interface, args.ttl, not args.no_loop, 4 * 1024 * 1024)
    except (SendError, InterfaceError, PcapngError, OSError) as exc:
        print(f"relayd send: {exc}", file=sys.stderr)
        return EXIT_USAGE
    shown = ", ".join(f"{g}:{p}" for g, p in groups[:4]) + (
        f", ... ({len(groups)} groups)" if len(groups) > 4 else ""
    )
    print(
        f"relayd send: {what} to {shown or 'its own groups'} ({origin}) from {interface}"
        f" ({interface_text}), TTL {args.ttl}; Ctrl-C stops",
        flush=True,
    )
    stats = ReplayStats()
    with sock:
        try:
            interrupted = trio.run(_send, sock, _limit(traffic, args.count), args, stats)
        except OSError as exc:
            print(f"relayd send: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        except KeyboardInterrupt:
            interrupted = True
    print(
        f"sent {stats.datagrams} datagrams, {stats.bytes} bytes in {stats.elapsed:.3f} s"
        f" (max late {stats.max_late * 1e3:.2f} ms, {stats.waits} waits)"
        + (", stopped by a signal" if interrupted else ""),
        flush=True,
    )
    return EXIT_OK
