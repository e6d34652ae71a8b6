"""``--hops``: the relay's latency split per hop from tcpdump stamps on the veths."""

from __future__ import annotations

import bisect
import contextlib
import shutil
import subprocess
import time
from pathlib import Path

from bench.relay.harness import PORT, TCP_PORT, Bench, Relay
from bench.relay.report import table
from bench.topology import stop


def _pcap_times(path: Path) -> list[float]:
    times = []
    for line in path.read_text().splitlines():
        head = line.split(" ", 1)[0]
        with contextlib.suppress(ValueError):
            times.append(float(head))
    return times


def hops(
    bench: Bench, relay: Relay, rate: int, seconds: float, workdir: Path, path: str = "relayd"
) -> list[str]:
    """Where the relay's latency goes: tcpdump stamps on the capture's ingress (c0), the TCP
    stream leaving capture (c1) and reaching emit (e0), and the multicast leaving emit (e1).

    A datagram's TCP time is that of the first capture->emit data segment at or after its
    arrival (datagrams of one batch share a segment), so the split is exact at low rates and
    an approximation once segments carry many datagrams."""
    if shutil.which("tcpdump") is None:
        return ["hops: needs tcpdump"]
    topo = bench.topo
    captures = {}
    for role, dev, expression in (
        ("cap", "c0", f"udp dst port {PORT}"),
        ("cap", "c1", f"tcp dst port {TCP_PORT} and greater 60"),
        ("emit", "e0", f"tcp dst port {TCP_PORT} and greater 60"),
        ("emit", "e1", f"udp dst port {PORT}"),
    ):
        out = (workdir / f"{dev}.txt").open("w")
        proc = topo.popen(
            role,
            ["tcpdump", "-i", dev, "-n", "-tt", "--time-stamp-precision=nano", "-l", expression],
            stdout=out,
            stderr=subprocess.DEVNULL,
        )
        captures[dev] = (proc, out)
    time.sleep(1.5)  # tcpdump attached
    point = bench.point(path, "fixed", rate, seconds)  # relayd, or the floor relay
    time.sleep(0.5)
    for proc, out in captures.values():
        stop(proc)
        out.close()
    t = {dev: _pcap_times(workdir / f"{dev}.txt") for dev in captures}
    parts: dict[str, list[float]] = {
        "capture: datagram in -> TCP out": [],
        "TCP over the veth": [],
        "emit: TCP in -> multicast out": [],
        "relay total (c0 -> e1)": [],
    }
    names = list(parts)
    if len(t["c0"]) != len(t["e1"]) or len(t["c1"]) != len(t["e0"]):
        return [f"hops: packets seen { ({d: len(v) for d, v in t.items()}) } do not pair up"]
    for arrived, left in zip(t["c0"], t["e1"], strict=True):
        j = bisect.bisect_left(t["c1"], arrived)
        if j == len(t["c1"]):
            continue
        parts[names[0]].append(t["c1"][j] - arrived)
        parts[names[1]].append(t["e0"][j] - t["c1"][j])
        parts[names[2]].append(left - t["e0"][j])
        parts[names[3]].append(left - arrived)
    lines = table([point])
    lines.append(f"per hop at {rate:,}/s ({len(t['c0'])} datagrams, {len(t['c1'])} TCP segments):")
    for name, values in parts.items():
        values.sort()
        if values:
            q = [values[min(len(values) - 1, int(f * len(values)))] * 1e6 for f in (0.5, 0.9, 0.99)]
            lines.append(f"  {name:34s} p50 {q[0]:7.1f}  p90 {q[1]:7.1f}  p99 {q[2]:8.1f} µs")
    return lines
