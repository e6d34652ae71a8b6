"""netif: interface resolution and multicast sockets, with real multicast on loopback."""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from relayd import netif
from relayd.netif import (
    ANCBUFSIZE,
    MAX_MEMBERSHIPS_PER_SOCKET,
    GroupReceiver,
    InterfaceError,
    address_error,
    bind_tcp_listener,
    drain,
    drain_error_queue,
    open_group_receivers,
    open_multicast_sender,
    parse_ancillary,
    resolve_interface,
)
from tests.helpers.loopback import free_udp_port
from tests.helpers.netns import NetnsHarness

LOOPBACK = IPv4Address("127.0.0.1")


def _random_groups(count: int) -> list[IPv4Address]:
    """Distinct groups in 239.255.0.0/16 (local scope), random so parallel runs differ."""
    base = random.randrange(1, 200) << 8
    start = random.randrange(0, 256 * 40)
    return [IPv4Address(int(IPv4Address("239.255.0.0")) + base + start + i) for i in range(count)]


@pytest.fixture
def receivers() -> Iterator[list[GroupReceiver]]:
    opened: list[GroupReceiver] = []
    yield opened
    for receiver in opened:
        receiver.close()


@pytest.fixture
def sender() -> Iterator[socket.socket]:
    sock = open_multicast_sender(LOOPBACK, ttl=0, loop=True, send_buffer=1 << 20)
    yield sock
    sock.close()


def _drain_all(
    receivers: list[GroupReceiver], expected: int, timeout: float = 5.0
) -> dict[int, list[tuple[IPv4Address, int, bytes, int | None]]]:
    got: dict[int, list[tuple[IPv4Address, int, bytes, int | None]]] = {
        index: [] for index in range(len(receivers))
    }
    deadline = time.monotonic() + timeout
    while sum(len(v) for v in got.values()) < expected and time.monotonic() < deadline:
        for index, receiver in enumerate(receivers):
            got[index].extend(drain(receiver, 100))
        time.sleep(0.002)
    time.sleep(0.05)  # anything extra would be here by now
    for index, receiver in enumerate(receivers):
        got[index].extend(drain(receiver, 100))
    return got


def test_resolve_interface_by_name_and_literal() -> None:
    assert resolve_interface("lo") == LOOPBACK
    assert resolve_interface("10.1.2.3") == IPv4Address("10.1.2.3")
    assert resolve_interface(" 0.0.0.0 ") == IPv4Address("0.0.0.0")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nosuchif0", "no interface named 'nosuchif0'"),
        ("239.1.1.1", "239.1.1.1 is a multicast address"),
        ("averyveryverylongname", "neither an IPv4 address nor an interface name"),
        ("", "empty interface name"),
    ],
)
def test_resolve_interface_errors(text: str, message: str) -> None:
    with pytest.raises(InterfaceError, match=message):
        resolve_interface(text)


def test_sender_socket_options(sender: socket.socket) -> None:
    assert not sender.getblocking()
    assert sender.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL) == 0
    assert sender.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP) == 1
    interface = sender.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, 4)
    assert IPv4Address(interface) == LOOPBACK
    with open_multicast_sender(LOOPBACK, ttl=16, loop=False, send_buffer=1 << 16) as other:
        assert other.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL) == 16
        assert other.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP) == 0
        assert other.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 1 << 16
    with pytest.raises(ValueError, match="TTL 256"):
        open_multicast_sender(LOOPBACK, ttl=256, loop=False, send_buffer=1 << 16)


def test_more_than_20_groups_use_more_sockets_and_each_gets_only_its_own(
    sender: socket.socket, receivers: list[GroupReceiver]
) -> None:
    port_a, port_b = free_udp_port(), free_udp_port()
    groups_a = _random_groups(45)
    groups_b = groups_a[:3]  # the same groups on another port are other destinations
    wanted = [(g, port_a) for g in groups_a] + [(g, port_b) for g in groups_b]
    receivers.extend(open_group_receivers(wanted, LOOPBACK, 1 << 20))

    assert [(r.port, len(r.groups)) for r in receivers] == [
        (port_a, 20),
        (port_a, 20),
        (port_a, 5),
        (port_b, 3),
    ]
    assert MAX_MEMBERSHIPS_PER_SOCKET == 20
    for receiver in receivers:
        assert not receiver.sock.getblocking()
        assert receiver.sock.getsockopt(socket.IPPROTO_IP, netif.IP_MULTICAST_ALL) == 0

    for group, port in wanted:
        sender.sendto(f"{group}:{port}".encode(), (str(group), port))
    got = _drain_all(receivers, len(wanted))

    for index, receiver in enumerate(receivers):
        expected = sorted(f"{group}:{receiver.port}" for group in receiver.groups)
        payloads = sorted(payload.decode() for _g, _p, payload, _d in got[index])
        assert payloads == expected
        for group, port, payload, drops in got[index]:
            assert payload.decode() == f"{group}:{port}"  # group read from IP_PKTINFO
            assert drops is None


