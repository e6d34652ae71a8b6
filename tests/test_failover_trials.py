"""Failure trials: one host of the deployment fails at a random moment of a Deribit replay.

The harness is tests/helpers/trials.py (namespaces, NLB stand-in, relayd hosts, faults) and
tests/helpers/trial_verdict.py (what the customer saw). Here: the verdict's arithmetic on
hand-made arrivals, then a few real trials with what holds on main today (one capture host,
no arbitration): a single emit-host failure loses nothing, duplicates stay within what
relayd resent (the exact-resume window), and relayd counted every loss the customer saw. The
cases that need A/B arbitration or one active emitter skip, saying why, until
``relayd check-config`` knows the option (and the emit host reports a role); then they run.
``make soak`` runs 20 trials of every host and fault and prints the table
(``python -m tests.helpers.trials table``).
"""

from __future__ import annotations

import json
import os
import random
import struct
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from relayd.tools.pcapng import CapturedDatagram, read_datagrams
from relayd.tools.player import DERIBIT_HEADER
from tests.helpers.netns import NetnsHarness
from tests.helpers.trial_verdict import (
    LATE_NS,
    Arrival,
    Outcome,
    Sent,
    judge,
    render_table,
    summarise,
)
from tests.helpers.trials import (
    FEED,
    Fault,
    Host,
    TrialBed,
    TrialRecord,
    TrialSettings,
    continue_sequences,
    emit_key_refused,
    lost_at_channel_edges,
    unavailable_reason,
)

MS = 1_000_000


def _sent() -> list[Sent]:
    """Three datagrams on each of two channels, 10 ms apart."""
    out = []
    for i in range(6):
        group = "239.1.1.1" if i % 2 == 0 else "239.1.1.2"
        out.append(Sent(group, 6100, f"payload {i}".encode(), i * 10 * MS))
    return out


def _arrive(sent: list[Sent], i: int, t_ms: float, source: str = "10.0.0.1") -> Arrival:
    d = sent[i]
    return Arrival(int(t_ms * MS), d.group, d.port, source, d.payload)


def test_judge_counts_loss_duplicates_reordering_and_foreign_bytes() -> None:
    sent = _sent()
    arrivals = [
        _arrive(sent, 0, 1),
        _arrive(sent, 1, 11),
        _arrive(sent, 4, 41),  # channel 239.1.1.1: 4 before 2
        _arrive(sent, 2, 42),  # reordered
        _arrive(sent, 1, 43, "10.0.0.2"),  # a second copy of 1, from the other host
        Arrival(44 * MS, "239.1.1.1", 6100, "10.0.0.2", b"never sent"),
        Arrival(45 * MS, "239.1.1.2", 6100, "10.0.0.1", sent[0].payload),  # wrong group
    ]  # 3 and 5 never arrive
    verdict = judge(sent, arrivals, replay_start_ns=0, fault_ns=0, speed=1.0)
    assert (verdict.sent, verdict.received, verdict.lost) == (6, 4, 2)
    assert verdict.lost_span_ms == 20.0  # 3 was due at 30 ms, 5 at 50 ms
    assert verdict.lost_runs == 2
    assert verdict.duplicates == 1
    assert verdict.duplicates_by_source == {"10.0.0.2": 1}
    assert verdict.reordered == 1
    assert verdict.foreign == 2
    assert verdict.by_source == {"10.0.0.1": 5, "10.0.0.2": 2}


