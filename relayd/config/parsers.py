"""The TOML configuration: a frozen attrs model, its loader and its validation.

``load_config(path)`` is the one entry point that ``relayd check-config``, start-up and
``SIGHUP`` reload all use, so all three accept and refuse exactly the same files. Every problem
in a file is collected and raised together as one :class:`ConfigError`, each message naming
the TOML path it is about, in the form cattrs' ``transform_error`` uses::

    invalid value for type, expected int @ $.emit[0].ttl (got "abc")

The key reference is ``docs/CONFIG.md``; the classes below mirror it field for field.
"""

from __future__ import annotations

import difflib
import errno
import ipaddress
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, get_args

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn, override

from relayd.session import TGW_MULTICAST_MTU, Allowlist, Destination
from relayd.units import UnitError, format_duration, format_size, parse_duration, parse_size
from relayd.wire import MAX_PAYLOAD

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "MAX_BUSY_POLL",
    "MAX_CONFIG_BYTES",
    "MAX_DURATION",
    "MAX_KEY_FILE_BYTES",
    "MAX_NESTING",
    "MAX_REPLAY_BYTES",
    "MAX_SITES",
    "MIN_DURATION",
    "CaptureFeed",
    "CaptureSite",
    "Config",
    "ConfigError",
    "EmitFeed",
    "Endpoint",
    "GroupPort",
    "HealthConfig",
    "LogFormat",
    "LogLevel",
    "MissingKeyFileError",
    "PortRange",
    "ProcessConfig",
    "UnsafeFileError",
    "UpstreamCheck",
    "key_file_warnings",
    "load_config",
    "parse_config",
    "read_regular_file",
]

DEFAULT_CONFIG_PATH: Final = Path("/etc/relayd/relayd.toml")
#: Shortest key accepted from a key file (bytes, surrounding whitespace removed).
MIN_KEY_BYTES: Final = 16
#: Largest key file read.
MAX_KEY_FILE_BYTES: Final = 64 * 1024

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
#: A/B arbitration of an emit feed's concurrent capture sessions (relayd/arbitration/).
Arbitration = Literal["none", "deribit", "content"]
#: The Deribit packet header the ``deribit`` arbitration reads (relayd/arbitration/headers.py).
DeribitLayoutName = Literal["frame-v1", "sbe"]
#: Bounds of the arbitration tunables: a hole waits at most 1 s for another copy (it delays
#: its channel that long), the content window spans 10 ms..60 s.
MAX_HOLD_TIMEOUT: Final = 1.0
CONTENT_WINDOW_RANGE: Final = (0.01, 60.0)
#: A capture feed's count of the exchange's own gaps (``upstream_check``); it reads the
#: Deribit packet header in the feed's ``deribit_layout`` (``DeribitLayoutName``).
UpstreamCheck = Literal["none", "deribit"]

MULTICAST: Final = IPv4Network("224.0.0.0/4")
LINK_LOCAL_MULTICAST: Final = IPv4Network("224.0.0.0/24")

# Socket buffers are C ints and Linux doubles what it is given; 1 GiB keeps well clear of that.
_MAX_SOCKET_BUFFER: Final = 1024**3
# The replay buffer must hold at least two maximal frames (a 65507-byte datagram and header).
_MIN_REPLAY_BYTES: Final = 128 * 1024
# ... and at most what a capture host can hold in memory beside its socket buffers.
MAX_REPLAY_BYTES: Final = 4 * 1024**3

#: Every duration lies in MIN_DURATION..MAX_DURATION seconds. Both data paths honour this
#: range: the Python one passes milliseconds to poll() as a C int (2**31-1 ms, about 596 h,
#: so "600h" overflowed) and rounds up to whole milliseconds; the C one adds nanoseconds to
#: CLOCK_MONOTONIC in an int64 (so "9999999999h" wrapped into the past and closed every
#: connection at once).
MIN_DURATION: Final = 0.001
MAX_DURATION: Final = 24 * 3600.0
#: ``busy_poll`` (latency mode) lies in 0 (off) .. MAX_BUSY_POLL seconds: a data-path thread
#: spins that long after data before it sleeps, so more is a core burnt for nothing.
MAX_BUSY_POLL: Final = 0.01

_FEED_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_IFNAMSIZ: Final = 16  # Linux interface names are at most 15 bytes


