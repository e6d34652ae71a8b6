"""What a capture feed reports: its health and its metric samples.

The runtime (relayd/capture/feed.py) runs the feed; :class:`CaptureReport` reads the parts it
runs (the sites, the receive side, the upstream check) and judges them: each site's health
(streaming, stalled, reconnecting, disconnected), the worst of them for a feed with several
sites, and the samples per feed and per site. It owns what only the report needs: the counters
of the runtime this one replaced (a reload or a restart resets none) and the session restarts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import trio

from relayd.capture.link import Connect
from relayd.capture.receive import Receive
from relayd.capture.sites import Site
from relayd.capture.upstream import UpstreamCheck
from relayd.replay import Evicted
from relayd.runtime import FeedHealth, MetricType, Sample

__all__ = ["STALLED_FRACTION", "CaptureReport"]

#: A feed with several sites reports the worst of their states (the last here).
_SITE_STATES = ("starting", "streaming", "reconnecting", "stalled", "disconnected")

#: Unhealthy ("stalled") once data sent has waited this share of ``ack_timeout`` for an ACK.
STALLED_FRACTION = 0.5


def _age(since: float | None) -> float | None:
    """Seconds since a ``time.monotonic`` stamp (the replay buffer's clock), or None when it
    never happened."""
    return None if since is None else round(max(0.0, time.monotonic() - since), 3)


class CaptureReport:
    """The health and samples of one capture feed, its counters carrying on from the feed it
    replaced."""

    def __init__(self, name: str, sites: Sequence[Site], receive: Receive) -> None:
        self.name = name
        self.sites = sites
        self.receive = receive
        #: ``upstream_check = "deribit"``: the runtime's check, from its ``open``.
        self.upstream: UpstreamCheck | None = None
        self.started = False  # the runtime runs (its sites' clocks are set)
        # A runtime that replaces another (``open(previous)``: a reload or a restart) starts a
        # new session, so the emit side resumes nothing: counted once here, summed over the
        # runtimes with the other counters, with what the old session held unacknowledged.
        self.session_restarts = 0
        self.session_lost_datagrams = 0
        # The counters of the runtime this one replaced, added to this one's own.
        self._carried: dict[tuple[str, tuple[tuple[str, str], ...]], Sample] = {}

    def health(self) -> FeedHealth:
        feed: dict[str, object] = {
            "last_seq": self.receive.seq,
            "session": self.sites[0].link.session_id.hex(),
            "session_restarts": self._total("session_restarts", self.session_restarts),
            "session_lost_datagrams": self._total(
                "session_lost_datagrams", self.session_lost_datagrams
            ),
            "kernel_drops": self.receive.kernel_drops,
            "last_datagram_age_seconds": _age(self.sites[0].replay.last_appended_at),
        }
        if self.upstream is not None:
            carried = {
                name.removeprefix("upstream_"): int(sample.value)
                for (name, labels), sample in self._carried.items()
                if name.startswith("upstream_") and labels == self.upstream.labels
            }
            upstream = feed["upstream"] = self.upstream.detail(carried)
            feed["upstream_gaps"] = upstream["gaps"]
        datagrams = self.receive.datagrams_in
        judged = [self._site_health(site) for site in self.sites]
        connections = sum(1 for site in self.sites if site.uplink.connected)
        if len(judged) == 1:
            healthy, state, detail = judged[0]
            detail.update(feed)
        else:
            healthy = all(h for h, _, _ in judged)
            state = max((s for _, s, _ in judged), key=_SITE_STATES.index)
            sites: dict[str, object] = {}
            for site, (site_healthy, site_state, site_detail) in zip(
                self.sites, judged, strict=True
            ):
                sites[site.name] = {"state": site_state, "healthy": site_healthy, **site_detail}
            detail = {**feed, "sites": sites}
        if not self.started:
            return FeedHealth(False, "starting", detail, 0, datagrams)
        return FeedHealth(healthy, state, detail, connections, datagrams)

    def _site_health(self, site: Site) -> tuple[bool, str, dict[str, object]]:
        """One site's health: whether it is healthy, its state and its facts."""
        uplink, link, replay = site.uplink, site.link, site.replay
        uplink.apply_acks()
        detail: dict[str, object] = {
            "peer": link.peer,
            "acked_seq": replay.acked_seq,
            "unacked_datagrams": replay.unacked_datagrams,
            "replay_bytes": replay.total_bytes,
            "replay_dropped_datagrams": replay.dropped_datagrams,
            "replay_dropped_by": {e.value: n for e, n in replay.dropped_by.items()},
            "resume_lost_datagrams": replay.resume_lost_datagrams,
            "ack_stalls": link.ack_stalls,
        }
        if not self.started:
            return False, "starting", detail
        if uplink.connected:
            waited, outstanding = uplink.ack_wait()
            if waited >= link.config.ack_timeout * STALLED_FRACTION:
                detail["ack_stalled_for"] = round(waited, 3)
                detail["ack_stalled_datagrams"] = outstanding
                return False, "stalled", detail
            return True, "streaming", detail
        down = trio.current_time() - link.down_since
        detail["disconnected_for"] = round(down, 3)
        detail["last_error"] = link.last_error
        healthy = down <= link.config.reconnect_budget
        return healthy, "reconnecting" if healthy else "disconnected", detail

    def samples(self) -> Iterable[Sample]:
        """This feed's samples, its counters carrying on from the feed it replaced."""
        own = list(self._own_samples())
        if not self._carried:
            return own
        out = []
        for sample in own:
            before = self._carried.get((sample.name, sample.labels))
            out.append(
                sample if before is None else sample._replace(value=sample.value + before.value)
            )
        seen = {(sample.name, sample.labels) for sample in own}
        out.extend(sample for key, sample in self._carried.items() if key not in seen)
        return out

    def _total(self, name: str, own: int) -> int:
        """``capture_<name>`` of this runtime plus what the feeds it replaced counted."""
        before = self._carried.get((f"capture_{name}", (("feed", self.name),)))
        return own + (0 if before is None else int(before.value))

    def carry_on_from(self, previous: Iterable[Sample]) -> None:
        """Count on from the samples of the runtime this one replaces (stopped by now)."""
        self._carried = {(s.name, s.labels): s for s in previous if s.type == "counter"}

    def session_replaced(self, lost: int) -> None:
        """This runtime's session replaced the previous runtime's, which ended with ``lost``
        datagrams unacknowledged."""
        self.session_restarts = 1
        self.session_lost_datagrams = lost

    def _own_samples(self) -> Iterable[Sample]:
        feed = (("feed", self.name),)
        receive = self.receive

        def one(name: str, kind: MetricType, text: str, value: float) -> Sample:
            return Sample(f"capture_{name}", kind, text, feed, value)

        yield one("datagrams_in", "counter", "Datagrams received.", receive.datagrams_in)
        yield one("bytes_in", "counter", "Payload bytes received.", receive.bytes_in)
        yield one("kernel_drops", "counter", "Datagrams the kernel dropped.", receive.kernel_drops)
        yield one(
            "session_restarts",
            "counter",
            "Capture sessions that replaced an earlier one of the feed (reload, restart): a "
            "new session resumes nothing on the emit side.",
            self.session_restarts,
        )
        yield one(
            "session_lost_datagrams",
            "counter",
            "Datagrams a capture session held unacknowledged when it ended for good (summed "
            "over its sites).",
            self.session_lost_datagrams,
        )
        for site in self.sites:
            yield from self._site_samples(site, (*feed, *site.labels))
        if self.upstream is not None:
            yield from self.upstream.samples()

    @staticmethod
    def _site_samples(site: Site, labels: tuple[tuple[str, str], ...]) -> Iterable[Sample]:
        """One site's samples (label ``site`` when the feed has named sites)."""
        uplink, link, replay = site.uplink, site.link, site.replay
        uplink.apply_acks()

        def one(name: str, kind: MetricType, text: str, value: float) -> Sample:
            return Sample(f"capture_{name}", kind, text, labels, value)

        yield one("frames_sent", "counter", "DATA frames sent.", uplink.frames_sent)
        yield one("bytes_sent", "counter", "Bytes written to TCP.", uplink.bytes_sent)
        yield one("replay_bytes", "gauge", "Bytes in the replay buffer.", replay.total_bytes)
        yield one("replay_chunks", "gauge", "Chunks in the replay buffer.", len(replay))
        yield one(
            "replay_dropped_datagrams",
            "counter",
            "Unacknowledged datagrams dropped from the replay buffer.",
            replay.dropped_datagrams,
        )
        for evicted in Evicted:
            yield Sample(
                "capture_replay_evicted_datagrams",
                "counter",
                "Unacknowledged datagrams dropped from the replay buffer, by the bound "
                "(replay_max_bytes, replay_max_age) that evicted them.",
                (*labels, ("reason", evicted.value)),
                replay.dropped_by[evicted],
            )
        yield one(
            "replay_dropped_bytes",
            "counter",
            "Unacknowledged bytes dropped from the replay buffer.",
            replay.dropped_bytes,
        )
        yield one(
            "resent_datagrams",
            "counter",
            "Datagrams sent again after a reconnect.",
            uplink.resent_datagrams,
        )
        yield one(
            "resume_lost_datagrams",
            "counter",
            "Datagrams no emit host acknowledged that were gone from the replay buffer when a "
            "connection resumed (its first frame jumps past them): lost. A loss within a "
            "connection is the emit side's gap_sequences; each loss is counted once.",
            replay.resume_lost_datagrams,
        )
        yield one(
            "ack_stalls",
            "counter",
            "Connections left because no ACK came for ack_timeout while data waited.",
            link.ack_stalls,
        )
        for result in Connect:
            yield Sample(
                "capture_connects",
                "counter",
                "Connection attempts by result.",
                (*labels, ("result", result.value)),
                link.connects[result],
            )
        yield one("connected", "gauge", "1 while streaming.", 1 if uplink.connected else 0)
        yield one("acked_seq", "gauge", "Highest sequence acknowledged.", replay.acked_seq)
        yield one(
            "unacked_datagrams",
            "gauge",
            "Datagrams not yet acknowledged.",
            replay.unacked_datagrams,
        )
        for code, count in sorted(link.errors_from_peer.items()):
            yield Sample(
                "capture_errors_from_peer",
                "counter",
                "ERROR frames received from the emit side, by code.",
                (*labels, ("code", str(code))),
                count,
            )