def test_judge_measures_overlap_only_where_sources_took_turns() -> None:
    sent = _sent()
    handover = [_arrive(sent, 0, 1, "A"), _arrive(sent, 2, 21, "B"), _arrive(sent, 4, 41, "B")]
    assert judge(sent, handover, replay_start_ns=0, fault_ns=0, speed=1.0).overlaps == ()
    # A, then B, then A's late backlog, then B again: the window is B's start to A's end.
    turns = [
        _arrive(sent, 0, 1, "A"),
        _arrive(sent, 2, 21, "B"),
        _arrive(sent, 0, 30, "A"),
        _arrive(sent, 2, 35, "A"),
        _arrive(sent, 4, 41, "B"),
    ]
    verdict = judge(sent, turns, replay_start_ns=0, fault_ns=0, speed=1.0)
    assert len(verdict.overlaps) == 1
    window = verdict.overlaps[0]
    assert (window.group, window.sources) == ("239.1.1.1", ("A", "B"))
    assert verdict.overlap_ms == 35.0 - 21.0
    assert verdict.two_source_groups == 1
    assert verdict.duplicates == 2


def test_judge_delay_and_recovery_follow_the_replay_pace() -> None:
    sent = _sent()
    late = LATE_NS / MS
    # At speed 2 datagram i is due at i * 5 ms; 3 comes late by more than LATE_NS.
    arrivals = [_arrive(sent, i, i * 5 + 1) for i in (0, 1, 2, 4, 5)]
    arrivals.append(_arrive(sent, 3, 15 + late + 10))
    verdict = judge(sent, arrivals, replay_start_ns=0, fault_ns=12 * MS, speed=2.0)
    assert verdict.max_delay_ms == pytest.approx(late + 10)
    assert verdict.recovered_ms == pytest.approx(15 + late + 10 - 12)
    on_time = judge(sent, arrivals[:5], replay_start_ns=0, fault_ns=0, speed=2.0)
    assert on_time.recovered_ms == 0.0
    assert on_time.max_delay_ms == pytest.approx(1.0)


def test_repetitions_continue_each_channels_sequence() -> None:
    def datagram(group: str, channel: int, sequence: int, body: bytes) -> CapturedDatagram:
        head = DERIBIT_HEADER.pack(len(body), channel, sequence)
        return CapturedDatagram(0, IPv4Address(group), 6100, head + body)

    capture = [
        datagram("239.1.1.1", 1, 10, b"a"),
        datagram("239.1.1.1", 2, 2**32 - 1, b"b"),  # a channel of one, at the top
        datagram("239.1.1.1", 1, 11, b"c"),
        datagram("239.1.1.2", 1, 5, b"d"),  # the same ChannelID on another group
        datagram("239.1.1.1", 1, 12, b"e"),
        CapturedDatagram(0, IPv4Address("239.1.1.1"), 6100, b"short"),
    ]
    assert continue_sequences(capture, 0) == capture

    def sequences(rounds: int) -> list[int]:
        return [
            DERIBIT_HEADER.unpack_from(d.payload)[2]
            for d in continue_sequences(capture, rounds)
            if len(d.payload) >= DERIBIT_HEADER.size
        ]

    assert sequences(1) == [13, 0, 14, 6, 15]  # the next repetition follows on, modulo 2**32
    assert sequences(2) == [16, 1, 17, 7, 18]
    second = continue_sequences(capture, 2)
    assert [d.payload[DERIBIT_HEADER.size :] for d in second] == [
        d.payload[DERIBIT_HEADER.size :] for d in capture
    ]
    assert second[-1] == capture[-1]


def test_judge_refuses_a_replay_that_repeats_a_datagram() -> None:
    sent = [*_sent(), _sent()[0]]
    with pytest.raises(ValueError, match="repeats datagram 6"):
        judge(sent, [], replay_start_ns=0, fault_ns=0, speed=1.0)