class ConfigError(Exception):
    """Every problem found in one configuration, one message per problem."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors: tuple[str, ...] = tuple(errors)
        super().__init__(self.errors)

    def __str__(self) -> str:
        return "; ".join(self.errors)


class MissingKeyFileError(Exception):
    """A feed's key file does not exist (yet). The feed cannot start until it does; unlike
    other start failures this one does not stop relayd at start-up (see ``key_file_warnings``)."""


class _InvalidValueError(ValueError):
    """A value of the right type that breaks a rule; the message is shown as it is."""


class _WrongTypeError(TypeError):
    """A value of the wrong TOML type. The message keeps cattrs' wording; the value given is
    shown after the TOML path (see ``_messages``)."""

    def __init__(self, expected: str, given: Any) -> None:
        super().__init__(f"invalid value for type, expected {expected}")
        self.given = given


# Separates a message from the "(got ...)" that _messages moves behind the TOML path. JSON
# escapes it inside any value shown, so it can only come from here.
_GOT: Final = "\x1f"
_MAX_SHOWN: Final = 40


def _shown(value: Any) -> str:
    """A value as the TOML file wrote it, cut short: ``"abc"``, ``16``, ``true``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, str):
        text = json.dumps(value[:_MAX_SHOWN], ensure_ascii=False)
        return text[:-1] + '..."' if len(value) > _MAX_SHOWN else text
    if isinstance(value, (int, float)):
        return json.dumps(value)[:_MAX_SHOWN]
    return str(value)[:_MAX_SHOWN]  # a TOML date or time, written without quotes


# --------------------------------------------------------------------------------------------
# Value types


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


# --------------------------------------------------------------------------------------------
# The model


@attrs.frozen(kw_only=True)
class ProcessConfig:
    """``[process]``: logging."""

    log_level: LogLevel = "info"
    log_format: LogFormat = "text"


@attrs.frozen(kw_only=True)
class HealthConfig:
    """``[health]``: the HTTP server for ``/healthz``, ``/healthz/<feed>`` and ``/metrics``."""

    listen: Endpoint = Endpoint("0.0.0.0", 8080)


_ALL_PORTS: Final = (PortRange(1, 65535),)


@attrs.frozen(kw_only=True)
class EmitFeed:
    """One ``[[emit]]`` table: a TCP listener whose datagrams are sent out as multicast."""

    name: str
    listen: Endpoint
    interface: str
    allowed_sources: tuple[IPv4Network, ...]
    allowed_groups: tuple[IPv4Network, ...]
    ttl: int = 16
    loop: bool = False
    allowed_ports: tuple[PortRange, ...] = _ALL_PORTS
    max_connections: int = 4
    hello_timeout: float = 5.0
    heartbeat_interval: float = 1.0
    idle_timeout: float = 5.0
    send_buffer: int = 4 * 1024**2
    max_datagram_size: int = TGW_MULTICAST_MTU
    auth_key_files: tuple[Path, ...] = ()
    arbitration: Arbitration = "none"
    deribit_layout: DeribitLayoutName = "frame-v1"
    arbitration_hold_timeout: float = 0.05
    arbitration_content_window: float = 2.0
    busy_poll: float = 0.0  # latency mode (C data plane): seconds; 0: off
    #: Groups the observer joins to see another relay emit the feed (relayd/emit/observer.py);
    #: empty: the destinations this host has emitted to.
    watch_groups: tuple[GroupPort, ...] = ()
    #: Another relay counts as emitting the feed this long after its latest datagram seen.
    emitter_grace: float = 1.0
    #: The claim (relayd/emit/role.py): a new stream is held this long, announced by beacons,
    #: before this host emits; 0: no claim and no beacons. Needs ``watch_groups``.
    emitter_claim: float = 0.3
    #: UDP port of the beacons, sent to the first of ``watch_groups`` (0: the listen port).
    beacon_port: int = 0

    def beacon_destination(self) -> GroupPort | None:
        """Where this feed's beacons go and are watched for (None: no beacons, no claim)."""
        if not self.watch_groups or self.emitter_claim <= 0:
            return None
        port = self.beacon_port or self.listen.port
        if port == 0:
            return None  # a listener on an ephemeral port: the hosts cannot agree on one
        return GroupPort(self.watch_groups[0].group, port)

    def allows(self, group: IPv4Address | int, port: int) -> bool:
        """Whether a datagram to ``group:port`` may be emitted (group as an address or the
        host-order int of one): ``relayd.session.Allowlist``, the rule the data planes use."""
        verdict = Allowlist(self.allowed_groups, self.allowed_ports).verdict(int(group), port)
        return verdict is Destination.ALLOWED


#: Sites one capture feed streams to at most (``[[capture.site]]``).
MAX_SITES: Final = 8


@attrs.frozen(kw_only=True)
class CaptureSite:
    """One ``[[capture.site]]`` table: a place a capture feed streams to (London, Tokyo),
    with its own targets (a failover list), replay buffer, ACK state and key. Unset bounds
    and key are the feed's."""

    name: str
    targets: tuple[Endpoint, ...]
    replay_max_bytes: int | None = None
    replay_max_age: float | None = None
    auth_key_file: Path | None = None


