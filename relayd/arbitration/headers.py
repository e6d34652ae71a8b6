"""Where the Deribit packet headers keep channel and sequence (sans-I/O, no allocation beyond
one tuple per datagram).

Two layouts, chosen per feed: the 8-byte frame header of the published sample captures, and the
current SBE market data schema's 24-byte packet header. docs/EXACTLY_ONCE.md cites the sources.
A datagram too short or inconsistent for its layout parses to None, never an exception.
"""

from __future__ import annotations

import enum
import struct
from typing import Final, NamedTuple

__all__ = [
    "PARSERS",
    "SBE_INCREMENTAL",
    "SBE_RETRANSMIT",
    "SBE_SNAPSHOT",
    "ChannelKind",
    "DeribitHeader",
    "DeribitLayout",
    "HeaderFields",
    "parse_deribit",
]

# The 8-byte frame header of the published sample captures: PacketLength u16 (bytes after the
# header), ChannelID u16, Sequence u32, little-endian. One sequence number per packet.
V1_HEADER: Final = struct.Struct("<HHI")
# The SBE market data schema's PacketHeader (24 bytes, little-endian): sendingTime int64 (ns),
# seqNum int64 (of the packet's first message), channelId int32, type uint16 (a bit set),
# messageCount uint16. The next packet's seqNum is seqNum + messageCount; a heartbeat is a packet
# of 0 messages carrying the current sequence number.
SBE_HEADER: Final = struct.Struct("<qqiHH")
SBE_MESSAGE_HEADER_SIZE: Final = 16  # every message starts with a 16-byte mdMessageHeader
SBE_INCREMENTAL: Final = 0x01
SBE_SNAPSHOT: Final = 0x02
SBE_RETRANSMIT: Final = 0x04
_SBE_KNOWN_TYPES: Final = SBE_INCREMENTAL | SBE_SNAPSHOT | SBE_RETRANSMIT


class DeribitLayout(enum.Enum):
    FRAME_V1 = "frame-v1"  # 8 bytes: length, channel, sequence (the sample captures)
    SBE = "sbe"  # 24 bytes: sendingTime, seqNum, channelId, type, messageCount


class ChannelKind(enum.Enum):
    INCREMENTAL = "incremental"
    SNAPSHOT = "snapshot"


class DeribitHeader(NamedTuple):
    """The arbitration-relevant part of one Deribit packet header."""

    channel: int
    seq: int  # the first sequence number the packet carries
    span: int  # sequence numbers it carries (messageCount; 1 in the 8-byte layout)
    stamp: int  # sendingTime in ns (SBE), 0 in the 8-byte layout
    sequenced: bool  # False: snapshot, retransmit or reject SBE packets
    kind: ChannelKind


HeaderFields = tuple[int, int, int, int, bool, ChannelKind]  # DeribitHeader's, as a plain tuple


def _parse_v1(payload: bytes, port: int, snapshot_ports: frozenset[int]) -> HeaderFields | None:
    size = len(payload)
    if size < 8:
        return None
    length, channel, seq = V1_HEADER.unpack_from(payload)
    if length != size - 8:
        return None
    kind = ChannelKind.SNAPSHOT if port in snapshot_ports else ChannelKind.INCREMENTAL
    return channel, seq, 1, 0, True, kind


def _parse_sbe(payload: bytes, port: int, snapshot_ports: frozenset[int]) -> HeaderFields | None:
    size = len(payload)
    if size < 24:
        return None
    stamp, seq, channel, type_bits, count = SBE_HEADER.unpack_from(payload)
    if seq < 0 or type_bits & ~_SBE_KNOWN_TYPES or size < 24 + SBE_MESSAGE_HEADER_SIZE * count:
        return None
    if type_bits == SBE_INCREMENTAL:
        return channel, seq, count, stamp, True, ChannelKind.INCREMENTAL
    # Snapshot packets share one seqNum (the incremental sequence they reflect); retransmits
    # repeat sequences on purpose; type 0 is a reject: none has a sequence of its own.
    kind = ChannelKind.SNAPSHOT if type_bits & SBE_SNAPSHOT else ChannelKind.INCREMENTAL
    return channel, seq, count, stamp, False, kind


PARSERS: Final = {DeribitLayout.FRAME_V1: _parse_v1, DeribitLayout.SBE: _parse_sbe}


def parse_deribit(
    layout: DeribitLayout, port: int, payload: bytes, snapshot_ports: frozenset[int]
) -> DeribitHeader | None:
    """The header of one datagram, or None if it is too short or inconsistent for ``layout``."""
    fields = PARSERS[layout](payload, port, snapshot_ports)
    return None if fields is None else DeribitHeader(*fields)
