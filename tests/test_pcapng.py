"""pcapng reader: the Deribit sample captures, and files built here block by block."""

from __future__ import annotations

import io
import shutil
import statistics
import struct
import subprocess
from collections import Counter
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.tools.pcapng import (
    CapturedDatagram,
    PcapngError,
    PcapngStats,
    PcapngWriter,
    iter_datagrams,
    read_datagrams,
)

# ---- the shared Deribit captures (figures from their README) -------------------------------


@pytest.mark.parametrize(
    ("name", "count", "span", "sizes", "pairs"),
    [
        ("sample_capture_v1_6.pcapng", 5066, 80.7, (20, 153, 1458), 29),
        ("price_index.pcapng", 1277, 261.2, (52, 52, 52), 2),
        ("combo_legs.pcapng", 45, 90.0, (361, 1441, 1443), 6),
        ("rfq.pcapng", 2, 98.0, (42, 42, 42), 1),
    ],
)
def test_deribit_captures_match_their_readme(
    deribit_dir: Path,
    name: str,
    count: int,
    span: float,
    sizes: tuple[int, int, int],
    pairs: int,
) -> None:
    stats = PcapngStats()
    datagrams = read_datagrams(deribit_dir / name, stats)
    assert len(datagrams) == count == stats.datagrams == stats.packets
    assert round((datagrams[-1].ts_ns - datagrams[0].ts_ns) / 1e9, 1) == span
    lengths = [len(d.payload) for d in datagrams]
    assert (min(lengths), statistics.median_low(lengths), max(lengths)) == sizes
    assert len({(d.group, d.port) for d in datagrams}) == pairs
    assert {d.port for d in datagrams} <= {6100, 6101}
    assert all(
        IPv4Address("239.111.111.0") <= d.group <= IPv4Address("239.111.111.21") for d in datagrams
    )
    # every payload starts with the Deribit header; its length field counts what follows it
    for d in datagrams:
        assert struct.unpack_from("<H", d.payload)[0] == len(d.payload) - 8


def test_sample_timestamps_are_nanoseconds_since_the_epoch(deribit_sample: Path) -> None:
    datagrams = read_datagrams(deribit_sample)
    first = datagrams[0].ts_ns
    # recorded with if_tsresol 9: nanosecond digits, not microseconds scaled up
    assert any(d.ts_ns % 1000 for d in datagrams)
    # 2023-06-15, as dumpcap stamped it
    assert 1_686_700_000 * 10**9 < first < 1_686_950_000 * 10**9


def test_sample_burst_shape(deribit_sample: Path) -> None:
    datagrams = read_datagrams(deribit_sample)
    busiest = Counter(d.group for d in datagrams if d.port == 6100).most_common(1)[0]
    assert busiest == (IPv4Address("239.111.111.11"), 1757)
    # README: bursts of ~47 datagrams within 1 ms
    times = [d.ts_ns for d in datagrams]
    best = 0
    start = 0
    for end, ts in enumerate(times):
        while ts - times[start] > 1_000_000:
            start += 1
        best = max(best, end - start + 1)
    assert 40 <= best <= 60


def test_iter_datagrams_accepts_a_stream(deribit_sample: Path) -> None:
    with deribit_sample.open("rb") as stream:
        first = next(iter_datagrams(stream))
    assert first == read_datagrams(deribit_sample)[0]


# ---- files built here ------------------------------------------------------------------------


class Writer:
    """Builds pcapng blocks in one byte order."""

    def __init__(self, endian: str = "<") -> None:
        self.e = endian
        self.out = io.BytesIO()

    def block(self, kind: int, body: bytes) -> None:
        body += b"\0" * (-len(body) % 4)
        length = len(body) + 12
        self.out.write(struct.pack(self.e + "II", kind, length) + body)
        self.out.write(struct.pack(self.e + "I", length))

    def section(self) -> None:
        self.block(0x0A0D0D0A, struct.pack(self.e + "IHHq", 0x1A2B3C4D, 1, 0, -1))

    def interface(self, linktype: int, tsresol: int | None = None, tsoffset: int = 0) -> None:
        options = b""
        if tsresol is not None:
            options += struct.pack(self.e + "HH", 9, 1) + bytes([tsresol, 0, 0, 0])
        if tsoffset:
            options += struct.pack(self.e + "HHq", 14, 8, tsoffset)
        options += struct.pack(self.e + "HH", 2, 3) + b"lo\0\0"  # if_name, ignored
        options += struct.pack(self.e + "HH", 0, 0)
        self.block(1, struct.pack(self.e + "HHI", linktype, 0, 65535) + options)

    def packet(self, if_id: int, ticks: int, frame: bytes, original: int | None = None) -> None:
        head = struct.pack(
            self.e + "IIIII",
            if_id,
            ticks >> 32,
            ticks & 0xFFFFFFFF,
            len(frame),
            len(frame) if original is None else original,
        )
        self.block(6, head + frame)

    def simple(self, frame: bytes) -> None:
        self.block(3, struct.pack(self.e + "I", len(frame)) + frame)

    def unknown(self) -> None:
        self.block(0x00000BAD, b"whatever")

    def data(self) -> bytes:
        return self.out.getvalue()