@attrs.frozen(kw_only=True)
class CaptureFeed:
    """One ``[[capture]]`` table: multicast groups joined and streamed to the emit side, at
    ``targets`` (one site) or at each ``[[capture.site]]`` (``site``)."""

    name: str
    interface: str
    groups: tuple[GroupPort, ...]
    targets: tuple[Endpoint, ...] = ()
    receive_buffer: int = 16 * 1024**2
    replay_max_bytes: int = 64 * 1024**2
    replay_max_age: float = 30.0
    heartbeat_interval: float = 1.0
    idle_timeout: float = 5.0
    connect_timeout: float = 3.0
    reconnect_budget: float = 10.0
    ack_timeout: float = 10.0
    auth_key_file: Path | None = None
    sources: tuple[IPv4Address, ...] = ()
    upstream_check: UpstreamCheck = "none"
    deribit_layout: DeribitLayoutName = "frame-v1"
    site: tuple[CaptureSite, ...] = ()

    @property
    def sites(self) -> tuple[CaptureSite, ...]:
        """Where the feed streams: its named sites, or one unnamed site (name "") with the
        feed's ``targets``; bounds and key filled in from the feed where a site has none."""
        sites = self.site or (CaptureSite(name="", targets=self.targets),)
        return tuple(
            attrs.evolve(
                site,
                replay_max_bytes=site.replay_max_bytes or self.replay_max_bytes,
                replay_max_age=site.replay_max_age or self.replay_max_age,
                auth_key_file=site.auth_key_file or self.auth_key_file,
            )
            for site in sites
        )

    busy_poll: float = 0.0  # latency mode (C data plane): seconds; 0: off


@attrs.frozen(kw_only=True)
class Config:
    """A whole file. Feeds keep the order of the file; names are unique per kind."""

    process: ProcessConfig = ProcessConfig()
    health: HealthConfig = HealthConfig()
    emit: tuple[EmitFeed, ...] = ()
    capture: tuple[CaptureFeed, ...] = ()

    def emit_feed(self, name: str) -> EmitFeed | None:
        """The emit feed called ``name``, if any."""
        return next((feed for feed in self.emit if feed.name == name), None)

    def capture_feed(self, name: str) -> CaptureFeed | None:
        """The capture feed called ``name``, if any."""
        return next((feed for feed in self.capture if feed.name == name), None)


# --------------------------------------------------------------------------------------------
# Value parsers: TOML value in, typed value out, or _WrongTypeError / _InvalidValueError.

T = TypeVar("T")
Parser = Callable[[Any], T]


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise _WrongTypeError("str", value)
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _WrongTypeError("int", value)
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _WrongTypeError("bool", value)
    return value


def _int_in(lo: int, hi: int | None = None) -> Parser[int]:
    def parse(value: Any) -> int:
        number = _int(value)
        if number < lo or (hi is not None and number > hi):
            bounds = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise _InvalidValueError(f"{number} out of range {bounds}")
        return number

    return parse


def _one_of(choices: tuple[str, ...]) -> Parser[Any]:
    def parse(value: Any) -> str:
        text = _str(value)
        if text not in choices:
            raise _InvalidValueError(
                f"invalid value {text!r}, expected one of: {', '.join(choices)}"
            )
        return text

    return parse


def _name(kind: str) -> Parser[str]:
    """A feed's or a site's name (``kind`` says which in the error)."""

    def parse(value: Any) -> str:
        name = _str(value)
        if not _FEED_NAME.fullmatch(name):
            raise _InvalidValueError(
                f"invalid {kind} name {name!r}: 1 to 63 of a-z, 0-9, '_' and '-', "
                "starting with a letter or digit"
            )
        return name

    return parse


_feed_name = _name("feed")


_NOT_HOST_ADDRESSES: Final = (
    (IPv4Network("0.0.0.0/8"), "not a host address (0.0.0.0/8 means this network)"),
    (IPv4Network("255.255.255.255/32"), "the limited broadcast address"),
    (MULTICAST, "a multicast address"),
)


def _interface(value: Any) -> str:
    name = _str(value)
    if name and name.replace(".", "").isdigit():
        try:
            address = IPv4Address(name)
        except ValueError:
            raise _InvalidValueError(f"invalid interface {name!r}: bad IPv4 address") from None
        for network, what in _NOT_HOST_ADDRESSES:
            if address in network:
                raise _InvalidValueError(
                    f"invalid interface {name!r}: {what}; expected an interface name or the "
                    "unicast IPv4 address of an interface"
                )
        return name
    bad_char = any(char == "/" or char.isspace() or not char.isprintable() for char in name)
    if not name or len(name.encode()) >= _IFNAMSIZ or bad_char:
        raise _InvalidValueError(
            f"invalid interface {name!r}: expected an interface name or IPv4 address"
        )
    return name


def _source(value: Any) -> IPv4Address:
    text = _str(value)
    try:
        address = IPv4Address(text)
    except ValueError:
        raise _InvalidValueError(f"invalid source {text!r}: expected an IPv4 address") from None
    if address.is_multicast or address.is_unspecified:
        raise _InvalidValueError(f"invalid source {text}: expected a unicast sender address")
    return address


def _endpoint(value: Any) -> Endpoint:
    return Endpoint.parse(_str(value))


def _listen_endpoint(value: Any) -> Endpoint:
    return Endpoint.parse(_str(value), allow_port_zero=True)


