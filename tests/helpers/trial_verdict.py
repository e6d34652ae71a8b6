"""What a customer saw in one failure trial, judged against what the exchange sent (no I/O).

``judge`` takes the datagrams the exchange sent (in order, with their capture times) and every
datagram the customer's receiver got (arrival time, group, port, source address, bytes) and
returns a ``Verdict``: lost, duplicated, reordered per (group, port), bytes nobody sent, which
source sent how much, the windows in which two sources emitted the same group (overlap), and
how late the first copies arrived (the outage a customer sees, and when it ended).

``summarise`` folds the trials of each (host, fault) into one table row (medians and maxima);
``render_table`` prints the rows as the Markdown table docs/EXACTLY_ONCE.md carries.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import attrs

#: A first copy later than this behind its due time counts as delayed by the fault.
LATE_NS = 200_000_000


class Sent(NamedTuple):
    """One datagram the exchange sent; ``offset_ns`` is its due time after the replay start."""

    group: str
    port: int
    payload: bytes
    offset_ns: int


class Arrival(NamedTuple):
    """One datagram the customer received."""

    t_ns: int
    group: str
    port: int
    source: str
    payload: bytes


@attrs.frozen
class Overlap:
    """A window in which two sources emitted one (group, port) in turn."""

    group: str
    port: int
    start_ns: int
    end_ns: int
    sources: tuple[str, ...]

    @property
    def ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


@attrs.frozen
class Verdict:
    sent: int
    received: int  # distinct datagrams of the replay that arrived
    lost: int
    lost_span_ms: float  # from the first lost datagram's due time to the last one's
    lost_runs: int  # stretches of consecutive datagrams (in send order) that were lost
    duplicates: int  # copies beyond the first
    reordered: int  # first copies behind a later datagram of their (group, port)
    foreign: int  # datagrams whose bytes the exchange never sent on that group and port
    by_source: dict[str, int]  # every arrival, per source address
    duplicates_by_source: dict[str, int]
    overlaps: tuple[Overlap, ...]
    max_delay_ms: float  # the latest first copy behind its due time
    recovered_ms: float  # fault to the last first copy more than LATE_NS late (0: none late)

    @property
    def overlap_ms(self) -> float:
        """The longest overlap window of any group (0 when no group had two sources in turn)."""
        return max((o.ms for o in self.overlaps), default=0.0)

    @property
    def two_source_groups(self) -> int:
        return len({(o.group, o.port) for o in self.overlaps})


def judge(
    sent: Sequence[Sent],
    arrivals: Iterable[Arrival],
    *,
    replay_start_ns: int,
    fault_ns: int,
    speed: float,
) -> Verdict:
    """The verdict of one trial; ``speed`` is the replay's pace factor (offsets are divided
    by it). Raises ValueError when the replay repeats a datagram: duplicates would be
    unmeasurable by bytes."""
    index: dict[tuple[str, int, bytes], int] = {}
    for i, datagram in enumerate(sent):
        key = (datagram.group, datagram.port, datagram.payload)
        if key in index:
            raise ValueError(f"the replay repeats datagram {i}: duplicates are unmeasurable")
        index[key] = i
    ordered = sorted(arrivals, key=lambda a: a.t_ns)
    seen: set[int] = set()
    highest: dict[tuple[str, int], int] = {}
    by_source: dict[str, int] = {}
    duplicates_by_source: dict[str, int] = {}
    duplicates = reordered = foreign = 0
    max_delay = 0
    last_late = 0
    per_channel: dict[tuple[str, int], list[Arrival]] = {}
    for arrival in ordered:
        by_source[arrival.source] = by_source.get(arrival.source, 0) + 1
        channel = (arrival.group, arrival.port)
        per_channel.setdefault(channel, []).append(arrival)
        found = index.get((arrival.group, arrival.port, arrival.payload))
        if found is None:
            foreign += 1
            continue
        i = found
        if i in seen:
            duplicates += 1
            duplicates_by_source[arrival.source] = duplicates_by_source.get(arrival.source, 0) + 1
            continue
        seen.add(i)
        if i < highest.get(channel, -1):
            reordered += 1
        highest[channel] = max(highest.get(channel, -1), i)
        delay = arrival.t_ns - (replay_start_ns + int(sent[i].offset_ns / speed))
        max_delay = max(max_delay, delay)
        if delay > LATE_NS:
            last_late = max(last_late, arrival.t_ns)
    overlaps = tuple(
        window
        for channel, items in sorted(per_channel.items())
        if (window := _overlap(channel, items)) is not None
    )
    lost = [i for i in range(len(sent)) if i not in seen]
    lost_offsets = [sent[i].offset_ns for i in lost]
    lost_span = (max(lost_offsets) - min(lost_offsets)) / speed if lost_offsets else 0.0
    return Verdict(
        sent=len(sent),
        received=len(seen),
        lost=len(sent) - len(seen),
        lost_span_ms=lost_span / 1e6,
        lost_runs=sum(1 for n, i in enumerate(lost) if n == 0 or lost[n - 1] != i - 1),
        duplicates=duplicates,
        reordered=reordered,
        foreign=foreign,
        by_source=by_source,
        duplicates_by_source=duplicates_by_source,
        overlaps=overlaps,
        max_delay_ms=max_delay / 1e6,
        recovered_ms=max(0, last_late - fault_ns) / 1e6 if last_late else 0.0,
    )


def _overlap(channel: tuple[str, int], arrivals: Sequence[Arrival]) -> Overlap | None:
    """The window in which sources took turns on one channel (arrivals in time order).

    The arrivals form runs of one source. One run is one source; two runs are a clean
    handover (the old source stopped before the new one started). From three runs on, the
    sources alternated: the window runs from the start of the second run to the end of the
    last but one (e.g. old, new, old's late backlog, new)."""
    runs: list[tuple[str, int, int]] = []  # source, first, last arrival time
    for arrival in arrivals:
        if runs and runs[-1][0] == arrival.source:
            runs[-1] = (arrival.source, runs[-1][1], arrival.t_ns)
        else:
            runs.append((arrival.source, arrival.t_ns, arrival.t_ns))
    if len(runs) < 3:
        return None
    return Overlap(
        group=channel[0],
        port=channel[1],
        start_ns=runs[1][1],
        end_ns=runs[-2][2],
        sources=tuple(sorted({source for source, _, _ in runs})),
    )


# -- many trials -------------------------------------------------------------------------------


@attrs.frozen
class Outcome:
    """One trial as the table needs it: the customer's verdict beside relayd's own counts."""

    host: str
    fault: str
    verdict: Verdict
    #: datagrams relayd counted as lost in the trial (drops, gaps, send errors, replay
    #: evictions, sessions lost), summed over every process
    counted_lost: float
    #: datagrams relayd counted as sent again (the capture side's resends)
    resent: float
    #: copies the emit hosts received beyond one per datagram sent (their datagrams_in, summed,
    #: minus the replay): the resends as the emit side counts them
    resent_received: float = 0.0

    @property
    def resend_window(self) -> float:
        """What relayd counted as sent twice, on whichever side counted more: the capture
        side's resent counter fell a few short in some freezes, and a killed emit host's
        last counts die with it."""
        return max(self.resent, self.resent_received)


@attrs.frozen
class Row:
    host: str
    fault: str
    trials: int
    lost: tuple[float, float]  # median, max
    lost_span_ms: tuple[float, float]
    duplicates: tuple[float, float]
    overlap_ms: tuple[float, float]
    max_delay_ms: tuple[float, float]
    recovered_ms: tuple[float, float]
    counted_lost: tuple[float, float]  # what relayd counted as lost, median and max
    trials_with_loss: int
    trials_with_duplicates: int
    loss_counted: int  # trials whose customer loss relayd counted in full
    reordered: int  # total over the trials
    foreign: int


def _median_max(values: Sequence[float]) -> tuple[float, float]:
    return (statistics.median(values), max(values)) if values else (0.0, 0.0)


def summarise(outcomes: Iterable[Outcome]) -> list[Row]:
    """One row per (host, fault), in first-seen order."""
    grouped: dict[tuple[str, str], list[Outcome]] = {}
    for outcome in outcomes:
        grouped.setdefault((outcome.host, outcome.fault), []).append(outcome)
    rows = []
    for (host, fault), items in grouped.items():
        verdicts = [o.verdict for o in items]
        rows.append(
            Row(
                host=host,
                fault=fault,
                trials=len(items),
                lost=_median_max([v.lost for v in verdicts]),
                lost_span_ms=_median_max([v.lost_span_ms for v in verdicts]),
                duplicates=_median_max([v.duplicates for v in verdicts]),
                overlap_ms=_median_max([v.overlap_ms for v in verdicts]),
                max_delay_ms=_median_max([v.max_delay_ms for v in verdicts]),
                recovered_ms=_median_max([v.recovered_ms for v in verdicts]),
                counted_lost=_median_max([o.counted_lost for o in items]),
                trials_with_loss=sum(1 for v in verdicts if v.lost),
                trials_with_duplicates=sum(1 for v in verdicts if v.duplicates),
                loss_counted=sum(1 for o in items if o.verdict.lost <= o.counted_lost),
                reordered=sum(v.reordered for v in verdicts),
                foreign=sum(v.foreign for v in verdicts),
            )
        )
    return rows


def _pair(values: tuple[float, float], digits: int = 0) -> str:
    median, most = values
    return f"{median:,.{digits}f} / {most:,.{digits}f}"


def render_table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table (median / max per trial)."""
    lines = [
        "| host | fault | trials | lost (median / max) | lost stream ms (median / max)"
        " | trials with loss"
        " | loss counted by relayd | relayd counted lost (median / max)"
        " | duplicates (median / max) | trials with duplicates | overlap ms (median / max)"
        " | longest delay ms (median / max) | late until ms after the fault (median / max)"
        " | reordered, foreign |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.host} | {row.fault} | {row.trials} | {_pair(row.lost)} |"
            f" {_pair(row.lost_span_ms)} |"
            f" {row.trials_with_loss} | {row.loss_counted} of {row.trials} |"
            f" {_pair(row.counted_lost)} |"
            f" {_pair(row.duplicates)} | {row.trials_with_duplicates} |"
            f" {_pair(row.overlap_ms)} | {_pair(row.max_delay_ms)} |"
            f" {_pair(row.recovered_ms)} | {row.reordered}, {row.foreign} |"
        )
    return "\n".join(lines) + "\n"
