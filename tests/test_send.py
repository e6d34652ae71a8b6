"""``relayd send``: where it sends (config feeds, --group, a capture's own groups), and the
real thing on loopback with ``relayd listen`` as the receiver."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from relayd.config import CaptureFeed, EmitFeed, Endpoint, GroupPort, PortRange
from relayd.tools.pcapng import CapturedDatagram, PcapngWriter
from relayd.tools.send import SendError, feed_groups, map_groups, pick_feed
from tests.helpers.netns import read_line

G = IPv4Address


def _capture(name: str = "dc") -> CaptureFeed:
    return CaptureFeed(
        name=name,
        interface="lo",
        groups=(GroupPort(G("239.1.1.1"), 6100), GroupPort(G("239.1.1.2"), 6101)),
        targets=(Endpoint("127.0.0.1", 1),),
    )


def _emit(name: str = "cloud") -> EmitFeed:
    return EmitFeed(
        name=name,
        listen=Endpoint("0.0.0.0", 6000),
        interface="lo",
        allowed_sources=(IPv4Network("10.0.0.0/8"),),
        allowed_groups=(IPv4Network("239.111.111.0/27"), IPv4Network("239.5.5.5/32")),
        allowed_ports=(PortRange(6101, 6101), PortRange(6100, 6100)),
    )


def test_the_groups_of_a_feed() -> None:
    assert feed_groups(_capture()) == ((G("239.1.1.1"), 6100), (G("239.1.1.2"), 6101))
    emit = feed_groups(_emit())
    assert emit[:2] == ((G("239.111.111.1"), 6100), (G("239.111.111.2"), 6100))
    assert len(emit) == 9  # 8 of the /27, the /32 itself
    assert emit[-1] == (G("239.5.5.5"), 6100)
    for group, port in emit:
        assert _emit().allows(group, port)  # the emit side lets every one through


def test_pick_feed() -> None:
    capture, emit = [_capture()], [_emit()]
    assert pick_feed(capture, emit, None).name == "dc"
    assert pick_feed([], emit, None).name == "cloud"
    assert pick_feed(capture, emit, "cloud").name == "cloud"
    with pytest.raises(SendError, match=r"no feed named 'x' \(feeds: cloud, dc\)"):
        pick_feed(capture, emit, "x")


def test_map_groups_keeps_known_groups_and_maps_the_rest_in_order() -> None:
    targets = [(G("239.1.1.1"), 6100), (G("239.1.1.2"), 6101)]
    traffic = [
        CapturedDatagram(0, G("239.9.9.9"), 1, b"a"),
        CapturedDatagram(1, G("239.1.1.2"), 6101, b"b"),
        CapturedDatagram(2, G("239.8.8.8"), 1, b"c"),
        CapturedDatagram(3, G("239.7.7.7"), 1, b"d"),
        CapturedDatagram(4, G("239.9.9.9"), 1, b"e"),
    ]
    got = [(d.group, d.port, d.payload) for d in map_groups(traffic, targets)]
    assert got == [
        (G("239.1.1.1"), 6100, b"a"),
        (G("239.1.1.2"), 6101, b"b"),
        (G("239.1.1.2"), 6101, b"c"),
        (G("239.1.1.1"), 6100, b"d"),  # more groups than targets: wraps
        (G("239.1.1.1"), 6100, b"e"),
    ]


# ---- on loopback ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _groups(count: int) -> list[str]:
    port = _free_port()
    base = int(G("239.255.0.0")) + random.randrange(1, 250) * 256
    return [f"{G(base + i + 1)}:{port}" for i in range(count)]


def _relayd(*argv: str) -> list[str]:
    return [sys.executable, "-m", "relayd", *argv]


def _listen(groups: list[str], count: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        _relayd("listen", *groups, "-i", "lo", "--json", "--count", str(count), "--expect-all",
                "--duration", "30"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert json.loads(read_line(proc, timeout=20.0))["event"] == "ready"
    return proc


def _send(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _relayd("send", "-i", "lo", *argv), capture_output=True, text=True, timeout=60, check=False
    )


def _summary(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, (out.decode(), err.decode())
    summary: dict[str, Any] = json.loads(out.decode().splitlines()[-1])
    return summary


def test_synthetic_traffic_to_groups_given_on_the_command_line() -> None:
    groups = _groups(3)
    listener = _listen(groups, 60)
    args = [a for g in groups for a in ("--group", g)]
    sent = _send(*args, "--count", "60", "--rate", "2000")
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.splitlines()[0].startswith("relayd send: 60 synthetic Deribit-shaped")
    assert sent.stdout.splitlines()[-1].startswith("sent 60 datagrams, ")
    summary = _summary(listener)
    assert summary["datagrams"] == 60
    assert {g["group"] for g in summary["groups"] if g["datagrams"]} == set(groups)


def test_synthetic_traffic_to_the_groups_an_emit_feed_allows(tmp_path: Path) -> None:
    port = _free_port()
    third = random.randrange(1, 250)
    config = tmp_path / "relayd.toml"
    config.write_text(
        f"""
[[emit]]
name = "cloud"
listen = "0.0.0.0:6000"
interface = "lo"
allowed_sources = ["10.0.0.0/8"]
allowed_groups = ["239.254.{third}.0/30"]
allowed_ports = ["{port}"]
"""
    )
    groups = [f"239.254.{third}.{i}:{port}" for i in (1, 2)]
    listener = _listen(groups, 40)
    sent = _send("--config", str(config), "--count", "40", "--rate", "2000")
    assert sent.returncode == 0, sent.stderr
    assert f"(emit feed 'cloud' of {config})" in sent.stdout
    assert _summary(listener)["datagrams"] == 40


def test_a_capture_replays_to_its_own_groups_or_to_the_given_ones(tmp_path: Path) -> None:
    own, other = _groups(2), _groups(1)
    path = tmp_path / "c.pcapng"
    with path.open("wb") as stream:
        writer = PcapngWriter(stream)
        for i in range(30):
            group, port = own[i % 2].split(":")
            writer.write(i * 1000, (G("10.0.0.1"), 5000), G(group), int(port), bytes([i]) * 50)
    listener = _listen(own, 30)
    sent = _send(str(path), "--speed", "0")
    assert sent.returncode == 0, sent.stderr
    assert "(as captured)" in sent.stdout
    assert _summary(listener)["datagrams"] == 30
    listener = _listen(other, 30)
    sent = _send(str(path), "--speed", "0", "--group", other[0])
    assert sent.returncode == 0, sent.stderr
    assert _summary(listener)["datagrams"] == 30


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "/nonexistent/relayd.toml"], "relayd send: /nonexistent/relayd.toml: "),
        (["--group", "239.1.1.1:1", "-i", "nosuchif0"], "no interface named 'nosuchif0'"),
        (["/nonexistent.pcapng"], "No such file or directory"),
    ],
)
def test_bad_input_exits_2(argv: list[str], message: str) -> None:
    result = subprocess.run(
        _relayd("send", *argv), capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert message in result.stderr
