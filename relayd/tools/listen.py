"""``relayd listen``: join multicast groups, show what arrives, and pass or fail as a check.

Live reports every interval (a per-group table redrawn in place on a terminal, plain lines
otherwise, one JSON object per line with ``--json``) and a summary at the end: per group the
sender's address, datagrams, bytes, sizes and rates, the kernel's drop counter, and with
``--deribit`` the gaps and duplicates of every Deribit channel, from the packet header of
``--deribit-layout`` (``frame-v1``, the default: the 8-byte header of the sample captures,
payload length u16, channel u16, sequence u32, LE; ``sbe``: the 24-byte SBE packet header,
whose packets carry ``messageCount`` sequence numbers from ``seqNum``; docs/EXACTLY_ONCE.md).
``--write`` keeps every datagram in a pcapng file.

The run ends at ``--duration``, after ``--count`` datagrams, or on Ctrl-C/SIGTERM; each prints
the summary and exits with the verdict of the checks (:class:`relayd.cli.ListenOutcome`). JSON
lines carry an ``"event"`` key: ``"ready"`` once every group is joined, ``"report"`` per interval,
``"summary"`` at the end (with ``"exit_code"`` and ``"failures"``).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import attrs
import trio

from relayd.arbitration.headers import PARSERS, DeribitLayout
from relayd.cli import ListenOutcome
from relayd.netif import (
    ANCBUFSIZE,
    MAX_DATAGRAM,
    GroupReceiver,
    InterfaceError,
    open_group_receivers,
    parse_ancillary,
    resolve_interface,
)
from relayd.tools.pcapng import PcapngWriter

__all__ = [
    "ChannelStats",
    "Checks",
    "GroupStats",
    "ListenState",
    "Outcome",
    "igmp_hint",
    "main",
    "parse_groups",
    "verdict",
]


Outcome = ListenOutcome

DEFAULT_RECEIVE_BUFFER = 8 * 1024 * 1024
_DRAIN_BATCH = 1024
_TABLE_ROWS = 40  # the live table shows this many groups at most

GroupKey = tuple[IPv4Address, int]
Source = tuple[IPv4Address, int]


class UsageError(Exception):
    """A command-line value that cannot be used."""


@attrs.define
class ChannelStats:
    """Sequence tracking of one Deribit channel on one group:port. A packet carries ``span``
    sequence numbers from ``sequence`` (1 in the frame-v1 layout; SBE: messageCount, 0 for a
    heartbeat, which carries the next sequence number)."""

    first: int
    highest: int  # the highest sequence number seen
    datagrams: int = 1
    gaps: int = 0  # times the sequence jumped forward past the next one
    missing: int = 0  # sequence numbers jumped over
    duplicates: int = 0  # sequences at or below the highest seen (a repeat or a late one)

    @classmethod
    def start(cls, sequence: int, span: int = 1) -> ChannelStats:
        return cls(first=sequence, highest=sequence + span - 1)

    def see(self, sequence: int, span: int = 1) -> None:
        self.datagrams += 1
        expected = self.highest + 1
        if sequence > expected:
            self.gaps += 1
            self.missing += sequence - expected
        elif span == 0 or sequence + span - 1 <= self.highest:
            if span:  # a heartbeat at or below the next sequence says nothing new
                self.duplicates += 1
            return
        elif sequence < expected:  # SBE ranges that start below the next one and end past it
            self.duplicates += 1
        self.highest = max(self.highest, sequence + span - 1)


@attrs.define
class GroupStats:
    """Counters of one group:port."""

    datagrams: int = 0
    bytes: int = 0
    min_size: int = 0
    max_size: int = 0
    malformed: int = 0  # with --deribit: too short or a length field that does not match
    unsequenced: int = 0  # with --deribit-layout sbe: snapshot, retransmit or reject packets
    last_datagrams: int = 0  # totals at the previous report
    last_bytes: int = 0
    source: Source | None = None  # the sender of the latest datagram
    sources: set[IPv4Address] = attrs.field(factory=set)
    last_at: float | None = None  # monotonic time of the latest datagram


@attrs.frozen
class Checks:
    """What makes a run fail besides receiving nothing."""

    expect: frozenset[GroupKey] = frozenset()
    min_rate: float | None = None
    fail_on_gaps: bool = False
    stall: float | None = None
    count: int | None = None


def _source_text(source: Source | None) -> str:
    return "-" if source is None else f"{source[0]}:{source[1]}"


@attrs.define
class ListenState:
    """Everything ``listen`` counts; fed with ``record`` (no I/O, testable alone)."""

    groups: tuple[GroupKey, ...]
    deribit: bool = False
    deribit_layout: DeribitLayout = DeribitLayout.FRAME_V1
    stats: dict[GroupKey, GroupStats] = attrs.field(factory=dict)
    channels: dict[tuple[IPv4Address, int, int], ChannelStats] = attrs.field(factory=dict)
    #: each socket's kernel drop counter, as last reported (cumulative)
    socket_drops: dict[int, int] = attrs.field(factory=dict)
    unexpected: int = 0  # datagrams for a group:port not asked for (should stay 0)
    started: float = attrs.field(factory=time.monotonic)
    last_report: float = 0.0
    received: int = 0
    first_at: float | None = None  # monotonic time of the first datagram
    last_at: float | None = None  # ... and of the latest
    longest_silence: float = 0.0  # between two datagrams, after the first one

    def __attrs_post_init__(self) -> None:
        for key in self.groups:
            self.stats[key] = GroupStats()
        self.last_report = self.started

    def arrived(self, now: float) -> None:
        """A batch of datagrams arrived at ``now`` (monotonic): silence bookkeeping."""
        if self.last_at is None:
            self.first_at = now
        else:
            self.longest_silence = max(self.longest_silence, now - self.last_at)
        self.last_at = now

    def silence(self, now: float) -> float:
        """Seconds since the latest datagram (0 before the first one)."""
        return 0.0 if self.last_at is None else max(0.0, now - self.last_at)

    def record(
        self,
        group: IPv4Address,
        port: int,
        payload: bytes,
        source: Source | None = None,
        now: float | None = None,
    ) -> None:
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
        self.received += 1
        if source is not None:
            stats.source = source
            stats.sources.add(source[0])
        if now is not None:
            stats.last_at = now
        if self.deribit:
            header = PARSERS[self.deribit_layout](payload, port, frozenset())
            if header is None:
                stats.malformed += 1
                return
            channel, sequence, span, _stamp, sequenced, _kind = header
            if not sequenced:
                stats.unsequenced += 1
                return
            key = (group, port, channel)
            tracker = self.channels.get(key)
            if tracker is None:
                self.channels[key] = ChannelStats.start(sequence, span)
            else:
                tracker.see(sequence, span)

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

    def _channel_gaps(self) -> dict[GroupKey, int]:
        out: dict[GroupKey, int] = {}
        for (group, port, _channel), stats in self.channels.items():
            out[group, port] = out.get((group, port), 0) + stats.gaps
        return out

    def report(self, now: float) -> dict[str, Any]:
        """The per-interval report (and reset the interval counters)."""
        interval = max(now - self.last_report, 1e-9)
        gaps_of = self._channel_gaps() if self.deribit else {}
        groups = []
        interval_datagrams = interval_bytes = 0
        for (group, port), stats in self.stats.items():
            datagrams = stats.datagrams - stats.last_datagrams
            bytes_ = stats.bytes - stats.last_bytes
            stats.last_datagrams = stats.datagrams
            stats.last_bytes = stats.bytes
            interval_datagrams += datagrams
            interval_bytes += bytes_
            entry: dict[str, Any] = {
                "group": f"{group}:{port}",
                "source": _source_text(stats.source),
                "rate": round(datagrams / interval, 1),
                "bitrate": round(bytes_ * 8 / interval),
                "datagrams": stats.datagrams,
                "bytes": stats.bytes,
                "last_age": None if stats.last_at is None else round(now - stats.last_at, 3),
            }
            if self.deribit:
                entry["gaps"] = gaps_of.get((group, port), 0)
            groups.append(entry)
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
            "silence": round(self.silence(now), 3),
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
                "source": _source_text(stats.source),
                "sources": sorted(str(s) for s in stats.sources),
                "datagrams": stats.datagrams,
                "bytes": stats.bytes,
                "min_size": stats.min_size,
                "mean_size": round(stats.bytes / stats.datagrams, 1) if stats.datagrams else 0,
                "max_size": stats.max_size,
                "rate": round(stats.datagrams / elapsed, 2),
            }
            if self.deribit:
                entry["malformed"] = stats.malformed
            if self.deribit and self.deribit_layout is DeribitLayout.SBE:
                entry["unsequenced"] = stats.unsequenced
            groups.append(entry)
        tail = self.silence(now)
        out: dict[str, Any] = {
            "event": "summary",
            "time": time.time(),
            "elapsed": round(elapsed, 3),
            "datagrams": total_datagrams,
            "bytes": total_bytes,
            "rate": round(total_datagrams / elapsed, 1),
            "kernel_drops": self.kernel_drops,
            "unexpected": self.unexpected,
            "longest_silence": round(max(self.longest_silence, tail), 3),
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


def verdict(summary: dict[str, Any], checks: Checks) -> tuple[Outcome, list[str]]:
    """The exit status of a run and one line per failed check (pure: a summary in)."""
    failures: list[tuple[Outcome, str]] = []
    if summary["datagrams"] == 0:
        failures.append((Outcome.NO_DATA, "no datagram arrived"))
    silent = [
        g["group"]
        for g in summary["groups"]
        if not g["datagrams"] and parse_groups([g["group"]])[0] in checks.expect
    ]
    if silent and summary["datagrams"]:
        failures.append((Outcome.GROUP_SILENT, f"no datagram on {', '.join(silent)}"))
    if checks.fail_on_gaps and summary.get("gaps"):
        failures.append(
            (
                Outcome.GAPS,
                f"{summary['gaps']} sequence gaps ({summary['missing']} datagrams missing)",
            )
        )
    if (
        checks.stall is not None
        and summary["datagrams"]
        and summary["longest_silence"] > checks.stall
    ):
        failures.append(
            (
                Outcome.STALL,
                f"silent for {summary['longest_silence']:.1f} s (limit {checks.stall:g} s)",
            )
        )
    if checks.min_rate is not None and summary["datagrams"] and summary["rate"] < checks.min_rate:
        failures.append(
            (
                Outcome.TOO_FEW,
                f"{summary['rate']:.1f} datagrams/s, below --min-rate {checks.min_rate:g}",
            )
        )
    if checks.count is not None and 0 < summary["datagrams"] < checks.count:
        failures.append(
            (Outcome.TOO_FEW, f"{summary['datagrams']} of --count {checks.count} datagrams")
        )
    if not failures:
        return Outcome.OK, []
    return min(code for code, _ in failures), [text for _, text in failures]


def igmp_hint(interface: IPv4Address, read: Callable[[str], str | None] | None = None) -> str:
    """A warning naming the fix when the host answers IGMP queries with version 3, which
    networks that speak only IGMPv2 (AWS Transit Gateway multicast) ignore: the joins never
    reach the network and nothing arrives. Empty when v2 is forced or on loopback."""
    if interface.is_loopback:
        return ""
    read = read or _read_sysctl
    name = _interface_name(interface)
    scopes = ["all"] + ([name] if name else [])
    values = {scope: read(f"net/ipv4/conf/{scope}/force_igmp_version") for scope in scopes}
    if any(value is not None and value.strip() == "2" for value in values.values()):
        return ""
    if all(value is None for value in values.values()):
        return ""  # not Linux, or no /proc: nothing to say
    scope = name or "all"
    return (
        f"IGMP version is not forced to 2 (net.ipv4.conf.{scope}.force_igmp_version="
        f"{(values.get(scope) or '0').strip()}): networks that only speak IGMPv2, such as AWS"
        " Transit Gateway multicast, ignore this host's IGMPv3 joins and deliver nothing. Fix: "
        "sudo sysctl -w net.ipv4.conf.all.force_igmp_version=2"
        + (f" net.ipv4.conf.{name}.force_igmp_version=2" if name else "")
    )


def _read_sysctl(path: str) -> str | None:
    try:
        return Path("/proc/sys", path).read_text()
    except OSError:
        return None


def _interface_name(address: IPv4Address) -> str | None:
    """The interface holding ``address``, or None (0.0.0.0, or not found)."""
    if address.is_unspecified:
        return None
    for _index, name in socket.if_nameindex():
        try:
            if resolve_interface(name) == address:
                return name
        except InterfaceError:
            continue
    return None


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


def _age(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f}s ago"


def report_table(report: dict[str, Any]) -> list[str]:
    """The live table: the totals line, then one row per group (the busiest first)."""
    groups = sorted(report["groups"], key=lambda g: (-g["rate"], -g["datagrams"], g["group"]))
    deribit = "gaps" in report
    head = (
        f"{'GROUP:PORT':<22} {'SOURCE':<21} {'DGRAM/S':>9} {'BIT/S':>13} {'TOTAL':>10}"
        f" {'LAST':>11}" + (f" {'GAPS':>6}" if deribit else "")
    )
    lines = [_report_line(report, len(groups)), head]
    for g in groups[:_TABLE_ROWS]:
        lines.append(
            f"{g['group']:<22} {g['source']:<21} {g['rate']:>9.1f}"
            f" {_human_bits(g['bitrate']):>13} {g['datagrams']:>10} {_age(g['last_age']):>11}"
            + (f" {g['gaps']:>6}" if deribit else "")
        )
    if len(groups) > _TABLE_ROWS:
        lines.append(f"... and {len(groups) - _TABLE_ROWS} more groups")
    return lines


def _summary_text(summary: dict[str, Any]) -> str:
    lines = [
        f"summary: {summary['datagrams']} datagrams, {_human_bytes(summary['bytes'])}"
        f" in {summary['elapsed']:.1f} s ({summary['rate']:.1f} dgram/s),"
        f" kernel drops {summary['kernel_drops']},"
        f" longest silence {summary['longest_silence']:.1f} s",
        f"{'group:port':<22} {'datagrams':>10} {'bytes':>12} {'min':>6} {'mean':>8}"
        f" {'max':>6} {'dgram/s':>9}  source",
    ]
    for entry in summary["groups"]:
        others = len(entry["sources"]) - 1
        source = entry["source"] + (f" (+{others} more)" if others > 0 else "")
        lines.append(
            f"{entry['group']:<22} {entry['datagrams']:>10} {entry['bytes']:>12}"
            f" {entry['min_size']:>6} {entry['mean_size']:>8} {entry['max_size']:>6}"
            f" {entry['rate']:>9}  {source}"
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
    if "written" in summary:
        written = summary["written"]
        lines.append(f"wrote {written['datagrams']} datagrams to {written['path']}")
    if summary["failures"]:
        lines.extend(f"FAIL: {failure}" for failure in summary["failures"])
        lines.append(f"exit {summary['exit_code']} ({Outcome(summary['exit_code']).name})")
    else:
        lines.append("ok: every check passed")
    return "\n".join(lines)


@attrs.define
class _Output:
    stream: TextIO
    json: bool
    tty: bool
    groups: int
    live_lines: int = 0  # lines of the live table on screen

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
            # redraw the table in place: up to its first line, clear to the end of the screen
            up = f"\x1b[{self.live_lines}F" if self.live_lines else "\r"
            lines = report_table(report)
            self.stream.write(up + "\x1b[J" + "\n".join(lines) + "\n")
            self.stream.flush()
            self.live_lines = len(lines)
        else:
            self._line(_report_line(report, self.groups))

    def warn(self, text: str) -> None:
        if self.json:
            self._line(json.dumps({"event": "warning", "time": time.time(), "message": text}))
        else:
            print(f"relayd listen: warning: {text}", file=sys.stderr, flush=True)

    def summary(self, summary: dict[str, Any]) -> None:
        if self.json:
            self._line(json.dumps(summary))
        else:
            self._line(_summary_text(summary))

    def _line(self, text: str) -> None:
        self.live_lines = 0
        self.stream.write(text + "\n")
        self.stream.flush()


@attrs.define
class _Run:
    """One listen run: the receive tasks, the report loop, the end conditions."""

    receivers: list[GroupReceiver]
    state: ListenState
    output: _Output
    checks: Checks
    interval: float
    writer: PcapngWriter | None = None
    interrupted: bool = False
    _stalled: bool = False

    def _take(self, receiver: GroupReceiver) -> int:
        """Read what is waiting on one socket (not past ``--count``); how many were read."""
        recvmsg = receiver.sock.recvmsg
        record = self.state.record
        writer = self.writer
        port = receiver.port
        now = time.monotonic()
        count = 0
        limit = _DRAIN_BATCH
        if self.checks.count is not None:
            limit = min(limit, self.checks.count - self.state.received)
        for _ in range(limit):
            try:
                payload, ancdata, _flags, address = recvmsg(MAX_DATAGRAM, ANCBUFSIZE)
            except (BlockingIOError, InterruptedError):
                break
            group_number, drops = parse_ancillary(ancdata)
            group = receiver.group_of(group_number)
            source = (IPv4Address(address[0]), int(address[1]))
            record(group, port, payload, source, now)
            if writer is not None:
                writer.write(time.time_ns(), source, group, port, payload)
            if drops is not None:
                self.state.socket_drops[receiver.fileno()] = drops
            count += 1
        if count:
            self.state.arrived(now)
        return count

    async def _receive(self, receiver: GroupReceiver, done: trio.CancelScope) -> None:
        count = self.checks.count
        while True:
            await trio.lowlevel.wait_readable(receiver.sock)
            self._take(receiver)
            if count is not None and self.state.received >= count:
                done.cancel()

    async def _report(self) -> None:
        next_at = trio.current_time() + self.interval
        stall = self.checks.stall
        while True:
            await trio.sleep_until(next_at)
            next_at += self.interval
            now = time.monotonic()
            self.output.report(self.state.report(now))
            silence = self.state.silence(now)
            if stall is not None and silence > stall and not self._stalled:
                self._stalled = True
                self.output.warn(f"stalled: no datagram for {silence:.1f} s (limit {stall:g} s)")
            elif silence <= (stall or 0):
                self._stalled = False

    async def _signals(self, done: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                self.interrupted = True
                done.cancel()
                return

    async def run(self, duration: float | None) -> None:
        with trio.CancelScope() as done:
            if duration is not None:
                done.deadline = trio.current_time() + duration
            async with trio.open_nursery() as nursery:
                if threading.current_thread() is threading.main_thread():
                    nursery.start_soon(self._signals, done)
                for receiver in self.receivers:
                    nursery.start_soon(self._receive, receiver, done)
                nursery.start_soon(self._report)
        # one last drain: whatever arrived before the end still counts (not past --count)
        for receiver in self.receivers:
            while self._take(receiver):
                pass


def _checks(args: argparse.Namespace, keys: Sequence[GroupKey]) -> Checks:
    expect = set(parse_groups(args.expect)) if args.expect else set()
    unknown = expect - set(keys)
    if unknown:
        names = ", ".join(f"{g}:{p}" for g, p in sorted(unknown))
        raise UsageError(f"--expect {names}: not among the groups listened to")
    if getattr(args, "expect_all", False):
        expect |= set(keys)
    return Checks(
        expect=frozenset(expect),
        min_rate=getattr(args, "min_rate", None),
        fail_on_gaps=bool(getattr(args, "fail_on_gaps", False)),
        stall=getattr(args, "stall", None),
        count=getattr(args, "count", None),
    )


def _open_write(path: str | None) -> BinaryIO | None:
    if path is None:
        return None
    try:
        return open(path, "wb")
    except OSError as exc:
        raise UsageError(f"--write {path}: {exc.strerror}") from None


def main(args: argparse.Namespace) -> int:
    """``relayd listen GROUP:PORT ...``: see the module docstring and ``--help``."""
    for name, default in (
        ("expect", None),
        ("expect_all", False),
        ("min_rate", None),
        ("fail_on_gaps", False),
        ("stall", None),
        ("count", None),
        ("write", None),
    ):
        if not hasattr(args, name):
            setattr(args, name, default)
    stream: BinaryIO | None = None
    try:
        keys = parse_groups(args.groups)
        checks = _checks(args, keys)
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
        stream = _open_write(args.write)
    except (UsageError, InterfaceError) as exc:
        print(f"relayd listen: {exc}", file=sys.stderr)
        return Outcome.USAGE
    output = _Output(
        stream=sys.stdout,
        json=bool(getattr(args, "json", False)),
        tty=sys.stdout.isatty(),
        groups=len(keys),
    )
    layout = getattr(args, "deribit_layout", None)
    state = ListenState(
        groups=keys,
        deribit=bool(getattr(args, "deribit", False)) or checks.fail_on_gaps or bool(layout),
        deribit_layout=DeribitLayout(layout or DeribitLayout.FRAME_V1.value),
    )
    output.ready(
        {
            "event": "ready",
            "interface": str(interface),
            "groups": [f"{group}:{port}" for group, port in keys],
            "sockets": len(receivers),
            "receive_buffer": min(r.receive_buffer_effective for r in receivers),
        }
    )
    for receiver in receivers:
        if receiver.receive_buffer_capped:
            output.warn(
                f"receive buffer of port {receiver.port} capped at"
                f" {receiver.receive_buffer_effective} bytes (asked"
                f" {receiver.receive_buffer_requested}); raise net.core.rmem_max"
            )
            break
    hint = igmp_hint(interface)
    if hint:
        output.warn(hint)
    run = _Run(
        receivers,
        state,
        output,
        checks,
        interval,
        writer=PcapngWriter(stream) if stream is not None else None,
    )
    error: OSError | None = None
    try:
        trio.run(run.run, duration)
    except KeyboardInterrupt:
        run.interrupted = True
    except OSError as exc:
        error = exc
    finally:
        for receiver in receivers:
            receiver.close()
        if stream is not None:
            stream.close()
    summary = state.summary(time.monotonic())
    code, failures = verdict(summary, checks)
    if code is Outcome.NO_DATA and hint:
        failures.append(hint)
    if error is not None:
        code, failures = Outcome.ERROR, [*failures, f"receive failed: {error}"]
    summary.update(
        exit_code=int(code),
        failures=failures,
        interrupted=run.interrupted,
        checks=_describe(checks),
    )
    if run.writer is not None:
        summary["written"] = {"path": str(args.write), "datagrams": run.writer.datagrams}
    output.summary(summary)
    return int(code)


def _describe(checks: Checks) -> dict[str, Any]:
    return {
        "expect": sorted(f"{g}:{p}" for g, p in checks.expect),
        "min_rate": checks.min_rate,
        "fail_on_gaps": checks.fail_on_gaps,
        "stall": checks.stall,
        "count": checks.count,
    }