def test_other_groups_on_the_same_port_stay_out(
    sender: socket.socket, receivers: list[GroupReceiver]
) -> None:
    port = free_udp_port()
    joined, other = _random_groups(2)
    receivers.extend(open_group_receivers([(joined, port)], LOOPBACK, 1 << 16))
    # a second socket of this process joins `other` on the same port
    receivers.extend(open_group_receivers([(other, port)], LOOPBACK, 1 << 16))
    sender.sendto(b"to-other", (str(other), port))
    sender.sendto(b"to-joined", (str(joined), port))
    got = _drain_all(receivers, 2)
    assert [(g, p) for g, p, _payload, _d in got[0]] == [(joined, port)]
    assert [(g, p) for g, p, _payload, _d in got[1]] == [(other, port)]


def _rmem_max() -> int:
    return int(Path("/proc/sys/net/core/rmem_max").read_text())


def test_receive_buffer_capped_by_rmem_max_is_reported(receivers: list[GroupReceiver]) -> None:
    limit = _rmem_max()
    asked = limit * 2
    receivers.extend(
        open_group_receivers(
            [(_random_groups(1)[0], free_udp_port())], LOOPBACK, asked, force_buffer=False
        )
    )
    receiver = receivers[0]
    assert receiver.receive_buffer_requested == asked
    assert receiver.receive_buffer_effective == limit
    assert receiver.receive_buffer_capped


def test_receive_buffer_forced_as_root(receivers: list[GroupReceiver]) -> None:
    if os.geteuid() != 0:
        pytest.skip("SO_RCVBUFFORCE needs root (CAP_NET_ADMIN)")
    asked = max(_rmem_max() * 2, 8 << 20)
    receivers.extend(
        open_group_receivers([(_random_groups(1)[0], free_udp_port())], LOOPBACK, asked)
    )
    assert receivers[0].receive_buffer_effective == asked
    assert not receivers[0].receive_buffer_capped


def test_kernel_drops_are_reported(sender: socket.socket, receivers: list[GroupReceiver]) -> None:
    group, port = _random_groups(1)[0], free_udp_port()
    receivers.extend(open_group_receivers([(group, port)], LOOPBACK, 4096, force_buffer=False))
    sent = 200
    for index in range(sent):
        sender.sendto(index.to_bytes(4, "big") + bytes(996), (str(group), port))
    first = _drain_all(receivers, sent, timeout=0.5)[0]
    assert 0 < len(first) < sent
    assert all(drops is None for _g, _p, _payload, drops in first)  # queued before any drop
    sender.sendto(b"after", (str(group), port))
    after = _drain_all(receivers, 1)[0]
    assert [payload for _g, _p, payload, _d in after] == [b"after"]
    assert after[0][3] == sent - len(first)


def test_parse_ancillary_without_messages() -> None:
    assert parse_ancillary([]) == (0, None)
    assert socket.CMSG_SPACE(12) + socket.CMSG_SPACE(4) <= ANCBUFSIZE


@pytest.mark.parametrize(
    ("group", "port", "message"),
    [
        ("10.0.0.1", 6100, "10.0.0.1 is not a multicast group"),
        ("239.1.1.1", 0, "port 0 is outside"),
        ("239.1.1.1", 65536, "port 65536 is outside"),
    ],
)
def test_receiver_argument_errors(group: str, port: int, message: str) -> None:
    with pytest.raises(InterfaceError, match=message):
        open_group_receivers([(IPv4Address(group), port)], LOOPBACK, 1 << 16)