def _ipv4_only(parse: Parser[Endpoint]) -> Parser[Endpoint]:
    """Emit listeners and capture targets are IPv4 end to end (their sockets are AF_INET), so an
    IPv6 address there is refused here rather than failing when the feed starts."""

    def parse_ipv4(value: Any) -> Endpoint:
        endpoint = parse(value)
        if ":" in endpoint.host:
            raise _InvalidValueError(
                f"invalid address {value!r}: IPv6 is not supported here yet "
                "(use an IPv4 address or a host name)"
            )
        return endpoint

    return parse_ipv4


def _group_port(value: Any) -> GroupPort:
    return GroupPort.parse(_str(value))


def _port_range(value: Any) -> PortRange:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _WrongTypeError('port or "lo-hi" range', value)
    return PortRange.parse(value)


def _cidr(value: Any) -> IPv4Network:
    text = _str(value)
    try:
        return IPv4Network(text)
    except ValueError as exc:
        if "host bits set" in str(exc):
            loose = IPv4Network(text, strict=False)
            raise _InvalidValueError(
                f"invalid CIDR {text!r}: host bits set (did you mean {loose}?)"
            ) from None
        raise _InvalidValueError(
            f"invalid CIDR {text!r}: expected an IPv4 network like 10.0.0.0/8"
        ) from None


def _group_cidr(value: Any) -> IPv4Network:
    network = _cidr(value)
    if not network.subnet_of(MULTICAST):
        raise _InvalidValueError(
            f"group range {network} is not inside the multicast range 224.0.0.0/4"
        )
    if network.overlaps(LINK_LOCAL_MULTICAST):
        raise _InvalidValueError(
            f"group range {network} overlaps the link-local range 224.0.0.0/24"
        )
    return network


def _path(value: Any) -> Path:
    text = _str(value)
    if not text or "\0" in text:
        raise _InvalidValueError(f"invalid path {text!r}")
    return Path(text)


