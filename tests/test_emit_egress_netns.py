"""Loss at the emit side's egress: a queue discipline that drops on the multicast interface.

    sender ──veth── cloud (relayd run, tbf 4 Mbit/s on the customer link) ──veth── customer

The sender streams datagrams at 5,000/s, more than the token bucket lets through; the queue
discipline drops the rest. Every datagram must be either received by the customer (an
independent receiver that counts) or counted in ``send_errors`` (ENOBUFS), and the feed is
unhealthy while the drops last and healthy after.
"""

from __future__ import annotations

import json
import select
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.netns import NetnsHarness
from tests.test_emit_netns import (
    FEED,
    PORT,
    fetch,
    metrics,
    received,
    start_receiver,
    topology,
    value,
)

pytestmark = [pytest.mark.netns, pytest.mark.slow]

GROUP = ("239.111.5.1", 6200)
COUNT = 10_000
RATE = 5_000  # datagrams per second
PAYLOAD = 160  # bytes: 5,000/s is about 8 Mbit/s on the wire, twice what the bucket passes
CALM = 300  # then this many at CALM_RATE, which the bucket passes whole
CALM_RATE = 100

# The capture side: COUNT datagrams to GROUP at RATE per second, then CALM at CALM_RATE,
# printing "calm" between the two, then waits for the last ACK.
PACED = r"""
import json, socket, sys, time
from ipaddress import IPv4Address
from relayd.wire import FROM_EMIT, Ack, Challenge, Decoder, encode_datagram, encode_hello

host, port, count, rate, calm, calm_rate, group, udp_port, size = sys.argv[1:10]
count, rate, calm, calm_rate, size = int(count), int(rate), int(calm), int(calm_rate), int(size)
sock = socket.create_connection((host, int(port)), timeout=30)
decoder = Decoder(FROM_EMIT)
events = []

def next_event():
    while not events:
        data = sock.recv(65536)
        if not data:
            raise SystemExit("closed by the emit side")
        events.extend(decoder.feed(data))
    return events.pop(0)

assert isinstance(next_event(), Challenge)
sock.sendall(encode_hello("deribit", b"\xee" * 16))
welcome = next_event()
assert isinstance(welcome, Ack), welcome
key = int(IPv4Address(group))

def paced(first_seq, number, per_second):
    batch = max(1, per_second // 100)
    start = time.monotonic()
    for first in range(first_seq, first_seq + number, batch):
        last = min(first_seq + number - 1, first + batch - 1)
        sock.sendall(b"".join(
            encode_datagram(seq, key, int(udp_port), seq, seq.to_bytes(8, "big") * (size // 8))
            for seq in range(first, last + 1)
        ))
        delay = start + (last - first_seq + 1) / per_second - time.monotonic()
        if delay > 0:
            time.sleep(delay)

paced(1, count, rate)
print("calm", flush=True)
paced(count + 1, calm, calm_rate)
total = count + calm
while True:
    event = next_event()
    if isinstance(event, Ack) and event.seq >= total:
        break
print(json.dumps({"welcome": welcome.seq, "ack": event.seq}), flush=True)
"""


@pytest.mark.parametrize("datapath", ["c", "python"], indirect=True)
def test_queue_discipline_drops_are_counted_and_unhealthy(
    netns: NetnsHarness, tmp_path: Path, datapath: str
) -> None:
    with topology(netns, tmp_path) as net:
        net.cloud.run(
            ["tc", "qdisc", "add", "dev", net.downlink.a_dev, "root", "tbf",
             "rate", "4mbit", "burst", "10kb", "latency", "5ms"]
        )  # fmt: skip
        out = tmp_path / "received.txt"
        receiver = start_receiver(net, [GROUP], out)
        sender = net.sender.popen(
            net.sender.python_argv(
                "-c", PACED, str(net.uplink.b_addr.ip), str(PORT), str(COUNT), str(RATE),
                str(CALM), str(CALM_RATE), *map(str, GROUP), str(PAYLOAD),
            ),
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert sender.stdout is not None
        during: list[int] = []  # /healthz/<feed> while the drops last ...
        while not select.select([sender.stdout], [], [], 0.2)[0]:
            during.append(fetch(net.cloud, f"/healthz/{FEED}")[0])
        assert sender.stdout.readline().strip() == b"calm"
        calm_at = time.monotonic()
        after = []  # ... and once they stopped (the calm datagrams all pass)
        while time.monotonic() < calm_at + 20 and 200 not in after:
            after.append(fetch(net.cloud, f"/healthz/{FEED}")[0])
            time.sleep(0.2)
        healthy_after = time.monotonic() - calm_at
        stdout, _ = sender.communicate(timeout=60)
        assert sender.returncode == 0
        assert json.loads(stdout.decode().strip().splitlines()[-1]) == {
            "welcome": 0,
            "ack": COUNT + CALM,
        }
        time.sleep(0.3)
        receiver.terminate()
        assert receiver.wait(timeout=10) == 0
        got = received(out)
        assert all(drops == "None" for *_, drops in got), "the customer's sockets dropped"
        families = metrics(net.cloud)
        errors = value(families, "datagrams_dropped_total", reason="send_error")
        out_total = value(families, "datagrams_out_total")
        print(
            f"{datapath}: sent {COUNT} + {CALM}, received {len(got)}, send errors {errors:.0f}, "
            f"datagrams_out {out_total:.0f}, health while dropping {sorted(set(during))}, "
            f"200 again {healthy_after:.1f} s after the drops stopped"
        )
        assert errors > 0
        assert len(got) + errors == COUNT + CALM
        assert out_total == len(got)
        assert value(families, "send_errors_total", errno="ENOBUFS") == errors
        assert 503 in during
        assert after[-1] == 200
