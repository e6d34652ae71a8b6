"""An emit feed's A/B arbitration: one arbiter shared by every capture session it streams.

Several capture hosts may stream one feed at once (A/B capture hosts). With ``arbitration =
"deribit"`` or ``"content"`` the feed makes one arbiter (relayd/arbitration/ is the
specification; each data plane makes its own, ``DataPlane.arbiter``) and every pump hands it each
allowed datagram before the send (relayd/_fastpath.c ``arb_emit``, relayd/pyplane/emit.py
``_arbitrated``), so each upstream datagram goes out once, in order per channel. This class
keeps what lives in Trio: the source number of each capture host (the share each one won is
counted per source, labelled by host, at most ``ARBITER_SOURCES - 1`` hosts by name and the
rest as "other"), the number of sessions streaming (the arbiter holds datagrams behind a hole
only while another copy can fill it), the metrics and the health detail.

With ``arbitration = "none"`` nothing changes per datagram; a second capture session that
streams while another one does is logged (rate-limited) and counted, since every datagram of
both then goes out.

``observe(group, port, payload)`` (any thread) tells the arbiter what another relay emitted on
the feed's groups, so that this one does not send it again (the active emitter's observer).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from typing import Any, Final

from relayd.arbitration import ArbitrationConfig, ArbitrationMode, DeribitLayout
from relayd.config import EmitFeed
from relayd.datapath import ARBITER_SOURCES, DataPlane, FeedArbiter
from relayd.logs import RateLimitedLogger
from relayd.runtime import UPSTREAM_GAPS_HELP, UPSTREAM_MISSING_HELP, Sample

__all__ = ["OTHER_SOURCES", "FeedArbitration", "arbitration_config"]

log = logging.getLogger("relayd.emit")

#: The label of the source number every host past the first ``ARBITER_SOURCES - 1`` shares.
OTHER_SOURCES: Final = "other"

#: (counter, metric name, help) of the arbiter's counters exported as ``relayd_arbitration_*``.
_COUNTERS: Final = (
    (
        "duplicates",
        "duplicates",
        "Datagrams not sent: another copy or the observed relay sent "
        "them already (A/B arbitration).",
    ),
    ("held", "held", "Datagrams held behind a hole for another copy to fill it."),
    ("gaps", "gaps", "Holes no copy filled before the hold timeout: gaps customers see."),
    ("missing", "missing", "Sequence numbers lost in those holes."),
    ("overlaps", "overlaps", "Datagrams sent whose sequence range was partly sent already."),
    ("resets", "resets", "Channels the exchange restarted (sequence far behind)."),
    ("channel_evictions", "channel_evictions", "Channels forgotten for the channel table bound."),
    ("hold_overflows", "hold_overflows", "Holes closed early for the held datagrams bound."),
    ("content_evictions", "content_evictions", "Content hashes forgotten for the window bound."),
    (
        "malformed",
        "malformed",
        "Datagrams whose Deribit header did not parse (sent once, by content).",
    ),
    ("observed", "observed", "Datagrams another relay was seen to emit (observe)."),
)


def arbitration_config(feed: EmitFeed) -> ArbitrationConfig:
    """The arbiter settings of ``feed``."""
    return ArbitrationConfig(
        mode=ArbitrationMode(feed.arbitration),
        layout=DeribitLayout(feed.deribit_layout),
        hold_timeout=feed.arbitration_hold_timeout,
        content_window=feed.arbitration_content_window,
    )


class FeedArbitration:
    """One emit feed's arbitration state (Trio owns it; ``arbiter`` is thread-safe)."""

    def __init__(self, name: str, config: EmitFeed, plane: DataPlane) -> None:
        self.name = name
        self.settings = arbitration_config(config)
        self.plane_name = plane.name
        self.arbiter: FeedArbiter | None = None
        if self.settings.mode is not ArbitrationMode.NONE:
            self.arbiter = plane.arbiter(self.settings)
        self._sources: dict[str, int] = {}  # capture host -> source number
        self.streaming = 0  # sessions streaming now
        self.concurrent_sessions = 0  # starts while another session streamed
        self.flushed = 0  # held datagrams sent when the last session ended
        self.flush_failed = 0
        self._users = 0  # feeds using it (a restarted feed takes it over from the old one)
        self._rlog = RateLimitedLogger(log, interval=60.0, max_keys=4)

    def carries_over(self, config: EmitFeed, plane: DataPlane) -> bool:
        """True when a feed restarted with ``config`` can take this state (and its arbiter,
        with what it knows of every channel) over: same settings, same data plane."""
        return arbitration_config(config) == self.settings and plane.name == self.plane_name

    def source_of(self, peer: str) -> int:
        """The source number of a capture connection from ``peer`` (``host:port``)."""
        host = peer.rsplit(":", 1)[0]
        source = self._sources.get(host)
        if source is None:
            if len(self._sources) < ARBITER_SOURCES - 1:
                source = self._sources[host] = len(self._sources)
            else:
                source = ARBITER_SOURCES - 1
        return source

    def session_started(self, peer: str, others: int) -> None:
        """A session's pump starts while ``others`` other sessions stream."""
        self.streaming = others + 1
        if self.arbiter is not None:
            self.arbiter.set_live_sources(self.streaming)
        elif others:
            self.concurrent_sessions += 1
            self._rlog.warning(
                "concurrent",
                "%s: capture session from %s streams while %d other session(s) do: with "
                'arbitration = "none" every datagram goes out once per session (set '
                "arbitration for A/B capture hosts); %d such starts so far",
                self.name,
                peer,
                others,
                self.concurrent_sessions,
            )

    def session_ended(self, remaining: int, mcast: socket.socket) -> int:
        """A session's pump ended, ``remaining`` others stream. When none does, no copy can
        fill a hole any more: what is held goes out now on ``mcast`` (no pump would send it).
        Returns how many datagrams that sent."""
        self.streaming = remaining
        if self.arbiter is None:
            return 0
        self.arbiter.set_live_sources(remaining)
        if remaining:
            return 0
        sent, failed = self.arbiter.flush(mcast)
        self.flushed += sent
        self.flush_failed += failed
        return sent

    def observe(self, group: int, port: int, payload: bytes) -> None:
        """Any thread: a datagram another relay emitted on this feed's groups (host-order
        group): this feed does not send it, nor anything before it on its channel, again."""
        if self.arbiter is not None:
            self.arbiter.observe(group, port, payload, time.monotonic())

    def acquire(self) -> FeedArbitration:
        """One more feed uses it (``release`` when it stopped)."""
        self._users += 1
        return self

    def release(self) -> None:
        """A feed that used it stopped; the last one frees the arbiter (no pump runs then)."""
        self._users -= 1
        if self._users <= 0 and self.arbiter is not None:
            self.arbiter.close()

    # -- what it shows -----------------------------------------------------------------------

    def _sent_by_host(self) -> dict[str, int]:
        assert self.arbiter is not None
        sent = self.arbiter.sent_by_source()
        by_host = {host: sent[source] for host, source in self._sources.items()}
        if sent[-1] and len(self._sources) >= ARBITER_SOURCES - 1:
            by_host[OTHER_SOURCES] = sent[-1]
        return by_host

    def detail(self) -> dict[str, Any]:
        """The ``arbitration`` entry of ``/healthz/<feed>``."""
        out: dict[str, Any] = {
            "mode": self.settings.mode.value,
            "streaming_sessions": self.streaming,
            "concurrent_sessions": self.concurrent_sessions,
        }
        if self.arbiter is None:
            return out
        if self.settings.mode is ArbitrationMode.DERIBIT:
            out["deribit_layout"] = self.settings.layout.value
        counts = self.arbiter.counts()
        for key in (
            "duplicates",
            "held",
            "gaps",
            "missing",
            "overlaps",
            "resets",
            "channel_evictions",
            "hold_overflows",
            "malformed",
            "observed",
            "held_now",
            "channels",
        ):
            out[key] = counts[key]
        out["sent_by_source"] = self._sent_by_host()
        return out

    def samples(self) -> Iterator[Sample]:
        feed = (("feed", self.name),)
        yield Sample(
            "concurrent_sessions",
            "counter",
            "Capture sessions that started streaming while another session of the feed "
            'streamed; with arbitration = "none" each sends every datagram again.',
            feed,
            self.concurrent_sessions,
        )
        if self.arbiter is None:
            return
        counts = self.arbiter.counts()
        for key, name, help_text in _COUNTERS:
            yield Sample(f"arbitration_{name}", "counter", help_text, feed, counts[key])
        if self.settings.mode is ArbitrationMode.DERIBIT:  # the exchange's gaps customers see
            emit_side = (*feed, ("side", "emit"))
            yield Sample("upstream_gaps", "counter", UPSTREAM_GAPS_HELP, emit_side, counts["gaps"])
            yield Sample(
                "upstream_missing", "counter", UPSTREAM_MISSING_HELP, emit_side, counts["missing"]
            )
        for host, value in self._sent_by_host().items():
            yield Sample(
                "arbitration_sent",
                "counter",
                "Datagrams sent after arbitration, by the capture host whose copy came first.",
                (*feed, ("source", host)),
                value,
            )
        yield Sample(
            "arbitration_flushed",
            "counter",
            "Held datagrams sent when the last capture session ended (no copy left to fill "
            "their holes).",
            feed,
            self.flushed,
        )
        yield Sample(
            "arbitration_held_now",
            "gauge",
            "Datagrams held behind holes now.",
            feed,
            counts["held_now"],
        )
        yield Sample(
            "arbitration_channels",
            "gauge",
            "Channels the arbiter tracks.",
            feed,
            counts["channels"],
        )
