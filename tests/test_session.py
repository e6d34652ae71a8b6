"""The per-datagram rules (relayd/session.py): the oracle both data planes are tested against."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.config import PortRange
from relayd.session import (
    DUPLICATE,
    OVERSIZE,
    TGW_MULTICAST_MTU,
    Allowlist,
    Control,
    Destination,
    accept,
    ack_point,
    control_wake,
    next_control,
    oversize,
)


@pytest.mark.parametrize(
    ("highest", "seq", "verdict"),
    [
        (0, 1, 0),  # a new session's first datagram
        (0, 500, 0),  # a session this host has not seen: no gap (failover)
        (5, 6, 0),
        (5, 5, DUPLICATE),
        (5, 1, DUPLICATE),
        (5, 9, 3),  # 6, 7 and 8 were skipped
    ],
)
def test_accept(highest: int, seq: int, verdict: int) -> None:
    assert accept(highest, seq) == verdict


@pytest.mark.parametrize(
    ("highest", "seq", "verdict"),
    [
        (30, 51, 0),  # another emit host emitted 31..50 meanwhile: where the capture resumes
        (30, 31, 0),
        (30, 30, DUPLICATE),  # a resend this host emitted: the stream goes on from there
        (30, 2, DUPLICATE),
    ],
)
def test_the_first_datagram_of_a_connection_is_never_a_gap(
    highest: int, seq: int, verdict: int
) -> None:
    assert accept(highest, seq, resuming=True) == verdict


@given(st.lists(st.integers(1, 50), max_size=40))
def test_accept_emits_each_sequence_once_in_increasing_order(seqs: list[int]) -> None:
    highest, emitted, skipped = 0, [], 0
    for seq in seqs:
        verdict = accept(highest, seq)
        if verdict != DUPLICATE:
            skipped += verdict
            emitted.append(seq)
            highest = seq
    assert emitted == sorted(set(emitted))
    if emitted:
        assert skipped == emitted[-1] - emitted[0] + 1 - len(emitted)


@pytest.mark.parametrize(
    ("highest", "held_floor", "point"),
    [
        (10, None, 10),  # nothing held: everything emitted
        (10, 7, 6),  # frame 7 is held: ACK up to 6 only, though 8..10 went out
        (10, 1, 0),
    ],
)
def test_ack_point_stays_below_what_is_held(
    highest: int, held_floor: int | None, point: int
) -> None:
    assert ack_point(highest, held_floor) == point


def test_allowlist_judges_the_group_first() -> None:
    allow = Allowlist(
        (IPv4Network("239.1.0.0/16"), IPv4Network("239.9.9.9/32")),
        (PortRange(6000, 6010), PortRange(7000, 7000)),
    )

    def verdict(group: str, port: int) -> Destination:
        return allow.verdict(int(IPv4Address(group)), port)

    assert verdict("239.1.2.3", 6000) is Destination.ALLOWED
    assert verdict("239.9.9.9", 7000) is Destination.ALLOWED
    assert verdict("239.1.2.3", 6011) is Destination.PORT_NOT_ALLOWED
    assert verdict("239.2.0.1", 6000) is Destination.GROUP_NOT_ALLOWED
    assert verdict("239.2.0.1", 1) is Destination.GROUP_NOT_ALLOWED
    assert Destination.PORT_NOT_ALLOWED.reason == "port_not_allowed"


def test_oversize_is_strictly_larger_than_the_limit() -> None:
    assert TGW_MULTICAST_MTU == 8500
    assert not oversize(0, 1)
    assert not oversize(1, 1)
    assert oversize(2, 1)
    assert not oversize(TGW_MULTICAST_MTU, TGW_MULTICAST_MTU)
    assert oversize(TGW_MULTICAST_MTU + 1, TGW_MULTICAST_MTU)
    assert not oversize(65507, 65507)
    assert OVERSIZE == "oversize"
    assert OVERSIZE not in {d.reason for d in Destination}  # a reason of its own


def test_the_welcome_ack_goes_out_at_once() -> None:
    assert next_control(0.0, -float("inf"), -1, 0, 0.002, 1.0) is Control.ACK


def test_acks_are_coalesced_and_heartbeats_fill_silence() -> None:
    def due(now: float, acked: int, highest: int) -> Control:
        return next_control(now, 10.0, acked, highest, 0.002, 1.0)

    assert due(10.001, 5, 9) is Control.NOTHING  # within the ACK interval
    assert due(10.002, 5, 9) is Control.ACK
    assert due(10.5, 9, 9) is Control.NOTHING  # nothing new, not idle long enough
    assert due(11.0, 9, 9) is Control.HEARTBEAT
    assert control_wake(10.0, 5, 9, 0.002, 1.0) == 10.002
    assert control_wake(10.0, 9, 9, 0.002, 1.0) == 11.0


@given(
    st.floats(0, 10),
    st.floats(-1, 10),
    st.integers(-1, 5),
    st.integers(0, 5),
    st.floats(0, 1),
    st.floats(0, 5),
)
def test_control_wake_is_when_next_control_speaks(
    now: float, last_out: float, acked: int, highest: int, interval: float, beat: float
) -> None:
    wake = control_wake(last_out, acked, highest, interval, beat)
    if now < wake:
        assert next_control(now, last_out, acked, highest, interval, beat) is Control.NOTHING
    else:
        assert next_control(now, last_out, acked, highest, interval, beat) is not Control.NOTHING
