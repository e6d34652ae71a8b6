"""Emit-host beacons (relayd/emit/beacon.py) and the claim on a running feed, on loopback:
another relay is a socket bound to 127.0.0.2, this host is 127.0.0.1."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address

import pytest
import trio

from relayd.config import GroupPort, parse_config
from relayd.emit.beacon import Beacon, BeaconError, BeaconState, decode, encode
from relayd.wire import ErrorCode
from tests.helpers.capture_standin import Peer, make_config, metric, pick_groups, running

FEED = make_config().name


def test_a_beacon_round_trips_and_anything_else_is_refused() -> None:
    for beacon in (
        Beacon("deribit", BeaconState.CLAIMING),
        Beacon("a-feed_2", BeaconState.ACTIVE, emitted=True),
    ):
        data = encode(beacon)
        assert len(data) == 8 + len(beacon.feed)
        assert decode(data) == beacon
    good = encode(Beacon("deribit", BeaconState.ACTIVE))
    for bad, why in (
        (good[:5], "shorter"),
        (b"XXXX" + good[4:], "magic"),
        (good[:4] + b"\x02" + good[5:], "version 2"),
        (good[:5] + b"\x07" + good[6:], "malformed"),
        (good + b"x", "for a name of"),
        (b"\x00" * 64, "magic"),  # a customer datagram that strayed onto the port
    ):
        with pytest.raises(BeaconError, match=why):
            decode(bad)


def _config_text(extra: str) -> str:
    return (
        '[[emit]]\nname = "f"\nlisten = "127.0.0.1:7000"\ninterface = "127.0.0.1"\n'
        'allowed_sources = ["127.0.0.0/8"]\nallowed_groups = ["239.1.0.0/16"]\n' + extra
    )


def test_the_beacon_goes_to_the_first_watch_group_on_the_listen_port_unless_told() -> None:
    (feed,) = parse_config(_config_text('watch_groups = ["239.1.1.1:6100"]\n')).emit
    assert feed.beacon_destination() == GroupPort(IPv4Address("239.1.1.1"), 7000)
    (feed,) = parse_config(
        _config_text('watch_groups = ["239.1.1.1:6100"]\nbeacon_port = 6999\n')
    ).emit
    assert feed.beacon_destination() == GroupPort(IPv4Address("239.1.1.1"), 6999)
    (feed,) = parse_config(_config_text("")).emit
    assert feed.beacon_destination() is None  # no watch_groups: no beacons, no claim
    (feed,) = parse_config(
        _config_text('watch_groups = ["239.1.1.1:6100"]\nemitter_claim = "0s"\n')
    ).emit
    assert feed.beacon_destination() is None
    with pytest.raises(Exception, match="beacon_port"):
        parse_config(_config_text('watch_groups = ["239.1.1.1:7000"]\n'))


def _other_relay() -> socket.socket:
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.2", 0))
    sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    return sender


def _beacon_listener(group: IPv4Address, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    mreq = struct.pack("4s4s", group.packed, socket.inet_aton("127.0.0.1"))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    sock.setblocking(False)
    return sock


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.usefixtures("datapath")
async def test_a_feed_claims_before_it_emits_and_announces_itself() -> None:
    (group, port), *_ = pick_groups(1)
    beacon_port = _free_udp_port()
    config = make_config(
        watch_groups=(GroupPort(group, port),), beacon_port=beacon_port, loop=False
    )
    listener = _beacon_listener(group, beacon_port)
    try:
        with trio.fail_after(20):
            async with running(config) as feed:
                assert feed.role.snapshot()["role"] == "ready"
                assert feed.listen_port is not None
                peer = await Peer.start(feed.listen_port)
                await peer.welcome()
                states = []
                while feed.role.snapshot()["role"] != "active":
                    states.append(feed.role.snapshot()["role"])
                    await trio.sleep(0.01)
                assert "claiming" in states
                assert metric(feed, "emit_claims", outcome="won") == 1
                await trio.sleep(0.3)
                heard = []
                while True:
                    try:
                        heard.append(decode(listener.recv(256)))
                    except BlockingIOError:
                        break
                assert Beacon(FEED, BeaconState.ACTIVE, emitted=True) in heard
                assert metric(feed, "emit_beacons", kind="sent") >= len(heard)
                await peer.aclose()
    finally:
        listener.close()


@pytest.mark.usefixtures("datapath")
async def test_a_claim_yields_to_another_active_relay_and_refuses_the_stream() -> None:
    """Another relay's ACTIVE beacon (no data at all): a ready feed turns standby; a stream
    that gets in while it was still ready is closed with NOT_ACTIVE before anything is
    emitted. Another feed's beacons change nothing."""
    (group, port), *_ = pick_groups(1)
    beacon_port = _free_udp_port()
    config = make_config(  # a long claim: the yield must come from the beacon, not a race
        watch_groups=(GroupPort(group, port),), beacon_port=beacon_port, emitter_claim=3.0
    )
    other = _other_relay()
    try:
        with trio.fail_after(20):
            async with running(config) as feed:
                assert feed.listen_port is not None
                for _ in range(10):
                    other.sendto(
                        encode(Beacon("elsewhere", BeaconState.ACTIVE)), (str(group), beacon_port)
                    )
                    await trio.sleep(0.02)
                assert feed.role.snapshot()["role"] == "ready"
                assert metric(feed, "emit_beacons", kind="ignored") >= 1
                peer = await Peer.start(feed.listen_port)
                await peer.welcome()
                assert feed.role.snapshot()["role"] == "claiming"
                other.sendto(
                    encode(Beacon(FEED, BeaconState.ACTIVE, True)), (str(group), beacon_port)
                )
                await peer.closed_with(ErrorCode.NOT_ACTIVE)
                role = feed.role.snapshot()
                assert role["role"] == "standby"
                assert role["claims"] == {"won": 0, "yielded": 1}
                assert role["other_relays"][0]["source"] == "127.0.0.2"
                assert role["other_relays"][0]["beacon"] == "active"
                assert metric(feed, "emit_claims", outcome="yielded") == 1
                assert metric(feed, "split_brain") == 0
                assert metric(feed, "datagrams_out") == 0
    finally:
        other.close()


async def test_without_a_beacon_socket_there_is_no_claim() -> None:
    """The beacon port is taken by a socket without SO_REUSEADDR: the feed cannot hear or
    send beacons, says so, and a stream makes it active at once (as without watch_groups)."""
    (group, port), *_ = pick_groups(1)
    squatter = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    squatter.bind(("0.0.0.0", 0))
    beacon_port = squatter.getsockname()[1]
    config = make_config(watch_groups=(GroupPort(group, port),), beacon_port=beacon_port)
    try:
        with trio.fail_after(20):
            async with running(config) as feed:
                assert feed.observer is not None
                assert feed.observer.beacon is None
                assert feed.role.claim == 0
                assert feed.listen_port is not None
                peer = await Peer.start(feed.listen_port)
                await peer.welcome()
                assert feed.role.snapshot()["role"] == "active"
                await peer.aclose()
    finally:
        squatter.close()
