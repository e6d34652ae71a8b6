"""The value parsers: one TOML value in, a typed value out, or an error that names the rule.

Each raises ``_WrongTypeError`` (wrong TOML type) or ``_InvalidValueError`` (right type,
broken rule); the bounds they enforce are defined here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Final, TypeVar

from cattrs.errors import IterableValidationError, IterableValidationNote

from relayd.config.errors import _InvalidValueError, _WrongTypeError
from relayd.config.values import LINK_LOCAL_MULTICAST, MULTICAST, Endpoint, GroupPort, PortRange
from relayd.units import UnitError, format_duration, format_size, parse_duration, parse_size

#: Bounds of the arbitration tunables: a hole waits at most 1 s for another copy (it delays
#: its channel that long), the content window spans 10 ms..60 s.
MAX_HOLD_TIMEOUT: Final = 1.0
CONTENT_WINDOW_RANGE: Final = (0.01, 60.0)

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
_IFNAMSIZ: Final = 16  # Linux interface names are at most 15 bytes

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
