"""What loopback tests share: the address, the feed name, a free UDP port, waiting for a
condition, and datagrams grouped per destination."""

from __future__ import annotations

import socket
from collections.abc import Callable, Hashable, Iterable
from ipaddress import IPv4Address
from typing import TypeVar

import trio

LOOPBACK = IPv4Address("127.0.0.1")
#: the feed name of the loopback tests' feeds and stand-ins
FEED = "test"

Group = TypeVar("Group", bound=Hashable)


def free_udp_port() -> int:
    """A UDP port nobody is bound to right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("0.0.0.0", 0))
        return int(probe.getsockname()[1])


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 nobody is bound to right now (the kernel's pick for port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    """Until ``predicate()`` is true (polled), or TooSlowError after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def per_group(items: Iterable[tuple[Group, int, bytes]]) -> dict[tuple[Group, int], list[bytes]]:
    """Payloads per (group, port), in order: what must match between sent and received."""
    out: dict[tuple[Group, int], list[bytes]] = {}
    for group, port, payload in items:
        out.setdefault((group, port), []).append(payload)
    return out
