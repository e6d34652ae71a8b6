"""What this host charges per syscall and per wake-up (``python -m bench.wakeup [--rounds N]``).

A relay that forwards one datagram per wake-up pays, per datagram and hop, one wake-up and a
few syscalls besides the copy; on a virtual machine a wake-up that crosses CPUs (an
inter-processor interrupt, a halted vCPU resumed) can cost many times one that does not. This
runs ``bench/wakeup.c`` (compiled with gcc into bench/out): a null syscall, then two threads
passing a byte back and forth over pipes, pinned to one CPU and to two, with untimed waits
(``read``) and with timed ones (``ppoll`` with a timeout: a kernel timer armed and cancelled
per wait). Per pass (one wake-up): wall time and the process's CPU time, medians of
``--rounds`` runs, the ways alternated. Read with docs/PERFORMANCE.md ("Seventh round"): the
figures explain what the floor relay (bench/floor.c) costs on a host before relayd adds anything.
No root needed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence

from bench.relay.harness import compile_c


def _run(binary: str, *args: str) -> dict[str, float]:
    out = subprocess.run(
        [binary, *args], check=True, capture_output=True, text=True, timeout=300
    ).stdout
    return {key: float(value) for key, value in (pair.split("=") for pair in out.split())}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wakeup", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="runs of each way (median)")
    parser.add_argument("--count", type=int, default=20000, help="round trips per run")
    args = parser.parse_args(argv)
    binary = str(compile_c("wakeup"))
    cpus = sorted(os.sched_getaffinity(0))
    ways: dict[str, tuple[str, ...]] = {"one CPU": (str(cpus[0]), str(cpus[0]))}
    if len(cpus) > 1:
        ways["two CPUs"] = (str(cpus[0]), str(cpus[1]))
    else:
        print("bench.wakeup: one CPU available: the two-CPU rows are skipped", file=sys.stderr)
    syscall: list[float] = []
    passes: dict[tuple[str, str], list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        syscall.append(_run(binary, "syscall", "1000000")["ns"])
        for timed in ("", "timed"):
            for way, pair in ways.items():
                extra = (timed,) if timed else ()
                passes.setdefault((way, timed), []).append(
                    _run(binary, "pingpong", str(args.count), *pair, *extra)
                )
    print(f"null syscall (getppid): {statistics.median(syscall):.0f} ns (median of {args.rounds})")
    print("| threads on | wait | wall µs per wake-up | CPU µs per wake-up |")
    print("|---|---|---|---|")
    for (way, timed), runs in passes.items():
        wall = statistics.median(r["wall_us"] for r in runs)
        cpu = statistics.median(r["cpu_us"] for r in runs)
        wait = "ppoll with a timeout" if timed else "read (untimed)"
        print(f"| {way} | {wait} | {wall:.2f} | {cpu:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
