"""End-to-end relay benchmark in network namespaces (``python -m bench.relay [--quick]``).

A C generator (``bench/gen.c``) sends paced multicast to 4 groups, a C receiver
(``bench/recv.c``) counts loss, duplicates and reordering and measures one-way latency (all
namespaces share one clock). Two paths run in the same sweep:

* ``direct``: generator -> receiver over one veth, no relay (the baseline);
* ``relayd``: generator -> ``relayd run`` with a capture feed -> TCP over a veth ->
  ``relayd run`` with an emit feed -> receiver.

Two shapes: ``fixed`` (160-byte payloads at a fixed rate) and ``bursty`` (Deribit-like sizes in
bursts of 50 back-to-back datagrams). For every point the CPU time (utime + stime) and RSS of
both relay processes are sampled from ``/proc``, and the capture sockets' kernel drop counters
say where a loss happened.

``--quick`` runs one short sweep and prints the ratio of the relay to the direct path: a
regression guard, not a timed test. ``--docs`` writes the results into ``docs/PERFORMANCE.md``
and plots them to ``docs/performance.png`` (installing matplotlib into the venv if needed).
``--profile`` records both relay processes with py-spy under load instead of sweeping (Python
frames only); ``--perf`` counts syscalls and context switches per thread with ``perf stat`` and
samples kernel and user stacks with ``perf record -g``, for the C data path.

Needs root; without it the benchmark says why and exits 0.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime
import importlib
import json
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.netns_bench import Topology, stop, unavailable_reason

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
GROUPS = ("239.77.0.1", "239.77.0.2", "239.77.0.3", "239.77.0.4")
PORT = 16100
TCP_PORT = 16667
SIZE = 160
BURST = 50
CLK_TCK = os.sysconf("SC_CLK_TCK")
RESULTS_BEGIN = "<!-- results:begin (written by python -m bench.relay --docs) -->"
RESULTS_END = "<!-- results:end -->"

FULL_SWEEP = {"fixed": (10_000, 50_000, 100_000, 150_000, 200_000), "bursty": (10_000, 50_000)}
QUICK_SWEEP = {"fixed": (10_000, 100_000), "bursty": (50_000,)}


# --------------------------------------------------------------------------------------------
# Building and system set-up


def compile_c(name: str) -> Path:
    """bench/<name>.c compiled into bench/out/<name> (again when the source is newer)."""
    OUT.mkdir(parents=True, exist_ok=True)
    source, binary = REPO / "bench" / f"{name}.c", OUT / name
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(
            ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(source)],
            check=True,
            timeout=120,
        )
    return binary


def build() -> tuple[Path, Path]:
    """Compile the generator and the receiver into bench/out (when the source is newer)."""
    return compile_c("gen"), compile_c("recv")


def _appliance_sysctls() -> dict[str, int]:
    """The socket-buffer limits the appliance sets (etc/sysctl.d), which relayd is sized for."""
    wanted: dict[str, int] = {}
    conf = REPO / "etc" / "sysctl.d" / "60-relayd.conf"
    if conf.exists():
        for line in conf.read_text().splitlines():
            key, sep, value = line.partition("=")
            key = key.strip()
            if sep and key in ("net.core.rmem_max", "net.core.wmem_max"):
                wanted[key] = int(value.strip())
    return wanted


@contextlib.contextmanager
def appliance_limits() -> Iterator[list[str]]:
    """Raise net.core.rmem_max/wmem_max (global, not per namespace) to the appliance's values
    for the run, and put the old values back afterwards."""
    changed: list[tuple[Path, str]] = []
    notes: list[str] = []
    try:
        for key, value in _appliance_sysctls().items():
            path = Path("/proc/sys") / key.replace(".", "/")
            old = path.read_text().strip()
            if int(old) < value:
                path.write_text(str(value))
                changed.append((path, old))
                notes.append(f"{key} {old} -> {value} (appliance value, restored afterwards)")
        yield notes
    finally:
        for path, old in changed:
            with contextlib.suppress(OSError):
                path.write_text(old)


def machine_description() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return (
        f"{os.cpu_count()} vCPU ({model}), {mem_gib:.0f} GiB RAM, Linux {platform.release()},"
        f" Python {platform.python_version()}"
    )


# --------------------------------------------------------------------------------------------
# /proc sampling


@dataclass
class ProcSample:
    cpu_ticks: int
    sys_ticks: int
    rss_kib: int
    hwm_kib: int
    udp_drops: int
    #: nanoseconds runnable but waiting for a CPU, all threads (/proc/PID/task/*/schedstat)
    runq_wait_ns: int


def sample(pid: int, port: int) -> ProcSample:
    """CPU ticks (utime + stime, all threads), RSS and peak RSS of ``pid``, and the kernel drop
    counters of the UDP sockets bound to ``port`` in its network namespace."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])
    rss = hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    drops = 0
    port_hex = f":{port:04X}"
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/net/udp").read_text().splitlines()[1:]:
            parts = line.split()
            if len(parts) > 12 and parts[1].endswith(port_hex):
                drops += int(parts[-1])
    wait = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, IndexError, ValueError):
                wait += int((task / "schedstat").read_text().split()[1])
    return ProcSample(ticks, int(fields[12]), rss, hwm, drops, wait)


# --------------------------------------------------------------------------------------------
# The relay under test


