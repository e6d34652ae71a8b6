"""The burst analysis of ``bench.relay --bursts`` on stamps whose answer is known."""

from __future__ import annotations

import pytest

from bench.relay.hops import burst_profile

US = 1e-6


def stamps() -> tuple[list[float], list[float], list[float]]:
    """Three bursts of 4 datagrams 1 µs apart, 1 ms between bursts, then a burst cut short
    (2 datagrams). Capture writes a segment half a microsecond after every second datagram; emit
    sends datagram k of a burst 10 + 3k µs after the burst's first arrival (3 µs apart: a
    queue that grows by 2 µs a datagram)."""
    c0, c1, e1 = [], [], []
    for b, size in enumerate((4, 4, 4, 2)):
        first = 1.0 + b * 1e-3
        for k in range(size):
            c0.append(first + k * US)
            e1.append(first + (10 + 3 * k) * US)
            if k % 2:
                c1.append(first + (k + 0.5) * US)
    return c0, c1, e1


def test_the_profile_reads_positions_pace_and_queueing() -> None:
    c0, c1, e1 = stamps()
    profile = burst_profile(c0, c1, e1, burst=4, gap=100 * US)
    assert profile is not None
    assert profile.bursts == 3  # the burst cut short does not count
    assert [p[0] / US for p in profile.positions] == pytest.approx([0, 1, 2, 3])
    # datagrams 0 and 1 share the segment sent at 1.5 µs, 2 and 3 the one at 3.5 µs
    assert [p[1] / US for p in profile.positions] == pytest.approx([1.5, 1.5, 3.5, 3.5])
    assert [p[2] / US for p in profile.positions] == pytest.approx([10, 13, 16, 19])
    assert profile.pace_in / US == pytest.approx(1)
    assert profile.pace_out / US == pytest.approx(3)
    # relay added per datagram: 10, 12, 14, 16 µs; the median of the 12 is the upper middle
    assert profile.added / US == pytest.approx(14)
    assert profile.lead / US == pytest.approx(10 - 3)  # first out 10 µs, last in at 3 µs
    assert profile.segments == 2


def test_without_a_whole_burst_or_a_pairing_there_is_no_profile() -> None:
    c0, c1, e1 = stamps()
    assert burst_profile(c0, c1, e1[:-1], burst=4, gap=100 * US) is None  # a datagram lost
    assert burst_profile(c0[:2], c1, e1[:2], burst=4, gap=100 * US) is None
