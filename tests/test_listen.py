"""``relayd listen`` and the player, with real multicast on loopback."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import pty
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
import trio

from relayd.arbitration import DeribitLayout
from relayd.config import GroupPort
from relayd.netif import open_multicast_sender
from relayd.tools.listen import (
    ChannelStats,
    Checks,
    ListenState,
    Outcome,
    UsageError,
    igmp_hint,
    main,
    parse_groups,
    verdict,
)
from relayd.tools.pcapng import CapturedDatagram, read_datagrams
from relayd.tools.player import DERIBIT_HEADER, SYNTH_GROUPS, replay, synth_deribit
from tests.helpers.loopback import free_udp_port
from tests.helpers.netns import read_line

LOOPBACK = IPv4Address("127.0.0.1")


def _random_groups(count: int) -> list[tuple[IPv4Address, int]]:
    """Groups on a free port in 239.255.0.0/16, random so parallel runs do not meet."""
    port = free_udp_port()
    base = int(IPv4Address("239.255.0.0")) + random.randrange(1, 250) * 256
    return [(IPv4Address(base + i), port) for i in range(count)]


def _deribit(channel: int, sequence: int, body: bytes = b"x" * 10) -> bytes:
    return DERIBIT_HEADER.pack(len(body), channel, sequence) + body


@pytest.fixture
def sender() -> Iterator[socket.socket]:
    sock = open_multicast_sender(LOOPBACK, ttl=0, loop=True, send_buffer=4 << 20)
    yield sock
    sock.close()


# ---- counting, no sockets --------------------------------------------------------------------


def test_channel_stats_gaps_and_duplicates() -> None:
    stats = ChannelStats(first=10, highest=10)
    for sequence in (11, 12, 15, 16, 16, 14, 20):
        stats.see(sequence)
    assert (stats.datagrams, stats.highest) == (8, 20)
    assert (stats.gaps, stats.missing, stats.duplicates) == (2, 5, 2)


def test_listen_state_counts_groups_sizes_and_channels() -> None:
    a = (IPv4Address("239.1.1.1"), 6100)
    b = (IPv4Address("239.1.1.2"), 6100)
    state = ListenState(groups=(a, b), deribit=True)
    state.record(*a, _deribit(1, 5, b"y" * 100))
    state.record(*a, _deribit(1, 6))
    state.record(*a, _deribit(1, 8))
    state.record(*a, _deribit(2, 1))
    state.record(*b, b"short")
    state.record(*b, struct.pack("<HHI", 99, 1, 1) + b"z")  # length field does not match
    state.record(IPv4Address("239.9.9.9"), 6100, _deribit(1, 1))
    summary = state.summary(time.monotonic())
    groups = {g["group"]: g for g in summary["groups"]}
    assert groups["239.1.1.1:6100"] | {"rate": 0, "mean_size": 0} == {
        "group": "239.1.1.1:6100",
        "datagrams": 4,
        "bytes": 108 + 18 * 3,
        "min_size": 18,
        "mean_size": 0,
        "max_size": 108,
        "rate": 0,
        "malformed": 0,
        "source": "-",
        "sources": [],
    }
    assert groups["239.1.1.2:6100"]["malformed"] == 2
    assert summary["unexpected"] == 1
    assert (summary["gaps"], summary["missing"], summary["duplicates"]) == (1, 1, 0)
    assert [(c["channel"], c["first"], c["last"]) for c in summary["channels"]] == [
        (1, 5, 8),
        (2, 1, 1),
    ]
    report = state.report(time.monotonic())
    assert report["datagrams"] == 6
    assert report["active_groups"] == 2
    # the next report covers only what came since
    state.record(*b, _deribit(3, 1))
    later = state.report(time.monotonic())
    assert [g["datagrams"] for g in later["groups"]] == [4, 3]
    assert later["rate"] > 0


def test_parse_groups() -> None:
    keys = parse_groups(["239.1.1.1:6100", GroupPort(IPv4Address("239.1.1.2"), 6101)])
    assert keys == ((IPv4Address("239.1.1.1"), 6100), (IPv4Address("239.1.1.2"), 6101))
    assert parse_groups(["239.1.1.1:6100", "239.1.1.1:6100"]) == keys[:1]
    for bad, message in [
        ("10.1.1.1:6100", "not a multicast group"),
        ("239.1.1.1", "expected GROUP:PORT"),
        ("239.1.1.1:x", "expected GROUP:PORT"),
        ("239.1.1.1:70000", "outside 1..65535"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse_groups([bad])


def _args(groups: Sequence[str], **kwargs: Any) -> argparse.Namespace:
    values: dict[str, Any] = {
        "groups": list(groups),
        "interface": "lo",
        "duration": 0.2,
        "json": True,
        "deribit": False,
        "interval": 1.0,
    }
    values.update(kwargs)
    return argparse.Namespace(**values)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"groups": ["10.0.0.1:6100"]}, "10.0.0.1 is not a multicast group"),
        ({"interface": "nosuchif0"}, "no interface named 'nosuchif0'"),
        ({"interval": 0.0}, "--interval must be positive"),
    ],
)
def test_bad_arguments_exit_2(
    capsys: pytest.CaptureFixture[str], kwargs: dict[str, Any], message: str
) -> None:
    args = _args(kwargs.pop("groups", ["239.255.1.1:6100"]), **kwargs)
    assert main(args) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""


# ---- the real thing on loopback --------------------------------------------------------------


def _listen_argv(groups: Sequence[tuple[IPv4Address, int]], *extra: str) -> list[str]:
    names = [f"{group}:{port}" for group, port in groups]
    return [sys.executable, "-m", "relayd", "listen", *names, "--interface", "lo", *extra]


def _start(argv: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready = json.loads(read_line(proc, timeout=20.0))
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    assert ready["event"] == "ready"
    return proc


def _stop(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, code: int = 0
) -> list[dict[str, Any]]:
    proc.send_signal(sig)
    return _finish(proc, code)


def _finish(proc: subprocess.Popen[bytes], code: int = 0) -> list[dict[str, Any]]:
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == code, (out.decode(), err.decode())
    return [json.loads(line) for line in out.decode().splitlines()]


def _send(sock: socket.socket, datagrams: list[CapturedDatagram], speed: float = 0) -> None:
    async def go() -> None:
        await replay(sock, datagrams, speed=speed)

    trio.run(go)


def test_listen_counts_every_datagram_per_group(sender: socket.socket) -> None:
    groups = _random_groups(25)  # more than 20: two sockets on the port
    datagrams = list(synth_deribit(3000, groups=groups, seed=7))
    proc = _start(_listen_argv(groups, "--json", "--deribit", "--interval", "0.2"))
    try:
        _send(sender, datagrams)
        time.sleep(0.5)
    finally:
        events = _stop(proc)
    summary = events[-1]
    assert summary["event"] == "summary"
    assert [e["event"] for e in events[:-1]].count("report") >= 1
    expected = Counter(f"{d.group}:{d.port}" for d in datagrams)
    assert {g["group"]: g["datagrams"] for g in summary["groups"] if g["datagrams"]} == expected
    assert summary["bytes"] == sum(len(d.payload) for d in datagrams)
    assert (summary["gaps"], summary["missing"], summary["duplicates"]) == (0, 0, 0)
    assert summary["kernel_drops"] == 0
    assert summary["unexpected"] == 0
    for channel in summary["channels"]:
        assert channel["first"] == 1
        assert channel["last"] == channel["datagrams"]


def test_listen_reports_gaps_and_duplicates(sender: socket.socket) -> None:
    groups = _random_groups(2)
    datagrams = list(synth_deribit(200, groups=groups, seed=3))
    first_group = [i for i, d in enumerate(datagrams) if (d.group, d.port) == groups[0]]
    gone = {first_group[10], first_group[11]}
    again = datagrams[first_group[20]]
    sent = [d for i, d in enumerate(datagrams) if i not in gone] + [again]
    proc = _start(_listen_argv(groups, "--json", "--deribit"))
    try:
        _send(sender, sent)
        time.sleep(0.3)
    finally:
        summary = _stop(proc)[-1]
    assert summary["datagrams"] == len(sent)
    assert (summary["gaps"], summary["missing"], summary["duplicates"]) == (1, 2, 1)
    channel = next(c for c in summary["channels"] if c["gaps"])
    assert channel["group"] == f"{groups[0][0]}:{groups[0][1]}"
    assert (channel["gaps"], channel["missing"], channel["duplicates"]) == (1, 2, 1)


def test_listen_plain_lines_and_summary_table(sender: socket.socket) -> None:
    groups = _random_groups(3)
    datagrams = list(synth_deribit(90, groups=groups, seed=1))
    proc = subprocess.Popen(
        _listen_argv(groups, "--duration", "1.5", "--interval", "0.3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # in text mode the "listening" line goes to stderr once every group is joined
    assert read_line(proc, 20, stderr=True).startswith("listening on 3 groups via 127.0.0.1")
    _send(sender, datagrams)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    reports = [line for line in lines if line.startswith("[")]
    assert len(reports) >= 3
    assert "\r" not in out.decode()
    summary = lines[len(reports)]
    assert summary.startswith("summary: 90 datagrams")
    for group, port in groups:
        count = sum(1 for d in datagrams if d.group == group)
        row = next(line for line in lines if line.startswith(f"{group}:{port} "))
        assert row.split()[1] == str(count)


def test_listen_live_line_on_a_terminal(sender: socket.socket) -> None:
    groups = _random_groups(1)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        _listen_argv(groups, "--duration", "1.0", "--interval", "0.2"),
        stdout=terminal,
        stderr=subprocess.DEVNULL,
    )
    os.close(terminal)
    output = b""
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(controller, 4096)
                except OSError:  # the terminal closed: the process ended
                    break
                if not chunk:
                    break
                output += chunk
            elif proc.poll() is not None:
                break
    finally:
        os.close(controller)
        proc.wait(timeout=10)
    assert proc.returncode == Outcome.NO_DATA
    text = output.decode()
    assert text.count("\x1b[J[") >= 3  # the live table, redrawn in place
    assert text.count("\x1b[3F\x1b[J") >= 2  # up to its first line: totals, header, 1 group
    assert "GROUP:PORT" in text
    assert "SOURCE" in text
    assert "summary: 0 datagrams" in text
    assert "FAIL: no datagram arrived" in text


def test_ctrl_c_prints_the_summary_and_exits_0(sender: socket.socket) -> None:
    groups = _random_groups(1)
    proc = _start(_listen_argv(groups, "--json"))
    _send(sender, list(synth_deribit(5, groups=groups)))
    time.sleep(0.2)
    summary = _stop(proc, signal.SIGINT, code=0)[-1]
    assert summary["event"] == "summary"
    assert summary["datagrams"] == 5
    assert (summary["exit_code"], summary["failures"], summary["interrupted"]) == (0, [], True)


def _summary(**overrides: Any) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "datagrams": 100,
        "rate": 10.0,
        "gaps": 0,
        "missing": 0,
        "longest_silence": 0.5,
        "groups": [
            {"group": "239.1.1.1:6100", "datagrams": 100},
            {"group": "239.1.1.2:6100", "datagrams": 0},
        ],
    }
    summary.update(overrides)
    return summary


A = (IPv4Address("239.1.1.1"), 6100)
B = (IPv4Address("239.1.1.2"), 6100)


@pytest.mark.parametrize(
    ("summary", "checks", "code", "failures"),
    [
        (_summary(), Checks(), Outcome.OK, []),
        (_summary(datagrams=0, groups=[]), Checks(), Outcome.NO_DATA, ["no datagram arrived"]),
        (_summary(), Checks(expect=frozenset({B})), Outcome.GROUP_SILENT,
         ["no datagram on 239.1.1.2:6100"]),
        (_summary(), Checks(expect=frozenset({A})), Outcome.OK, []),
        (_summary(gaps=2, missing=5), Checks(fail_on_gaps=True), Outcome.GAPS,
         ["2 sequence gaps (5 datagrams missing)"]),
        (_summary(gaps=2, missing=5), Checks(), Outcome.OK, []),
        (_summary(longest_silence=7.0), Checks(stall=5.0), Outcome.STALL,
         ["silent for 7.0 s (limit 5 s)"]),
        (_summary(), Checks(min_rate=20), Outcome.TOO_FEW,
         ["10.0 datagrams/s, below --min-rate 20"]),
        (_summary(), Checks(count=150), Outcome.TOO_FEW, ["100 of --count 150 datagrams"]),
        # several: the lowest code, every reason
        (_summary(longest_silence=9.0, rate=1.0), Checks(stall=5, min_rate=5,
         expect=frozenset({B})), Outcome.GROUP_SILENT,
         ["no datagram on 239.1.1.2:6100", "silent for 9.0 s (limit 5 s)",
          "1.0 datagrams/s, below --min-rate 5"]),
    ],
)  # fmt: skip
def test_verdict(
    summary: dict[str, Any], checks: Checks, code: Outcome, failures: list[str]
) -> None:
    assert verdict(summary, checks) == (code, failures)


def test_silence_is_counted_between_datagrams_and_at_the_end() -> None:
    state = ListenState(groups=(A,), started=100.0)
    assert state.silence(150.0) == 0.0  # before the first datagram: no data, not a stall
    state.arrived(101.0)
    state.arrived(103.5)
    state.arrived(104.0)
    assert state.longest_silence == 2.5
    assert state.silence(110.0) == 6.0
    state.record(*A, b"x", (IPv4Address("10.1.2.3"), 5000), 104.0)
    summary = state.summary(110.0)
    assert summary["longest_silence"] == 6.0  # the silence at the end counts too
    assert summary["groups"][0]["source"] == "10.1.2.3:5000"


def test_igmp_hint_names_the_fix() -> None:
    values = {"net/ipv4/conf/all/force_igmp_version": "0\n"}
    hint = igmp_hint(IPv4Address("0.0.0.0"), values.get)
    assert "net.ipv4.conf.all.force_igmp_version=0" in hint
    assert hint.endswith("Fix: sudo sysctl -w net.ipv4.conf.all.force_igmp_version=2")
    values["net/ipv4/conf/all/force_igmp_version"] = "2\n"
    assert igmp_hint(IPv4Address("0.0.0.0"), values.get) == ""
    nothing: dict[str, str] = {}
    assert igmp_hint(IPv4Address("127.0.0.1"), nothing.get) == ""  # loopback: no IGMP at all
    assert igmp_hint(IPv4Address("0.0.0.0"), nothing.get) == ""  # no /proc: nothing to say


def test_no_data_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    groups = _random_groups(1)
    assert main(_args([f"{g}:{p}" for g, p in groups], duration=0.3)) == Outcome.NO_DATA
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (summary["exit_code"], summary["failures"]) == (3, ["no datagram arrived"])


def test_count_stops_after_n_and_says_who_sent(sender: socket.socket) -> None:
    groups = _random_groups(2)
    proc = _start(_listen_argv(groups, "--json", "--count", "20", "--expect-all"))
    _send(sender, list(synth_deribit(60, groups=groups, seed=2)))
    summary = _finish(proc, code=0)[-1]
    assert summary["datagrams"] == 20
    port = sender.getsockname()[1]
    assert {g["source"] for g in summary["groups"]} == {f"127.0.0.1:{port}"}


def test_checks_fail_with_their_own_exit_status(sender: socket.socket) -> None:
    groups = _random_groups(2)
    only_first = [d for d in synth_deribit(200, groups=groups, seed=5) if d.group == groups[0][0]]
    sent = only_first[:50] + only_first[52:]  # a gap of 2 on the first group's channel
    proc = _start(_listen_argv(groups, "--json", "--expect-all", "--fail-on-gaps"))
    _send(sender, sent)
    time.sleep(0.3)
    summary = _stop(proc, code=Outcome.GROUP_SILENT)[-1]
    assert summary["failures"] == [
        f"no datagram on {groups[1][0]}:{groups[1][1]}",
        "1 sequence gaps (2 datagrams missing)",
    ]
    proc = _start(_listen_argv(groups[:1], "--json", "--fail-on-gaps"))
    _send(sender, sent)
    time.sleep(0.3)
    assert _stop(proc, code=Outcome.GAPS)[-1]["gaps"] == 1
    proc = _start(_listen_argv(groups[:1], "--json", "--min-rate", "1000000"))
    _send(sender, sent[:10])
    time.sleep(0.3)
    assert _stop(proc, code=Outcome.TOO_FEW)[-1]["failures"][0].endswith("--min-rate 1e+06")


def test_a_stall_is_flagged_and_fails(sender: socket.socket) -> None:
    groups = _random_groups(1)
    datagrams = list(synth_deribit(10, groups=groups))
    proc = _start(_listen_argv(groups, "--json", "--stall", "300ms", "--interval", "100ms"))
    _send(sender, datagrams[:5])
    time.sleep(1.0)
    _send(sender, datagrams[5:])
    time.sleep(0.2)
    events = _stop(proc, code=Outcome.STALL)
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert any(w.startswith("stalled: no datagram for ") for w in warnings), warnings
    assert events[-1]["longest_silence"] > 0.3


def test_write_keeps_every_datagram_as_pcapng(sender: socket.socket, tmp_path: Path) -> None:
    groups = _random_groups(3)
    datagrams = list(synth_deribit(100, groups=groups, seed=9))
    path = tmp_path / "got.pcapng"
    proc = _start(_listen_argv(groups, "--json", "--write", str(path)))
    _send(sender, datagrams)
    time.sleep(0.3)
    summary = _stop(proc)[-1]
    assert summary["written"] == {"path": str(path), "datagrams": 100}
    got = read_datagrams(path)
    key = lambda d: (d.group, d.port, d.payload)  # noqa: E731
    assert sorted(map(key, got)) == sorted(map(key, datagrams))
    per_group = {g: [d.payload for d in got if d.group == g] for g, _ in groups}
    assert per_group == {g: [d.payload for d in datagrams if d.group == g] for g, _ in groups}


# ---- the player ------------------------------------------------------------------------------


def test_synth_deribit_looks_like_the_sample() -> None:
    datagrams = list(synth_deribit(5000, seed=11, start_ns=10**18))
    assert datagrams == list(synth_deribit(5000, seed=11, start_ns=10**18))
    assert {(d.group, d.port) for d in datagrams} <= set(SYNTH_GROUPS)
    assert all(d.group in IPv4Network("239.255.0.0/16") for d in datagrams)  # local scope
    sizes = sorted(len(d.payload) for d in datagrams)
    assert sizes[0] >= 20
    assert sizes[-1] <= 1458
    assert sizes[len(sizes) // 2] == 153
    span = (datagrams[-1].ts_ns - datagrams[0].ts_ns) / 1e9
    assert 40 < len(datagrams) / span < 120  # about 63 datagrams/s
    assert all(b.ts_ns >= a.ts_ns for a, b in itertools.pairwise(datagrams))
    per_channel: dict[int, list[int]] = {}
    for d in datagrams:
        length, channel, sequence = DERIBIT_HEADER.unpack_from(d.payload)
        assert length == len(d.payload) - DERIBIT_HEADER.size
        assert (d.group, d.port) == SYNTH_GROUPS[channel - 1]
        per_channel.setdefault(channel, []).append(sequence)
    for sequences in per_channel.values():
        assert sequences == list(range(1, len(sequences) + 1))


def test_synth_deribit_is_endless_without_a_count() -> None:
    stream = synth_deribit()
    assert len([next(stream) for _ in range(10_000)]) == 10_000


async def test_replay_keeps_the_capture_pacing(autojump_clock: trio.testing.MockClock) -> None:
    # Trio's virtual clock: the pacing is exact whatever the load on the machine.
    groups = _random_groups(1)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    receiver.bind(("0.0.0.0", groups[0][1]))
    receiver.setsockopt(
        socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, groups[0][0].packed + LOOPBACK.packed
    )
    receiver.settimeout(10)  # real seconds: the datagrams are sent by now, but not received
    # five datagrams at 0, 100, 200, 300, 400 ms, played at 2x: 200 ms in all
    datagrams = [
        CapturedDatagram(1_000_000_000 + i * 100_000_000, groups[0][0], groups[0][1], bytes([i]))
        for i in range(5)
    ]
    with receiver, open_multicast_sender(LOOPBACK, 0, True, 1 << 16) as sock:
        stats = await replay(sock, datagrams, speed=2.0, skip=frozenset({3}))
        got = [receiver.recv(100) for _ in range(4)]
        receiver.setblocking(False)
        with pytest.raises(BlockingIOError):
            receiver.recv(100)
    assert got == [b"\x00", b"\x01", b"\x02", b"\x04"]
    assert stats.datagrams == 4
    assert stats.bytes == 4
    assert stats.elapsed == pytest.approx(0.2)  # paced: never early, never late
    assert stats.max_late == 0


async def test_replay_flat_out_and_bad_speed(sender: socket.socket) -> None:
    groups = _random_groups(1)
    datagrams = list(synth_deribit(2000, groups=groups))
    stats = await replay(sender, datagrams, speed=math.inf)
    assert stats.datagrams == 2000
    assert stats.elapsed < 5.0  # the capture spans about 30 s
    with pytest.raises(ValueError, match="speed"):
        await replay(sender, datagrams, speed=-1)


# ---- the SBE packet header (--deribit-layout sbe) --------------------------------------------


def _sbe(channel: int, seq: int, count: int = 1, *, kind: int = 0x01, stamp: int = 1) -> bytes:
    """An SBE market data packet as docs/EXACTLY_ONCE.md lays it out: sendingTime int64,
    seqNum int64, channelId int32, type uint16, messageCount uint16 (little-endian), then a
    16-byte mdMessageHeader and an 8-byte body per message."""
    header = struct.pack("<qqiHH", stamp, seq, channel, kind, count)
    return header + (struct.pack("<HHHHQ", 24, 1, 1, 1, 0) + b"m" * 8) * count


def test_channel_stats_sbe_ranges_and_heartbeats() -> None:
    stats = ChannelStats.start(100, 4)  # 100..103
    stats.see(104, 2)  # in order
    stats.see(106, 0)  # heartbeat: the next sequence, nothing new
    stats.see(110, 1)  # 106..109 missing
    stats.see(109, 3)  # starts below the next one: a duplicate in part
    stats.see(100, 2)  # a repeat
    stats.see(115, 0)  # a heartbeat past the next one: 112..114 missing
    assert (stats.first, stats.highest, stats.datagrams) == (100, 114, 7)
    assert (stats.gaps, stats.missing, stats.duplicates) == (2, 7, 2)


def test_listen_state_reads_the_sbe_layout() -> None:
    a = (IPv4Address("239.1.1.1"), 6100)
    state = ListenState(groups=(a,), deribit=True, deribit_layout=DeribitLayout.SBE)
    for payload in (
        _sbe(7, 1, 3),
        _sbe(7, 4, 1),
        _sbe(7, 6, 2),  # 5 missing
        _sbe(7, 1, 1, kind=0x02),  # a snapshot packet: no sequence of its own
        _sbe(7, 8, 2)[:40],  # shorter than its two messages
        _deribit(7, 9),  # a frame-v1 packet is malformed in this layout
    ):
        state.record(*a, payload)
    summary = state.summary(time.monotonic())
    [group] = summary["groups"]
    assert (group["malformed"], group["unsequenced"]) == (2, 1)
    assert (summary["gaps"], summary["missing"], summary["duplicates"]) == (1, 1, 0)
    assert [(c["channel"], c["first"], c["last"]) for c in summary["channels"]] == [(7, 1, 7)]


def test_listen_reports_gaps_in_sbe_packets(sender: socket.socket) -> None:
    """``--deribit-layout sbe`` (implies --deribit) on real sockets: packets of several
    messages, a heartbeat, a skipped packet and a repeated one."""
    groups = _random_groups(2)
    (first, port), (second, _) = groups
    packets = [
        (first, _sbe(1, 1, 2)),
        (first, _sbe(1, 3, 3)),
        (first, _sbe(1, 6, 0)),  # heartbeat
        # 6..7 never sent
        (first, _sbe(1, 8, 1)),
        (second, _sbe(2, 50, 4)),
        (second, _sbe(2, 54, 1)),
        (second, _sbe(2, 54, 1)),  # repeated
    ]
    proc = _start(_listen_argv(groups, "--json", "--deribit-layout", "sbe"))
    try:
        for group, payload in packets:
            sender.sendto(payload, (str(group), port))
        time.sleep(0.3)
    finally:
        summary = _stop(proc)[-1]
    assert summary["datagrams"] == len(packets)
    assert (summary["gaps"], summary["missing"], summary["duplicates"]) == (1, 2, 1)
    assert [(c["channel"], c["first"], c["last"], c["gaps"]) for c in summary["channels"]] == [
        (1, 1, 8, 1),
        (2, 50, 54, 0),
    ]
    assert all(g["malformed"] == 0 for g in summary["groups"])
