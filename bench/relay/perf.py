"""``--perf``: syscalls, context switches and kernel call paths per relay thread, from
``perf stat --per-thread`` and ``perf record -g`` (parsed from ``perf script``)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.relay.harness import OUT, REPO, Bench, Relay
from bench.relay.report import table
from bench.topology import stop

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


def find_perf() -> tuple[str | None, str]:
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
