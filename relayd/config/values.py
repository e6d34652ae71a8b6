"""The value types of the file: TCP endpoints, multicast ``group:port`` pairs, UDP port ranges.

Each parses its own text form (``parse``) and writes it back (``str``); the model and the
value parsers build on them.
"""

from __future__ import annotations

import ipaddress
import re
from ipaddress import IPv4Address, IPv4Network
from typing import Final

import attrs

from relayd.config.errors import _InvalidValueError

MULTICAST: Final = IPv4Network("224.0.0.0/4")
LINK_LOCAL_MULTICAST: Final = IPv4Network("224.0.0.0/24")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _check_port(port: int, what: str, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise _InvalidValueError(f"invalid {what}: port {port} out of range {low}..65535")
    return port


def _parse_port(text: str, what: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise _InvalidValueError(f"invalid {what}: port {text!r} is not a number")
    return int(text)


def _check_host(host: str, text: str) -> str:
    if not host:
        raise _InvalidValueError(f"invalid address {text!r}: missing host (use 0.0.0.0 for all)")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise _InvalidValueError(f"invalid address {text!r}: bad IPv6 address") from None
        return host[1:-1]
    if ":" in host:
        raise _InvalidValueError(f"invalid address {text!r}: write IPv6 addresses as [addr]:port")
    if host.replace(".", "").isdigit():
        try:
            IPv4Address(host)
        except ValueError:
            raise _InvalidValueError(f"invalid address {text!r}: bad IPv4 address") from None
        return host
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise _InvalidValueError(f"invalid address {text!r}: bad host name")
    return host


@attrs.frozen
class Endpoint:
    """A TCP address, ``"host:port"`` in the file. ``host`` is an IPv4 address, an IPv6 address
    (written in brackets in the file, stored without) or a DNS name resolved at run time."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, allow_port_zero: bool = False) -> Endpoint:
        """``"0.0.0.0:6667"``, ``"nlb.example.com:6667"``, ``"[::1]:8080"``; port 0 (any free
        port) only with ``allow_port_zero``. Raises ``ValueError`` with a readable message."""
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise _InvalidValueError(f'invalid address {text!r}: expected "host:port"')
        port = _parse_port(port_text, f"address {text!r}")
        port = _check_port(port, f"address {text!r}", allow_zero=allow_port_zero)
        return cls(_check_host(host, text), port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _check_group(group: IPv4Address) -> IPv4Address:
    if group not in MULTICAST:
        raise _InvalidValueError(f"group {group} is not a multicast address (224.0.0.0/4)")
    if group in LINK_LOCAL_MULTICAST:
        raise _InvalidValueError(f"group {group} is in the link-local range 224.0.0.0/24")
    return group


@attrs.frozen(order=True)
class GroupPort:
    """A multicast destination, ``"group:port"`` in the file (``"239.111.111.1:6100"``)."""

    group: IPv4Address
    port: int

    @classmethod
    def parse(cls, text: str) -> GroupPort:
        """Parse and check ``"group:port"``: the group inside 224.0.0.0/4 and outside the
        link-local 224.0.0.0/24, the port 1..65535. Raises ``ValueError``."""
        group_text, sep, port_text = text.rpartition(":")
        if not sep:
            raise _InvalidValueError(f'invalid group {text!r}: expected "group:port"')
        try:
            group = IPv4Address(group_text)
        except ValueError:
            raise _InvalidValueError(
                f"invalid group {text!r}: {group_text!r} is not an IPv4 address"
            ) from None
        port = _parse_port(port_text, f"group {text!r}")
        return cls(_check_group(group), _check_port(port, f"group {text!r}"))

    def __str__(self) -> str:
        return f"{self.group}:{self.port}"


@attrs.frozen
class PortRange:
    """An inclusive range of UDP ports, ``6100``, ``"6100"`` or ``"6100-6101"`` in the file."""

    lo: int
    hi: int

    @classmethod
    def parse(cls, value: int | str) -> PortRange:
        """Parse and check a port or ``"lo-hi"`` range (1..65535, lo <= hi)."""
        if isinstance(value, int):
            if not 1 <= value <= 65535:
                raise _InvalidValueError(f"port {value} out of range 1..65535")
            return cls(value, value)
        lo_text, sep, hi_text = value.partition("-")
        what = f"port range {value!r}"
        lo = _check_port(_parse_port(lo_text.strip(), what), what)
        hi = _check_port(_parse_port(hi_text.strip(), what), what) if sep else lo
        if lo > hi:
            raise _InvalidValueError(f"invalid port range {value!r}: {lo} > {hi}")
        return cls(lo, hi)

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.lo <= port <= self.hi

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"