def test_summary_rows_give_median_and_max_per_host_and_fault() -> None:
    sent = _sent()
    outcomes = []
    for lost in (0, 1, 3):  # trial with 0, 1 and 3 of the last datagrams missing
        arrivals = [_arrive(sent, i, i * 10) for i in range(6 - lost)]
        verdict = judge(sent, arrivals, replay_start_ns=0, fault_ns=0, speed=1.0)
        outcomes.append(Outcome("emit 1", "kill -9", verdict, counted_lost=lost, resent=0.0))
    broken = judge(sent, [], replay_start_ns=0, fault_ns=0, speed=1.0)
    outcomes.append(Outcome("capture A", "freeze", broken, counted_lost=0.0, resent=0.0))
    rows = summarise(outcomes)
    assert [(r.host, r.fault, r.trials) for r in rows] == [
        ("emit 1", "kill -9", 3),
        ("capture A", "freeze", 1),
    ]
    assert rows[0].lost == (1.0, 3.0)
    assert (rows[0].trials_with_loss, rows[0].loss_counted) == (2, 3)
    assert (rows[1].lost, rows[1].loss_counted) == ((6.0, 6.0), 0)
    table = render_table(rows)
    first = "| emit 1 | kill -9 | 3 | 1 / 3 | 0 / 20 | 2 | 3 of 3 | 1 / 3 |"
    assert table.splitlines()[2].startswith(first)
    assert "| capture A | freeze | 1 | 6 / 6 |" in table


def test_loss_at_a_channels_edges_is_what_its_sequence_numbers_may_not_show() -> None:
    def packet(channel: int, seq: int) -> Sent:
        return Sent("239.1.1.1", 6100, struct.pack("<HHI", 1, channel, seq) + b"x", seq)

    sent = [packet(c, s) for s in range(1, 5) for c in (1, 2, 3)]
    # channel 1 loses 2 (between packets it got) and 4 (an edge), channel 2 loses 1 (an edge),
    # channel 3 loses everything (4, all edges)
    lost = {(1, 2), (1, 4), (2, 1), *((3, s) for s in range(1, 5))}
    arrivals = [
        Arrival(0, s.group, s.port, "10.0.0.1", s.payload)
        for s in sent
        if struct.unpack_from("<HI", s.payload, 2) not in lost
    ]
    assert lost_at_channel_edges(sent, arrivals) == 1 + 1 + 4


def test_counted_loss_counts_each_loss_once_and_the_exchange_numbers_where_they_see_more() -> None:
    counters = {
        "capture_kernel_drops": 1.0,
        "capture_resume_lost_datagrams": 10.0,
        "gap_sequences": 5.0,
        "capture_replay_dropped_datagrams": 40.0,  # an upper bound of the 15: not summed
        "datagrams_dropped": 2.0,  # failed sends (send_errors counts them too: not summed)
        "send_errors": 2.0,
        "upstream_missing.emit": 1000.0,  # a capture process killed: a new session
        "upstream_missing.capture": 7.0,
    }
    assert TrialSettings().counted_loss(counters) == 16 + 2
    assert TrialSettings(arbitration="deribit").counted_loss(counters) == 1000 + 2
    assert TrialSettings(upstream_check=True).counted_loss(counters) == 16 + 2
    counters["upstream_missing.capture"] = 30.0
    assert TrialSettings(upstream_check=True).counted_loss(counters) == 30 + 2


# -- real trials ------------------------------------------------------------------------------

Beds = Callable[[TrialSettings], TrialBed]