def test_join_on_an_address_that_is_not_local_fails_cleanly() -> None:
    with pytest.raises(InterfaceError, match="cannot join"):
        open_group_receivers(
            [(_random_groups(1)[0], free_udp_port())], IPv4Address("192.0.2.77"), 1 << 16
        )


@pytest.mark.netns
def test_interface_without_ipv4_is_an_error(netns: NetnsHarness) -> None:
    host, other = netns.namespace("host"), netns.namespace("other")
    link = netns.link(host, other)
    host.run(["ip", "addr", "flush", "dev", link.a_dev])
    code = (
        "import sys\n"
        "from relayd.netif import InterfaceError, resolve_interface\n"
        "try:\n"
        f"    resolve_interface({link.a_dev!r})\n"
        "except InterfaceError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    proc = host.run(host.python_argv("-c", code), check=False)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.strip() == f"interface {link.a_dev!r} has no IPv4 address"
    # the other end still has its address
    show = f"from relayd.netif import resolve_interface as r; print(r({link.b_dev!r}))"
    proc = other.run(other.python_argv("-c", show))
    assert proc.stdout.strip() == str(link.b_addr.ip)


def test_a_port_in_use_names_the_address() -> None:
    """ "Address already in use" alone did not say which of a host's listeners failed."""
    first = bind_tcp_listener("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        assert not first.getblocking()
        with pytest.raises(OSError, match="in use") as info:
            bind_tcp_listener("127.0.0.1", port)
        assert info.value.errno == errno.EADDRINUSE
        assert str(info.value) == (
            f"[Errno {errno.EADDRINUSE}] cannot bind 127.0.0.1:{port}: Address already in use"
        )
    finally:
        first.close()
    refused = address_error(
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "::1", 7, "connect"
    )
    assert isinstance(refused, ConnectionRefusedError)
    assert str(refused) == f"[Errno {errno.ECONNREFUSED}] cannot connect [::1]:7: refused"


def test_bind_tcp_listener_closes_the_socket_on_failure() -> None:
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match=r"cannot bind 192\.0\.2\.1:1: "):
        bind_tcp_listener("192.0.2.1", 1)  # TEST-NET-1: never a local address
    assert set(os.listdir("/proc/self/fd")) == before


def test_sender_reports_late_errors_and_drain_clears_them() -> None:
    """With ``report_drops`` (the emit feeds') IP_RECVERR is on: an error that comes after
    ``send`` returned (here a port unreachable for a datagram to a closed loopback port) is
    queued; without draining it fails the next, unrelated send; ``drain_error_queue``
    returns it and clears the pending error."""
    port = free_udp_port()
    with open_multicast_sender(LOOPBACK, 1, True, 65536) as plain:  # tools: as before
        assert plain.getsockopt(socket.IPPROTO_IP, netif.IP_RECVERR) == 0
    with open_multicast_sender(LOOPBACK, 1, True, 65536, report_drops=True) as sock:
        assert sock.getsockopt(socket.IPPROTO_IP, netif.IP_RECVERR) == 1
        sock.connect(("127.0.0.1", port))
        sock.send(b"first")
        _wait_for_error(sock)
        with pytest.raises(ConnectionRefusedError):
            sock.send(b"second")  # the pending error of the first, not this one's
        assert drain_error_queue(sock) == [errno.ECONNREFUSED]
        for _ in range(3):
            sock.send(b"again")
            _wait_for_error(sock)
            assert drain_error_queue(sock) == [errno.ECONNREFUSED]


def _wait_for_error(sock: socket.socket) -> None:
    """Until the socket's error queue has an entry (POLLERR)."""
    poller = select.poll()
    poller.register(sock.fileno(), 0)
    assert poller.poll(5000), "no error arrived"


def test_a_literal_address_is_followed_by_the_index_of_the_interface_that_has_it() -> None:
    """An interface given by its primary address is found by index (followed like a name
    when it comes back with another address); 0.0.0.0 and an address no interface has are
    not followed."""
    from relayd.netif import interface_index  # noqa: PLC0415

    assert interface_index("127.0.0.1") == socket.if_nametoindex("lo")
    assert interface_index("lo") == socket.if_nametoindex("lo")
    assert interface_index("0.0.0.0") is None
    assert interface_index("192.0.2.77") is None  # TEST-NET-1: nobody's address