class Relay:
    """Two ``relayd run`` processes: an emit feed in the emit namespace, a capture feed in the
    capture namespace, joined by TCP over the cap-emit veth."""

    def __init__(self, topo: Topology, workdir: Path, log_level: str = "warning") -> None:
        self.topo = topo
        self.workdir = workdir
        self.log_level = log_level
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def _configs(self) -> dict[str, str]:
        cap_link, tcp_link, out_link = (self.topo.links[d] for d in ("g0", "c1", "e1"))
        head = (
            f'[process]\nlog_level = "{self.log_level}"\n\n[health]\nlisten = "127.0.0.1:18080"\n\n'
        )
        groups = ", ".join(f'"{g}:{PORT}"' for g in GROUPS)
        return {
            "emit": head + "[[emit]]\n"
            'name = "bench"\n'
            f'listen = "{tcp_link.b_addr}:{TCP_PORT}"\n'
            f'interface = "{out_link.a_dev}"\n'
            "ttl = 1\nloop = false\n"
            f'allowed_sources = ["{tcp_link.a_addr.rsplit(".", 1)[0]}.0/24"]\n'
            'allowed_groups = ["239.77.0.0/24"]\n',
            "cap": head + "[[capture]]\n"
            'name = "bench"\n'
            f'interface = "{cap_link.b_dev}"\n'
            f"groups = [{groups}]\n"
            f'targets = ["{tcp_link.b_addr}:{TCP_PORT}"]\n',
        }

    def start(self) -> None:
        for role, text in self._configs().items():
            config = self.workdir / f"{role}.toml"
            config.write_text(text)
            log = (self.workdir / f"{role}.log").open("w")
            self.procs[role] = self.topo.popen(
                role,
                [sys.executable, "-m", "relayd", "run", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
            log.close()
            if role == "emit":
                time.sleep(0.5)  # listener first, so the capture side connects at once

    def failure(self) -> str | None:
        """None while both processes run, else what happened (exit codes and log tails)."""
        dead = [(r, p.returncode) for r, p in self.procs.items() if p.poll() is not None]
        if not dead:
            return None
        return "; ".join(f"{role} exited {code}: {self.log_tail(role)}" for role, code in dead)

    def log_tail(self, role: str, lines: int = 6) -> str:
        path = self.workdir / f"{role}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def pids(self) -> dict[str, int]:
        return {role: proc.pid for role, proc in self.procs.items()}

    def stop(self) -> None:
        """Stop both processes and keep their logs in bench/out/relay-<role>.log."""
        for proc in self.procs.values():
            stop(proc)
        for role in self.procs:
            log = self.workdir / f"{role}.log"
            if log.exists():
                shutil.copyfile(log, OUT / f"relay-{role}.log")

    def warnings(self) -> list[str]:
        """The log lines of both processes so far (the log level is warning)."""
        lines = []
        for role in self.procs:
            log = self.workdir / f"{role}.log"
            if log.exists():
                lines += [
                    f"{role}: {line}" for line in log.read_text(errors="replace").splitlines()
                ]
        return lines


# --------------------------------------------------------------------------------------------
# One measurement


@dataclass
class Point:
    path: str
    shape: str
    rate: int
    sent: int = 0
    received: int = 0
    dup: int = 0
    reorder: int = 0
    p50: float = -1.0
    p99: float = -1.0
    p999: float = -1.0
    max: float = -1.0
    k_p50: float = -1.0
    k_p99: float = -1.0
    gen_rate: float = 0.0
    delivered_rate: float = 0.0
    gen_max_late_us: float = 0.0
    gen_cpu_us: float = 0.0
    recv_cpu_us: float = 0.0
    recv_drops: int = 0
    capture_drops: int = 0
    cpu_capture_us: float | None = None
    cpu_emit_us: float | None = None
    #: share of the relay CPU spent in the kernel (stime), percent
    cpu_sys_pct: float | None = None
    #: time the relay processes waited for a CPU while runnable, percent of the point's wall
    #: time (capture, emit): high values mean the relay was starved, not slow
    runq_capture_pct: float | None = None
    runq_emit_pct: float | None = None
    rss_capture_mb: float | None = None
    rss_emit_mb: float | None = None
    hwm_capture_mb: float | None = None
    hwm_emit_mb: float | None = None
    error: str | None = None
    runs: int = 1

    @property
    def loss_pct(self) -> float:
        return 100.0 * (self.sent - self.received) / self.sent if self.sent else 100.0

    @property
    def keeps_up(self) -> bool:
        """Delivered everything at (nearly) the offered rate, and the median datagram did not
        wait in a backlog (p50 under 10 ms): no queue built up during the point."""
        return (
            self.received == self.sent
            and self.delivered_rate >= 0.95 * self.gen_rate
            and 0 <= self.p50 < 10_000
        )

    @property
    def cpu_us(self) -> float | None:
        if self.cpu_capture_us is None or self.cpu_emit_us is None:
            return None
        return self.cpu_capture_us + self.cpu_emit_us


def _kv(line: str) -> dict[str, str]:
    words = line.split()
    return dict(zip(words[::2], words[1::2], strict=False))


class Bench:
    def __init__(self, topo: Topology, gen: Path, recv: Path, relay: Relay | None) -> None:
        self.topo, self.gen, self.recv, self.relay = topo, gen, recv, relay
        self.run_id = 1

    def _addresses(self, path: str) -> tuple[str, str]:
        """(generator egress address, receiver ingress address) of a path."""
        if path == "direct":
            link = self.topo.links["g1"]
            return link.a_addr, link.b_addr
        return self.topo.links["g0"].a_addr, self.topo.links["e1"].b_addr

    def _start_receiver(self, argv: list[str]) -> subprocess.Popen[str]:
        proc = self.topo.popen("recv", argv)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10.0)
        line = proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            stop(proc)
            raise RuntimeError(
                f"receiver did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}"
            )
        return proc

    def probe(self, path: str, timeout: float = 20.0) -> bool:
        """True once a datagram of every group came through ``path`` (the relay is up)."""
        gen_addr, recv_addr = self._addresses(path)
        groups = ",".join(GROUPS)
        recv = self._start_receiver(
            [str(self.recv), "--iface", recv_addr, "--groups", groups, "--port", str(PORT),
             "--until-all-groups", "--timeout-ms", str(int(timeout * 1000))]
        )  # fmt: skip
        gen = self.topo.popen(
            "gen",
            [str(self.gen), "--iface", gen_addr, "--groups", groups, "--port", str(PORT),
             "--rate", "200", "--count", str(int(timeout * 200)), "--run-id", "0"],
        )  # fmt: skip
        try:
            recv.wait(timeout=timeout + 5)
        except subprocess.TimeoutExpired:
            stop(recv)
        stop(gen)
        gen.communicate()
        recv.communicate()
        return recv.returncode == 0

    def point(self, path: str, shape: str, rate: int, seconds: float) -> Point:
        self.run_id += 1
        point = Point(path, shape, rate)
        count = int(rate * seconds)
        if shape == "bursty":
            count = max(BURST, count // BURST * BURST)
        gen_addr, recv_addr = self._addresses(path)
        groups = ",".join(GROUPS)
        # a backlogged relay on a busy machine can pause for a while: wait longer before
        # calling what is missing lost
        idle_ms = "700" if path == "direct" else "2000"
        recv = self._start_receiver(
            [str(self.recv), "--iface", recv_addr, "--groups", groups, "--port", str(PORT),
             "--count", str(count), "--run-id", str(self.run_id), "--idle-ms", idle_ms,
             "--timeout-ms", str(int((seconds * 3 + 15) * 1000))]
        )  # fmt: skip
        pids = self.relay.pids() if path == "relayd" and self.relay else {}
        before = {role: sample(pid, PORT) for role, pid in pids.items()}
        started = time.monotonic()
        gen = self.topo.run(
            "gen",
            [str(self.gen), "--iface", gen_addr, "--groups", groups, "--port", str(PORT),
             "--rate", str(rate), "--count", str(count), "--shape", shape, "--size", str(SIZE),
             "--burst", str(BURST), "--run-id", str(self.run_id)],
            timeout=seconds * 3 + 15,
        )  # fmt: skip
        try:
            out, err = recv.communicate(timeout=seconds * 3 + 20)
        except subprocess.TimeoutExpired:
            stop(recv)
            out, err = recv.communicate()
        after = {
            role: sample(pid, PORT) for role, pid in pids.items() if Path(f"/proc/{pid}").exists()
        }
        g = _kv(gen.stdout)
        r = _kv(out.strip().splitlines()[-1] if out.strip() else "")
        if gen.returncode != 0 or "sent" not in g:
            point.error = f"generator failed: {gen.stderr.strip()}"
            return point
        if "received" not in r:
            point.error = f"receiver failed: {err.strip()}"
            return point
        point.sent = int(g["sent"])
        point.gen_rate = point.sent / float(g["elapsed_s"]) if float(g["elapsed_s"]) else 0.0
        point.gen_max_late_us = float(g["max_late_us"])
        point.gen_cpu_us = float(g["cpu_us_per_dgram"])
        point.received = int(r["received"])
        point.dup, point.reorder = int(r["dup"]), int(r["reorder"])
        point.p50, point.p99, point.p999, point.max = (
            float(r[k]) for k in ("p50_us", "p99_us", "p999_us", "max_us")
        )
        point.k_p50, point.k_p99 = float(r["k_p50_us"]), float(r["k_p99_us"])
        point.recv_drops = int(r["drops"])
        point.recv_cpu_us = float(r["cpu_us_per_dgram"])
        span = float(r["span_s"])
        point.delivered_rate = point.received / span if span > 0 else 0.0
        if pids:
            if set(after) != set(before):
                point.error = f"relay died: {self.relay.failure() if self.relay else ''}"
                return point
            relayed = max(point.received, 1)
            us_per_tick = 1e6 / CLK_TCK
            cap, emit = (after["cap"], before["cap"]), (after["emit"], before["emit"])
            point.cpu_capture_us = (cap[0].cpu_ticks - cap[1].cpu_ticks) * us_per_tick / relayed
            point.cpu_emit_us = (emit[0].cpu_ticks - emit[1].cpu_ticks) * us_per_tick / relayed
            ticks = sum(a.cpu_ticks - b.cpu_ticks for a, b in (cap, emit))
            sys_ticks = sum(a.sys_ticks - b.sys_ticks for a, b in (cap, emit))
            point.cpu_sys_pct = 100.0 * sys_ticks / ticks if ticks else None
            point.rss_capture_mb = cap[0].rss_kib / 1024
            point.rss_emit_mb = emit[0].rss_kib / 1024
            point.hwm_capture_mb = cap[0].hwm_kib / 1024
            point.hwm_emit_mb = emit[0].hwm_kib / 1024
            point.capture_drops = cap[0].udp_drops - cap[1].udp_drops
            wall_ns = max(1.0, (time.monotonic() - started) * 1e9)
            point.runq_capture_pct = 100.0 * (cap[0].runq_wait_ns - cap[1].runq_wait_ns) / wall_ns
            point.runq_emit_pct = 100.0 * (emit[0].runq_wait_ns - emit[1].runq_wait_ns) / wall_ns
        return point


def median_point(points: Sequence[Point]) -> Point:
    """Field-wise median of repeated runs of one (path, shape, rate)."""
    good = [p for p in points if p.error is None] or list(points)
    first = good[0]
    merged = Point(first.path, first.shape, first.rate, runs=len(good), error=first.error)
    for name in asdict(first):
        if name in ("path", "shape", "rate", "error", "runs"):
            continue
        values = [getattr(p, name) for p in good if getattr(p, name) is not None]
        if values:
            value = statistics.median(values)
            setattr(merged, name, int(value) if isinstance(values[0], int) else float(value))
    return merged


# --------------------------------------------------------------------------------------------
# Output


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or value < 0 else f"{value:.{digits}f}"


def table(points: Sequence[Point]) -> list[str]:
    header = (
        "| path | shape | rate/s | sent | received | delivered/s | loss % | dup | reorder "
        "| p50 µs | p99 µs | p999 µs | socket p50/p99 µs | relay CPU µs/dgram (cap+emit) "
        "| RSS MB (cap/emit) |"
    )
    rows = [header, "|" + "---|" * 15]
    for p in points:
        if p.error and not p.sent:
            rows.append(f"| {p.path} | {p.shape} | {p.rate:,} | {p.error} |" + " |" * 11)
            continue
        cpu = (
            "-"
            if p.cpu_us is None
            else f"{p.cpu_us:.1f} ({p.cpu_capture_us:.1f}+{p.cpu_emit_us:.1f})"
        )
        rss = (
            "-"
            if p.rss_capture_mb is None or p.rss_emit_mb is None
            else f"{p.rss_capture_mb:.0f}/{p.rss_emit_mb:.0f}"
        )
        rows.append(
            f"| {p.path} | {p.shape} | {p.rate:,} | {p.sent:,} | {p.received:,} "
            f"| {p.delivered_rate / 1000:,.1f}k "
            f"| {p.loss_pct:.3f} | {p.dup} | {p.reorder} | {_fmt(p.p50)} | {_fmt(p.p99)} "
            f"| {_fmt(p.p999)} | {_fmt(p.k_p50)}/{_fmt(p.k_p99)} | {cpu} | {rss} |"
        )
    return rows


def _pace(p: Point) -> str:
    return "keeps up" if p.keeps_up else "loses" if p.received < p.sent else "falls behind"


def diagnostics(points: Sequence[Point]) -> list[str]:
    """Why a relay point looks the way it does: pace, CPU of everyone, starvation, drops."""
    rows = [
        "| shape | rate/s | relay pace | gen / recv CPU µs/dgram | relay kernel share "
        "| relay waited for a CPU (cap/emit) | capture socket drops | peak RSS MB (cap/emit) |",
        "|" + "---|" * 8,
    ]
    for p in points:
        if p.path != "relayd" or not p.sent:
            continue
        peak = (
            "-"
            if p.hwm_capture_mb is None or p.hwm_emit_mb is None
            else f"{p.hwm_capture_mb:.0f}/{p.hwm_emit_mb:.0f}"
        )
        rows.append(
            f"| {p.shape} | {p.rate:,} | {_pace(p)} "
            f"| {p.gen_cpu_us:.1f} / {p.recv_cpu_us:.1f} | {_fmt(p.cpu_sys_pct, 0)} % "
            f"| {_fmt(p.runq_capture_pct, 0)} % / {_fmt(p.runq_emit_pct, 0)} % "
            f"| {p.capture_drops} | {peak} |"
        )
    return rows


def ratios(points: Sequence[Point]) -> list[str]:
    """The relay against the direct path at each (shape, rate): the regression guard."""
    by_key = {(p.path, p.shape, p.rate): p for p in points}
    lines = []
    for p in points:
        if p.path != "relayd":
            continue
        d = by_key.get(("direct", p.shape, p.rate))
        if d is None or not d.received or not p.received or d.p50 <= 0 or d.p99 <= 0:
            continue
        pace = _pace(p).upper() if not p.keeps_up else _pace(p)
        lines.append(
            f"  {p.shape:6s} {p.rate:>7,}/s: {pace:12s} delivered"
            f" {p.received / max(d.received, 1):.4f}"
            f" of direct, p50 x{p.p50 / d.p50:.1f} (+{p.p50 - d.p50:.0f} µs),"
            f" p99 x{p.p99 / d.p99:.1f} (+{p.p99 - d.p99:.0f} µs)"
            + (f", CPU {p.cpu_us:.1f} µs/dgram" if p.cpu_us is not None else "")
        )
    return lines


def write_docs(points: Sequence[Point], meta: dict[str, Any]) -> None:
    doc = REPO / "docs" / "PERFORMANCE.md"
    block = [
        RESULTS_BEGIN,
        "",
        f"Measured {meta['date']} with `{meta['command']}`"
        f" ({meta['mode']}: {meta['seconds']:g} s per point,"
        + (f" median of {meta['runs']} runs)." if meta["runs"] > 1 else " one run)."),
        f"Machine: {meta['machine']}; load average {meta['load']} at the start.",
        *(f"System: {note}." for note in meta["notes"]),
        "",
        *table(points),
        "",
        *diagnostics(points),
        "",
        "Relay against direct at each rate:",
        "",
        "```",
        *ratios(points),
        "```",
        "",
        RESULTS_END,
    ]
    text = doc.read_text() if doc.exists() else f"# Performance\n\n{RESULTS_BEGIN}\n{RESULTS_END}\n"
    begin, end = text.find(RESULTS_BEGIN), text.find(RESULTS_END)
    if begin < 0 or end < 0:
        text = text.rstrip("\n") + "\n\n" + RESULTS_BEGIN + "\n" + RESULTS_END + "\n"
        begin, end = text.find(RESULTS_BEGIN), text.find(RESULTS_END)
    text = text[:begin] + "\n".join(block) + text[end + len(RESULTS_END) :]
    doc.write_text(text)
    plot(points, REPO / "docs" / "performance.png", meta)


def _pyplot() -> Any:
    try:
        return importlib.import_module("matplotlib.pyplot")
    except ImportError:
        print("installing matplotlib into the venv for the plot ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "matplotlib"],
            check=True,
            timeout=600,
        )  # fmt: skip
        importlib.invalidate_caches()
        return importlib.import_module("matplotlib.pyplot")


def plot(points: Sequence[Point], target: Path, meta: dict[str, Any]) -> None:
    plt = _pyplot()
    plt.switch_backend("Agg")
    fig, (ax_rate, ax_loss, ax_lat) = plt.subplots(1, 3, figsize=(16, 5), dpi=100)
    colors = {("direct", "fixed"): "tab:blue", ("relayd", "fixed"): "tab:red",
              ("direct", "bursty"): "tab:cyan", ("relayd", "bursty"): "tab:orange"}  # fmt: skip
    for (path, shape), color in colors.items():
        series = sorted((p for p in points if p.path == path and p.shape == shape and p.sent),
                        key=lambda p: p.rate)  # fmt: skip
        if not series:
            continue
        rates = [p.rate / 1000 for p in series]
        label = f"{path}, {shape}"
        ax_loss.plot(rates, [p.loss_pct for p in series], "o-", color=color, label=label)
        ax_rate.plot(rates, [p.delivered_rate / 1000 for p in series], "o-", color=color,
                     label=label)  # fmt: skip
        for attr, style in (("p50", "o-"), ("p99", "s--"), ("p999", "^:")):
            values = [getattr(p, attr) for p in series]
            ax_lat.plot(rates, [v if v > 0 else float("nan") for v in values], style,
                        color=color, label=f"{label} {attr}")  # fmt: skip
    ax_loss.set_xlabel("rate (k datagrams/s)")
    ax_loss.set_ylabel("loss (%)")
    ax_loss.set_title("loss against rate")
    worst = max((p.loss_pct for p in points if p.sent), default=0.0)
    ax_loss.set_ylim(-0.05 * max(worst, 1.0), 1.1 * max(worst, 1.0))
    top = max((p.rate / 1000 for p in points), default=1.0)
    ax_rate.plot([0, top], [0, top], color="grey", linewidth=0.8, label="offered")
    ax_rate.set_xlabel("offered rate (k datagrams/s)")
    ax_rate.set_ylabel("delivered rate (k datagrams/s)")
    ax_rate.set_title("throughput: below the grey line = falling behind")
    ax_rate.grid(True, alpha=0.3)
    ax_rate.legend(fontsize=8)
    ax_loss.grid(True, alpha=0.3)
    ax_loss.legend(fontsize=8)
    ax_lat.set_xlabel("rate (k datagrams/s)")
    ax_lat.set_ylabel("one-way latency (µs, log)")
    ax_lat.set_yscale("log")
    ax_lat.set_title("latency p50 / p99 / p999 against rate")
    ax_lat.grid(True, which="both", alpha=0.3)
    ax_lat.legend(fontsize=6, ncol=2)
    fig.suptitle(f"relayd vs direct multicast, {meta['machine'].split(' (')[0]}, {meta['date']}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(target)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Profile


def _py_spy() -> Path:
    binary = Path(sys.executable).parent / "py-spy"
    if not binary.exists():
        found = shutil.which("py-spy")
        if found:
            return Path(found)
        print("installing py-spy into the venv ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "py-spy"],
            check=True,
            timeout=600,
        )  # fmt: skip
    return binary


def summarize_profile(raw: Path, top: int = 15) -> list[str]:
    """Self and inclusive sample shares per function from py-spy's collapsed-stack output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [re.sub(r" \(.*?/", " (", f) for f in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return ["  (no samples: the process was idle)"]
    lines = [f"  {total} samples; self time:"]
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("  inclusive time:")
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return lines


def profile(bench: Bench, relay: Relay, rate: int, seconds: float, shape: str) -> list[str]:
    spy = _py_spy()
    procs = {}
    for role, pid in relay.pids().items():
        raw = OUT / f"profile-{role}.txt"
        procs[role] = (
            subprocess.Popen(
                [str(spy), "record", "--pid", str(pid), "--duration", str(int(seconds)),
                 "--rate", "200", "--nonblocking", "--format", "raw", "--output", str(raw)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            ),
            raw,
        )  # fmt: skip
    time.sleep(1.0)
    point = bench.point("relayd", shape, rate, seconds - 2)
    lines = table([point])
    for role, (proc, raw) in procs.items():
        try:
            _, err = proc.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            stop(proc)
            _, err = proc.communicate()
        lines.append(f"py-spy, {role} process ({'capture' if role == 'cap' else 'emit'}):")
        lines += summarize_profile(raw) if raw.exists() else [f"  py-spy failed: {err.strip()}"]
    return lines


# --------------------------------------------------------------------------------------------
# perf: syscalls, context switches and kernel call paths per thread

#: syscalls counted per thread (tracepoints ``syscalls:sys_enter_<name>``)
PERF_SYSCALLS = (
    "sendto", "recvfrom", "recvmsg", "sendmsg", "sendmmsg", "recvmmsg", "poll", "ppoll",
    "epoll_wait", "epoll_pwait", "read", "write", "futex",
)  # fmt: skip
#: kernel frames that only say "a syscall happened", left out of the call-path summary
_ENTRY_FRAMES = re.compile(
    r"^(entry_SYSCALL_64.*|do_syscall_64|x64_sys_call|__(x64|ia32|se|do)_sys_\w+)$"
)
#: frames that name the syscall, best first (the __x64_sys_ wrapper is sometimes not on the
#: stack, e.g. recvmsg shows only __sys_recvmsg)
_SYSCALL_FRAMES = (
    re.compile(r"^__(?:x64|ia32)_sys_(\w+)$"),
    re.compile(r"^(?:__sys|ksys|do_sys|__do_sys)_(\w+)$"),
)


def _perf() -> tuple[str | None, str]:
    """(perf binary, "") when perf can count here, else (None, why not). Installs the Debian
    package (linux-perf) when perf is missing and apt-get is there, as ``--profile`` installs
    py-spy."""
    binary = shutil.which("perf")
    if binary is None and shutil.which("apt-get"):
        print("installing linux-perf ...", flush=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "linux-perf"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            timeout=600,
            check=False,
        )
        binary = shutil.which("perf")
    if binary is None:
        return None, "perf is not installed (Debian package linux-perf)"
    probe = subprocess.run(
        [binary, "stat", "-e", "context-switches", "--", "true"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        paranoid = "?"
        with contextlib.suppress(OSError):
            paranoid = Path("/proc/sys/kernel/perf_event_paranoid").read_text().strip()
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"perf cannot count here (perf_event_paranoid {paranoid}): {last}"
    return binary, ""


def _tracepoints_work(perf: str) -> bool:
    probe = subprocess.run(
        [perf, "stat", "-e", "syscalls:sys_enter_sendto", "--", "true"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return probe.returncode == 0


@dataclass
class PerfThread:
    pid: int
    tid: int
    comm: str
    #: start time in clock ticks after boot (/proc/<pid>/task/<tid>/stat field 22)
    started: int
    role: str = ""
    counts: dict[str, float] | None = None
    #: (voluntary, involuntary) context switches so far, from /proc/<pid>/task/<tid>/status
    switches: tuple[int, int] = (0, 0)


def _switches(thread: PerfThread) -> tuple[int, int]:
    counts = {"voluntary_ctxt_switches": 0, "nonvoluntary_ctxt_switches": 0}
    with contextlib.suppress(OSError, ValueError):
        status = Path(f"/proc/{thread.pid}/task/{thread.tid}/status").read_text()
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in counts:
                counts[key] = int(value)
    return counts["voluntary_ctxt_switches"], counts["nonvoluntary_ctxt_switches"]


def _threads(pids: dict[str, int]) -> dict[int, PerfThread]:
    """Every thread of the relay processes: comm (the pthread name Trio sets) and start time."""
    threads = {}
    for pid in pids.values():
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (task / "stat").read_text()
                started = int(stat[stat.rindex(")") + 2 :].split()[19])
                comm = (task / "comm").read_text().strip()
                threads[int(task.name)] = PerfThread(pid, int(task.name), comm, started)
    return threads


def _count(thread: PerfThread, name: str) -> float:
    return (thread.counts or {}).get(name, 0.0)


def _assign_roles(threads: dict[int, PerfThread], pids: dict[str, int], by_syscalls: bool) -> str:
    """Name each thread's role from what it does; returns how the mapping was made."""
    for role, pid in pids.items():
        mine = sorted((t for t in threads.values() if t.pid == pid), key=lambda t: t.started)
        for t in mine:
            t.role = f"{role}: Trio main thread" if t.tid == pid else f"{role}: other thread"
        workers = [t for t in mine if t.tid != pid and t.counts]
        if by_syscalls:
            if role == "cap":
                rx = max(workers, key=lambda t: _count(t, "recvmsg"), default=None)
                if rx is not None and _count(rx, "recvmsg") > 0:
                    rx.role = "cap: receive thread (C)"
                readers = [
                    t for t in workers if _count(t, "recvmsg") == 0 and _count(t, "ppoll") > 0
                ]
                ack = max(readers, key=lambda t: _count(t, "recvfrom"), default=None)
                if ack is not None and _count(ack, "recvfrom") > 0:
                    ack.role = "cap: ACK reader (C)"
            else:
                data = max(workers, key=lambda t: _count(t, "sendto"), default=None)
                if data is not None and _count(data, "sendto") > 0:
                    data.role = "emit: data thread (C)"
        else:
            busiest = max(workers, key=lambda t: _count(t, "task-clock"), default=None)
            if busiest is not None:
                name = "receive thread" if role == "cap" else "data thread"
                busiest.role = f"{role}: {name} (guessed: busiest)"
    if by_syscalls:
        return (
            "roles from each thread's syscall mix in this window: the main thread is the one"
            " whose tid is the pid (Trio's event loop); in capture the thread calling recvmsg is"
            " the C receive loop (it also does the TCP send), the other one in ppoll+recvfrom"
            " is the C ACK reader; in emit the thread calling sendto is the C data thread;"
            " everything else is 'other' (idle Trio worker threads). comm is the pthread name"
            " Trio gives its worker threads (15 characters), so it does not tell them apart."
        )
    return (
        "no syscall tracepoints: roles guessed as the busiest non-main thread per process"
        " (unverified); the main thread is the one whose tid is the pid"
    )


def _perf_stat(path: Path, tids: dict[int, PerfThread]) -> None:
    """Read ``perf stat -x ';' --per-thread`` output into each thread's counts."""
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split(";")
        if len(parts) < 4 or "-" not in parts[0]:
            continue
        name, _, tid_text = parts[0].rpartition("-")
        with contextlib.suppress(ValueError):
            value = float(parts[1])
            thread = tids.get(int(tid_text))
            if thread is None:
                continue
            event = parts[3].removeprefix("syscalls:sys_enter_")
            thread.counts = {**(thread.counts or {}), event: value}
            if not thread.comm:
                thread.comm = name


def _sigint(proc: subprocess.Popen[str], timeout: float = 60.0) -> str:
    """Stop a perf run like Ctrl-C (it then writes its results) and return its stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        _, err = proc.communicate()
    return err or ""


def _dso_kind(dso: str) -> str:
    name = dso.rsplit("/", 1)[-1]
    if name.startswith("[kernel") or name.endswith(".ko") or name.startswith("[bpf"):
        return "kernel"
    if "_fastpath" in name:
        return "_fastpath"
    if name.startswith(("libc.", "libc-", "ld-linux", "libpthread")):
        return "libc"
    if name.startswith(("python", "libpython")):
        return "python"
    return "other"


@dataclass
class RoleProfile:
    """Sample weights (perf's period) of one thread role."""

    samples: int = 0
    #: per kind of DSO of the sampled instruction (kernel, _fastpath, libc, python, other)
    kinds: Counter[str] = field(default_factory=Counter)
    #: per syscall (or per outermost kernel frame outside syscalls)
    entries: Counter[str] = field(default_factory=Counter)
    #: per entry: per kernel symbol on the stack (children / inclusive)
    inclusive: dict[str, Counter[str]] = field(default_factory=dict)
    #: per kernel symbol the sample was in (self time)
    leaves: Counter[str] = field(default_factory=Counter)


def _perf_script(perf: str, data: Path, roles: dict[int, str]) -> dict[str, RoleProfile]:
    """Walk ``perf script`` call chains into per-role sample shares."""
    proc = subprocess.Popen(
        [perf, "script", "-i", str(data), "-F", "comm,tid,period,ip,sym,dso"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        errors="replace",
    )
    assert proc.stdout is not None
    profiles: dict[str, RoleProfile] = {}

    def finish(role: str, period: int, frames: list[tuple[str, str]]) -> None:
        if not frames:
            return
        prof = profiles.setdefault(role, RoleProfile())
        prof.samples += period
        kind = _dso_kind(frames[0][1])
        prof.kinds[kind] += period
        if kind != "kernel":
            return
        kernel = [sym for sym, dso in frames if _dso_kind(dso) == "kernel"]
        prof.leaves[frames[0][0]] += period
        entry = ""
        for pattern in _SYSCALL_FRAMES:
            for sym in reversed(kernel):  # outermost first
                match = pattern.match(sym)
                if match:
                    entry = match.group(1)
                    break
            if entry:
                break
        if not entry:  # not in a syscall's body: name the outermost frame that says something
            inner = [sym for sym in reversed(kernel) if not _ENTRY_FRAMES.match(sym)]
            entry = f"({inner[0]})" if inner else "(syscall entry and exit)"
        prof.entries[entry] += period
        seen = prof.inclusive.setdefault(entry, Counter())
        for sym in set(kernel):
            if not _ENTRY_FRAMES.match(sym):
                seen[sym] += period

    role, period = "", 0
    frames: list[tuple[str, str]] = []
    for line in proc.stdout:
        if not line.strip():
            finish(role, period, frames)
            role, frames = "", []
        elif line[0] in " \t":
            words = line.split()
            if len(words) >= 3:
                frames.append((words[1].split("+", 1)[0], words[-1].strip("()")))
        else:
            words = line.split()
            with contextlib.suppress(ValueError, IndexError):
                tid, period = int(words[-2]), int(words[-1])
                role = roles.get(tid, f"other: {' '.join(words[:-2])}")
    finish(role, period, frames)
    proc.wait(timeout=60)
    return profiles


def perf_report(
    bench: Bench, relay: Relay, rate: int, seconds: float, shape: str, perf: str
) -> list[str]:
    """Two points at ``rate``: one under ``perf stat`` (syscalls and context switches per
    thread), one under ``perf record -g`` (where each thread's samples are)."""
    pids = relay.pids()
    threads = _threads(pids)
    tracepoints = _tracepoints_work(perf)
    events = ["task-clock", "context-switches", "cpu-migrations"]
    if tracepoints:
        events += [f"syscalls:sys_enter_{name}" for name in PERF_SYSCALLS]
    pid_list = ",".join(str(p) for p in pids.values())
    lines: list[str] = []

    # (a) perf stat
    stat_out = OUT / "perf-stat.txt"
    counting = subprocess.Popen(
        [perf, "stat", "-x", ";", "--per-thread", "-e", ",".join(events), "-p", pid_list,
         "-o", str(stat_out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    time.sleep(1.0)
    for t in threads.values():
        t.switches = _switches(t)
    counted = bench.point("relayd", shape, rate, seconds)
    for t in threads.values():
        now = _switches(t)
        t.switches = (now[0] - t.switches[0], now[1] - t.switches[1])
    err = _sigint(counting)
    if not stat_out.exists():
        return [f"perf stat failed: {err.strip()}"]
    _perf_stat(stat_out, threads)
    how = _assign_roles(threads, pids, tracepoints)
    per = max(counted.received, 1)
    kind = "syscall tracepoints" if tracepoints else "no tracepoints"
    lines.append(f"point under perf stat ({kind}):")
    lines += table([counted])
    shown = [n for n in PERF_SYSCALLS if any((t.counts or {}).get(n) for t in threads.values())]
    header = (
        "| thread (role) | tid | comm | CPU µs/dgram | ctx switches/dgram"
        " | of them involuntary | migrations/dgram "
    )
    header += "".join(f"| {n}/dgram " for n in shown) + "|"
    lines += ["", f"per thread, per datagram delivered ({counted.received:,}):", header,
              "|" + "---|" * (7 + len(shown))]  # fmt: skip
    order = sorted(threads.values(), key=lambda t: (t.role.split(":")[0], t.started))
    for t in order:
        c = t.counts or {}
        if not c:
            continue
        cells = [
            f"{c.get('task-clock', 0) * 1000 / per:.2f}",  # msec -> µs
            f"{c.get('context-switches', 0) / per:.3f}",
            f"{t.switches[1] / per:.3f}",
            f"{c.get('cpu-migrations', 0) / per:.3f}",
            *(f"{c.get(n, 0) / per:.3f}" for n in shown),
        ]
        lines.append(f"| {t.role} | {t.tid} | {t.comm} | " + " | ".join(cells) + " |")
    lines.append(f"mapping: {how}")
    if not tracepoints:
        lines.append("raw counts only: syscall tracepoints (syscalls:sys_enter_*) are missing")

    # (b) perf record
    data = OUT / "perf-relay.data"
    recording = subprocess.Popen(
        [perf, "record", "-g", "-F", "4000", "-p", pid_list, "-o", str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    recorded = bench.point("relayd", shape, rate, seconds)
    err = _sigint(recording)
    if not data.exists():
        return [*lines, f"perf record failed: {err.strip()}"]
    roles = {t.tid: t.role for t in threads.values()}
    profiles = _perf_script(perf, data, roles)
    total = sum(p.samples for p in profiles.values()) or 1.0
    evlist = subprocess.run(
        [perf, "evlist", "-i", str(data)], capture_output=True, text=True, timeout=60, check=False
    )
    event = (evlist.stdout.split() or ["?"])[0]
    lines += ["", f"point under perf record -g -F 4000 (event {event}):"]
    if event.startswith("cpu-clock"):
        lines.append(
            "  no hardware PMU here (software cpu-clock sampling): time spent with interrupts off"
            " is sampled where they come back on, so finish_task_switch,"
            " _raw_spin_unlock_irqrestore and the softirq exits carry more than their own cost"
        )
    lines += table([recorded])
    lines += [
        "",
        "where the samples are, per thread role (share of all samples of both processes;"
        " kernel/user split by the sampled instruction's DSO):",
        "| thread (role) | samples % | kernel % | _fastpath % | libc % | python % | other % |",
        "|---|---|---|---|---|---|---|",
    ]
    ranked = sorted(profiles.items(), key=lambda kv: -kv[1].samples)
    for role, prof in ranked:
        kinds = prof.kinds
        cells = [f"{100 * kinds[k] / prof.samples:.1f}" for k in
                 ("kernel", "_fastpath", "libc", "python", "other")]  # fmt: skip
        lines.append(f"| {role} | {100 * prof.samples / total:.1f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "kernel time by syscall (share of the role's samples), then the kernel functions on the"
        " stack under it (children: inclusive share of the role's samples). A name in"
        " parentheses is kernel time outside a syscall's body: (exit_to_user_mode_loop) is a"
        " reschedule on the way back to user space (the thread was preempted), (asm_...) an"
        " interrupt. Samples in finish_task_switch are the cost of a context switch (perf"
        " attributes them when interrupts come back on after the switch).",
    ]
    for role, prof in ranked:
        if prof.samples < 0.02 * total or not prof.entries:
            continue
        lines.append(f"  {role}:")
        for entry, n in prof.entries.most_common(4):
            if n < 0.02 * prof.samples:
                break
            under = prof.inclusive.get(entry, Counter())
            top = ", ".join(
                f"{sym} {100 * m / prof.samples:.0f}" for sym, m in under.most_common(10)
            )
            lines.append(
                f"    {entry:10s} {100 * n / prof.samples:5.1f}%" + (f": {top}" if top else "")
            )
        hot = ", ".join(
            f"{sym} {100 * m / prof.samples:.1f}" for sym, m in prof.leaves.most_common(6)
        )
        lines.append(f"    kernel self time: {hot}")
    lines.append(
        f"raw data: {data.relative_to(REPO)} (perf report -i ...), {stat_out.relative_to(REPO)}"
    )
    return lines


# --------------------------------------------------------------------------------------------
# Per-hop latency


def _pcap_times(path: Path) -> list[float]:
    times = []
    for line in path.read_text().splitlines():
        head = line.split(" ", 1)[0]
        with contextlib.suppress(ValueError):
            times.append(float(head))
    return times


def hops(bench: Bench, relay: Relay, rate: int, seconds: float, workdir: Path) -> list[str]:
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
    point = bench.point("relayd", "fixed", rate, seconds)
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


# --------------------------------------------------------------------------------------------
# Main


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.relay", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="one short sweep, 1 run per point")
    parser.add_argument("--runs", type=int, help="runs per point (median); default 3, quick 1")
    parser.add_argument("--seconds", type=float, help="seconds per point; default 3, quick 1.5")
    parser.add_argument("--paths", default="direct,relayd", help="comma-separated paths")
    parser.add_argument("--fixed", help="comma-separated rates for the 160-byte shape")
    parser.add_argument("--bursty", help="comma-separated rates for the bursty shape")
    parser.add_argument("--docs", action="store_true",
                        help="write docs/PERFORMANCE.md and docs/performance.png")  # fmt: skip
    parser.add_argument(
        "--profile", action="store_true", help="py-spy both relay processes under load, no sweep"
    )
    parser.add_argument(
        "--perf",
        action="store_true",
        help="perf stat (syscalls, context switches per thread) and perf record -g of both"
        " relay processes under load, no sweep",
    )
    parser.add_argument(
        "--profile-rate",
        type=int,
        help="rate of the --profile and --perf point (default 100000, --perf 50000)",
    )
    parser.add_argument(
        "--hops",
        type=int,
        metavar="RATE",
        help="split the relay's latency per hop with tcpdump at RATE datagrams/s, no sweep",
    )
    parser.add_argument("--profile-shape", default="fixed", choices=("fixed", "bursty"))
    parser.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="nice level of the generator, receiver and relay processes alike (default -10:"
        " other work on the machine disturbs the figures less; 0 to turn off)",
    )
    parser.add_argument(
        "--docs-only",
        action="store_true",
        help="rewrite the docs from the last run's bench/out/relay-results.json, no measuring",
    )
    args = parser.parse_args(argv)
    if args.docs_only:
        saved = json.loads((OUT / "relay-results.json").read_text())
        write_docs([Point(**p) for p in saved["points"]], saved["meta"])
        print("wrote docs/PERFORMANCE.md and docs/performance.png")
        return 0

    reason = unavailable_reason()
    if reason:
        print(f"bench.relay: skipped: {reason}")
        return 0
    perf = ""
    if args.perf:
        found, why = _perf()
        if found is None:
            print(f"bench.relay: skipped: {why}")
            return 0
        perf = found
    # SIGTERM and SIGHUP unwind like Ctrl-C: namespaces deleted, sysctls restored
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    runs = args.runs or (1 if args.quick else 3)
    seconds = args.seconds or (1.5 if args.quick else 3.0)
    sweep = dict(QUICK_SWEEP if args.quick else FULL_SWEEP)
    for shape in ("fixed", "bursty"):
        given = getattr(args, shape)
        if given is not None:
            sweep[shape] = tuple(int(float(r)) for r in given.split(",") if r)
    paths = [p for p in args.paths.split(",") if p]

    gen, recv = build()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    with contextlib.suppress(OSError, IndexError):
        pressure = Path("/proc/pressure/cpu").read_text().split()[2]  # some avg60=..
        load += f", CPU pressure {pressure.replace('=', ' ')} %"
    started = time.monotonic()
    with (
        appliance_limits() as notes,
        Topology(args.nice) as topo,
        tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp,
    ):
        for note in notes:
            print(f"bench.relay: {note}")
        relay: Relay | None = None
        if "relayd" in paths or args.profile or args.hops or args.perf:
            relay = Relay(topo, Path(tmp))
            relay.start()
        bench = Bench(topo, gen, recv, relay)
        try:
            if relay is not None and not bench.probe("relayd"):
                problem = relay.failure() or (
                    f"no datagram came through; logs: cap: {relay.log_tail('cap')}"
                    f" emit: {relay.log_tail('emit')}"
                )
                print(f"bench.relay: relay path unavailable: {problem}")
                relay.stop()
                relay = bench.relay = None
                paths = [p for p in paths if p != "relayd"]
                if args.profile or args.hops or args.perf:
                    return 1
            if args.hops and relay is not None:
                print("\n".join(hops(bench, relay, args.hops, seconds, Path(tmp))))
                return 0
            if args.profile and relay is not None:
                rate = args.profile_rate or 100_000
                print("\n".join(profile(bench, relay, rate, 12, args.profile_shape)))
                return 0
            if args.perf and relay is not None:
                rate = args.profile_rate or 50_000
                print(f"machine load before the run (loadavg 1/5/15 min): {load}")
                print("\n".join(
                    perf_report(bench, relay, rate, args.seconds or 4.0, args.profile_shape, perf)
                ))  # fmt: skip
                return 0
            results: list[Point] = []
            for shape, rates in sweep.items():
                for rate in rates:
                    per_path: dict[str, list[Point]] = {p: [] for p in paths}
                    for _ in range(runs):
                        for path in paths:  # interleaved, so drifting load hits both alike
                            point = bench.point(path, shape, rate, seconds)
                            per_path[path].append(point)
                            if point.error:
                                print(f"bench.relay: {path} {shape} {rate}: {point.error}")
                    for path in paths:
                        merged = median_point(per_path[path])
                        results.append(merged)
                        print(
                            f"  {path:6s} {shape:6s} {rate:>7,}/s  loss {merged.loss_pct:7.3f} %"
                            f"  p50 {_fmt(merged.p50):>8s}  p99 {_fmt(merged.p99):>8s} µs"
                            f" (kernel stamp {_fmt(merged.k_p50)}/{_fmt(merged.k_p99)})"
                            f"  gen {merged.gen_cpu_us:.1f} recv {merged.recv_cpu_us:.1f} µs/dgram"
                            + (
                                f"  relay {merged.cpu_us:.1f} µs/dgram"
                                f" ({_fmt(merged.cpu_sys_pct, 0)}% sys), waited for a CPU"
                                f" {_fmt(merged.runq_capture_pct, 0)}%/"
                                f"{_fmt(merged.runq_emit_pct, 0)}% of the time"
                                if merged.cpu_us
                                else ""
                            )
                            + (
                                f"  capture drops {merged.capture_drops}"
                                if merged.capture_drops
                                else ""
                            ),
                            flush=True,
                        )
        finally:
            if relay is not None:
                logged = relay.warnings()
                relay.stop()
                if logged:
                    print(f"bench.relay: the relay logged {len(logged)} lines (warning and up),"
                          " in bench/out/relay-*.log; the last ones:")  # fmt: skip
                    print("\n".join(f"  {line}" for line in logged[-8:]))
    mode = "quick" if args.quick else "full"
    command = "make bench-quick" if args.quick else "make bench"
    if args.docs:
        command = "python -m bench.relay --docs" + (" --quick" if args.quick else "")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "mode": mode,
        "seconds": seconds,
        "runs": runs,
        "machine": machine_description(),
        "load": load,
        "notes": [*notes, f"generator, receiver and relay processes at nice {args.nice}"]
        if args.nice
        else notes,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    print()
    print(f"relay benchmark ({mode}, {seconds:g} s per point, median of {runs}); {meta['machine']}")
    print("\n".join(table(results)))
    guard = ratios(results)
    if guard:
        print("\nrelayd against the direct path:")
        print("\n".join(guard))
    (OUT / "relay-results.json").write_text(
        json.dumps({"meta": meta, "points": [asdict(p) for p in results]}, indent=1)
    )
    if args.docs:
        write_docs(results, meta)
        print("wrote docs/PERFORMANCE.md and docs/performance.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