@pytest.fixture(scope="module")
def beds(tmp_path_factory: pytest.TempPathFactory, deribit_sample: Path) -> Iterator[Beds]:
    """A bed per settings, built on first use and reused by the module's trials; every
    namespace and process is gone afterwards, pass or fail."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    datagrams = read_datagrams(deribit_sample)
    made: dict[TrialSettings, tuple[NetnsHarness, TrialBed]] = {}

    def bed(settings: TrialSettings) -> TrialBed:
        if settings not in made:
            net = NetnsHarness()
            try:
                workdir = tmp_path_factory.mktemp("trials")
                made[settings] = (net, TrialBed(net, workdir, settings, datagrams, deribit_sample))
            except BaseException:
                net.close()
                raise
        return made[settings][1]

    yield bed
    for net, built in made.values():
        built.close()
        net.close()


def _trial(bed: TrialBed, host: Host, fault: Fault) -> TrialRecord:
    seed = int.from_bytes(os.urandom(4), "big")
    record = bed.run(host, fault, random.Random(seed))
    print(f"\nTRIAL seed={seed} {json.dumps(record.as_json(), sort_keys=True)}")
    return record


def _explain(bed: TrialBed, record: TrialRecord) -> str:
    logs = "\n".join(f"--- {h.name}\n{h.tail(1500)}" for h in (*bed.captures, *bed.emits))
    return f"{json.dumps(record.as_json(), sort_keys=True)}\n{logs}"


TODAY = TrialSettings()  # one capture host, no arbitration key: main's behaviour


def _assert_nothing_lost_at_most_resent(bed: TrialBed, record: TrialRecord) -> None:
    """Nothing lost (a loss relayd did not count is named as such), duplicates at most what
    was resent, every first copy in order, none the exchange never sent."""
    verdict, why = record.outcome.verdict, _explain(bed, record)
    assert verdict.lost <= record.outcome.counted_lost, f"a loss relayd did not count: {why}"
    assert verdict.lost == 0, why
    assert verdict.duplicates <= record.outcome.resend_window, why
    assert (verdict.reordered, verdict.foreign) == (0, 0), why


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.parametrize("fault", list(Fault), ids=lambda f: f.name.lower())
def test_active_emit_host_failure_loses_nothing(beds: Beds, fault: Fault) -> None:
    """The emit host carrying the feed is killed, frozen or cut off: the capture side goes
    to the other one through the NLB and resends what was not acknowledged. Nothing is lost;
    the duplicates are at most what was resent (the exact-resume window: what the old host
    emitted without acknowledging it), as relayd counted it on the capture or the emit side,
    and every first copy arrives in order."""
    bed = beds(TODAY)
    record = _trial(bed, Host.EMIT_1, fault)
    _assert_nothing_lost_at_most_resent(bed, record)


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.parametrize("fault", [Fault.FREEZE, Fault.CUT], ids=lambda f: f.name.lower())
def test_capture_host_freeze_or_cut_loses_nothing(beds: Beds, fault: Fault) -> None:
    """The only capture host frozen (the kernel queues the multicast meanwhile) or cut off
    from the NLB (its replay buffer holds the stream): nothing lost, no duplicate; a loss
    would have to show in relayd's own counters."""
    bed = beds(TODAY)
    record = _trial(bed, Host.CAPTURE_A, fault)
    _assert_nothing_lost_at_most_resent(bed, record)


@pytest.mark.netns
@pytest.mark.slow
def test_capture_host_killed_loses_its_outage_only(beds: Beds) -> None:
    """The only capture host killed and started again a second later (the unit's
    RestartSec): what the exchange sent while no process was there is lost, in one stretch
    (without a sequenced format relayd cannot count it: the restarted process is a new
    session; with one, the next test); before and after, every datagram arrives once and in
    order."""
    bed = beds(TODAY)
    record = _trial(bed, Host.CAPTURE_A, Fault.KILL)
    verdict, why = record.outcome.verdict, _explain(bed, record)
    assert verdict.lost_runs <= 1, why
    assert verdict.duplicates <= record.outcome.resend_window, why
    assert (verdict.reordered, verdict.foreign) == (0, 0), why


