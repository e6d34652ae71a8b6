"""Encode and decode rates of the wire codec (`python -m bench.codec [--quick]`).

Decoding is measured the way the emit side uses it: 64 KiB chunks of 160-byte datagrams, every
complete frame of a chunk decoded in one call, frames split across chunk boundaries.
"""

from __future__ import annotations

import argparse
import statistics
import time

from relayd import wire

PAYLOAD = bytes(range(160))
GROUP = 0xEF6F6F01


def encode_rate(count: int) -> float:
    encode = wire.encode_datagram
    start = time.perf_counter()
    for seq in range(1, count + 1):
        encode(seq, GROUP, 6100, seq, PAYLOAD)
    return count / (time.perf_counter() - start)


def pack_in_place_rate(count: int) -> float:
    frame = wire.DATA_HEADER_SIZE + len(PAYLOAD)
    buffer = bytearray(frame * 256)
    pack = wire.pack_datagram_header
    start = time.perf_counter()
    for seq in range(count):
        pack(buffer, (seq & 255) * frame, seq, GROUP, 6100, seq, len(PAYLOAD))
    return count / (time.perf_counter() - start)


def decode_rate(count: int, chunk_size: int = 65536) -> tuple[float, int]:
    stream = b"".join(
        wire.encode_datagram(seq, GROUP + (seq & 3), 6100, seq, PAYLOAD)
        for seq in range(1, count + 1)
    )
    chunks = [stream[i : i + chunk_size] for i in range(0, len(stream), chunk_size)]
    decoder = wire.Decoder()
    start = time.perf_counter()
    decoded = 0
    for chunk in chunks:
        decoded += len(decoder.feed(chunk))
    elapsed = time.perf_counter() - start
    assert decoded == count
    return count / elapsed, len(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one short round")
    args = parser.parse_args()
    count, rounds = (50_000, 3) if args.quick else (400_000, 5)
    enc = [encode_rate(count) for _ in range(rounds)]
    pack = [pack_in_place_rate(count) for _ in range(rounds)]
    dec = [decode_rate(count)[0] for _ in range(rounds)]
    print(f"wire codec, 160-byte payloads, median of {rounds} rounds of {count:,} frames")
    for name, rates in (
        ("encode_datagram", enc),
        ("pack_datagram_header", pack),
        ("decode (64 KiB chunks)", dec),
    ):
        median = statistics.median(rates)
        print(f"  {name:24s} {median / 1e6:6.2f} M frames/s  {1e9 / median:7.0f} ns/frame")


if __name__ == "__main__":
    main()
