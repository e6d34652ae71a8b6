"""CPU of an emit feed's observer while another relay emits at a high rate
(`python -m bench.observer [--rates 50000,200000] [--seconds 4] [--rounds 3]`, root).

The benchmark's "gen" namespace sends the feed (bench/gen.c, 160-byte datagrams over 4 groups)
to "cap" over a veth; in "cap" a worker process joins the groups and runs for --seconds:

    sample  relayd's observer (relayd/emit/observer.py: a bounded sample per TICK, the role
            decided and the gate renewed after each drain), in its own thread, as on an emit
            host in standby
    full    a Python loop that reads every datagram (``recvmsg_into``, as the observer would
            without a bound): what the sample avoids

Figures: the worker's CPU (user + system, ``getrusage`` around the loop) as a share of one
core, and datagrams read per second, medians of --rounds with the modes alternated in each
round. The kernel's delivery of each datagram up to the socket (and its drop when the buffer is
full) runs in the sender's context on a veth, so it is not in these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import statistics
import sys
import threading
import time
from ipaddress import IPv4Address
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GROUPS = ("239.77.0.1", "239.77.0.2", "239.77.0.3", "239.77.0.4")
PORT = 6200
SIZE = 160
MODES = ("sample", "full")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(iface: str, mode: str, seconds: float) -> dict[str, float]:
    """Inside "cap": join, run ``mode`` for ``seconds``, report CPU and datagrams read."""
    from relayd.config import GroupPort  # noqa: PLC0415 - the worker's own imports
    from relayd.emit.observer import FeedRole, Observer  # noqa: PLC0415
    from relayd.netif import ANCBUFSIZE, open_group_receivers  # noqa: PLC0415

    address = IPv4Address(iface)
    watch = [GroupPort(IPv4Address(g), PORT) for g in GROUPS]
    stop_r, stop_w = os.pipe()
    if mode == "sample":
        role = FeedRole("bench", address)
        observer = Observer("bench", role, address, watch)
        thread = threading.Thread(target=observer.run, args=(stop_r, None))
        time.sleep(0.5)  # joined; let the traffic settle
        before = _cpu()
        thread.start()
        time.sleep(seconds)
        os.write(stop_w, b"x")
        thread.join()
        cpu = _cpu() - before
        read = observer.other_datagrams + observer.own_datagrams
    else:
        receivers = open_group_receivers(
            [(IPv4Address(g), PORT) for g in GROUPS], address, 4 * 1024 * 1024
        )
        buffer = bytearray(65536)
        time.sleep(0.5)
        before = _cpu()
        read = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select(receivers, [], [], 0.1)
            for receiver in ready:
                recv = receiver.sock.recvmsg_into
                while True:
                    try:
                        recv((buffer,), ANCBUFSIZE)
                    except BlockingIOError:
                        break
                    read += 1
        cpu = _cpu() - before
    return {"cpu_share": cpu / seconds, "read_per_second": read / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="50000,200000")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("IFACE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.seconds)), flush=True)
        return 0

    from bench.relay.harness import compile_c  # noqa: PLC0415 - needs gcc, root
    from bench.topology import Topology, cannot_run  # noqa: PLC0415

    if cannot_run("bench.observer"):
        return 0
    gen = compile_c("gen")
    rates = [int(r) for r in args.rates.split(",")]
    results: dict[tuple[int, str], list[dict[str, float]]] = {}
    with Topology() as topo:
        gen_addr, cap_addr = topo.links["g0"].a_ip, topo.links["g0"].b_ip
        for _round in range(args.rounds):
            for rate in rates:
                for mode in MODES:
                    count = int(rate * (args.seconds + 2.0))
                    sender = topo.popen(
                        "gen",
                        [str(gen), "--iface", gen_addr, "--groups", ",".join(GROUPS),
                         "--port", str(PORT), "--rate", str(rate), "--count", str(count),
                         "--size", str(SIZE), "--run-id", "1"],
                    )  # fmt: skip
                    done = topo.run(
                        "cap",
                        [sys.executable, "-m", "bench.observer", "--seconds", str(args.seconds),
                         "--worker", cap_addr, mode],
                        timeout=args.seconds + 30,
                        cwd=REPO,
                    )  # fmt: skip
                    out, _ = sender.communicate(timeout=args.seconds + 30)
                    words = out.split()
                    sent_rate = int(words[1]) / float(words[3]) if len(words) > 3 else 0.0
                    if done.returncode != 0:
                        print(done.stderr, file=sys.stderr)
                        return 1
                    result = json.loads(done.stdout)
                    result["sent_per_second"] = sent_rate
                    results.setdefault((rate, mode), []).append(result)
    print(f"observer CPU while another relay emits ({args.rounds} rounds, medians; shared machine)")
    print(f"{'rate/s':>8} {'sent/s':>8} {'mode':>7} {'CPU % of a core':>16} {'read/s':>10}")
    for (rate, mode), runs in sorted(results.items()):
        cpu = statistics.median(r["cpu_share"] for r in runs) * 100
        read = statistics.median(r["read_per_second"] for r in runs)
        sent = statistics.median(r["sent_per_second"] for r in runs)
        print(f"{rate:>8} {sent:>8.0f} {mode:>7} {cpu:>16.2f} {read:>10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