def _seconds(value: Any) -> float:
    """A TOML number or duration string as seconds, unchecked for range."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _WrongTypeError("duration", value)
    try:
        return parse_duration(value)
    except UnitError as exc:
        raise _InvalidValueError(str(exc)) from None


def _duration(value: Any) -> float:
    seconds = _seconds(value)
    if seconds <= 0:
        raise _InvalidValueError(f"invalid duration {value!r}: must be > 0")
    return _within(value, seconds, MIN_DURATION, MAX_DURATION)


def _within(value: Any, seconds: float, lo: float, hi: float) -> float:
    """``seconds`` (parsed from ``value``) when it lies in ``lo``..``hi``."""
    if not lo <= seconds <= hi:
        raise _InvalidValueError(
            f"invalid duration {value!r}: must be between {format_duration(lo)} and "
            f"{format_duration(hi)}"
        )
    return seconds


def _hold_timeout(value: Any) -> float:
    """A duration 0..``MAX_HOLD_TIMEOUT`` (0: never hold, a hole is a gap at once)."""
    if value == 0 and not isinstance(value, bool):
        return 0.0
    seconds = _duration(value)
    if seconds > MAX_HOLD_TIMEOUT:
        raise _InvalidValueError(
            f"invalid duration {value!r}: must be between 0 and {format_duration(MAX_HOLD_TIMEOUT)}"
        )
    return seconds


def _content_window(value: Any) -> float:
    return _within(value, _duration(value), *CONTENT_WINDOW_RANGE)


def _busy_poll(value: Any) -> float:
    """A duration of 0 (off) up to MAX_BUSY_POLL (``"50us"``)."""
    seconds = _seconds(value)
    if seconds > MAX_BUSY_POLL:
        raise _InvalidValueError(
            f"invalid duration {value!r}: must be between 0 (off) and "
            f"{format_duration(MAX_BUSY_POLL)}"
        )
    if 0 < seconds < 1e-6:
        raise _InvalidValueError(f"invalid duration {value!r}: must be 0 (off) or at least 1us")
    return seconds


#: The longest claim (``emitter_claim``): a capture side's frames wait this long unACKed.
MAX_EMITTER_CLAIM = 5.0


def _emitter_claim(value: Any) -> float:
    """A duration 0 (no claim, no beacons) or 10ms..MAX_EMITTER_CLAIM."""
    seconds = _seconds(value)
    if seconds == 0:
        return 0.0
    return _within(value, seconds, 0.01, MAX_EMITTER_CLAIM)


def _size(lo: int = 1, hi: int | None = None) -> Parser[int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise _WrongTypeError("size", value)
        try:
            size = parse_size(value)
        except UnitError as exc:
            raise _InvalidValueError(str(exc)) from None
        if size < lo:
            least = "> 0" if lo == 1 else f"at least {format_size(lo)}"
            raise _InvalidValueError(f"invalid size {value!r}: must be {least}")
        if hi is not None and size > hi:
            raise _InvalidValueError(f"invalid size {value!r}: must be at most {format_size(hi)}")
        return size

    return parse


def _tuple_of(
    item: Parser[T], *, non_empty: bool = False, unique: bool = False
) -> Parser[tuple[T, ...]]:
    """A TOML array, each element parsed by ``item``; every bad element is reported."""

    def parse(value: Any) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise _WrongTypeError("array", value)
        if non_empty and not value:
            raise _InvalidValueError("must not be empty")
        items: list[T] = []
        first: dict[T, int] = {}
        errors: list[Exception] = []
        for index, element in enumerate(value):
            try:
                parsed = item(element)
                if unique and parsed in first:
                    raise _InvalidValueError(f"duplicate {parsed} (also at [{first[parsed]}])")
            except Exception as exc:  # collected and reported with the path
                note = IterableValidationNote(f"index {index}", index, object)
                setattr(exc, "__notes__", [*getattr(exc, "__notes__", []), note])  # noqa: B010
                errors.append(exc)
            else:
                items.append(parsed)
                if unique:
                    first.setdefault(parsed, index)
        if errors:
            raise IterableValidationError("invalid array elements", errors, tuple)
        return tuple(items)

    return parse


# --------------------------------------------------------------------------------------------
# The converter: cattrs structures each table, the parsers above structure each value.

_converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)


def _strict_hook(parser: Parser[T]) -> Callable[[Any, Any], T]:
    return lambda value, _type: parser(value)


for _type, _parser in ((int, _int), (str, _str), (bool, _bool)):
    _converter.register_structure_hook(_type, _strict_hook(_parser))


def _register(
    cls: type[T],
    parsers: Mapping[str, Parser[Any]],
    check: Callable[[T], Iterator[tuple[str, str]]] | None = None,
) -> None:
    """Structure ``cls`` from a TOML table: unknown keys refused, each field by its parser, then
    ``check`` for rules across fields (it yields ``(field, message)`` pairs)."""
    missing = {a.name for a in attrs.fields(cls) if a.init} - set(parsers)  # type: ignore[arg-type]
    assert not missing, f"no parser for {cls.__name__}.{missing}"
    overrides = {name: override(struct_hook=_strict_hook(p)) for name, p in parsers.items()}
    generated = make_dict_structure_fn(cls, _converter, **overrides)  # type: ignore[arg-type]

    def structure(value: Any, _type: Any) -> T:
        if not isinstance(value, dict):
            raise _WrongTypeError("table", value)
        instance: T = generated(value, cls)
        if check is not None:
            errors: list[Exception] = []
            for field, message in check(instance):
                exc = _InvalidValueError(message)
                setattr(exc, "__notes__", [AttributeValidationNote(field, field, object)])  # noqa: B010
                errors.append(exc)
            if errors:
                raise ClassValidationError(f"invalid {cls.__name__}", errors, cls)
        return instance

    _converter.register_structure_hook(cls, structure)


def _check_timeouts(feed: EmitFeed | CaptureFeed) -> Iterator[tuple[str, str]]:
    if feed.idle_timeout <= feed.heartbeat_interval:
        yield (
            "idle_timeout",
            f"idle_timeout ({format_duration(feed.idle_timeout)}) must be longer than "
            f"heartbeat_interval ({format_duration(feed.heartbeat_interval)})",
        )


def _check_emit(feed: EmitFeed) -> Iterator[tuple[str, str]]:
    yield from _check_timeouts(feed)
    beacon = feed.beacon_destination()
    if beacon is not None and beacon.port in {g.port for g in feed.watch_groups}:
        yield (
            "beacon_port",
            f"the beacons would go to port {beacon.port}, a port of watch_groups (customers "
            "bound to it would receive them): set beacon_port to a port the feed does not use",
        )


_register(
    ProcessConfig,
    {"log_level": _one_of(get_args(LogLevel)), "log_format": _one_of(get_args(LogFormat))},
)
_register(HealthConfig, {"listen": _listen_endpoint})
_register(
    EmitFeed,
    {
        "name": _feed_name,
        "listen": _ipv4_only(_listen_endpoint),
        "interface": _interface,
        "allowed_sources": _tuple_of(_cidr, non_empty=True),
        "allowed_groups": _tuple_of(_group_cidr, non_empty=True),
        "ttl": _int_in(1, 255),
        "loop": _bool,
        "allowed_ports": _tuple_of(_port_range, non_empty=True),
        "max_connections": _int_in(1),
        "hello_timeout": _duration,
        "heartbeat_interval": _duration,
        "idle_timeout": _duration,
        "send_buffer": _size(hi=_MAX_SOCKET_BUFFER),
        "max_datagram_size": _int_in(1, MAX_PAYLOAD),
        "auth_key_files": _tuple_of(_path),
        "arbitration": _one_of(get_args(Arbitration)),
        "deribit_layout": _one_of(get_args(DeribitLayoutName)),
        "arbitration_hold_timeout": _hold_timeout,
        "arbitration_content_window": _content_window,
        "busy_poll": _busy_poll,
        "watch_groups": _tuple_of(_group_port, unique=True),
        "emitter_grace": _duration,
        "emitter_claim": _emitter_claim,
        "beacon_port": _int_in(0, 65535),
    },
    _check_emit,
)


def _check_sites(feed: CaptureFeed) -> Iterator[tuple[str, str]]:
    if feed.targets and feed.site:
        yield (
            "targets",
            "give targets or [[capture.site]] tables, not both (targets is the one site of a "
            "feed without [[capture.site]])",
        )
    elif not feed.targets and not feed.site:
        yield "targets", "required: targets, or one or more [[capture.site]] tables"
    if len(feed.site) > MAX_SITES:
        yield "site", f"{len(feed.site)} sites, at most {MAX_SITES}"
    first: dict[str, int] = {}
    for index, site in enumerate(feed.site):
        if site.name in first:
            yield "site", f"duplicate site name {site.name!r} (also site[{first[site.name]}])"
        first.setdefault(site.name, index)


def _check_capture(feed: CaptureFeed) -> Iterator[tuple[str, str]]:
    yield from _check_timeouts(feed)
    yield from _check_sites(feed)


_site_name = _name("site")


_register(
    CaptureSite,
    {
        "name": _site_name,
        "targets": _tuple_of(_ipv4_only(_endpoint), non_empty=True, unique=True),
        "replay_max_bytes": _size(lo=_MIN_REPLAY_BYTES, hi=MAX_REPLAY_BYTES),
        "replay_max_age": _duration,
        "auth_key_file": _path,
    },
)


def _site_table(value: Any) -> CaptureSite:
    return _converter.structure(value, CaptureSite)


_register(
    CaptureFeed,
    {
        "name": _feed_name,
        "interface": _interface,
        "groups": _tuple_of(_group_port, non_empty=True, unique=True),
        "targets": _tuple_of(_ipv4_only(_endpoint), non_empty=True, unique=True),
        "receive_buffer": _size(hi=_MAX_SOCKET_BUFFER),
        "replay_max_bytes": _size(lo=_MIN_REPLAY_BYTES, hi=MAX_REPLAY_BYTES),
        "replay_max_age": _duration,
        "heartbeat_interval": _duration,
        "idle_timeout": _duration,
        "connect_timeout": _duration,
        "reconnect_budget": _duration,
        "ack_timeout": _duration,
        "auth_key_file": _path,
        "sources": _tuple_of(_source, unique=True),
        "upstream_check": _one_of(get_args(UpstreamCheck)),
        "deribit_layout": _one_of(get_args(DeribitLayoutName)),
        "site": _tuple_of(_site_table),
        "busy_poll": _busy_poll,
    },
    _check_capture,
)


# --------------------------------------------------------------------------------------------
# Messages


def _describe(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, _WrongTypeError):
        return f"{exc}{_GOT}(got {_shown(exc.given)})"
    if isinstance(exc, _InvalidValueError):
        return str(exc)
    if isinstance(exc, ForbiddenExtraKeysError):
        known = [a.name for a in attrs.fields(exc.cl) if a.init]
        return "; ".join(_unknown_key(key, known) for key in sorted(exc.extra_fields))
    if isinstance(exc, KeyError):
        return "required key missing"
    return cattrs.v.format_exception(exc, type_)


def _unknown_key(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{hint}"


def _messages(exc: Exception, path: str) -> list[str]:
    """``message @ path``, and ``message @ path (got value)`` for a value of the wrong type:
    the prefix stays what cattrs' ``transform_error`` says."""
    messages = []
    for message in cattrs.transform_error(exc, path, _describe):
        text, got, rest = message.partition(_GOT)
        shown, at, where = rest.rpartition(" @ ")
        if not got:
            messages.append(message)
        else:
            messages.append(f"{text} @ {where} {shown}" if at else f"{text} {rest}")
    return messages


