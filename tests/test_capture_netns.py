"""The whole relay between network namespaces, each side a real ``relayd run``.

    exch ──veth── dc ──veth── cloud ──veth── cust
    player        capture     emit (1 or 2   receiver joined
    (multicast)   feed        addresses)     to every group

"exch" stands for the exchange: the player sends the Deribit sample as real multicast into
"dc" over its own link, so the TCP path dc-cloud can be cut without touching the source.
The receiver in "cust" records every datagram (group, port, payload, arrival time), which
lets the tests check completeness, byte identity and per-group order, and measure the longest
silence during a failover.

Run as a script, this file is the player (``send``) and the receiver (``recv``) that run
inside the namespaces.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from relayd.netif import drain, open_group_receivers, open_multicast_sender
from relayd.tools.pcapng import CapturedDatagram, iter_datagrams, read_datagrams
from relayd.tools.player import replay
from tests.helpers.metrics import value as metric_value
from tests.helpers.netns import Link, Netns, NetnsError, NetnsHarness, read_line

pytestmark = [pytest.mark.netns, pytest.mark.slow]

FEED = "deribit"
EMIT_PORT = 6667
HEALTH_PORT = 18080
HERE = Path(__file__).resolve()


# -- what runs inside the namespaces (script mode) ------------------------------------------


def _send(args: argparse.Namespace) -> int:
    datagrams = list(iter_datagrams(args.pcap))[args.first : args.first + args.count]
    sock = open_multicast_sender(IPv4Address(args.interface), 1, False, 4 * 1024 * 1024)
    stats = trio.run(lambda: replay(sock, datagrams, speed=args.speed))
    print(json.dumps({"sent": stats.datagrams, "elapsed": stats.elapsed}), flush=True)
    return 0


def _recv(args: argparse.Namespace) -> int:
    pairs = []
    for text in args.groups:
        group, _, port = text.rpartition(":")
        pairs.append((IPv4Address(group), int(port)))
    receivers = open_group_receivers(pairs, IPv4Address(args.interface), 8 * 1024 * 1024)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print("ready", flush=True)
    out = open(args.out, "w")  # noqa: SIM115 - a pipe would block the receive loop
    while not stop:
        try:
            ready, _, _ = select.select(receivers, [], [], 0.2)
        except InterruptedError:
            continue
        for receiver in ready:
            for group, port, payload, drops in drain(receiver):
                now = time.time_ns()
                line = {"t": now, "g": str(group), "p": port, "d": payload.hex(), "k": drops}
                out.write(json.dumps(line) + "\n")
    out.close()
    return 0


def _script(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    send = commands.add_parser("send")
    send.add_argument("--pcap", required=True)
    send.add_argument("--interface", required=True)
    send.add_argument("--speed", type=float, default=1.0)
    send.add_argument("--first", type=int, default=0)
    send.add_argument("--count", type=int, default=10**9)
    recv = commands.add_parser("recv")
    recv.add_argument("--interface", required=True)
    recv.add_argument("--out", required=True)
    recv.add_argument("groups", nargs="+")
    args = parser.parse_args(argv)
    return _send(args) if args.command == "send" else _recv(args)


# -- the test topology -----------------------------------------------------------------------


@attrs.define
class Relay:
    net: NetnsHarness
    exch: Netns
    dc: Netns
    cloud: Netns
    cust: Netns
    source: Link  # exch - dc
    path: Link  # dc - cloud
    egress: Link  # cloud - cust
    second_emit: IPv4Address  # another cloud address on the dc-facing link
    workdir: Path
    groups: list[str]
    capture: subprocess.Popen[bytes] | None = None
    emits: list[subprocess.Popen[bytes]] = attrs.field(factory=list)
    receiver: subprocess.Popen[bytes] | None = None
    fds: list[int] = attrs.field(factory=list)

    def _log_file(self, name: str) -> int:
        """A file descriptor for a child's stderr (closed in the parent right after)."""
        fd = os.open(self.workdir / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.fds.append(fd)
        return fd

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def write(self, name: str, text: str) -> Path:
        path = self.workdir / name
        path.write_text(text)
        return path

    def start_capture(self, replay_max_bytes: str = "64MiB") -> None:
        groups = ", ".join(f'"{g}"' for g in self.groups)
        config = self.write(
            "capture.toml",
            f"""
[health]
listen = "127.0.0.1:{HEALTH_PORT}"

[[capture]]
name = "{FEED}"
interface = "{self.source.b_dev}"
groups = [{groups}]
targets = ["{self.path.b_addr.ip}:{EMIT_PORT}", "{self.second_emit}:{EMIT_PORT}"]
replay_max_bytes = "{replay_max_bytes}"
heartbeat_interval = "200ms"
idle_timeout = "1s"
connect_timeout = "1s"
""",
        )
        self.capture = self.dc.popen(
            self.dc.relayd_argv("run", "--config", str(config)),
            stdout=subprocess.DEVNULL,
            stderr=self._log_file("capture.log"),
        )

    def start_emit(self, address: IPv4Address) -> subprocess.Popen[bytes]:
        config = self.write(
            f"emit-{address}.toml",
            f"""
[health]
listen = "127.0.0.1:{HEALTH_PORT + 1 + len(self.emits)}"

[[emit]]
name = "{FEED}"
listen = "{address}:{EMIT_PORT}"
interface = "{self.egress.a_dev}"
ttl = 1
allowed_sources = ["{self.path.a_addr.network}"]
allowed_groups = ["239.111.111.0/24"]
heartbeat_interval = "200ms"
idle_timeout = "1s"
""",
        )
        proc = self.cloud.popen(
            self.cloud.relayd_argv("run", "--config", str(config)),
            stdout=subprocess.DEVNULL,
            stderr=self._log_file(f"emit-{address}.log"),
        )
        self.emits.append(proc)
        return proc

    def start_receiver(self) -> None:
        self.receiver = self.cust.popen(
            self.cust.python_argv(
                str(HERE),
                "recv",
                "--interface",
                str(self.egress.b_addr.ip),
                "--out",
                str(self.workdir / "received.jsonl"),
                *self.groups,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert read_line(self.receiver, timeout=20).strip() == "ready"

    def stop_receiver(self) -> list[dict[str, Any]]:
        assert self.receiver is not None
        self.receiver.send_signal(signal.SIGTERM)
        _, err = self.receiver.communicate(timeout=30)
        assert self.receiver.returncode == 0, err.decode()
        lines = (self.workdir / "received.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def play(
        self, pcap: Path, speed: float, first: int = 0, count: int = 10**9
    ) -> subprocess.Popen[bytes]:
        return self.exch.popen(
            self.exch.python_argv(
                str(HERE), "send", "--pcap", str(pcap), "--interface",
                str(self.source.a_addr.ip), "--speed", str(speed),
                "--first", str(first), "--count", str(count),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip

    def metrics(self, netns: Netns | None = None, port: int = HEALTH_PORT) -> str:
        """A process's /metrics (default: the capture's)."""
        netns = netns or self.dc
        status, body = netns.http_get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200, body
        return body

    def metric(self, name: str) -> float:
        """A capture metric; counters carry Prometheus' ``_total`` suffix."""
        try:
            return metric_value(self.metrics(), f"capture_{name}", feed=FEED)
        except AssertionError:  # not exported yet
            return -1.0

    def wait_streaming(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.metric("connected") == 1:
                    return
            except (NetnsError, OSError):  # the health server is not up yet
                pass
            time.sleep(0.1)
        raise AssertionError(f"capture not streaming; log: {self.log('capture.log')}")

    def log(self, name: str) -> str:
        path = self.workdir / name
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _groups(datagrams: list[CapturedDatagram]) -> list[str]:
    return sorted({f"{d.group}:{d.port}" for d in datagrams})


@pytest.fixture
def relay(netns: NetnsHarness, tmp_path: Path, deribit_sample: Path) -> Iterator[Relay]:
    exch = netns.namespace("exch")
    dc = netns.namespace("dc")
    cloud = netns.namespace("cloud")
    cust = netns.namespace("cust")
    source = netns.link(exch, dc)
    path = netns.link(dc, cloud)
    egress = netns.link(cloud, cust)
    exch.add_multicast_route(source.a_dev)
    second = IPv4Address(int(path.b_addr.ip) + 1)
    cloud.run(["ip", "addr", "add", f"{second}/{path.b_addr.network.prefixlen}", "dev", path.b_dev])
    relay = Relay(
        net=netns,
        exch=exch,
        dc=dc,
        cloud=cloud,
        cust=cust,
        source=source,
        path=path,
        egress=egress,
        second_emit=second,
        workdir=tmp_path,
        groups=_groups(read_datagrams(deribit_sample)),
    )
    try:
        yield relay
    finally:
        netns.close()
        relay.close_fds()


def _check_complete(
    sent: list[CapturedDatagram], got: list[dict[str, Any]]
) -> tuple[int, list[dict[str, Any]]]:
    """Every datagram arrived byte-identical, in order per group; returns the duplicate count
    and the first copies."""
    expected: dict[tuple[str, int], list[str]] = {}
    for d in sent:
        expected.setdefault((str(d.group), d.port), []).append(d.payload.hex())
    seen: set[tuple[str, int, str]] = set()
    firsts: dict[tuple[str, int], list[str]] = {}
    first_copies = []
    duplicates = 0
    for item in got:
        key = (item["g"], item["p"], item["d"])
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        first_copies.append(item)
        firsts.setdefault((item["g"], item["p"]), []).append(item["d"])
    missing = sum(len(v) for v in expected.values()) - len(seen)
    assert missing == 0, f"{missing} datagrams missing"
    assert firsts == expected  # byte-identical, nothing extra, per-group order
    return duplicates, first_copies


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out.decode().splitlines()[-1])
    return result


def _settle(relay: Relay, count: int, timeout: float = 15.0) -> None:
    """Wait until the emit side acknowledged ``count`` datagrams."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if relay.metric("acked_seq") >= count:
            return
        time.sleep(0.1)


def _unique_payloads(datagrams: list[CapturedDatagram]) -> None:
    keys = {(d.group, d.port, d.payload) for d in datagrams}
    assert len(keys) == len(datagrams), "the sample repeats a datagram; duplicates unmeasurable"


@pytest.mark.parametrize(("speed", "count"), [(1.0, 700), (100.0, 10**9)])
def test_sample_arrives_complete_and_identical(
    relay: Relay, deribit_sample: Path, speed: float, count: int
) -> None:
    """At the capture's own pacing (its first 700 datagrams, ~10 s) and the whole capture
    at 100x: complete, byte-identical, per-group ordered, no duplicates."""
    datagrams = read_datagrams(deribit_sample)[:count]
    _unique_payloads(datagrams)
    relay.start_emit(relay.path.b_addr.ip)
    relay.start_capture()
    relay.start_receiver()
    relay.wait_streaming()
    result = _wait(relay.play(deribit_sample, speed, count=count), timeout=120)
    assert result["sent"] == len(datagrams)
    _settle(relay, len(datagrams))
    time.sleep(0.3)
    got = relay.stop_receiver()
    duplicates, _ = _check_complete(datagrams, got)
    assert duplicates == 0
    assert relay.metric("datagrams_in") == len(datagrams)
    assert relay.metric("kernel_drops") == 0


@pytest.mark.parametrize("hang", [False, True], ids=["kill", "hang-then-kill"])
def test_emit_host_failover_loses_nothing(relay: Relay, deribit_sample: Path, hang: bool) -> None:
    """Kill the emit process mid-stream (SIGKILL, no goodbye; or first freeze it for 0.5 s,
    so that it takes in data it never emits) while a second emit process listens on another
    address: the capture side reconnects there and resends; the receiver sees every datagram,
    duplicates only within the window the dead host had emitted but not acknowledged."""
    datagrams = read_datagrams(deribit_sample)
    _unique_payloads(datagrams)
    first = relay.start_emit(relay.path.b_addr.ip)
    relay.start_capture()
    relay.start_receiver()
    relay.wait_streaming()
    relay.start_emit(relay.second_emit)  # the standby (an NLB's other target), not used yet
    time.sleep(1.5)
    player = relay.play(deribit_sample, 10.0)  # 8 s
    time.sleep(3.0)
    # The host hangs first (SIGSTOP: it neither emits nor ACKs what is still arriving), then
    # dies; what it took in meanwhile exists only in the capture side's replay buffer.
    killed_at = time.time_ns()
    if hang:
        first.send_signal(signal.SIGSTOP)
        time.sleep(0.5)
    unacked_before = relay.metric("unacked_datagrams")
    first.kill()
    first.wait(timeout=10)
    result = _wait(player, timeout=60)
    assert result["sent"] == len(datagrams)
    _settle(relay, len(datagrams))
    time.sleep(0.3)
    got = relay.stop_receiver()
    duplicates, firsts = _check_complete(datagrams, got)
    resent = relay.metric("resent_datagrams")
    # duplicates are datagrams the dead host emitted but had not acknowledged: the capture
    # side resent them (every resend to a new host counts), and no more than were in flight
    assert duplicates <= resent
    if hang:
        assert unacked_before >= 1
        assert resent >= unacked_before
    gaps = [
        (b["t"] - a["t"]) / 1e9
        for a, b in itertools.pairwise(firsts)
        if b["t"] > killed_at - 1_000_000_000
    ]
    longest = max(gaps) if gaps else 0.0
    assert longest < (0.5 if hang else 0.0) + 1.0
    print(
        f"failover: duplicates {duplicates}, resent {resent}, unacked before kill "
        f"{unacked_before}, longest silence at the receiver after the kill {longest:.3f} s"
    )


def test_tcp_path_cut_and_restored(relay: Relay, deribit_sample: Path) -> None:
    """``ip link set down`` on the dc-cloud link for 2 s while streaming: the capture process
    keeps capturing into its replay buffer (bounded), reconnects when the link is back and
    nothing is lost."""
    datagrams = read_datagrams(deribit_sample)
    relay.start_emit(relay.path.b_addr.ip)
    relay.start_capture(replay_max_bytes="16MiB")
    relay.start_receiver()
    relay.wait_streaming()
    player = relay.play(deribit_sample, 10.0)
    time.sleep(2.0)
    relay.path.set_up(False)
    time.sleep(2.0)
    assert relay.capture is not None
    assert relay.capture.poll() is None
    held = relay.metric("replay_bytes")
    assert 0 < held <= 16 * 1024 * 1024 + 512 * 1024
    status = Path(f"/proc/{relay.capture.pid}/status").read_text()
    rss_kib = int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1])
    assert rss_kib < 300 * 1024
    print(f"path cut: replay buffer {held / 1e6:.2f} MB, capture RSS {rss_kib / 1024:.1f} MiB")
    relay.path.set_up(True)
    result = _wait(player, timeout=60)
    assert result["sent"] == len(datagrams)
    _settle(relay, len(datagrams), timeout=30)
    time.sleep(0.3)
    got = relay.stop_receiver()
    _check_complete(datagrams, got)
    assert relay.metric("replay_dropped_datagrams") == 0
    assert relay.capture.poll() is None


if __name__ == "__main__":
    sys.exit(_script())
