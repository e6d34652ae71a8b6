"""``--hops`` and ``--bursts``: the relay's latency split per hop, and how a burst crosses it,
from tcpdump stamps on the veths."""

from __future__ import annotations

import bisect
import contextlib
import math
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.relay.harness import BURST, PORT, TCP_PORT, Bench, Point, Relay
from bench.relay.report import table
from bench.topology import stop


def _pcap_times(path: Path) -> list[float]:
    times = []
    for line in path.read_text().splitlines():
        head = line.split(" ", 1)[0]
        with contextlib.suppress(ValueError):
            times.append(float(head))
    return times


_DEVICES = {  # device: (namespace, tcpdump filter)
    "c0": ("cap", f"udp dst port {PORT}"),
    "c1": ("cap", f"tcp dst port {TCP_PORT} and greater 60"),
    "e0": ("emit", f"tcp dst port {TCP_PORT} and greater 60"),
    "e1": ("emit", f"udp dst port {PORT}"),
}


def _stamped_point(
    bench: Bench, path: str, shape: str, rate: int, seconds: float, workdir: Path
) -> tuple[Point, dict[str, list[float]]]:
    """Run one point with tcpdump on the four relay veths; the point and each device's stamps."""
    captures = {}
    for dev, (role, expression) in _DEVICES.items():
        out = (workdir / f"{dev}.txt").open("w")
        proc = bench.topo.popen(
            role,
            ["tcpdump", "-i", dev, "-n", "-tt", "--time-stamp-precision=nano", "-l", expression],
            stdout=out,
            stderr=subprocess.DEVNULL,
        )
        captures[dev] = (proc, out)
    time.sleep(1.5)  # tcpdump attached
    point = bench.point(path, shape, rate, seconds)  # relayd, or the floor relay
    time.sleep(0.5)
    for proc, out in captures.values():
        stop(proc)
        out.close()
    return point, {dev: _pcap_times(workdir / f"{dev}.txt") for dev in captures}


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
    point, t = _stamped_point(bench, path, "fixed", rate, seconds, workdir)
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
        if values:
            q = [_quantile(values, f) * 1e6 for f in (0.5, 0.9, 0.99)]
            lines.append(f"  {name:34s} p50 {q[0]:7.1f}  p90 {q[1]:7.1f}  p99 {q[2]:8.1f} µs")
    return lines


def _quantile(values: list[float], fraction: float) -> float:
    """The value at ``fraction`` of the sorted values (the upper one of two middles), nan for
    none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else math.nan


def _median(values: list[float]) -> float:
    return _quantile(values, 0.5)


@dataclass(frozen=True)
class BurstProfile:
    """Medians over the whole bursts of a run, in seconds. ``positions[k]`` is, for the k-th
    datagram of a burst (from 0), the time since the burst's first datagram reached capture
    at which it reached capture, left capture in a TCP segment, and left emit."""

    bursts: int
    positions: list[tuple[float, float, float]]
    pace_in: float  # per datagram, first to last of a burst, at c0
    pace_out: float  # the same at e1
    added: float  # e1 - c0 over every datagram of the whole bursts
    lead: float  # first datagram out - last datagram in, per burst
    segments: float  # capture->emit TCP segments per burst


def burst_profile(
    c0: list[float], c1: list[float], e1: list[float], burst: int, gap: float
) -> BurstProfile | None:
    """Group the arrivals ``c0`` into bursts (runs less than ``gap`` apart; only runs of exactly
    ``burst`` count) and pair them in order with the departures ``e1``; a datagram's TCP
    segment is the first of ``c1`` at or after its arrival. None without a whole burst."""
    starts = [i for i in range(len(c0)) if i == 0 or c0[i] - c0[i - 1] > gap]
    ends = [*starts[1:], len(c0)]
    whole = [(a, b) for a, b in zip(starts, ends, strict=True) if b - a == burst]
    if not whole or len(c0) != len(e1):
        return None
    arrived: list[list[float]] = [[] for _ in range(burst)]
    sent_on: list[list[float]] = [[] for _ in range(burst)]
    left: list[list[float]] = [[] for _ in range(burst)]
    added, lead, segments = [], [], []
    for a, b in whole:
        first = c0[a]
        for k, i in enumerate(range(a, b)):
            j = bisect.bisect_left(c1, c0[i])
            arrived[k].append(c0[i] - first)
            if j < len(c1):
                sent_on[k].append(c1[j] - first)
            left[k].append(e1[i] - first)
            added.append(e1[i] - c0[i])
        lead.append(e1[a] - c0[b - 1])
        segments.append(float(bisect.bisect_right(c1, e1[b - 1]) - bisect.bisect_left(c1, first)))
    positions = [(_median(arrived[k]), _median(sent_on[k]), _median(left[k])) for k in range(burst)]
    return BurstProfile(
        bursts=len(whole),
        positions=positions,
        pace_in=positions[-1][0] / (burst - 1),
        pace_out=(positions[-1][2] - positions[0][2]) / (burst - 1),
        added=_median(added),
        lead=_median(lead),
        segments=_median(segments),
    )


def bursts(
    bench: Bench, rate: int, seconds: float, workdir: Path, path: str = "relayd"
) -> list[str]:
    """How a burst crosses the relay: the bursty shape at ``rate`` with tcpdump on the veths,
    and for each position in a burst the median time since the burst's first datagram reached
    capture (c0) at which that datagram reached capture, left capture in a TCP segment (c1:
    the first segment at or after its arrival) and left emit as multicast (e1).

    The generator sends a burst back to back, so the c0 column is the pace the direct path's
    receiver sees; where the e1 column grows faster than c0, datagrams queue in the relay and
    the later ones in a burst wait longer. A direct run comes first: its receiver figures are
    the same-sitting comparison."""
    if shutil.which("tcpdump") is None:
        return ["bursts: needs tcpdump"]
    direct = bench.point("direct", "bursty", rate, seconds)
    point, t = _stamped_point(bench, path, "bursty", rate, seconds, workdir)
    # bursts are BURST / rate apart: a gap of half that ends one
    profile = burst_profile(t["c0"], t["c1"], t["e1"], BURST, BURST / rate / 2)
    if profile is None:
        seen = {d: len(v) for d, v in t.items()}
        return [f"bursts: no whole burst of {BURST}, or packets seen {seen} do not pair up"]
    lines = table([direct, point])
    lines.append(
        f"bursts at {rate:,}/s: {profile.bursts} whole bursts of {BURST} ({len(t['c0'])}"
        f" datagrams); TCP segments per burst p50 {profile.segments:.0f}"
    )
    lines.append("  position   in at c0   TCP out c1   multicast out e1   relay added   (µs, p50)")
    for k in sorted({0, 4, 9, 24, 39, BURST - 1}):
        arrived, sent_on, left = (v * 1e6 for v in profile.positions[k])
        lines.append(
            f"  {k + 1:8d}   {arrived:8.1f}   {sent_on:10.1f}   {left:16.1f}"
            f"   {left - arrived:11.1f}"
        )
    lines.append(
        f"  pace: in {profile.pace_in * 1e6:.2f} µs/datagram, out {profile.pace_out * 1e6:.2f}"
        f" µs/datagram; relay added p50 {profile.added * 1e6:.1f} µs over all datagrams;"
        f" first out - last in p50 {profile.lead * 1e6:.1f} µs"
    )
    return lines