@pytest.mark.netns
@pytest.mark.slow
def test_capture_host_killed_with_deribit_counting_has_its_loss_counted(beds: Beds) -> None:
    """The only capture host killed, on a feed whose emit side arbitrates by Deribit
    sequence: the restarted process is a new session (relayd's own numbers start again), but
    the emit side's arbiter sees each channel's sequence jump across the session change and
    counts it (``relayd_upstream_missing_total{side="emit"}``): the loss is counted by relayd."""
    _needs_arbitration("deribit")
    bed = beds(TrialSettings(arbitration="deribit"))
    record = _trial(bed, Host.CAPTURE_A, Fault.KILL)
    verdict, why = record.outcome.verdict, _explain(bed, record)
    assert verdict.lost_runs <= 1, why
    # a loss at a channel's edge within the trial shows only to an emit host that knew the
    # channel before (the restarted capture host may reach the other one, which knows only
    # what it observed of this trial) and with the channel's next packet
    unseen = bed.channel_edge_loss()
    print(f"lost {verdict.lost}, counted {record.outcome.counted_lost}, at channel edges {unseen}")
    assert verdict.lost <= record.outcome.counted_lost + unseen, f"not counted: {why}"
    assert record.counters.get("upstream_missing.emit", 0.0) >= verdict.lost - unseen, why
    assert verdict.duplicates <= record.outcome.resend_window, why
    assert (verdict.reordered, verdict.foreign) == (0, 0), why


@pytest.mark.netns
@pytest.mark.slow
def test_standby_emit_host_failure_costs_nothing(beds: Beds) -> None:
    """Freezing the emit host that carries nothing changes nothing for the customer."""
    bed = beds(TODAY)
    record = _trial(bed, Host.EMIT_2, Fault.FREEZE)
    verdict, why = record.outcome.verdict, _explain(bed, record)
    assert (verdict.lost, verdict.duplicates, verdict.overlaps) == (0, 0, ()), why


# -- what needs A/B arbitration and one active emitter (skip until relayd has them) ------------


def _needs_arbitration(mode: str) -> None:
    refused = emit_key_refused("arbitration", mode)
    if refused is not None:
        pytest.skip(f'needs arbitration = "{mode}" on emit feeds; relayd check-config: {refused}')


def _needs_active_emitter(bed: TrialBed) -> None:
    bed.ready()
    answer = bed.emits[0].get(f"/healthz/{FEED}")
    assert answer is not None, "the emit host's health server does not answer"
    if "role" not in json.loads(answer[1]).get("feeds", {}).get(FEED, {}):
        pytest.skip(f"needs one active emitter per feed: /healthz/{FEED} reports no role")


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "fault"),
    [("deribit", fault) for fault in Fault] + [("content", Fault.KILL)],
    ids=lambda value: value.name.lower() if isinstance(value, Fault) else value,
)
def test_ab_capture_hosts_deliver_each_datagram_once(beds: Beds, mode: str, fault: Fault) -> None:
    """Two capture hosts stream the same groups and the emit side arbitrates: whichever
    capture host fails, every datagram arrives once. Both sessions must reach one emit host
    (the NLB spreads them; the active emitter refuses sessions on the standby), so this needs
    arbitration and one active emitter."""
    _needs_arbitration(mode)
    bed = beds(TrialSettings(capture_hosts=2, arbitration=mode))
    _needs_active_emitter(bed)
    record = _trial(bed, Host.CAPTURE_A, fault)
    verdict, why = record.outcome.verdict, _explain(bed, record)
    assert (verdict.lost, verdict.duplicates, verdict.reordered) == (0, 0, 0), why


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.parametrize("fault", list(Fault), ids=lambda f: f.name.lower())
def test_emit_failover_delivers_nothing_twice_from_one_source(beds: Beds, fault: Fault) -> None:
    """With deribit arbitration and one active emitter, the new active host skips what the
    old one sent and the old one, back, does not emit its backlog: no duplicate, and no group
    with two sources taking turns."""
    _needs_arbitration("deribit")
    bed = beds(TrialSettings(capture_hosts=2, arbitration="deribit"))
    _needs_active_emitter(bed)
    record = _trial(bed, Host.EMIT_1, fault)
    verdict, why = record.outcome.verdict, _explain(bed, record)
    assert (verdict.lost, verdict.duplicates) == (0, 0), why
    assert verdict.overlaps == (), why
