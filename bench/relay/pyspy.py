"""``--profile``: both relay processes recorded with py-spy (Python frames only) under load."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.relay.harness import OUT, Bench, Relay
from bench.relay.report import table
from bench.topology import stop


def find_py_spy() -> Path | None:
    """py-spy from the venv (the ``bench`` extra) or the PATH, else None."""
    binary = Path(sys.executable).parent / "py-spy"
    if binary.exists():
        return binary
    found = shutil.which("py-spy")
    return Path(found) if found else None


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


def profile(
    bench: Bench, relay: Relay, rate: int, seconds: float, shape: str, spy: Path
) -> list[str]:
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