# --------------------------------------------------------------------------------------------
# Loading

_SECTIONS: Final = ("process", "health", "emit", "capture")

#: Largest configuration file read; real ones are a few KiB.
MAX_CONFIG_BYTES: Final = 1024 * 1024
#: Deepest nesting of arrays and inline tables accepted. tomllib parses nesting by recursion:
#: 500 levels raised RecursionError, and 2,000 in a reload's worker thread killed the daemon.
MAX_NESTING: Final = 32

# What the nesting scan must step over: strings (which may hold brackets) and comments.
_TOML_TOKEN = re.compile(
    r'"""(?:[^\\]|\\.)*?"""'  # multi-line basic string
    r"|'{3}.*?'{3}"  # multi-line literal string
    r'|"(?:[^"\\\n]|\\.)*"'  # basic string
    r"|'[^'\n]*'"  # literal string
    r"|#[^\n]*"  # comment
    r"|[\[\]{}]",
    re.DOTALL,
)


def _nesting_error(text: str) -> str | None:
    """A message when arrays and inline tables in ``text`` nest deeper than ``MAX_NESTING``,
    found by a linear scan before any recursive parsing."""
    depth = 0
    for token in _TOML_TOKEN.finditer(text):
        bracket = token[0]
        if bracket in "[{":
            depth += 1
            if depth > MAX_NESTING:
                line = text.count("\n", 0, token.start()) + 1
                return f"invalid TOML: nested more than {MAX_NESTING} deep (at line {line})"
        elif bracket in "]}":
            depth = max(depth - 1, 0)
    return None


