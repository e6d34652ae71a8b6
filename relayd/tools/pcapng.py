"""A small pcapng reader that yields the UDP-over-IPv4 multicast datagrams of a capture.

Blocks understood: section header (either byte order; several sections per file),
interface description (link type, ``if_tsresol``, ``if_tsoffset``) and enhanced packet.
Simple packet blocks (no timestamp, no interface) and every other block are skipped.

Link types: Ethernet (1, with 802.1Q/802.1ad tags), raw IPv4 (101 and 228), Linux cooked
capture SLL (113) and SLL2 (276). IPv4 fragments, truncated packets, non-UDP and unicast
destinations are skipped and counted in ``PcapngStats``.

``PcapngWriter`` writes what ``relayd listen --write`` receives: one section, one raw-IPv4
interface with nanosecond timestamps, an IPv4 + UDP header rebuilt around each payload, so the
file replays with ``relayd send`` and opens in Wireshark.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import BinaryIO, NamedTuple

import attrs

__all__ = [
    "CapturedDatagram",
    "PcapngError",
    "PcapngStats",
    "PcapngWriter",
    "iter_datagrams",
    "read_datagrams",
]

BLOCK_SECTION_HEADER = 0x0A0D0D0A
BLOCK_INTERFACE = 0x00000001
BLOCK_SIMPLE_PACKET = 0x00000003
BLOCK_ENHANCED_PACKET = 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_IPV4 = 228
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276

OPT_END = 0
OPT_IF_TSRESOL = 9
OPT_IF_TSOFFSET = 14

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_VLAN = (0x8100, 0x88A8, 0x9100)

_MAX_BLOCK = 256 * 1024 * 1024


class CapturedDatagram(NamedTuple):
    """One UDP datagram sent to a multicast group, as captured."""

    ts_ns: int  # capture time, ns since the Unix epoch
    group: IPv4Address
    port: int
    payload: bytes


class PcapngError(Exception):
    """The file is not pcapng or is damaged."""


@attrs.define
class PcapngStats:
    """What the reader saw and skipped (pass one in to find out)."""

    blocks: int = 0
    packets: int = 0
    datagrams: int = 0
    skipped_link: int = 0  # unsupported link type or not IPv4
    skipped_fragment: int = 0
    skipped_truncated: int = 0
    skipped_not_udp: int = 0
    skipped_unicast: int = 0
    skipped_simple: int = 0


@attrs.define
class _Interface:
    linktype: int
    # timestamp units -> ns: ts_ns = units * mul // div + offset_ns
    mul: int
    div: int
    offset_ns: int


def _resolution(code: int) -> tuple[int, int]:
    """``(mul, div)`` turning timestamp units into ns for an ``if_tsresol`` value."""
    if code & 0x80:
        return 1_000_000_000, 1 << (code & 0x7F)
    exponent = code
    if exponent <= 9:
        return 10 ** (9 - exponent), 1
    return 1, 10 ** (exponent - 9)


class _Endian:
    def __init__(self, prefix: str) -> None:
        self.u16 = struct.Struct(prefix + "H")
        self.u32 = struct.Struct(prefix + "I")
        self.i64 = struct.Struct(prefix + "q")
        self.head = struct.Struct(prefix + "II")
        self.idb = struct.Struct(prefix + "HHI")
        self.epb = struct.Struct(prefix + "IIIII")
        self.option = struct.Struct(prefix + "HH")


_LITTLE = _Endian("<")
_BIG = _Endian(">")

_IPV4_HEAD = struct.Struct("!BBHHHBBH4s4s")
_UDP_HEAD = struct.Struct("!HHHH")
_U16BE = struct.Struct("!H")


def _parse_interface(body: bytes, end: _Endian) -> _Interface:
    if len(body) < 8:
        raise PcapngError("interface description block too short")
    linktype, _reserved, _snaplen = end.idb.unpack_from(body, 0)
    mul, div = 1000, 1  # default resolution: microseconds
    offset_ns = 0
    pos = 8
    while pos + 4 <= len(body):
        code, length = end.option.unpack_from(body, pos)
        pos += 4
        if code == OPT_END:
            break
        value = body[pos : pos + length]
        if code == OPT_IF_TSRESOL and length >= 1:
            mul, div = _resolution(value[0])
        elif code == OPT_IF_TSOFFSET and length >= 8:
            offset_ns = end.i64.unpack_from(value)[0] * 1_000_000_000
        pos += (length + 3) & ~3
    return _Interface(linktype, mul, div, offset_ns)


def _ip_offset(linktype: int, frame: bytes) -> int:
    """Offset of the IPv4 header inside a frame, or -1 when the frame is not IPv4."""
    if linktype == LINKTYPE_ETHERNET:
        pos = 12
        while True:
            if len(frame) < pos + 2:
                return -1
            ethertype = _U16BE.unpack_from(frame, pos)[0]
            if ethertype in ETHERTYPE_VLAN:
                pos += 4
                continue
            return pos + 2 if ethertype == ETHERTYPE_IPV4 else -1
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4):
        return 0 if frame and frame[0] >> 4 == 4 else -1
    if linktype == LINKTYPE_LINUX_SLL:
        if len(frame) < 16:
            return -1
        return 16 if _U16BE.unpack_from(frame, 14)[0] == ETHERTYPE_IPV4 else -1
    if linktype == LINKTYPE_LINUX_SLL2:
        if len(frame) < 20:
            return -1
        return 20 if _U16BE.unpack_from(frame, 0)[0] == ETHERTYPE_IPV4 else -1
    return -1


class _Decoder:
    """Frame bytes to ``CapturedDatagram`` (IPv4 + UDP), counting what it skips."""

    def __init__(self, stats: PcapngStats) -> None:
        self.stats = stats
        self.groups: dict[bytes, IPv4Address] = {}

    def decode(
        self, linktype: int, frame: bytes, original_length: int, ts_ns: int
    ) -> CapturedDatagram | None:
        stats = self.stats
        if len(frame) < original_length:
            stats.skipped_truncated += 1
            return None
        pos = _ip_offset(linktype, frame)
        if pos < 0 or len(frame) < pos + 20:
            stats.skipped_link += 1
            return None
        (vihl, _tos, total, _ident, frag, _ttl, proto, _csum, _src, dst) = _IPV4_HEAD.unpack_from(
            frame, pos
        )
        if vihl >> 4 != 4:
            stats.skipped_link += 1
            return None
        if frag & 0x3FFF:  # more-fragments flag or a fragment offset
            stats.skipped_fragment += 1
            return None
        if proto != 17:
            stats.skipped_not_udp += 1
            return None
        if not 224 <= dst[0] <= 239:
            stats.skipped_unicast += 1
            return None
        ip_end = pos + total
        udp = pos + (vihl & 0x0F) * 4
        if ip_end > len(frame) or udp + 8 > ip_end:
            stats.skipped_truncated += 1
            return None
        _sport, dport, udp_length, _ucsum = _UDP_HEAD.unpack_from(frame, udp)
        if udp_length < 8 or udp + udp_length > ip_end:
            stats.skipped_truncated += 1
            return None
        group = self.groups.get(dst)
        if group is None:
            group = self.groups[dst] = IPv4Address(dst)
        stats.datagrams += 1
        return CapturedDatagram(ts_ns, group, dport, frame[udp + 8 : udp + udp_length])


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise PcapngError(f"file ends inside a block ({len(data)} of {size} bytes)")
    return data


def _iter_stream(stream: BinaryIO, stats: PcapngStats) -> Iterator[CapturedDatagram]:
    decoder = _Decoder(stats)
    end: _Endian | None = None
    interfaces: list[_Interface] = []
    first = True
    while True:
        head = stream.read(8)
        if not head:
            return
        if len(head) != 8:
            raise PcapngError("file ends inside a block header")
        if head[:4] == b"\x0a\x0d\x0d\x0a":
            magic_bytes = _read_exact(stream, 4)
            if magic_bytes == b"\x4d\x3c\x2b\x1a":
                end = _LITTLE
            elif magic_bytes == b"\x1a\x2b\x3c\x4d":
                end = _BIG
            else:
                raise PcapngError("bad byte-order magic in a section header")
            length = end.u32.unpack_from(head, 4)[0]
            if length < 28 or length % 4 or length > _MAX_BLOCK:
                raise PcapngError(f"bad section header length {length}")
            _read_exact(stream, length - 12)
            interfaces = []
            stats.blocks += 1
            first = False
            continue
        if first or end is None:
            raise PcapngError("not a pcapng file (no section header first)")
        kind, length = end.head.unpack(head)
        if length < 12 or length % 4 or length > _MAX_BLOCK:
            raise PcapngError(f"bad block length {length} (block type {kind:#x})")
        body = _read_exact(stream, length - 8)
        stats.blocks += 1
        if kind == BLOCK_ENHANCED_PACKET:
            stats.packets += 1
            if len(body) < 24:
                raise PcapngError("enhanced packet block too short")
            if_id, ts_high, ts_low, captured, original = end.epb.unpack_from(body, 0)
            if if_id >= len(interfaces):
                raise PcapngError(f"packet on undeclared interface {if_id}")
            iface = interfaces[if_id]
            if 20 + captured > len(body) - 4:
                raise PcapngError("enhanced packet block shorter than its packet")
            ts_ns = ((ts_high << 32) | ts_low) * iface.mul // iface.div + iface.offset_ns
            datagram = decoder.decode(iface.linktype, body[20 : 20 + captured], original, ts_ns)
            if datagram is not None:
                yield datagram
        elif kind == BLOCK_INTERFACE:
            interfaces.append(_parse_interface(body, end))
        elif kind == BLOCK_SIMPLE_PACKET:
            stats.packets += 1
            stats.skipped_simple += 1


def iter_datagrams(
    source: str | os.PathLike[str] | BinaryIO, stats: PcapngStats | None = None
) -> Iterator[CapturedDatagram]:
    """Yield every multicast UDP datagram of a pcapng file (a path or a binary stream)."""
    counters = stats if stats is not None else PcapngStats()
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as stream:
            yield from _iter_stream(stream, counters)
    else:
        yield from _iter_stream(source, counters)


def read_datagrams(
    source: str | os.PathLike[str] | BinaryIO, stats: PcapngStats | None = None
) -> list[CapturedDatagram]:
    """All multicast UDP datagrams of a pcapng file, in capture order."""
    return list(iter_datagrams(source, stats))


def _ipv4_checksum(header: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _block(kind: int, body: bytes) -> bytes:
    pad = b"\0" * (-len(body) % 4)
    length = 12 + len(body) + len(pad)
    return struct.pack("<II", kind, length) + body + pad + struct.pack("<I", length)


class PcapngWriter:
    """Append UDP datagrams to a pcapng file (little-endian, link type raw IPv4, ns stamps)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.datagrams = 0
        section = struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1)
        tsresol = struct.pack("<HHB3x", OPT_IF_TSRESOL, 1, 9) + struct.pack("<HH", OPT_END, 0)
        interface = struct.pack("<HHI", LINKTYPE_IPV4, 0, 0) + tsresol
        stream.write(_block(BLOCK_SECTION_HEADER, section))
        stream.write(_block(BLOCK_INTERFACE, interface))

    def write(
        self,
        ts_ns: int,
        source: tuple[IPv4Address, int],
        group: IPv4Address,
        port: int,
        payload: bytes,
    ) -> None:
        """One datagram from ``source`` (address, port) to ``group:port``, seen at ``ts_ns``."""
        total = 28 + len(payload)
        head = _IPV4_HEAD.pack(0x45, 0, total, 0, 0x4000, 1, 17, 0, source[0].packed, group.packed)
        head = head[:10] + struct.pack("!H", _ipv4_checksum(head)) + head[12:]
        udp = _UDP_HEAD.pack(source[1], port, 8 + len(payload), 0)
        frame = head + udp + payload
        packet = struct.pack("<IIIII", 0, ts_ns >> 32, ts_ns & 0xFFFFFFFF, total, total) + frame
        self._stream.write(_block(BLOCK_ENHANCED_PACKET, packet))
        self.datagrams += 1

    def flush(self) -> None:
        self._stream.flush()
