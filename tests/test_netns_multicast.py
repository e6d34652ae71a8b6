"""Real multicast between network namespaces: the harness, the player and ``relayd listen``.

Namespace "dc" replays the Deribit sample with ``relayd send`` over a veth link;
namespace "cust" runs ``relayd listen --json --deribit`` and must see every datagram.
"""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from relayd.tools.pcapng import CapturedDatagram, read_datagrams
from tests.helpers.netns import (
    PREFIX,
    Link,
    Netns,
    NetnsHarness,
    cleanup_stale,
    list_harness_namespaces,
    read_line,
    unavailable_reason,
)

pytestmark = pytest.mark.netns

IGMP = 2
IGMPV2_REPORT = 0x16
IGMPV3_REPORT = 0x22


def _pair(netns: NetnsHarness) -> tuple[Netns, Netns, Link]:
    dc = netns.namespace("dc")
    cust = netns.namespace("cust")
    link = netns.link(dc, cust)
    dc.add_multicast_route(link.a_dev)
    return dc, cust, link


def _group_list(datagrams: list[CapturedDatagram]) -> list[str]:
    return sorted({f"{d.group}:{d.port}" for d in datagrams})


def _start_listener(
    cust: Netns, dev: str, groups: list[str], *extra: str
) -> subprocess.Popen[bytes]:
    listener = cust.popen(
        cust.relayd_argv("listen", *groups, "--interface", dev, "--json", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    ready = json.loads(read_line(listener, timeout=20.0))
    assert ready["event"] == "ready", ready
    assert len(ready["groups"]) == len(groups)
    return listener


def _stop_listener(listener: subprocess.Popen[bytes], code: int = 0) -> list[dict[str, Any]]:
    listener.send_signal(signal.SIGTERM)
    out, err = listener.communicate(timeout=20)
    assert listener.returncode == code, err.decode()
    return [json.loads(line) for line in out.decode().splitlines()]


def _replay(dc: Netns, dev: str, capture: Path, *extra: str) -> None:
    dc.run(
        dc.relayd_argv("send", str(capture), "--interface", dev, *extra),
        timeout=60,
    )


def _channels(datagrams: list[CapturedDatagram]) -> dict[tuple[str, int], list[int]]:
    """Sequence numbers per (group:port, channel), read straight from the payloads."""
    out: dict[tuple[str, int], list[int]] = {}
    for d in datagrams:
        _length, channel, sequence = struct.unpack_from("<HHI", d.payload)
        out.setdefault((f"{d.group}:{d.port}", channel), []).append(sequence)
    return out


def test_sample_replayed_at_100x_arrives_complete(
    netns: NetnsHarness, deribit_sample: Path
) -> None:
    dc, cust, link = _pair(netns)
    datagrams = read_datagrams(deribit_sample)
    groups = _group_list(datagrams)
    listener = _start_listener(cust, link.b_dev, groups, "--deribit", "--interval", "0.25")
    _replay(dc, link.a_dev, deribit_sample, "--speed", "100")
    time.sleep(0.3)
    events = _stop_listener(listener)
    summary = events[-1]
    assert summary["event"] == "summary"
    assert any(event["event"] == "report" for event in events[:-1])

    expected: dict[str, list[int]] = {}
    for d in datagrams:
        entry = expected.setdefault(f"{d.group}:{d.port}", [0, 0])
        entry[0] += 1
        entry[1] += len(d.payload)
    seen = {g["group"]: [g["datagrams"], g["bytes"]] for g in summary["groups"]}
    assert seen == expected
    assert summary["datagrams"] == len(datagrams) == 5066
    assert summary["unexpected"] == 0
    assert summary["kernel_drops"] == 0
    assert (summary["gaps"], summary["missing"], summary["duplicates"]) == (0, 0, 0)
    sequences = _channels(datagrams)
    assert {
        (c["group"], c["channel"]): (c["datagrams"], c["first"], c["last"])
        for c in summary["channels"]
    } == {key: (len(seqs), seqs[0], max(seqs)) for key, seqs in sequences.items()}


def test_listen_reports_a_datagram_dropped_on_purpose(
    netns: NetnsHarness, deribit_sample: Path
) -> None:
    dc, cust, link = _pair(netns)
    datagrams = read_datagrams(deribit_sample)
    busiest = Counter(f"{d.group}:{d.port}" for d in datagrams).most_common(1)[0][0]
    # the 100th datagram of the busiest group: inside its channel's run, not the first
    indexes = [i for i, d in enumerate(datagrams) if f"{d.group}:{d.port}" == busiest]
    dropped = indexes[99]
    listener = _start_listener(cust, link.b_dev, _group_list(datagrams), "--fail-on-gaps")
    _replay(dc, link.a_dev, deribit_sample, "--speed", "100", "--skip", str(dropped))
    time.sleep(0.3)
    summary = _stop_listener(listener, code=5)[-1]
    assert summary["failures"] == ["1 sequence gaps (1 datagrams missing)"]

    assert summary["datagrams"] == len(datagrams) - 1
    assert (summary["gaps"], summary["missing"], summary["duplicates"]) == (1, 1, 0)
    gapped = [c for c in summary["channels"] if c["gaps"]]
    _length, channel, _sequence = struct.unpack_from("<HHI", datagrams[dropped].payload)
    assert len(gapped) == 1
    assert (gapped[0]["group"], gapped[0]["channel"]) == (busiest, channel)


@pytest.mark.parametrize(("force_version", "report_type"), [(2, IGMPV2_REPORT), (0, IGMPV3_REPORT)])
def test_join_sends_igmp_reports_of_the_forced_version(
    netns: NetnsHarness, force_version: int, report_type: int
) -> None:
    dc, cust, link = _pair(netns)
    cust.sysctl("net.ipv4.conf.all.force_igmp_version", force_version)
    assert cust.read_sysctl("net.ipv4.conf.all.force_igmp_version") == str(force_version)
    groups = ["239.111.111.1:6100", "239.111.111.2:6100"]
    sniffer = dc.sniffer(link.a_dev, IGMP, duration=5.0, count=2)
    listener = _start_listener(cust, link.b_dev, groups)
    packets = sniffer.packets(timeout=15)
    events = _stop_listener(listener, code=3)  # nothing sent: no data
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    hint = [w for w in warnings if w.startswith("IGMP version is not forced to 2")]
    # the check names the fix exactly when the host would answer with IGMPv3
    assert bool(hint) == (force_version != 2), warnings
    if hint:
        assert hint[0].endswith(
            f"sudo sysctl -w net.ipv4.conf.all.force_igmp_version=2"
            f" net.ipv4.conf.{link.b_dev}.force_igmp_version=2"
        )
    assert events[-1]["failures"][0] == "no datagram arrived"

    cust_addr = str(link.b_addr.ip)
    assert packets, "no IGMP packet seen on the link"
    assert all(p["src"] == cust_addr for p in packets)
    types = {int(p["payload"][:2], 16) for p in packets}
    assert types == {report_type}
    if report_type == IGMPV2_REPORT:
        # an IGMPv2 report goes to the group itself and names it (bytes 4..7)
        reported = {str(IPv4Address(bytes.fromhex(p["payload"][8:16]))) for p in packets}
        assert reported == {g.split(":")[0] for g in groups}
        assert {p["dst"] for p in packets} == {g.split(":")[0] for g in groups}


def test_harness_kills_processes_and_deletes_namespaces() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with NetnsHarness() as net:
        inside = net.namespace("one")
        proc = inside.popen(["sleep", "60"])
        names = [inside.name]
        assert inside.name in list_harness_namespaces()
        assert inside.run(["ip", "-j", "link", "show", "lo"]).returncode == 0
    assert proc.poll() is not None
    assert not set(names) & set(list_harness_namespaces())


def test_stale_namespaces_of_dead_runs_are_removed(netns: NetnsHarness) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(finished.stdout)
    stale = f"{PREFIX}{dead_pid}-000000-stale"
    live = netns.namespace("live")
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        removed = cleanup_stale()
        assert stale in removed
        assert live.name not in removed
        assert stale not in list_harness_namespaces()
        assert live.name in list_harness_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, check=False)