def ipv4_udp(
    dst: str,
    port: int,
    payload: bytes,
    *,
    proto: int = 17,
    frag: int = 0,
    options: bytes = b"",
    src: str = "10.0.0.1",
) -> bytes:
    udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
    ihl = 5 + len(options) // 4
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        ihl * 4 + len(udp),
        1,
        frag,
        64,
        proto,
        0,
        IPv4Address(src).packed,
        IPv4Address(dst).packed,
    )
    return header + options + udp


def ethernet(ip: bytes, vlans: int = 0, ethertype: int = 0x0800) -> bytes:
    head = b"\x01\x00\x5e\x00\x00\x01" + b"\x02" * 6
    for _ in range(vlans):
        head += struct.pack("!HH", 0x8100, 42)
    return head + struct.pack("!H", ethertype) + ip + b"\0" * 6  # trailer padding


def sll(ip: bytes) -> bytes:
    return struct.pack("!HHH8sH", 0, 1, 6, b"\x02" * 8, 0x0800) + ip


def sll2(ip: bytes) -> bytes:
    return struct.pack("!HHIHBB8s", 0x0800, 0, 3, 1, 0, 6, b"\x02" * 8) + ip


@pytest.mark.parametrize("endian", ["<", ">"])
def test_every_link_type_and_what_is_skipped(endian: str) -> None:
    w = Writer(endian)
    w.section()
    w.interface(1)  # Ethernet, microseconds by default
    w.interface(101, tsresol=9)  # raw IP, nanoseconds
    w.interface(228, tsresol=0x80 | 10, tsoffset=100)  # raw IPv4, 2^-10 s, +100 s
    w.interface(113, tsresol=3)  # SLL, milliseconds
    w.interface(276, tsresol=12)  # SLL2, picoseconds
    w.interface(147)  # a link type the reader does not know
    w.packet(0, 1_000_000, ethernet(ipv4_udp("239.1.1.1", 6100, b"eth")))
    w.packet(0, 2_000_000, ethernet(ipv4_udp("239.1.1.2", 6101, b"vlan"), vlans=2))
    w.packet(1, 3_000_000_123, ipv4_udp("239.1.1.3", 6102, b"raw", options=b"\x01" * 8))
    w.packet(2, 2048, ipv4_udp("239.1.1.4", 6103, b"ipv4"))
    w.simple(ipv4_udp("239.1.1.9", 6109, b"simple"))
    w.unknown()
    w.packet(3, 5_000, sll(ipv4_udp("239.1.1.5", 6104, b"sll")))
    w.packet(4, 6_000_000_000_000_007, sll2(ipv4_udp("239.1.1.6", 6105, b"sll2")))
    # skipped: unicast, TCP, a fragment, a truncated capture, IPv6, unknown link type
    w.packet(0, 1, ethernet(ipv4_udp("10.0.0.2", 6100, b"unicast")))
    w.packet(0, 1, ethernet(ipv4_udp("239.1.1.1", 6100, b"tcp", proto=6)))
    w.packet(0, 1, ethernet(ipv4_udp("239.1.1.1", 6100, b"frag", frag=0x2000)))
    w.packet(0, 1, ethernet(ipv4_udp("239.1.1.1", 6100, b"frag", frag=0x0010)))
    w.packet(0, 1, ethernet(ipv4_udp("239.1.1.1", 6100, b"cut")), original=200)
    w.packet(0, 1, ethernet(b"\x60" + b"\0" * 50, ethertype=0x86DD))
    w.packet(5, 1, ipv4_udp("239.1.1.1", 6100, b"unknown link"))

    stats = PcapngStats()
    got = read_datagrams(io.BytesIO(w.data()), stats)
    assert got == [
        CapturedDatagram(1_000_000_000, IPv4Address("239.1.1.1"), 6100, b"eth"),
        CapturedDatagram(2_000_000_000, IPv4Address("239.1.1.2"), 6101, b"vlan"),
        CapturedDatagram(3_000_000_123, IPv4Address("239.1.1.3"), 6102, b"raw"),
        CapturedDatagram(102_000_000_000, IPv4Address("239.1.1.4"), 6103, b"ipv4"),
        CapturedDatagram(5_000_000_000, IPv4Address("239.1.1.5"), 6104, b"sll"),
        CapturedDatagram(6_000_000_000_000, IPv4Address("239.1.1.6"), 6105, b"sll2"),
    ]
    assert stats == PcapngStats(
        blocks=22,
        packets=14,
        datagrams=6,
        skipped_link=2,
        skipped_fragment=2,
        skipped_truncated=1,
        skipped_not_udp=1,
        skipped_unicast=1,
        skipped_simple=1,
    )


