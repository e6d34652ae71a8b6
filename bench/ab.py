"""Two relayd trees compared in one sitting: ``bench.relay`` run in each, alternately.

``python -m bench.ab OLD NEW --rounds 5 -- --quick`` runs ``python -m bench.relay --quick``
with each tree's ``.venv`` and working directory, OLD, NEW, OLD, NEW, ... so load from elsewhere
on the machine hits both alike, reads each run's ``bench/out/relay-results.json`` and prints,
per point, the medians over the rounds of both trees and their ratio (NEW / OLD): relay CPU per
datagram (capture + emit), p50 and p99 one-way latency, and the direct path's p50/p99 of the
same runs beside them. Raw figures: ``bench/out/ab-results.json`` of the tree it runs from.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"

#: Figures compared, as (label, how to get it from a point of relay-results.json).
FIGURES: tuple[tuple[str, str], ...] = (
    ("CPU us/dgram", "cpu"),
    ("p50 us", "p50"),
    ("p99 us", "p99"),
)


def _figure(point: dict[str, Any], key: str) -> float | None:
    if point.get("error"):
        return None
    if key == "cpu":
        capture, emit = point.get("cpu_capture_us"), point.get("cpu_emit_us")
        return None if capture is None or emit is None else float(capture) + float(emit)
    value = point.get(key)
    return None if value is None else float(value)


def _loss(point: dict[str, Any]) -> float:
    sent = point.get("sent") or 0
    return 0.0 if not sent else 100.0 * (sent - (point.get("received") or 0)) / sent


def run_once(tree: Path, args: Sequence[str]) -> list[dict[str, Any]]:
    """One ``bench.relay`` run in ``tree``: its points."""
    python = tree / ".venv" / "bin" / "python"
    subprocess.run([str(python), "-m", "bench.relay", *args], cwd=tree, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    results = json.loads((tree / "bench" / "out" / "relay-results.json").read_text())
    points: list[dict[str, Any]] = results["points"]
    return points


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _show(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def report(runs: dict[str, list[list[dict[str, Any]]]], names: Sequence[str]) -> str:
    """A markdown table: per point and figure, each tree's median and NEW / OLD."""
    old, new = names
    keys: dict[tuple[str, str, int], None] = {}
    for points in runs[old]:
        for point in points:
            keys[(point["path"], point["shape"], point["rate"])] = None
    lines = [
        f"| shape | rate/s | figure | direct ({old}) | direct ({new}) | relayd {old} "
        f"| relayd {new} | ratio | max loss % ({old}/{new}) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path, shape, rate in keys:
        if path != "relayd":
            continue
        for label, key in FIGURES:
            cells = []
            for name in names:
                for which in ("direct", "relayd"):
                    values = [
                        v
                        for points in runs[name]
                        for p in points
                        if (p["path"], p["shape"], p["rate"]) == (which, shape, rate)
                        and (v := _figure(p, key)) is not None
                    ]
                    cells.append(_median(values))
            direct_old, relay_old, direct_new, relay_new = cells
            ratio = None if not relay_old or relay_new is None else relay_new / relay_old
            loss = [
                max(
                    (
                        _loss(p)
                        for points in runs[name]
                        for p in points
                        if (p["path"], p["shape"], p["rate"]) == ("relayd", shape, rate)
                    ),
                    default=0.0,
                )
                for name in names
            ]
            direct = key != "cpu"
            lines.append(
                f"| {shape} | {rate:,} | {label} | {_show(direct_old) if direct else '-'} "
                f"| {_show(direct_new) if direct else '-'} | {_show(relay_old)} "
                f"| {_show(relay_new)} | {'-' if ratio is None else f'{ratio:.2f}'} "
                f"| {loss[0]:.3f}/{loss[1]:.3f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ab", description=__doc__, epilog="bench.relay options follow --"
    )
    parser.add_argument("old", type=Path, help="the tree to compare against")
    parser.add_argument("new", type=Path, help="the tree under test")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each tree (default 5)")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.relay_args = argv[cut + 1 :]
    names = (str(args.old), str(args.new))
    if names[0] == names[1]:
        parser.error("OLD and NEW are the same tree")
    runs: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for tree, name in ((args.old, names[0]), (args.new, names[1])):
            print(f"bench.ab: round {round_ + 1}/{args.rounds}: {name}", file=sys.stderr)
            runs[name].append(run_once(tree.resolve(), args.relay_args))
    OUT.mkdir(exist_ok=True)
    (OUT / "ab-results.json").write_text(json.dumps({"args": args.relay_args, "runs": runs}))
    print(f"{args.rounds} rounds each, alternately; medians; ratio = {names[1]} / {names[0]}")
    print(report(runs, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
