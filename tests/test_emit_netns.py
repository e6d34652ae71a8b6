"""The emit feed between network namespaces: ``relayd run`` in a "cloud" namespace.

    sender ──veth── cloud (relayd run: emit feed "deribit") ──veth── customer

The "sender" namespace speaks the wire protocol over TCP and streams the Deribit sample
capture; the "customer" namespace joins every group over its veth and must receive every
datagram byte for byte, in order per group, and nothing else. Along the way: a silent, a
garbage and a wrong-feed connection, a source outside the allowed CIDRs, datagrams for a group
outside the allowlist, a reconnect that resends, and the egress interface going down (send
errors, unhealthy) and up again (healthy).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from relayd.tools.pcapng import CapturedDatagram, read_datagrams
from tests.helpers.metrics import Families, parse
from tests.helpers.metrics import value as metric_value
from tests.helpers.netns import Link, Netns, NetnsHarness, read_line

pytestmark = [pytest.mark.netns, pytest.mark.slow]

FEED = "deribit"
PORT = 6667
HEALTH = "127.0.0.1:8080"
ALLOWED_GROUPS = "239.111.0.0/16"
OUTSIDE = ("239.255.250.1", 6100)  # outside ALLOWED_GROUPS: must never be emitted
UNJOINED = ("239.111.112.1", 6100)  # allowed, but the customer does not join it

# The capture side, run inside the sender namespace. Modes:
#   stream HOST PORT PCAP SESSION  - the main scenario; prints one JSON line of what it saw
#   plain HOST PORT PCAP SESSION   - only the capture, then waits for the last ACK
#   send HOST PORT SESSION FIRST_SEQ COUNT GROUP UDP_PORT - COUNT datagrams, waits for the ACK
SENDER = r"""
import json, os, select, socket, sys
from ipaddress import IPv4Address
from relayd.tools.pcapng import read_datagrams
from relayd.wire import (FROM_EMIT, Ack, Challenge, Decoder, Error, encode_datagram,
                         encode_hello)

FEED = "deribit"

class Conn:
    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.decoder = Decoder(FROM_EMIT)
        self.events = []

    def next(self):
        while not self.events:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return None
            self.events += self.decoder.feed(data)
        return self.events.pop(0)

    def hello(self, feed, session):
        challenge = self.next()
        assert isinstance(challenge, Challenge), challenge
        self.sock.sendall(encode_hello(feed, session))
        return self.next()

    def drain(self):
        while select.select([self.sock], [], [], 0)[0]:
            data = self.sock.recv(65536)
            if not data:
                raise SystemExit("emit side closed the stream")
            self.events += self.decoder.feed(data)

    def wait_ack(self, seq):
        while True:
            event = self.next()
            if isinstance(event, Ack) and event.seq >= seq:
                return event.seq
            assert event is None or not isinstance(event, Error), event
            if event is None:
                raise SystemExit("closed while waiting for an ACK")

    def codes_until_eof(self):
        codes = []
        while (event := self.next()) is not None:
            if isinstance(event, Error):
                codes.append(event.code)
        return codes

def frame(seq, group, port, payload):
    return encode_datagram(seq, int(IPv4Address(group)), port, seq, payload)

def send(conn, frames):
    for start in range(0, len(frames), 64):
        conn.sock.sendall(b"".join(frames[start:start + 64]))
        conn.drain()

mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "stream":
    pcap, session = sys.argv[4], bytes.fromhex(sys.argv[5])
    outside = (sys.argv[6], int(sys.argv[7]))
    frames = []
    for d in read_datagrams(pcap):
        frames.append(frame(len(frames) + 1, str(d.group), d.port, d.payload))
        if len(frames) % 1000 == 999:
            frames.append(frame(len(frames) + 1, outside[0], outside[1], b"must not appear"))
    total = len(frames)
    result = {"total": total}
    silent = [Conn(host, port) for _ in range(3)]
    garbage = Conn(host, port)
    garbage.sock.sendall(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
    wrong = Conn(host, port)
    result["wrong_feed"] = [wrong.hello("dev", session).code] + wrong.codes_until_eof()
    main = Conn(host, port)
    result["welcome"] = main.hello(FEED, session).seq
    send(main, frames[: total - 200])
    result["ack"] = main.wait_ack(total - 200)
    main.sock.close()
    again = Conn(host, port)  # reconnect, resend the last 700 (500 already emitted)
    result["welcome_again"] = again.hello(FEED, session).seq
    send(again, frames[total - 700 :])
    result["ack_again"] = again.wait_ack(total)
    result["garbage"] = garbage.codes_until_eof()
    result["silent"] = [conn.codes_until_eof() for conn in silent]
    again.sock.close()
    print(json.dumps(result), flush=True)
elif mode == "plain":
    pcap, session = sys.argv[4], bytes.fromhex(sys.argv[5])
    frames = [frame(i + 1, str(d.group), d.port, d.payload)
              for i, d in enumerate(read_datagrams(pcap))]
    conn = Conn(host, port)
    welcome = conn.hello(FEED, session).seq
    send(conn, frames)
    print(json.dumps({"welcome": welcome, "ack": conn.wait_ack(len(frames))}), flush=True)
    conn.sock.close()
else:
    session, first, count = bytes.fromhex(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    group, udp_port = sys.argv[7], int(sys.argv[8])
    conn = Conn(host, port)
    welcome = conn.hello(FEED, session).seq
    send(conn, [frame(first + i, group, udp_port, b"x" * 100) for i in range(count)])
    print(json.dumps({"welcome": welcome, "ack": conn.wait_ack(first + count - 1)}), flush=True)
    conn.sock.close()
"""

# The customer: joins every group given, writes "group port payload-hex drops" per datagram
# to a file until SIGTERM.
RECEIVER = r"""
import json, select, signal, sys
from ipaddress import IPv4Address
from relayd.netif import drain, open_group_receivers, resolve_interface

dev, groups, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
receivers = open_group_receivers(
    [(IPv4Address(g), p) for g, p in groups], resolve_interface(dev), 32 * 1024 * 1024
)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
print("ready", flush=True)
with open(out, "w") as f:
    while True:
        ready, _, _ = select.select(receivers, [], [], 0.05)
        for r in ready:
            for group, port, payload, drops in drain(r):
                f.write(f"{group} {port} {payload.hex()} {drops}\n")
        if stop and not ready:
            break
"""

# From a namespace outside allowed_sources: what does the listener say before it closes?
PROBE = r"""
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
try:
    data = sock.recv(1024)
except ConnectionResetError:
    data = b""
print(data.hex())
"""


def fetch(cloud: Netns, path: str) -> tuple[int, str]:
    return cloud.http_get(f"http://{HEALTH}{path}")


def metrics(cloud: Netns) -> Families:
    status, body = fetch(cloud, "/metrics")
    assert status == 200
    return parse(body)


def value(families: Families, name: str, **labels: str) -> float:
    return metric_value(families, name, feed=FEED, **labels)


def write_config(path: Path, interface: str, sender_net: str, extra: str = "") -> None:
    path.write_text(
        f"""
[health]
listen = "{HEALTH}"

[[emit]]
name = "{FEED}"
listen = "0.0.0.0:{PORT}"
interface = "{interface}"
ttl = 4
allowed_sources = ["{sender_net}"]
allowed_groups = ["{ALLOWED_GROUPS}"]
hello_timeout = "1s"
heartbeat_interval = "500ms"
idle_timeout = "5s"
{extra}
"""
    )


def wait_healthy(cloud: Netns, relayd: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert relayd.poll() is None, "relayd exited during start-up"
        try:
            status, _ = fetch(cloud, f"/healthz/{FEED}")
        except Exception:
            status = 0
        if status == 200:
            return
        time.sleep(0.2)
    raise AssertionError("the emit feed did not become healthy")


def run_sender(sender: Netns, *args: str) -> dict[str, Any]:
    out = sender.run(sender.python_argv("-c", SENDER, *args), timeout=60).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def received(path: Path) -> list[tuple[str, int, bytes, str]]:
    out = []
    for line in path.read_text().splitlines():
        group, port, payload, drops = line.split(" ")
        out.append((group, int(port), bytes.fromhex(payload), drops))
    return out


def per_group(items: Sequence[tuple[str, int, bytes]]) -> dict[tuple[str, int], list[bytes]]:
    out: dict[tuple[str, int], list[bytes]] = {}
    for group, port, payload in items:
        out.setdefault((group, port), []).append(payload)
    return out


@attrs.define
class Topology:
    sender: Netns
    cloud: Netns
    customer: Netns
    uplink: Link
    downlink: Link
    relayd: subprocess.Popen[bytes]


@contextlib.contextmanager
def topology(netns: NetnsHarness, tmp_path: Path, extra_config: str = "") -> Iterator[Topology]:
    """sender -- cloud (relayd run) -- customer; relayd's log is printed when the test fails."""
    sender = netns.namespace("snd")
    cloud = netns.namespace("cloud")
    customer = netns.namespace("cust")
    uplink = netns.link(sender, cloud)
    downlink = netns.link(cloud, customer)
    config = tmp_path / "relayd.toml"
    write_config(config, downlink.a_dev, str(uplink.a_addr.network), extra_config)
    log = tmp_path / "relayd.log"
    with log.open("wb") as log_file:
        relayd = cloud.popen(
            cloud.relayd_argv("run", "--config", str(config)),
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        wait_healthy(cloud, relayd)
        yield Topology(sender, cloud, customer, uplink, downlink, relayd)
        relayd.send_signal(signal.SIGTERM)
        assert relayd.wait(timeout=15) == 0
    finally:
        print(log.read_text(errors="replace"))  # shown when the test fails


def start_receiver(
    net: Topology, groups: Sequence[tuple[str, int]], out: Path
) -> subprocess.Popen[bytes]:
    receiver = net.customer.popen(
        net.customer.python_argv("-c", RECEIVER, net.downlink.b_dev, json.dumps(groups), str(out)),
        stdout=subprocess.PIPE,
    )
    assert read_line(receiver, timeout=20).strip() == "ready"
    return receiver


def stop_receiver(receiver: subprocess.Popen[bytes], out: Path) -> list[tuple[str, int, bytes]]:
    """What the customer received, checking its sockets dropped nothing."""
    time.sleep(0.3)
    receiver.send_signal(signal.SIGTERM)
    assert receiver.wait(timeout=10) == 0
    got = received(out)
    assert all(drops == "None" for *_, drops in got), "the customer's sockets dropped datagrams"
    return [g[:3] for g in got]


def test_deribit_sample_through_relayd_run(
    netns: NetnsHarness, deribit_sample: Path, tmp_path: Path
) -> None:
    datagrams = read_datagrams(deribit_sample)
    groups = sorted({(str(d.group), d.port) for d in datagrams})
    assert len(datagrams) == 5066
    with topology(netns, tmp_path) as net:
        scenario(net, datagrams, groups, deribit_sample, tmp_path)


def scenario(
    net: Topology,
    datagrams: list[CapturedDatagram],
    groups: list[tuple[str, int]],
    deribit_sample: Path,
    tmp_path: Path,
) -> None:
    sender, cloud, customer = net.sender, net.cloud, net.customer
    uplink, downlink = net.uplink, net.downlink
    out = tmp_path / "received.txt"
    receiver = start_receiver(net, [*groups, OUTSIDE], out)

    # A peer outside allowed_sources is closed before it is even challenged.
    probe = customer.run(
        customer.python_argv("-c", PROBE, str(downlink.a_addr.ip), str(PORT))
    ).stdout.strip()
    assert probe == ""

    session = "5e55" * 8
    target = str(uplink.b_addr.ip)
    result = run_sender(
        sender, "stream", target, str(PORT), str(deribit_sample), session, *map(str, OUTSIDE)
    )
    total = result["total"]
    assert total == 5066 + 5
    assert result["wrong_feed"] == [2]  # WRONG_FEED, then the close
    assert result["welcome"] == 0
    assert result["ack"] == total - 200
    assert result["welcome_again"] == total - 200
    assert result["ack_again"] == total
    assert result["garbage"] == [1]  # PROTOCOL
    assert result["silent"] == [[7], [7], [7]]  # HELLO_TIMEOUT

    families = metrics(cloud)
    assert value(families, "datagrams_out_total") == 5066
    assert value(families, "datagrams_in_total") == total - 200 + 700
    assert value(families, "duplicates_total") == 500
    assert value(families, "datagrams_dropped_total", reason="group_not_allowed") == 5
    assert value(families, "gaps_total") == 0
    assert value(families, "connections_accepted_total") == 2
    for reason, count in (
        ("source", 1),
        ("wrong_feed", 1),
        ("protocol", 1),
        ("hello_timeout", 3),
    ):
        assert value(families, "connections_rejected_total", reason=reason) == count, reason
    assert value(families, "decode_errors_total") == 1
    assert value(families, "capture_to_emit_latency_seconds_count") >= 1

    # The egress interface goes down: sends fail, counted, the feed turns unhealthy ...
    cloud.run(["ip", "link", "set", downlink.a_dev, "down"])
    failed = run_sender(
        sender, "send", target, str(PORT), session, str(total + 1), "5", *map(str, UNJOINED)
    )
    assert failed == {"welcome": total, "ack": total + 5}
    status, body = fetch(cloud, f"/healthz/{FEED}")
    assert status == 503, body
    families = metrics(cloud)
    assert value(families, "send_errors_total", errno="ENETUNREACH") == 5
    assert value(families, "datagrams_dropped_total", reason="send_error") == 5
    # ... and healthy again after a successful send, SEND_RECOVERY after the failures.
    cloud.run(["ip", "link", "set", downlink.a_dev, "up"])
    again = run_sender(
        sender, "send", target, str(PORT), session, str(total + 6), "3", *map(str, UNJOINED)
    )
    assert again == {"welcome": total + 5, "ack": total + 8}
    deadline = time.monotonic() + 20  # SEND_RECOVERY after the failures, with this success
    while (status := fetch(cloud, f"/healthz/{FEED}")[0]) != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    status, body = fetch(cloud, f"/healthz/{FEED}")
    assert status == 200, body
    assert json.loads(body)["feeds"][FEED]["healthy"] is True

    got = stop_receiver(receiver, out)
    want = [(str(d.group), d.port, d.payload) for d in datagrams]
    assert len(got) == len(want)  # nothing extra: no resend twice, nothing from OUTSIDE
    assert per_group(got) == per_group(want)


def test_full_send_buffer_waits_and_loses_nothing(
    netns: NetnsHarness, deribit_sample: Path, tmp_path: Path
) -> None:
    """A slow egress (token bucket on the customer link) and a small send buffer: the feed
    waits for room (EAGAIN, then writable) instead of dropping, and keeps the order."""
    datagrams = read_datagrams(deribit_sample)
    groups = sorted({(str(d.group), d.port) for d in datagrams})
    with topology(netns, tmp_path, 'send_buffer = "8KiB"') as net:
        net.cloud.run(
            ["tc", "qdisc", "add", "dev", net.downlink.a_dev, "root", "tbf",
             "rate", "20mbit", "burst", "16kb", "latency", "5s"]
        )  # fmt: skip
        out = tmp_path / "received.txt"
        receiver = start_receiver(net, groups, out)
        result = run_sender(
            net.sender, "plain", str(net.uplink.b_addr.ip), str(PORT), str(deribit_sample),
            "ab" * 16,
        )  # fmt: skip
        assert result == {"welcome": 0, "ack": len(datagrams)}
        got = stop_receiver(receiver, out)
        want = [(str(d.group), d.port, d.payload) for d in datagrams]
        assert len(got) == len(want)
        assert per_group(got) == per_group(want)
        families = metrics(net.cloud)
        assert value(families, "datagrams_out_total") == len(datagrams)
        assert value(families, "send_waits_total") > 0
        assert value(families, "datagrams_dropped_total", reason="send_error") == 0
