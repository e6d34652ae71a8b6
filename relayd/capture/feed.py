"""A capture feed: join multicast groups, frame every datagram, stream it to the emit side.

Two halves that never wait for each other: the receive threads (relayd/capture/receive.py)
and the connection loop here, which connects to the targets (every address of every name),
does the CHALLENGE / HELLO / welcome ACK exchange, rewinds the replay buffer to the welcome
ACK and streams (relayd/capture/uplink.py). While streaming, a sender task takes over whenever
the socket is full, a heartbeat task speaks when the stream is idle, and the data plane's ACK
reader (a thread) keeps the highest ACK, which trims the replay buffer, and watches
``idle_timeout``. Any error ends the connection; the loop reconnects with jittered
exponential backoff capped at 2 s.

The receive threads go on while the TCP side is slow, stalled or reconnecting: the replay
buffer absorbs it, bounded in bytes and age, and its drops are counted and logged.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Iterable
from typing import Literal

import attrs
import trio

from relayd.arbitration.headers import DeribitLayout
from relayd.capture.link import Connect, Link
from relayd.capture.receive import Receive
from relayd.capture.uplink import Uplink
from relayd.capture.upstream import UpstreamCheck
from relayd.config import CaptureFeed
from relayd.datapath import log_latency_mode, run_stoppable, select_plane
from relayd.keys import load_auth_keys
from relayd.logs import RateLimitedLogger
from relayd.netif import GroupReceiver, open_group_receivers, resolve_interface
from relayd.replay import Evicted, ReplayBuffer
from relayd.runtime import Feed, FeedHealth, MetricType, Sample

__all__ = ["CaptureFeedRuntime"]

log = logging.getLogger("relayd.capture")

#: Unhealthy ("stalled") once data sent has waited this share of ``ack_timeout`` for an ACK.
STALLED_FRACTION = 0.5


def _age(since: float | None) -> float | None:
    """Seconds since a ``time.monotonic`` stamp (the replay buffer's clock), or None when it
    never happened."""
    return None if since is None else round(max(0.0, time.monotonic() - since), 3)


class CaptureFeedRuntime:
    """One ``[[capture]]`` feed (the ``relayd.runtime.Feed`` protocol, kind "capture")."""

    kind: Literal["emit", "capture"] = "capture"

    def __init__(self, config: CaptureFeed, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.name = config.name
        # A runtime that replaces another (``open(previous)``: a reload or a restart) starts a
        # new session, so the emit side resumes nothing: counted once here, summed over the
        # runtimes with the other counters, with what the old session held unacknowledged.
        self.session_restarts = 0
        self.session_lost_datagrams = 0
        self.unacked_at_end: int | None = None  # set when run() ends
        self._limited = RateLimitedLogger(log)
        self._replay = ReplayBuffer(config.replay_max_bytes, config.replay_max_age)
        self.uplink = Uplink(config.name, self._replay, self._limited)
        self.receive = Receive(config.name, self.uplink, self._limited)
        self.link = Link(config, self.uplink, self._limited, rng or random.Random())
        self.receivers: list[GroupReceiver] = []
        self.upstream: UpstreamCheck | None = None  # upstream_check = "deribit", from open()
        self._interface: object = None
        # health (Trio clock)
        self._started = False
        # The feed this one replaces, until run() takes its counters (it has stopped by then),
        # and those counters: added to this feed's own, so a reload or restart resets none.
        self._previous: CaptureFeedRuntime | None = None
        self._carried: dict[tuple[str, tuple[tuple[str, str], ...]], Sample] = {}

    # -- Feed protocol ---------------------------------------------------------------------

    def set_close_reason(self, code: int, message: str) -> None:
        self.link.close_code = code
        self.link.close_message = message

    def update_keys(self, config: CaptureFeed) -> bool:
        """Take ``config`` without a restart when it differs from the running one in
        ``auth_key_file`` only: read the file again for the next connection (the current
        connection, session and replay buffer are kept). False when a restart is needed.
        Raises KeyFileError and keeps the current key when the file cannot be used."""
        old = self.config
        if attrs.evolve(old, auth_key_file=config.auth_key_file) != config or not (
            old.auth_key_file or config.auth_key_file
        ):
            return False
        path = config.auth_key_file
        self.link.key = None if path is None else load_auth_keys([path])[0]
        self.config = self.link.config = config
        return True

    @property
    def connected(self) -> bool:
        return self.uplink.connected

    @property
    def replay(self) -> ReplayBuffer:
        return self._replay

    @property
    def datagrams_in(self) -> int:
        return self.receive.datagrams_in

    @property
    def kernel_drops(self) -> int:
        return self.receive.kernel_drops

    def health(self) -> FeedHealth:
        self.uplink.apply_acks()
        replay = self._replay
        detail: dict[str, object] = {
            "peer": self.link.peer,
            "acked_seq": replay.acked_seq,
            "last_seq": self.receive.seq,
            "unacked_datagrams": replay.unacked_datagrams,
            "replay_bytes": replay.total_bytes,
            "replay_dropped_datagrams": replay.dropped_datagrams,
            "replay_dropped_by": {e.value: n for e, n in replay.dropped_by.items()},
            "session": self.link.session_id.hex(),
            "session_restarts": self._total("session_restarts", self.session_restarts),
            "session_lost_datagrams": self._total(
                "session_lost_datagrams", self.session_lost_datagrams
            ),
            "kernel_drops": self.receive.kernel_drops,
            "last_datagram_age_seconds": _age(replay.last_appended_at),
            "ack_stalls": self.link.ack_stalls,
        }
        if self.upstream is not None:
            carried = {
                name.removeprefix("upstream_"): int(sample.value)
                for (name, labels), sample in self._carried.items()
                if name.startswith("upstream_") and labels == self.upstream.labels
            }
            upstream = detail["upstream"] = self.upstream.detail(carried)
            detail["upstream_gaps"] = upstream["gaps"]
        datagrams = self.receive.datagrams_in
        if not self._started:
            return FeedHealth(False, "starting", detail, 0, datagrams)
        if self.uplink.connected:
            waited, outstanding = self.uplink.ack_wait()
            if waited >= self.config.ack_timeout * STALLED_FRACTION:
                detail["ack_stalled_for"] = round(waited, 3)
                detail["ack_stalled_datagrams"] = outstanding
                return FeedHealth(False, "stalled", detail, 1, datagrams)
            return FeedHealth(True, "streaming", detail, 1, datagrams)
        down = trio.current_time() - self.link.down_since
        detail["disconnected_for"] = round(down, 3)
        detail["last_error"] = self.link.last_error
        healthy = down <= self.config.reconnect_budget
        state = "reconnecting" if healthy else "disconnected"
        return FeedHealth(healthy, state, detail, 0, datagrams)

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

    def _carry_counters(self) -> None:
        previous, self._previous = self._previous, None
        if previous is not None:
            self._carried = {
                (s.name, s.labels): s for s in previous.samples() if s.type == "counter"
            }

    def _own_samples(self) -> Iterable[Sample]:
        self.uplink.apply_acks()
        feed = (("feed", self.name),)
        replay = self._replay
        uplink = self.uplink
        receive = self.receive

        def one(name: str, kind: MetricType, text: str, value: float) -> Sample:
            return Sample(f"capture_{name}", kind, text, feed, value)

        yield one("datagrams_in", "counter", "Datagrams received.", receive.datagrams_in)
        yield one("bytes_in", "counter", "Payload bytes received.", receive.bytes_in)
        yield one("kernel_drops", "counter", "Datagrams the kernel dropped.", receive.kernel_drops)
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
                (*feed, ("reason", evicted.value)),
                replay.dropped_by[evicted],
            )
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
            "Datagrams a capture session held unacknowledged when it ended for good.",
            self.session_lost_datagrams,
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
            "ack_stalls",
            "counter",
            "Connections left because no ACK came for ack_timeout while data waited.",
            self.link.ack_stalls,
        )
        for result in Connect:
            yield Sample(
                "capture_connects",
                "counter",
                "Connection attempts by result.",
                (*feed, ("result", result.value)),
                self.link.connects[result],
            )
        yield one("connected", "gauge", "1 while streaming.", 1 if self.connected else 0)
        yield one("acked_seq", "gauge", "Highest sequence acknowledged.", replay.acked_seq)
        yield one(
            "unacked_datagrams",
            "gauge",
            "Datagrams not yet acknowledged.",
            replay.unacked_datagrams,
        )
        for code, count in sorted(self.link.errors_from_peer.items()):
            yield Sample(
                "capture_errors_from_peer",
                "counter",
                "ERROR frames received from the emit side, by code.",
                (*feed, ("code", str(code))),
                count,
            )
        if self.upstream is not None:
            yield from self.upstream.samples()

    def open(self, previous: Feed | None = None) -> None:
        """Read the key, find the interface and join the groups (raises when one of them
        fails; nothing stays open then). ``previous``: the capture feed this one replaces,
        whose counters it carries on once it runs."""
        config = self.config
        if config.auth_key_file is not None:
            self.link.key = load_auth_keys([config.auth_key_file])[0]
        interface = resolve_interface(config.interface)
        self.link.plane = plane = select_plane()
        if config.upstream_check == "deribit" and self.upstream is None:
            layout = DeribitLayout(config.deribit_layout)
            self.upstream = UpstreamCheck(self.name, layout, plane, self._limited)
            self.receive.upstream = self.upstream.counter
        groups = [(gp.group, gp.port) for gp in config.groups]
        self.receivers = open_group_receivers(
            groups, interface, config.receive_buffer, sources=config.sources
        )
        self._interface = interface
        if isinstance(previous, CaptureFeedRuntime) and previous.name == self.name:
            self._previous = previous
        capped = [r for r in self.receivers if r.receive_buffer_capped]
        if capped:
            log.warning(
                "feed %s: receive buffer capped at %d bytes (asked %d); raise "
                "net.core.rmem_max or run as root",
                self.name,
                capped[0].receive_buffer_effective,
                config.receive_buffer,
            )

    def close(self) -> None:
        """Release what ``open`` acquired, when ``run`` will not."""
        for receiver in self.receivers:
            receiver.close()
        self.receivers = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self.receivers:
            self.open()
        plane = self.link.plane
        assert plane is not None
        previous = self._previous
        self._carry_counters()  # the feed replaced has stopped by now
        if previous is not None:
            self._new_session_after(previous)
        try:
            async with trio.open_nursery() as nursery:
                for receiver in self.receivers:
                    nursery.start_soon(
                        run_stoppable,
                        functools.partial(
                            self.receive.drain,
                            plane,
                            receiver,
                            self.link.wake_sender,
                            busy_poll=self.config.busy_poll,
                        ),
                    )
                if self.upstream is not None:
                    nursery.start_soon(self.upstream.watch)
                self._started = True
                self.link.down_since = trio.current_time()
                log.info(
                    "feed %s: joined %d groups on %s with %d sockets, data path %s%s",
                    self.name,
                    len(self.config.groups),
                    self._interface,
                    len(self.receivers),
                    plane.name,
                    ""
                    if self.upstream is None
                    else f", upstream check deribit ({self.upstream.layout.value})",
                )
                log_latency_mode(log, self.name, self.config.busy_poll, plane)
                task_status.started()
                await self.link.run()
        finally:
            for receiver in self.receivers:
                receiver.close()
            self.uplink.apply_acks()
            self.unacked_at_end = unacked = self._replay.unacked_datagrams
            if unacked:
                log.warning(
                    "feed %s: session %s ends with %d datagrams unacknowledged (lost unless "
                    "the feed resumes this session)",
                    self.name,
                    self.link.session_id.hex(),
                    unacked,
                    extra={"feed": self.name},
                )

    def _new_session_after(self, previous: CaptureFeedRuntime) -> None:
        """This runtime replaces ``previous`` (stopped) with a session of its own: count the
        restart and what the old session held unacknowledged when it ended."""
        if previous.link.session_id == self.link.session_id:
            return
        self.session_restarts = 1
        self.session_lost_datagrams = previous.unacked_at_end or 0
        log.warning(
            "feed %s: new capture session %s replaces %s: the emit side resumes nothing of the "
            "old one, whose %d unacknowledged datagrams are lost",
            self.name,
            self.link.session_id.hex(),
            previous.link.session_id.hex(),
            self.session_lost_datagrams,
            extra={"feed": self.name},
        )
