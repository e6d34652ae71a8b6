"""``relayd demo``: what it replays and says, its two latencies, and ``make demo``'s install."""

from __future__ import annotations

import argparse
import math
import re
import subprocess
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from relayd.tools import demo, samples
from relayd.tools.pcapng import PcapngWriter

REPO = Path(__file__).resolve().parent.parent


def test_bucket_quantile_reads_a_cumulative_histogram() -> None:
    buckets = [(1e-6, 0), (2e-6, 10), (4e-6, 90), (8e-6, 100), (math.inf, 100)]
    assert demo.bucket_quantile(buckets, 0.5) == 4e-6
    assert demo.bucket_quantile(buckets, 0.1) == 2e-6
    assert demo.bucket_quantile(buckets, 0.99) == 8e-6
    earlier = [(1e-6, 0), (2e-6, 10), (4e-6, 10), (8e-6, 10), (math.inf, 10)]
    assert demo.bucket_quantile(buckets, 0.5, earlier) == 4e-6  # only the 90 since
    assert math.isnan(demo.bucket_quantile(buckets, 0.5, buckets))
    assert demo._fmt_us(32e-6) == "<=32"


def _run(capsys: pytest.CaptureFixture[str], **kwargs: object) -> str:
    values: dict[str, object] = {"pcap": None, "speed": 1.0, "rate": 2000, "duration": 2.5}
    values.update(kwargs)
    assert demo.main(argparse.Namespace(**values)) == 0
    return capsys.readouterr().out


@pytest.mark.usefixtures("datapath")
def test_synthetic_traffic_says_why_and_both_latencies_are_explained(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "find_sample", lambda: None)
    out = _run(capsys)
    assert out.startswith(
        "relayd demo: replaying synthetic Deribit-shaped traffic (the Deribit sample was not"
        " found at ../shared/testdata/deribit/"
    )
    assert demo.LEGEND in out
    assert demo.HEADER in out
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\.\ds  ", line)]
    assert rows, out
    assert re.search(r"relay latency µs \(capture feed receive -> emit feed send, relayd's "
                     r"histogram\): p50 <=\d+  p99 <=\d+", out)  # fmt: skip
    assert "end-to-end latency ms (Python player -> Python receiver" in out
    assert re.search(r"first datagram relayed \d+\.\d ms after the player started", out)
    assert "in flight/lost" not in out  # the old column read as loss


@pytest.mark.usefixtures("datapath")
def test_a_capture_is_replayed_and_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "mine.pcapng"
    with path.open("wb") as stream:
        writer = PcapngWriter(stream)
        for i in range(200):
            writer.write(i * 1_000_000, (IPv4Address("10.0.0.1"), 1), IPv4Address("239.1.2.3"),
                         6100 + i % 2, bytes([i % 256]) * 100)  # fmt: skip
    out = _run(capsys, pcap=str(path), rate=None, speed=1.0, duration=1.0)
    assert out.startswith(f"relayd demo: replaying {path} (200 datagrams) at 1x")
    assert "ports 6100->" in out


def test_the_sample_is_found_from_the_main_checkout_of_a_worktree(tmp_path: Path) -> None:
    main, tree = tmp_path / "main", tmp_path / "trees" / "mine"
    (main / ".git" / "worktrees" / "mine").mkdir(parents=True)
    tree.mkdir(parents=True)
    (tree / ".git").write_text(f"gitdir: {main / '.git' / 'worktrees' / 'mine'}\n")
    assert samples.deribit_dir(tree) is None
    shared = tmp_path / "shared" / "testdata" / "deribit"
    shared.mkdir(parents=True)
    (shared / samples.DERIBIT_SAMPLE).write_bytes(b"")
    assert samples.deribit_dir(tree) == shared  # next to the main checkout
    assert samples.deribit_dir(main) == shared  # next to the checkout itself


def test_make_demo_installs_the_runtime_dependencies_only() -> None:
    """The recipe `make demo` would run in a fresh clone (no venv yet): a plain editable
    install, no dev extra, and a line saying so."""
    result = subprocess.run(
        ["make", "-n", "-C", str(REPO), "demo", "VENV=/nonexistent-venv"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    commands = result.stdout
    assert "pip install" in commands
    assert "[dev]" not in commands
    assert "pytest" not in commands
    assert "runtime dependencies" in commands
    assert "relayd demo" in commands