def test_a_new_section_starts_a_new_interface_list() -> None:
    w = Writer("<")
    w.section()
    w.interface(1)
    w.packet(0, 1, ethernet(ipv4_udp("239.2.2.2", 1, b"a")))
    data = w.data()
    w2 = Writer(">")
    w2.section()
    w2.interface(228, tsresol=9)
    w2.packet(0, 7, ipv4_udp("239.2.2.3", 2, b"b"))
    got = read_datagrams(io.BytesIO(data + w2.data()))
    assert got == [
        CapturedDatagram(1000, IPv4Address("239.2.2.2"), 1, b"a"),
        CapturedDatagram(7, IPv4Address("239.2.2.3"), 2, b"b"),
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xd4\xc3\xb2\xa1" + b"\0" * 20, "no section header"),  # a classic pcap file
        (b"\x0a\x0d\x0d\x0a\x1c\0\0\0\x01\x02\x03\x04", "byte-order magic"),
        (b"\x0a\x0d\x0d\x0a\x1c\0\0\0\x4d\x3c\x2b\x1a" + b"\0" * 4, "ends inside a block"),
        (b"\x0a\x0d\x0d", "inside a block header"),
    ],
)
def test_damaged_files(data: bytes, message: str) -> None:
    with pytest.raises(PcapngError, match=message):
        read_datagrams(io.BytesIO(data))


def test_packet_on_an_undeclared_interface() -> None:
    w = Writer()
    w.section()
    w.packet(0, 1, ipv4_udp("239.1.1.1", 1, b"x"))
    with pytest.raises(PcapngError, match="undeclared interface 0"):
        read_datagrams(io.BytesIO(w.data()))


def test_a_file_cut_in_the_middle_of_a_packet() -> None:
    w = Writer()
    w.section()
    w.interface(1)
    w.packet(0, 1, ethernet(ipv4_udp("239.1.1.1", 1, b"x" * 100)))
    with pytest.raises(PcapngError, match="ends inside a block"):
        read_datagrams(io.BytesIO(w.data()[:-30]))


@given(
    st.lists(
        st.tuples(
            st.integers(0, 2**63),
            st.integers(int(IPv4Address("224.0.0.0")), int(IPv4Address("239.255.255.255"))),
            st.integers(1, 65535),
            st.binary(max_size=1500),
        ),
        max_size=20,
    ),
    st.sampled_from(["<", ">"]),
)
def test_round_trip(packets: list[tuple[int, int, int, bytes]], endian: str) -> None:
    w = Writer(endian)
    w.section()
    w.interface(1, tsresol=9)
    for ts, group, port, payload in packets:
        w.packet(0, ts, ethernet(ipv4_udp(str(IPv4Address(group)), port, payload)))
    got = read_datagrams(io.BytesIO(w.data()))
    assert got == [
        CapturedDatagram(ts, IPv4Address(group), port, payload)
        for ts, group, port, payload in packets
    ]


# ---- the writer (relayd listen --write) --------------------------------------------------------


def _written(tmp_path: Path) -> tuple[Path, list[CapturedDatagram]]:
    sent = [
        CapturedDatagram(1_700_000_000_123_456_789 + i * 1000, IPv4Address(f"239.1.1.{i % 3}"),
                         6100 + i % 2, bytes([i]) * (i * 37 % 1400 + 1))
        for i in range(50)
    ]  # fmt: skip
    path = tmp_path / "out.pcapng"
    with path.open("wb") as stream:
        writer = PcapngWriter(stream)
        for d in sent:
            writer.write(d.ts_ns, (IPv4Address("10.0.0.7"), 40000), d.group, d.port, d.payload)
    assert writer.datagrams == 50
    return path, sent


def test_writer_round_trips_through_the_reader(tmp_path: Path) -> None:
    path, sent = _written(tmp_path)
    stats = PcapngStats()
    assert read_datagrams(path, stats) == sent
    assert (stats.packets, stats.datagrams) == (50, 50)


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs tcpdump")
def test_writer_output_reads_in_tcpdump(tmp_path: Path) -> None:
    """An independent reader (libpcap) sees valid IPv4/UDP with correct header checksums."""
    path, sent = _written(tmp_path)
    result = subprocess.run(
        ["tcpdump", "-nn", "-vv", "-r", str(path)], capture_output=True, text=True, check=True
    )
    assert result.stdout.count("10.0.0.7.40000 > 239.1.1.") == 50
    assert "bad cksum" not in result.stdout
    assert f"UDP, length {len(sent[1].payload)}" in result.stdout
