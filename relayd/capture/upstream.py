"""A capture feed's upstream check (``upstream_check = "deribit"``): the exchange's own gaps,
duplicates and resets per channel, counted before anything is relayed.

The counting runs in the data plane (``UpstreamCounter``: ``rd_upstream_scan`` over every batch
in C, relayd.arbitration's ``UpstreamMonitor`` in Python), shared by the feed's receive
threads. This module shows what it counted: metrics with bounded labels (the feed, never the
channel), the health detail with the channels that lost most, and a rate-limited warning that
names the channel of the latest gap.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Final

import trio

from relayd.arbitration.headers import DeribitLayout
from relayd.datapath import DataPlane, UpstreamChannel, UpstreamCounter, UpstreamTotals
from relayd.logs import RateLimitedLogger
from relayd.runtime import UPSTREAM_GAPS_HELP, UPSTREAM_MISSING_HELP, MetricType, Sample

__all__ = ["TOP_CHANNELS", "UpstreamCheck", "channel_name"]

#: Channels shown in the health detail (those with the most gaps, then duplicates, resets).
TOP_CHANNELS: Final = 5
#: How often the warning task looks at the counters.
WARN_INTERVAL: Final = 1.0

_COUNTERS: Final[tuple[tuple[str, str], ...]] = (
    ("datagrams", "Datagrams the upstream check read (upstream_check = deribit)."),
    ("gaps", UPSTREAM_GAPS_HELP),
    ("missing", UPSTREAM_MISSING_HELP),
    ("snapshot_gaps", "Gaps on snapshot channels (also counted in upstream_gaps)."),
    ("duplicates", "Datagrams at or below their channel's sequence: duplicates or late."),
    ("resets", "Channels the exchange restarted (a sequence far below the channel's)."),
    ("overlaps", "Datagrams whose sequence range started below the channel's and ended past it."),
    ("malformed", "Datagrams too short or inconsistent for the configured deribit_layout."),
    ("unsequenced", "SBE snapshot, retransmit or reject packets (no sequence of their own)."),
    ("evictions", "Channels evicted from the bounded channel table (least recently used)."),
)


def channel_name(group: int, port: int, channel: int) -> str:
    """``239.1.1.1:6100#7``: a channel as logs and health name it."""
    return f"{socket.inet_ntoa(group.to_bytes(4, 'big'))}:{port}#{channel}"


def _row(channel: UpstreamChannel) -> dict[str, object]:
    return {
        "channel": channel_name(channel.group, channel.port, channel.channel),
        "snapshot": channel.snapshot,
        "datagrams": channel.datagrams,
        "gaps": channel.gaps,
        "missing": channel.missing,
        "duplicates": channel.duplicates,
        "resets": channel.resets,
        "overlaps": channel.overlaps,
    }


class UpstreamCheck:
    """The upstream check of one capture feed: its data-plane counter and what shows it."""

    def __init__(
        self, name: str, layout: DeribitLayout, plane: DataPlane, limited: RateLimitedLogger
    ) -> None:
        self.name = name
        self.layout = layout
        self.counter: UpstreamCounter = plane.upstream_counter(layout)
        self._limited = limited
        self._gaps_warned = 0
        self._malformed_warned = 0
        self.labels: tuple[tuple[str, str], ...] = (("feed", name), ("side", "capture"))

    def totals(self) -> UpstreamTotals:
        return self.counter.totals()

    def top_channels(self, limit: int = TOP_CHANNELS) -> list[UpstreamChannel]:
        """The channels with the most gaps (then duplicates, resets), none without any."""
        worst = [c for c in self.counter.channels(lossy=True) if c.gaps or c.duplicates or c.resets]
        worst.sort(key=lambda c: (c.gaps, c.missing, c.duplicates, c.resets), reverse=True)
        return worst[:limit]

    def samples(self) -> Iterator[Sample]:
        """``relayd_upstream_*`` of the feed: labels ``feed`` and ``side`` (``capture``: counted
        before relaying) only, whatever the number of channels."""
        totals = self.totals()
        labels = self.labels

        def one(name: str, kind: MetricType, text: str, value: int) -> Sample:
            return Sample(f"upstream_{name}", kind, text, labels, value)

        for field, text in _COUNTERS:
            yield one(field, "counter", text, getattr(totals, field))
        yield one("channels", "gauge", "Channels the upstream check tracks now.", totals.channels)

    def detail(self, carried: dict[str, int]) -> dict[str, object]:
        """The health detail: totals (plus ``carried``, what the runtimes this one replaced
        counted, by field), the latest gap, the channels that lost most."""
        totals = self.totals()
        out: dict[str, object] = {"layout": self.layout.value}
        for field, _ in _COUNTERS:
            out[field] = getattr(totals, field) + carried.get(field, 0)
        out["channels"] = totals.channels
        if totals.last_gap is not None:
            group, port, channel, missing = totals.last_gap
            out["last_gap"] = {"channel": channel_name(group, port, channel), "missing": missing}
        out["top_channels"] = [_row(c) for c in self.top_channels()]
        return out

    def warn_on_new_gaps(self) -> None:
        """A rate-limited warning when gaps were counted since the previous look, and one when
        datagrams did not parse (a wrong ``deribit_layout``, or not a Deribit feed)."""
        totals = self.totals()
        if totals.malformed != self._malformed_warned:
            self._malformed_warned = totals.malformed
            self._limited.warning(
                f"{self.name}:upstream-malformed",
                "feed %s: %d of %d datagrams are not Deribit %s packets (too short, or a length "
                "that does not match): is deribit_layout right? They are relayed, not checked",
                self.name,
                totals.malformed,
                totals.datagrams,
                self.layout.value,
                extra={"feed": self.name},
            )
        if totals.gaps == self._gaps_warned or totals.last_gap is None:
            return
        new, self._gaps_warned = totals.gaps - self._gaps_warned, totals.gaps
        group, port, channel, missing = totals.last_gap
        self._limited.warning(
            f"{self.name}:upstream-gap",
            "feed %s: upstream gap on channel %s: %d sequence numbers missing at the exchange "
            "(%d new gaps, %d gaps and %d missing so far)",
            self.name,
            channel_name(group, port, channel),
            missing,
            new,
            totals.gaps,
            totals.missing,
            extra={"feed": self.name},
        )

    async def watch(self, interval: float = WARN_INTERVAL) -> None:
        """Warn about new gaps, once per ``interval``, until cancelled."""
        while True:
            await trio.sleep(interval)
            self.warn_on_new_gaps()
