"""``python -m bench.relay``: the command line (see the package docstring)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from bench import relay as package
from bench.relay.harness import (
    OUT,
    Bench,
    Point,
    Relay,
    appliance_limits,
    build,
    compile_c,
    cores_kept_awake,
    machine_description,
)
from bench.relay.hops import bursts, hops
from bench.relay.perf import find_perf, perf_report
from bench.relay.pyspy import find_py_spy, profile
from bench.relay.report import ratios, table, write_docs
from bench.relay.sweep import FULL_SWEEP, QUICK_SWEEP, run_sweep
from bench.topology import Topology, cannot_run


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def split_cpus(cpus: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """``--cpus CAP/EMIT[/LOAD]``: the relay processes' CPU lists by role, and the generator's
    and the receiver's (none without LOAD)."""
    parts = cpus.split("/") if cpus else []
    if len(parts) not in (0, 2, 3) or not all(parts):
        raise SystemExit(f"bench.relay: --cpus {cpus!r}: expected CAP/EMIT or CAP/EMIT/LOAD")
    relay = dict(zip(("cap", "emit"), parts, strict=False))
    return relay, ({"gen": parts[2], "recv": parts[2]} if len(parts) == 3 else {})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.relay", description=(package.__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="one short sweep, 1 run per point")
    parser.add_argument("--runs", type=int, help="runs per point (median); default 3, quick 1")
    parser.add_argument("--seconds", type=float, help="seconds per point; default 3, quick 1.5")
    parser.add_argument(
        "--paths",
        default="direct,relayd",
        help="comma-separated paths: direct, relayd, or floor (bench/floor.c, the least a"
        " two-hop TCP relay adds here, in relayd's place)",
    )
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
    parser.add_argument(
        "--bursts",
        type=int,
        metavar="RATE",
        help="how a burst crosses the relay, per position in the burst, from tcpdump stamps"
        " (bursty shape at RATE datagrams/s, after a direct run), no sweep",
    )
    parser.add_argument("--profile-shape", default="fixed", choices=("fixed", "bursty"))
    parser.add_argument(
        "--busy-poll",
        metavar="DURATION",
        help="run the relay feeds in latency mode: busy_poll = DURATION (e.g. 50us, 200us)",
    )
    parser.add_argument(
        "--busy-poll-on",
        default="both",
        choices=("both", "cap", "emit"),
        help="which relay feed --busy-poll applies to (default both): with --cpus, one hop"
        " spinning on a core of its own",
    )
    parser.add_argument(
        "--cpus",
        metavar="CAP/EMIT[/LOAD]",
        help="pin the relay processes with taskset, e.g. 0/1 (separate cores) or 0/0; LOAD"
        " pins the generator and the receiver too (e.g. 0/1/0: emit alone on core 1)",
    )
    parser.add_argument(
        "--keep-awake",
        action="store_true",
        help="run a SCHED_IDLE spinner on every CPU, so no CPU halts between datagrams: what"
        " the paths cost on a host whose cores stay out of deep idle",
    )
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
        return 0

    if cannot_run("bench.relay"):
        return 0
    perf = ""
    if args.perf:
        found, why = find_perf()
        if found is None:
            print(f"bench.relay: skipped: {why}")
            return 0
        perf = found
    spy = find_py_spy() if args.profile else None
    if args.profile and spy is None:
        print("bench.relay: skipped: py-spy is not installed (pip install -e '.[bench]')")
        return 0
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
    one_point = bool(args.profile or args.hops or args.bursts or args.perf)  # no sweep
    relay_pins, load_pins = split_cpus(args.cpus)
    if "floor" in paths and ("relayd" in paths or args.profile or args.perf):
        print("bench.relay: the floor relay runs alone: --paths direct,floor, no profiling")
        return 2

    gen, recv = build()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    with contextlib.suppress(OSError, IndexError):
        pressure = Path("/proc/pressure/cpu").read_text().split()[2]  # some avg60=..
        load += f", CPU pressure {pressure.replace('=', ' ')} %"
    started = time.monotonic()
    with (
        appliance_limits() as limit_notes,
        cores_kept_awake(args.keep_awake) as awake,
        Topology(args.nice, load_pins) as topo,
        tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp,
    ):
        notes = [*limit_notes, *awake]
        for note in notes:
            print(f"bench.relay: {note}")
        relay: Relay | None = None
        relayed = "floor" if "floor" in paths else "relayd"  # the path through the relay
        if relayed in paths or one_point:
            relay = Relay(
                topo,
                Path(tmp),
                busy_poll=args.busy_poll,
                busy_poll_on=args.busy_poll_on,
                pins=relay_pins,
                floor=compile_c("floor") if relayed == "floor" else None,
            )
            relay.start()
        bench = Bench(topo, gen, recv, relay)
        try:
            if relay is not None and not bench.probe(relayed):
                problem = relay.failure() or (
                    f"no datagram came through; logs: cap: {relay.log_tail('cap')}"
                    f" emit: {relay.log_tail('emit')}"
                )
                print(f"bench.relay: relay path unavailable: {problem}")
                relay.stop()
                relay = bench.relay = None
                paths = [p for p in paths if p != relayed]
                if one_point:
                    return 1
            if args.hops and relay is not None:
                print("\n".join(hops(bench, relay, args.hops, seconds, Path(tmp), relayed)))
                return 0
            if args.bursts and relay is not None:
                print("\n".join(bursts(bench, args.bursts, seconds, Path(tmp), relayed)))
                return 0
            if args.profile and relay is not None and spy is not None:
                rate = args.profile_rate or 100_000
                print("\n".join(profile(bench, relay, rate, 12, args.profile_shape, spy)))
                return 0
            if args.perf and relay is not None:
                rate = args.profile_rate or 50_000
                print(f"machine load before the run (loadavg 1/5/15 min): {load}")
                print("\n".join(
                    perf_report(bench, relay, rate, args.seconds or 4.0, args.profile_shape, perf)
                ))  # fmt: skip
                return 0
            results = run_sweep(bench, sweep, paths, runs, seconds)
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
        "notes": [
            *notes,
            *([f"generator, receiver and relay processes at nice {args.nice}"] * bool(args.nice)),
            *([f"busy_poll = {args.busy_poll} on {args.busy_poll_on}"] * bool(args.busy_poll)),
            *([f"pinned (capture/emit[/generator and receiver]): {args.cpus}"] * bool(args.cpus)),
        ],
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    print()
    print(f"relay benchmark ({mode}, {seconds:g} s per point, median of {runs}); {meta['machine']}")
    print("\n".join(table(results)))
    guard = ratios(results)
    if guard:
        print(f"\n{relayed} against the direct path:")
        print("\n".join(guard))
    (OUT / "relay-results.json").write_text(
        json.dumps({"meta": meta, "points": [asdict(p) for p in results]}, indent=1)
    )
    if args.docs:
        write_docs(results, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
