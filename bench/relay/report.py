"""Tables and ratios for the terminal, the results block of docs/PERFORMANCE.md and its plot.

The plot needs matplotlib (``pip install -e '.[bench]'``); without it the docs are written and
the plot is skipped with a message."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.relay.harness import REPO, Point

RESULTS_BEGIN = "<!-- results:begin (written by python -m bench.relay --docs) -->"
RESULTS_END = "<!-- results:end -->"


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or value < 0 else f"{value:.{digits}f}"


def _pair(capture: float | None, emit: float | None) -> str:
    """``capture/emit`` in whole units, "-" when either is unknown."""
    return "-" if capture is None or emit is None else f"{capture:.0f}/{emit:.0f}"


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
        rss = _pair(p.rss_capture_mb, p.rss_emit_mb)
        rows.append(
            f"| {p.path} | {p.shape} | {p.rate:,} | {p.sent:,} | {p.received:,} "
            f"| {p.delivered_rate / 1000:,.1f}k "
            f"| {p.loss_pct:.3f} | {p.dup} | {p.reorder} | {fmt(p.p50)} | {fmt(p.p99)} "
            f"| {fmt(p.p999)} | {fmt(p.k_p50)}/{fmt(p.k_p99)} | {cpu} | {rss} |"
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
        if p.path == "direct" or not p.sent:
            continue
        peak = _pair(p.hwm_capture_mb, p.hwm_emit_mb)
        rows.append(
            f"| {p.shape} | {p.rate:,} | {_pace(p)} "
            f"| {p.gen_cpu_us:.1f} / {p.recv_cpu_us:.1f} | {fmt(p.cpu_sys_pct, 0)} % "
            f"| {fmt(p.runq_capture_pct, 0)} % / {fmt(p.runq_emit_pct, 0)} % "
            f"| {p.capture_drops} | {peak} |"
        )
    return rows


def ratios(points: Sequence[Point]) -> list[str]:
    """The relay against the direct path at each (shape, rate): the regression guard."""
    by_key = {(p.path, p.shape, p.rate): p for p in points}
    lines = []
    for p in points:
        if p.path == "direct":
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
    print("wrote docs/PERFORMANCE.md")
    target = REPO / "docs" / "performance.png"
    if plot(points, target, meta):
        print("wrote docs/performance.png")


def _pyplot() -> Any | None:
    """matplotlib's pyplot, or None (with a message) when the ``bench`` extra is missing."""
    try:
        return importlib.import_module("matplotlib.pyplot")
    except ImportError:
        print(
            "bench.relay: matplotlib is not installed, docs/performance.png not redrawn"
            " (install the bench extra: pip install -e '.[bench]', or make bench)",
            flush=True,
        )
        return None


def plot(points: Sequence[Point], target: Path, meta: dict[str, Any]) -> bool:
    """Throughput, loss and latency against rate into ``target``; False without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
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
    return True
