"""The sweep: every (shape, rate) point on every path, interleaved, ``runs`` times each, merged
into the field-wise median."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict

from bench.relay.harness import Bench, Point
from bench.relay.report import fmt

FULL_SWEEP = {"fixed": (10_000, 50_000, 100_000, 150_000, 200_000), "bursty": (10_000, 50_000)}
QUICK_SWEEP = {"fixed": (10_000, 100_000), "bursty": (50_000,)}


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


def run_sweep(
    bench: Bench, sweep: dict[str, tuple[int, ...]], paths: Sequence[str], runs: int, seconds: float
) -> list[Point]:
    """Measure every point and print one line per merged point as it comes."""
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
                print(progress_line(merged), flush=True)
    return results


def progress_line(merged: Point) -> str:
    return (
        f"  {merged.path:6s} {merged.shape:6s} {merged.rate:>7,}/s  loss {merged.loss_pct:7.3f} %"
        f"  p50 {fmt(merged.p50):>8s}  p99 {fmt(merged.p99):>8s} µs"
        f" (kernel stamp {fmt(merged.k_p50)}/{fmt(merged.k_p99)})"
        f"  gen {merged.gen_cpu_us:.1f} recv {merged.recv_cpu_us:.1f} µs/dgram"
        + (
            f"  relay {merged.cpu_us:.1f} µs/dgram"
            f" ({fmt(merged.cpu_sys_pct, 0)}% sys), waited for a CPU"
            f" {fmt(merged.runq_capture_pct, 0)}%/"
            f"{fmt(merged.runq_emit_pct, 0)}% of the time"
            if merged.cpu_us
            else ""
        )
        + (f"  capture drops {merged.capture_drops}" if merged.capture_drops else "")
    )
