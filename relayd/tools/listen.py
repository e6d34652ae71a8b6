"""``relayd listen``: join multicast groups and show what arrives.

Live per-interval reports (a line rewritten in place on a terminal, plain lines otherwise, one
JSON object per line with ``--json``) and a summary at the end: per group datagrams, bytes,
sizes and rates, the kernel's drop counter, and with ``--deribit`` the gaps and duplicates of
every Deribit channel (8-byte header: payload length u16, channel u16, sequence u32, LE).

JSON lines carry an ``"event"`` key: ``"ready"`` once every group is joined, ``"report"`` per
interval, ``"summary"`` at the end. Exit status: 0 at the end of ``--duration`` or on SIGTERM,
130 on Ctrl-C, 2 for bad arguments (a group that is not multicast, an unknown interface).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import struct
import sys
import threading
import time
from collections.abc import Iterable
from ipaddress import IPv4Address
from typing import Any, TextIO

import attrs
import trio

from relayd.netif import (
    GroupReceiver,
    InterfaceError,
    drain,
    open_group_receivers,
    resolve_interface,
)

__all__ = ["ChannelStats", "GroupStats", "ListenState", "main", "parse_groups"]

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEFAULT_RECEIVE_BUFFER = 8 * 1024 * 1024
_DRAIN_BATCH = 1024
_HEADER = struct.Struct("<HHI")

GroupKey = tuple[IPv4Address, int]


class UsageError(Exception):
    """A command-line value that cannot be used."""


@attrs.define
class ChannelStats:
    """Sequence tracking of one Deribit channel on one group:port."""

    first: int
    highest: int
    datagrams: int = 1
    gaps: int = 0  # times the sequence jumped forward by more than one
    missing: int = 0  # sequence numbers jumped over
    duplicates: int = 0  # sequence at or below the highest seen (a repeat or a late one)

    def see(self, sequence: int) -> None:
        self.datagrams += 1
        highest = self.highest
        if sequence == highest + 1:
            self.highest = sequence
        elif sequence > highest:
            self.gaps += 1
            self.missing += sequence - highest - 1
            self.highest = sequence
        else:
            self.duplicates += 1


@attrs.define
class GroupStats:
    """Counters of one group:port."""

    datagrams: int = 0
    bytes: int = 0
    min_size: int = 0
    max_size: int = 0
    malformed: int = 0  # with --deribit: too short or a length field that does not match
    last_datagrams: int = 0  # totals at the previous report
    last_bytes: int = 0


@attrs.define
class ListenState:
    """Everything ``listen`` counts; fed with ``record`` (no I/O, testable alone)."""

    groups: tuple[GroupKey, ...]
    deribit: bool = False
    stats: dict[GroupKey, GroupStats] = attrs.field(factory=dict)
    channels: dict[tuple[IPv4Address, int, int], ChannelStats] = attrs.field(factory=dict)
    #: each socket's kernel drop counter, as last reported (cumulative)
    socket_drops: dict[int, int] = attrs.field(factory=dict)
    unexpected: int = 0  # datagrams for a group:port not asked for (should stay 0)
    started: float = attrs.field(factory=time.monotonic)
    last_report: float = 0.0

    def __attrs_post_init__(self) -> None:
        for key in self.groups:
            self.stats[key] = GroupStats()
        self.last_report = self.started

    def record(self, group: IPv4Address, port: int, payload: bytes) -> None:
        stats = self.stats.get((group, port))
        if stats is None:
            self.unexpected += 1
            return
        size = len(payload)
        if stats.datagrams == 0:
            stats.min_size = stats.max_size = size
        elif size < stats.min_size:
            stats.min_size = size
        elif size > stats.max_size:
            stats.max_size = size
        stats.datagrams += 1
        stats.bytes += size
        if self.deribit:
            if size < 8:
                stats.malformed += 1
                return
            length, channel, sequence = _HEADER.unpack_from(payload)
            if length != size - 8:
                stats.malformed += 1
                return
            key = (group, port, channel)
            tracker = self.channels.get(key)
            if tracker is None:
                self.channels[key] = ChannelStats(first=sequence, highest=sequence)
            else:
                tracker.see(sequence)

    @property
    def kernel_drops(self) -> int:
        return sum(self.socket_drops.values())

    def totals(self) -> tuple[int, int]:
        datagrams = bytes_ = 0
        for stats in self.stats.values():
            datagrams += stats.datagrams
            bytes_ += stats.bytes
        return datagrams, bytes_

    def sequence_totals(self) -> tuple[int, int, int]:
        """(gaps, missing, duplicates) over every channel."""
        gaps = missing = duplicates = 0
        for channel in self.channels.values():
            gaps += channel.gaps
            missing += channel.missing
            duplicates += channel.duplicates
        return gaps, missing, duplicates

    def report(self, now: float) -> dict[str, Any]:
        """The per-interval report (and reset the interval counters)."""
        interval = max(now - self.last_report, 1e-9)
        groups = []
        interval_datagrams = interval_bytes = 0
        for (group, port), stats in self.stats.items():
            datagrams = stats.datagrams - stats.last_datagrams
            bytes_ = stats.bytes - stats.last_bytes
            stats.last_datagrams = stats.datagrams
            stats.last_bytes = stats.bytes
            interval_datagrams += datagrams
            interval_bytes += bytes_
            groups.append(
                {
                    "group": f"{group}:{port}",
                    "rate": round(datagrams / interval, 1),
                    "bitrate": round(bytes_ * 8 / interval),
                    "datagrams": stats.datagrams,
                    "bytes": stats.bytes,
                }
            )
        self.last_report = now
        total_datagrams, total_bytes = self.totals()
        out: dict[str, Any] = {
            "event": "report",
            "time": time.time(),
            "elapsed": round(now - self.started, 3),
            "interval": round(interval, 3),
            "rate": round(interval_datagrams / interval, 1),
            "bitrate": round(interval_bytes * 8 / interval),
            "datagrams": total_datagrams,
            "bytes": total_bytes,
            "active_groups": sum(1 for s in self.stats.values() if s.datagrams),
            "kernel_drops": self.kernel_drops,
            "groups": groups,
        }
        if self.deribit:
            gaps, missing, duplicates = self.sequence_totals()
            out.update(gaps=gaps, missing=missing, duplicates=duplicates)
        return out

    def summary(self, now: float) -> dict[str, Any]:
        elapsed = max(now - self.started, 1e-9)
        total_datagrams, total_bytes = self.totals()
        groups = []
        for (group, port), stats in self.stats.items():
            entry: dict[str, Any] = {
                "group": f"{group}:{port}",
                "datagrams": stats.datagrams,
                "bytes": stats.bytes,
                "min_size": stats.min_size,
                "mean_size": round(stats.bytes / stats.datagrams, 1) if stats.datagrams else 0,
                "max_size": stats.max_size,
                "rate": round(stats.datagrams / elapsed, 2),
            }
            if self.deribit:
                entry["malformed"] = stats.malformed
            groups.append(entry)
        out: dict[str, Any] = {
            "event": "summary",
            "time": time.time(),
            "elapsed": round(elapsed, 3),
            "datagrams": total_datagrams,
            "bytes": total_bytes,
            "rate": round(total_datagrams / elapsed, 1),
            "kernel_drops": self.kernel_drops,
            "unexpected": self.unexpected,
            "groups": groups,
        }
        if self.deribit:
            gaps, missing, duplicates = self.sequence_totals()
            out.update(gaps=gaps, missing=missing, duplicates=duplicates)
            out["channels"] = [
                {
                    "group": f"{group}:{port}",
                    "channel": channel,
                    "datagrams": stats.datagrams,
                    "first": stats.first,
                    "last": stats.highest,
                    "gaps": stats.gaps,
                    "missing": stats.missing,
                    "duplicates": stats.duplicates,
                }
                for (group, port, channel), stats in sorted(self.channels.items())
            ]
        return out


def parse_groups(items: Iterable[object]) -> tuple[GroupKey, ...]:
    """``"group:port"`` strings (or objects with ``group`` and ``port``) to unique keys."""
    keys: list[GroupKey] = []
    for item in items:
        if isinstance(item, str):
            group_text, sep, port_text = item.rpartition(":")
            try:
                if not sep:
                    raise ValueError
                group = IPv4Address(group_text)
                port = int(port_text)
            except ValueError:
                raise UsageError(f"invalid group {item!r}: expected GROUP:PORT") from None
        else:
            group_attr = getattr(item, "group", None)
            port_attr = getattr(item, "port", None)
            if not isinstance(group_attr, IPv4Address) or not isinstance(port_attr, int):
                raise UsageError(f"invalid group {item!r}")
            group, port = group_attr, port_attr
        if not group.is_multicast:
            raise UsageError(f"{group} is not a multicast group (224.0.0.0/4)")
        if not 1 <= port <= 65535:
            raise UsageError(f"port {port} of {group} is outside 1..65535")
        if (group, port) not in keys:
            keys.append((group, port))
    if not keys:
        raise UsageError("no group given")
    return tuple(keys)


def _human_bits(bits_per_second: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_second >= scale:
            return f"{bits_per_second / scale:.2f} {unit}"
    return f"{bits_per_second:.0f} bit/s"


def _human_bytes(count: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def _report_line(report: dict[str, Any], groups: int) -> str:
    line = (
        f"[{report['elapsed']:8.1f}s] {report['rate']:9.1f} dgram/s"
        f" {_human_bits(report['bitrate']):>13} | total {report['datagrams']} dgrams"
        f" {_human_bytes(report['bytes'])} | {report['active_groups']}/{groups} groups"
        f" | kernel drops {report['kernel_drops']}"
    )
    if "gaps" in report:
        line += f" | gaps {report['gaps']} missing {report['missing']} dups {report['duplicates']}"
    return line


def _summary_text(summary: dict[str, Any]) -> str:
    lines = [
        f"summary: {summary['datagrams']} datagrams, {_human_bytes(summary['bytes'])}"
        f" in {summary['elapsed']:.1f} s ({summary['rate']:.1f} dgram/s),"
        f" kernel drops {summary['kernel_drops']}",
        f"{'group:port':<22} {'datagrams':>10} {'bytes':>12} {'min':>6} {'mean':>8}"
        f" {'max':>6} {'dgram/s':>9}",
    ]
    for entry in summary["groups"]:
        lines.append(
            f"{entry['group']:<22} {entry['datagrams']:>10} {entry['bytes']:>12}"
            f" {entry['min_size']:>6} {entry['mean_size']:>8} {entry['max_size']:>6}"
            f" {entry['rate']:>9}"
        )
    if "channels" in summary:
        lines.append(
            f"deribit: {len(summary['channels'])} channels, gaps {summary['gaps']}"
            f" (missing {summary['missing']}), duplicates {summary['duplicates']}"
        )
        for channel in summary["channels"]:
            if channel["gaps"] or channel["duplicates"]:
                lines.append(
                    f"  {channel['group']} channel {channel['channel']}: gaps {channel['gaps']}"
                    f" missing {channel['missing']} duplicates {channel['duplicates']}"
                    f" (seq {channel['first']}..{channel['last']})"
                )
    return "\n".join(lines)


@attrs.define
class _Output:
    stream: TextIO
    json: bool
    tty: bool
    groups: int
    live: bool = False  # a live line is on screen

    def ready(self, message: dict[str, Any]) -> None:
        if self.json:
            self._line(json.dumps(message))
        else:
            print(
                f"listening on {len(message['groups'])} groups via {message['interface']}"
                f" ({message['sockets']} sockets)",
                file=sys.stderr,
                flush=True,
            )

    def report(self, report: dict[str, Any]) -> None:
        if self.json:
            self._line(json.dumps(report))
        elif self.tty:
            self.stream.write("\r\x1b[K" + _report_line(report, self.groups))
            self.stream.flush()
            self.live = True
        else:
            self._line(_report_line(report, self.groups))

    def summary(self, summary: dict[str, Any]) -> None:
        if self.json:
            self._line(json.dumps(summary))
        else:
            self._line(_summary_text(summary))

    def _line(self, text: str) -> None:
        if self.live:
            self.stream.write("\n")
            self.live = False
        self.stream.write(text + "\n")
        self.stream.flush()


async def _receive(receiver: GroupReceiver, state: ListenState) -> None:
    record = state.record
    fileno = receiver.fileno()
    while True:
        await trio.lowlevel.wait_readable(receiver.sock)
        batch = drain(receiver, _DRAIN_BATCH)
        for group, port, payload, drops in batch:
            record(group, port, payload)
            if drops is not None:
                state.socket_drops[fileno] = drops


async def _report(state: ListenState, output: _Output, interval: float) -> None:
    next_at = trio.current_time() + interval
    while True:
        await trio.sleep_until(next_at)
        next_at += interval
        output.report(state.report(time.monotonic()))


async def _watch_signals(cancel: trio.CancelScope, outcome: list[int]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            outcome.append(EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_OK)
            cancel.cancel()
            return


async def _listen(
    receivers: list[GroupReceiver],
    state: ListenState,
    output: _Output,
    duration: float | None,
    interval: float,
    outcome: list[int],
) -> None:
    with trio.CancelScope() as scope:
        if duration is not None:
            scope.deadline = trio.current_time() + duration
        async with trio.open_nursery() as nursery:
            if threading.current_thread() is threading.main_thread():
                nursery.start_soon(_watch_signals, scope, outcome)
            for receiver in receivers:
                nursery.start_soon(_receive, receiver, state)
            nursery.start_soon(_report, state, output, interval)
    # one last drain: whatever arrived before the end still counts
    for receiver in receivers:
        while batch := drain(receiver, _DRAIN_BATCH):
            for group, port, payload, drops in batch:
                state.record(group, port, payload)
                if drops is not None:
                    state.socket_drops[receiver.fileno()] = drops


def main(args: argparse.Namespace) -> int:
    """``relayd listen GROUP:PORT ... [--interface IF] [--duration S] [--json] [--deribit]``."""
    try:
        keys = parse_groups(args.groups)
        interface_text = getattr(args, "interface", None) or "0.0.0.0"
        interface = resolve_interface(interface_text)
        duration: float | None = getattr(args, "duration", None)
        interval_arg = getattr(args, "interval", None)
        interval = 1.0 if interval_arg is None else float(interval_arg)
        if duration is not None and (duration <= 0 or math.isnan(duration)):
            raise UsageError(f"--duration must be positive, not {duration}")
        if interval <= 0 or math.isnan(interval):
            raise UsageError(f"--interval must be positive, not {interval}")
        receivers = open_group_receivers(keys, interface, DEFAULT_RECEIVE_BUFFER)
    except (UsageError, InterfaceError) as exc:
        print(f"relayd listen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    want_json = bool(getattr(args, "json", False))
    output = _Output(
        stream=sys.stdout,
        json=want_json,
        tty=sys.stdout.isatty(),
        groups=len(keys),
    )
    for receiver in receivers:
        if receiver.receive_buffer_capped:
            print(
                f"relayd listen: warning: receive buffer of port {receiver.port} capped at"
                f" {receiver.receive_buffer_effective} bytes (asked"
                f" {receiver.receive_buffer_requested}); raise net.core.rmem_max",
                file=sys.stderr,
            )
            break
    state = ListenState(groups=keys, deribit=bool(getattr(args, "deribit", False)))
    output.ready(
        {
            "event": "ready",
            "interface": str(interface),
            "groups": [f"{group}:{port}" for group, port in keys],
            "sockets": len(receivers),
            "receive_buffer": min(r.receive_buffer_effective for r in receivers),
        }
    )
    outcome: list[int] = []
    try:
        trio.run(_listen, receivers, state, output, duration, interval, outcome)
    except KeyboardInterrupt:
        outcome.append(EXIT_INTERRUPTED)
    finally:
        for receiver in receivers:
            receiver.close()
    output.summary(state.summary(time.monotonic()))
    return outcome[0] if outcome else EXIT_OK