def parse_config(text: str, *, base_dir: Path | None = None, check_files: bool = False) -> Config:
    """Parse and validate a whole configuration from TOML text.

    Relative key-file paths are made relative to ``base_dir`` when it is given. With
    ``check_files`` every key file must exist and be readable. Raises :class:`ConfigError`
    with every problem found; nothing else escapes for any input text.
    """
    too_deep = _nesting_error(text)
    if too_deep is not None:
        raise ConfigError([too_deep])
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"invalid TOML: {exc}"]) from None
    except RecursionError:  # the scan above should have caught it; never a traceback
        raise ConfigError([f"invalid TOML: nested more than {MAX_NESTING} deep"]) from None
    errors: list[str] = []

    for key in sorted(set(raw) - set(_SECTIONS)):
        errors.append(f"{_unknown_key(key, _SECTIONS)} @ $")

    def table(name: str, cls: type[T], default: T) -> T | None:
        if name not in raw:
            return default
        try:
            return _converter.structure(raw[name], cls)
        except Exception as exc:  # every failure becomes a message
            errors.extend(_messages(exc, f"$.{name}"))
            return None

    def feeds(name: str, cls: type[T]) -> list[tuple[int, T]]:
        value = raw.get(name, [])
        if not isinstance(value, list):
            errors.append(f"expected an array of tables ([[{name}]]) @ $.{name}")
            return []
        good: list[tuple[int, T]] = []
        for index, item in enumerate(value):
            try:
                good.append((index, _converter.structure(item, cls)))
            except Exception as exc:  # every failure becomes a message
                errors.extend(_messages(exc, f"$.{name}[{index}]"))
        return good

    process = table("process", ProcessConfig, ProcessConfig())
    health = table("health", HealthConfig, HealthConfig())
    emit = feeds("emit", EmitFeed)
    capture = feeds("capture", CaptureFeed)
    # Rules across tables look at the raw values that parse on their own, so that they are
    # reported even when another key of the same table is broken.
    errors.extend(_cross_checks(raw))
    if check_files:
        errors.extend(_check_key_files(raw, base_dir or Path()))
    if not raw.get("emit") and not raw.get("capture"):
        # An empty or truncated file must not pass a reload and stop every feed.
        errors.append("no feeds: add at least one [[emit]] or [[capture]] table @ $")

    if errors or process is None or health is None:
        raise ConfigError(errors)
    if base_dir is not None:
        emit = [(i, _rebase_emit(feed, base_dir)) for i, feed in emit]
        capture = [(i, _rebase_capture(feed, base_dir)) for i, feed in capture]
    return Config(
        process=process,
        health=health,
        emit=tuple(feed for _, feed in emit),
        capture=tuple(feed for _, feed in capture),
    )


class UnsafeFileError(OSError):
    """A file relayd refuses to read: not a regular file, or larger than its cap."""


def read_regular_file(path: Path, limit: int) -> bytes:
    """The contents of ``path``, which must be a regular file of at most ``limit`` bytes.

    The open never blocks (``O_NONBLOCK``: a FIFO without a writer would otherwise hang a
    reload, and stop behind it) and ``fstat`` on the open descriptor decides, so a FIFO, a
    device or a directory is refused without a read. Raises ``OSError`` (``UnsafeFileError``
    for a refused file) whose ``strerror`` says why."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):  # the kernel's own words, as reading one used to say
            raise UnsafeFileError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(mode):
            what = _FILE_KINDS.get(stat.S_IFMT(mode), "another kind of file")
            raise UnsafeFileError(errno.EINVAL, f"not a regular file ({what})")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, min(limit + 1 - size, 1 << 16) or 1):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise UnsafeFileError(errno.EFBIG, f"larger than {format_size(limit)}")
        return b"".join(chunks)
    finally:
        os.close(fd)


_FILE_KINDS: Final = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def load_config(path: Path | str) -> Config:
    """Read, parse and validate the file at ``path``, and check that its key files are
    readable. Raises :class:`ConfigError` with every problem (also for an unreadable file, a
    FIFO or device, or one larger than ``MAX_CONFIG_BYTES``).

    Relative key-file paths are taken relative to the file's directory."""
    path = Path(path)
    try:
        data = read_regular_file(path, MAX_CONFIG_BYTES)
    except OSError as exc:
        raise ConfigError([f"cannot read {path}: {exc.strerror or exc}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path} is not UTF-8 text (byte {exc.start})"]) from None
    return parse_config(text, base_dir=path.parent, check_files=True)


