"""The emit-host beacon: a small datagram an active or claiming emit host sends about every
observer tick, so that the other emit hosts of the feed know who holds it before any data
flows (docs/EXACTLY_ONCE.md, "One active emitter per feed"). Sans-I/O: encode and decode.

Layout (network byte order), 8 bytes and the feed name::

    magic "RLYB" | version u8 (1) | state u8 (1 claiming, 2 active) | flags u8 | name length u8
    | name (ASCII)

Flags: bit 0, the sender has opened its emit gate in this active episode (it may have
emitted data).
"""

from __future__ import annotations

import enum
import struct
from typing import Final

import attrs

__all__ = ["BEACON_VERSION", "Beacon", "BeaconError", "BeaconState", "decode", "encode"]

_HEAD: Final = struct.Struct("!4sBBBB")
_MAGIC: Final = b"RLYB"
BEACON_VERSION: Final = 1
_EMITTED: Final = 0x01


class BeaconState(enum.Enum):
    CLAIMING = 1
    ACTIVE = 2


class BeaconError(ValueError):
    """Not a beacon this relay understands (another sender on the beacon port, a newer
    version, a cut datagram)."""


@attrs.frozen
class Beacon:
    feed: str
    state: BeaconState
    emitted: bool = False


def encode(beacon: Beacon) -> bytes:
    name = beacon.feed.encode("ascii")
    if len(name) > 255:
        raise ValueError(f"feed name too long for a beacon: {beacon.feed!r}")
    flags = _EMITTED if beacon.emitted else 0
    return _HEAD.pack(_MAGIC, BEACON_VERSION, beacon.state.value, flags, len(name)) + name


def decode(data: bytes) -> Beacon:
    if len(data) < _HEAD.size:
        raise BeaconError(f"{len(data)} bytes: shorter than a beacon's {_HEAD.size}")
    magic, version, state, flags, length = _HEAD.unpack_from(data)
    if magic != _MAGIC:
        raise BeaconError(f"not a relayd beacon (magic {magic!r})")
    if version != BEACON_VERSION:
        raise BeaconError(f"beacon version {version}, this relay knows {BEACON_VERSION}")
    if len(data) != _HEAD.size + length:
        raise BeaconError(f"{len(data)} bytes for a name of {length}")
    try:
        beacon_state = BeaconState(state)
        feed = data[_HEAD.size :].decode("ascii")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BeaconError(f"malformed beacon: {exc}") from None
    return Beacon(feed, beacon_state, bool(flags & _EMITTED))
