"""A capture feed's upstream check (``upstream_check = "deribit"``): the exchange's own gaps,
duplicates and resets per channel, counted before anything is relayed.

The counting runs in the data plane (``UpstreamCounter``: ``rd_upstream_scan`` over every batch
in C, relayd.arbitration's ``UpstreamMonitor`` in Python), shared by the feed's receive
threads. This module shows what it counted: metrics with bounded labels (the feed, never the
channel), the health detail with the channels that lost most, and a rate-limited warning that
names the channel of the latest gap.

Across a restart of relayd (a crash, an upgrade, the unit restarting it) the check resumes
each channel where the previous process left it, so the restarted capture host counts what
the exchange sent while it was down as a gap: under systemd (``StateDirectory=relayd``, the
environment's ``STATE_DIRECTORY``) every channel's position is written to
``upstream-<feed>.json`` there at most every ``STATE_INTERVAL`` and when the feed stops, and
read when it starts (:class:`StatePositions`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import trio

from relayd.arbitration import ChannelPosition
from relayd.arbitration.headers import DeribitLayout
from relayd.datapath import DataPlane, UpstreamChannel, UpstreamCounter, UpstreamTotals
from relayd.logs import RateLimitedLogger
from relayd.runtime import UPSTREAM_GAPS_HELP, UPSTREAM_MISSING_HELP, MetricType, Sample

__all__ = ["STATE_INTERVAL", "TOP_CHANNELS", "StatePositions", "UpstreamCheck", "channel_name"]

log = logging.getLogger("relayd.capture")

#: Channels shown in the health detail (those with the most gaps, then duplicates, resets).
TOP_CHANNELS: Final = 5
#: How often the warning task looks at the counters.
WARN_INTERVAL: Final = 1.0
#: Channel positions are written at most this often (seconds), and when the feed stops.
STATE_INTERVAL: Final = 0.2
#: The state file's format.
_STATE_VERSION: Final = 1


def state_directory() -> Path | None:
    """Where systemd lets the unit keep state (``StateDirectory=``), or None."""
    value = os.environ.get("STATE_DIRECTORY", "")
    first = value.split(":", 1)[0]
    return Path(first) if first else None


class StatePositions:
    """The channel positions of one feed's upstream check in a file, written atomically
    (a temporary file renamed over it). A file that cannot be read or is of another layout is
    logged and ignored: the check then starts afresh, as without a file."""

    def __init__(self, path: Path, feed: str, layout: DeribitLayout) -> None:
        self.path = path
        self.feed = feed
        self.layout = layout

    def load(self) -> list[ChannelPosition]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning(
                "feed %s: upstream state %s unreadable, not resumed: %s", self.feed, self.path, exc
            )
            return []
        try:
            if doc["version"] != _STATE_VERSION or doc["layout"] != self.layout.value:
                log.warning(
                    "feed %s: upstream state %s is for layout %s (version %s), not resumed",
                    self.feed,
                    self.path,
                    doc.get("layout"),
                    doc.get("version"),
                )
                return []
            return [
                ChannelPosition(int(g), int(p), int(c), bool(s), int(n), int(t))
                for g, p, c, s, n, t in doc["channels"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            log.warning(
                "feed %s: upstream state %s malformed, not resumed: %s", self.feed, self.path, exc
            )
            return []

    def save(self, positions: list[ChannelPosition]) -> None:
        doc = {
            "version": _STATE_VERSION,
            "feed": self.feed,
            "layout": self.layout.value,
            "saved_at": time.time(),
            "channels": [list(p) for p in positions],
        }
        scratch = self.path.with_name(f".{self.path.name}.tmp")
        try:
            scratch.write_text(json.dumps(doc, separators=(",", ":")))
            scratch.replace(self.path)
        except OSError as exc:
            log.warning("feed %s: upstream state %s not written: %s", self.feed, self.path, exc)


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
        self,
        name: str,
        layout: DeribitLayout,
        plane: DataPlane,
        limited: RateLimitedLogger,
        state_dir: Path | None = None,
        *,
        resume: bool = True,
    ) -> None:
        """``state_dir``: where to keep the channel positions (None: nowhere); ``resume``:
        start from the positions found there."""
        self.name = name
        self.layout = layout
        self.counter: UpstreamCounter = plane.upstream_counter(layout)
        self._limited = limited
        self.state: StatePositions | None = None
        self.resumed = 0  # channels resumed from the state file
        if state_dir is not None:
            self.state = StatePositions(state_dir / f"upstream-{name}.json", name, layout)
            positions = self.state.load() if resume else []
            self.resumed = self.counter.resume(positions, time.monotonic_ns())
            if positions:
                log.info(
                    "feed %s: upstream check resumes %d channels where the previous process "
                    "left them (%s)",
                    name,
                    self.resumed,
                    self.state.path,
                    extra={"feed": name},
                )
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

    def save_state(self) -> None:
        """Write every channel's position to the state file (if there is one)."""
        if self.state is not None:
            self.state.save(self.counter.positions())

    async def keep_state(self, interval: float = STATE_INTERVAL) -> None:
        """Write the positions when datagrams came since the last write, at most once per
        ``interval``, and once more when cancelled (the feed stops)."""
        if self.state is None:
            return
        seen = -1
        try:
            while True:
                await trio.sleep(interval)
                datagrams = self.counter.totals().datagrams
                if datagrams != seen:
                    seen = datagrams
                    self.save_state()
        finally:
            self.save_state()
