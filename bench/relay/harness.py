"""The relay under test and one measured point: build the C tools, start both ``relayd run``
processes in their namespaces, drive the generator and receiver, sample /proc."""

from __future__ import annotations

import contextlib
import os
import platform
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.topology import Topology, stop

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "bench" / "out"
GROUPS = ("239.77.0.1", "239.77.0.2", "239.77.0.3", "239.77.0.4")
PORT = 16100
TCP_PORT = 16667
SIZE = 160
BURST = 50
CLK_TCK = os.sysconf("SC_CLK_TCK")


def compile_c(name: str) -> Path:
    """bench/<name>.c compiled into bench/out/<name> (again when it or bench/common.h is
    newer)."""
    OUT.mkdir(parents=True, exist_ok=True)
    source, binary = REPO / "bench" / f"{name}.c", OUT / name
    newest = max(source.stat().st_mtime, (REPO / "bench" / "common.h").stat().st_mtime)
    if not binary.exists() or binary.stat().st_mtime < newest:
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


@contextlib.contextmanager
def cores_kept_awake(enabled: bool) -> Iterator[list[str]]:
    """With ``enabled``, a spinning process at SCHED_IDLE on every CPU for the run: a CPU then
    never halts, so a woken thread runs without the wake-up of an idle CPU (on this VM a halted
    vCPU, slow to wake after a few milliseconds idle), and any other thread preempts the
    spinner at once. A stand-in for a host whose cores are kept out of deep idle states."""
    spinners: list[subprocess.Popen[bytes]] = []
    missing = [tool for tool in ("chrt", "taskset") if shutil.which(tool) is None]
    if enabled and missing:
        raise SystemExit(f"bench.relay: --keep-awake needs {' and '.join(missing)} (util-linux)")
    try:
        if enabled:
            # sched_yield: a spinner picked over a runnable thread (its tiny share still earns
            # it a slice now and then) hands the CPU back at once instead of after the slice
            spin = [sys.executable, "-c", "import os\nwhile True: os.sched_yield()"]
            for cpu in sorted(os.sched_getaffinity(0)):
                pinned = ["chrt", "--idle", "0", "taskset", "-c", str(cpu), *spin]
                spinners.append(subprocess.Popen(pinned))
        note = f"cores kept awake: a SCHED_IDLE spinner on each of {len(spinners)} CPUs"
        yield [note] if enabled else []
    finally:
        for proc in spinners:
            stop(proc)


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


class Relay:
    """Two ``relayd run`` processes: an emit feed in the emit namespace, a capture feed in the
    capture namespace, joined by TCP over the cap-emit veth. ``floor``: bench/floor.c's two
    processes in their place, the least a two-hop TCP relay adds on this machine."""

    def __init__(
        self,
        topo: Topology,
        workdir: Path,
        log_level: str = "warning",
        *,
        busy_poll: str | None = None,
        busy_poll_on: str = "both",
        pins: dict[str, str] | None = None,
        floor: Path | None = None,
    ) -> None:
        self.topo = topo
        self.floor = floor  # the compiled bench/floor.c, run instead of relayd
        self.workdir = workdir
        self.log_level = log_level
        self.busy_poll = busy_poll  # the feeds' latency mode (``busy_poll``), None: off
        self.busy_poll_on = busy_poll_on  # which feeds have it: "both", "cap" or "emit"
        self.pins = dict(pins or {})  # "cap"/"emit" -> taskset CPU list; absent: unpinned
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def _configs(self) -> dict[str, str]:
        cap_link, tcp_link, out_link = (self.topo.links[d] for d in ("g0", "c1", "e1"))
        head = (
            f'[process]\nlog_level = "{self.log_level}"\n\n[health]\nlisten = "127.0.0.1:18080"\n\n'
        )
        groups = ", ".join(f'"{g}:{PORT}"' for g in GROUPS)
        latency = {
            role: f'busy_poll = "{self.busy_poll}"\n'
            if self.busy_poll and self.busy_poll_on in ("both", role)
            else ""
            for role in ("cap", "emit")
        }
        return {
            "emit": head + "[[emit]]\n"
            'name = "bench"\n'
            f'listen = "{tcp_link.b_ip}:{TCP_PORT}"\n'
            f'interface = "{out_link.a_dev}"\n'
            "ttl = 1\nloop = false\n"
            f'allowed_sources = ["{tcp_link.a_addr.network}"]\n'
            'allowed_groups = ["239.77.0.0/24"]\n' + latency["emit"],
            "cap": head + "[[capture]]\n"
            'name = "bench"\n'
            f'interface = "{cap_link.b_dev}"\n'
            f"groups = [{groups}]\n"
            f'targets = ["{tcp_link.b_ip}:{TCP_PORT}"]\n' + latency["cap"],
        }

    def _floor_argv(self) -> dict[str, list[str]]:
        cap_link, tcp_link, out_link = (self.topo.links[d] for d in ("g0", "c1", "e1"))
        assert self.floor is not None
        to = f"{tcp_link.b_ip}:{TCP_PORT}"
        return {
            "emit": [str(self.floor), "emit", "--listen", to, "--iface", out_link.a_ip],
            "cap": [str(self.floor), "cap", "--iface", cap_link.b_ip, "--groups",
                    ",".join(GROUPS), "--port", str(PORT), "--to", to],
        }  # fmt: skip

    def start(self) -> None:
        if self.floor is not None:
            commands = self._floor_argv()
        else:
            commands = {}
            for role, text in self._configs().items():
                config = self.workdir / f"{role}.toml"
                config.write_text(text)
                commands[role] = [sys.executable, "-m", "relayd", "run", "--config", str(config)]
        for role, argv in commands.items():
            log = (self.workdir / f"{role}.log").open("w")
            pin = ["taskset", "-c", self.pins[role]] if role in self.pins else []
            self.procs[role] = self.topo.popen(
                role,
                [*pin, *argv],
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
            return link.a_ip, link.b_ip
        return self.topo.links["g0"].a_ip, self.topo.links["e1"].b_ip

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
        pids = self.relay.pids() if path != "direct" and self.relay else {}
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