def _tables(raw: Mapping[str, Any], kind: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``(path, table)`` for each table of an array of tables that is one."""
    items = raw.get(kind)
    if isinstance(items, list):
        for index, item in enumerate(items):
            if isinstance(item, dict):
                yield f"$.{kind}[{index}]", item


def _try(parser: Parser[T], value: Any) -> T | None:
    """``parser(value)``, or None when the value is invalid (and so reported elsewhere)."""
    try:
        return parser(value)
    except (TypeError, ValueError):
        return None


def _lenient(table: Mapping[str, Any], key: str, parser: Parser[T]) -> T | None:
    """The parsed value of ``table[key]``, or None when it is absent or invalid."""
    return _try(parser, table[key]) if key in table else None


def _cross_checks(raw: Mapping[str, Any]) -> Iterator[str]:
    for kind in ("emit", "capture"):
        first_name: dict[str, str] = {}
        for where, table in _tables(raw, kind):
            name = _lenient(table, "name", _feed_name)
            if name is None:
                continue
            if name in first_name:
                yield f"duplicate feed name {name!r} (also {first_name[name]}) @ {where}.name"
            first_name.setdefault(name, f"{where}.name")

    listeners: list[tuple[str, Endpoint | None]] = []
    health = raw.get("health", {})
    if isinstance(health, dict):
        if "listen" in health:
            listeners.append(("$.health.listen", _lenient(health, "listen", _listen_endpoint)))
        else:
            listeners.append(("$.health.listen", HealthConfig().listen))
    for where, table in _tables(raw, "emit"):
        listeners.append((f"{where}.listen", _lenient(table, "listen", _listen_endpoint)))
    first_port: dict[int, str] = {}
    for where, endpoint in listeners:
        if endpoint is None or endpoint.port == 0:  # 0: any free port, never a conflict
            continue
        if endpoint.port in first_port:
            yield f"port {endpoint.port} is already used by {first_port[endpoint.port]} @ {where}"
        first_port.setdefault(endpoint.port, where)


def _check_key_files(raw: Mapping[str, Any], base_dir: Path) -> Iterator[str]:
    files: list[tuple[str, Path | None]] = []
    for where, table in _tables(raw, "emit"):
        paths = table.get("auth_key_files")
        if isinstance(paths, list):
            files += [(f"{where}.auth_key_files[{i}]", _try(_path, p)) for i, p in enumerate(paths)]
    for where, table in _tables(raw, "capture"):
        files.append((f"{where}.auth_key_file", _lenient(table, "auth_key_file", _path)))
        sites = table.get("site")
        for index, site in enumerate(sites if isinstance(sites, list) else []):
            if isinstance(site, dict):
                path = _lenient(site, "auth_key_file", _path)
                files.append((f"{where}.site[{index}].auth_key_file", path))
    for where, relative in files:
        if relative is None:
            continue
        path = base_dir / relative
        try:
            key = read_regular_file(path, MAX_KEY_FILE_BYTES).strip()
        except FileNotFoundError:
            continue  # not provisioned yet: a warning (key_file_warnings), not an error
        except OSError as exc:
            yield f"cannot read key file {path}: {exc.strerror or exc} @ {where}"
            continue
        if len(key) < MIN_KEY_BYTES:
            yield f"key file {path} holds fewer than {MIN_KEY_BYTES} bytes @ {where}"


def key_file_warnings(config: Config) -> list[str]:
    """One line per key file that does not exist (yet), naming its TOML path.

    Not an error: the key may be provisioned after the configuration (user data, a secrets
    agent). Until it exists that feed does not start; the supervisor retries it with backoff.
    """
    found: list[tuple[str, str, Path]] = []
    for index, emit in enumerate(config.emit):
        for number, path in enumerate(emit.auth_key_files):
            found.append((f"$.emit[{index}].auth_key_files[{number}]", emit.name, path))
    for index, capture in enumerate(config.capture):
        if capture.auth_key_file is not None:
            found.append((f"$.capture[{index}].auth_key_file", capture.name, capture.auth_key_file))
        for number, site in enumerate(capture.site):
            if site.auth_key_file is not None:
                where = f"$.capture[{index}].site[{number}].auth_key_file"
                found.append((where, capture.name, site.auth_key_file))
    return [
        f"key file {path} does not exist yet; feed {name!r} will not start until it does @ {where}"
        for where, name, path in found
        if not path.exists() and not path.is_symlink()
    ]


def _rebase_emit(feed: EmitFeed, base_dir: Path) -> EmitFeed:
    return attrs.evolve(feed, auth_key_files=tuple(base_dir / p for p in feed.auth_key_files))


def _rebase_capture(feed: CaptureFeed, base_dir: Path) -> CaptureFeed:
    sites = tuple(
        site
        if site.auth_key_file is None
        else attrs.evolve(site, auth_key_file=base_dir / site.auth_key_file)
        for site in feed.site
    )
    if feed.auth_key_file is None:
        return attrs.evolve(feed, site=sites)
    return attrs.evolve(feed, auth_key_file=base_dir / feed.auth_key_file, site=sites)
