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

A feed with ``[[capture.site]]`` tables has one uplink and one connection loop per site
(relayd/capture/sites.py), all fed the same numbered batches. A reload that changes a running
feed is applied to it in place where the change allows (``prepare_update``,
relayd/capture/change.py): same session, sequence and replay buffers. Its health and
samples are judged by relayd/capture/report.py.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address
from typing import Literal

import attrs
import trio

from relayd.arbitration.headers import DeribitLayout
from relayd.capture.change import CaptureChange, plan_capture_change
from relayd.capture.receive import Receive
from relayd.capture.receivers import Receivers
from relayd.capture.report import CaptureReport
from relayd.capture.sites import Fanout, Site, site_config
from relayd.capture.upstream import UpstreamCheck, state_directory
from relayd.config import CaptureFeed
from relayd.datapath import log_latency_mode, select_plane
from relayd.keys import load_auth_keys
from relayd.logs import RateLimitedLogger
from relayd.netif import (
    GroupReceiver,
    InterfaceError,
    open_group_receivers,
    resolve_interface,
)
from relayd.replay import ReplayBuffer
from relayd.runtime import Feed, FeedHealth, Sample

__all__ = ["CaptureFeedRuntime", "LiveUpdate"]

log = logging.getLogger("relayd.capture")


class CaptureFeedRuntime:
    """One ``[[capture]]`` feed (the ``relayd.runtime.Feed`` protocol, kind "capture")."""

    kind: Literal["emit", "capture"] = "capture"

    def __init__(self, config: CaptureFeed, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.name = config.name
        self.unacked_at_end: int | None = None  # set when run() ends
        self._limited = RateLimitedLogger(log)
        rng = rng or random.Random()
        first, *more = config.sites
        # One session and one sequence per feed, whichever site (relayd/capture/sites.py).
        self.sites = [Site(config, first, self._limited, rng)]
        session = self.sites[0].link.session_id
        self.sites += [Site(config, site, self._limited, rng, session) for site in more]
        # The first site's parts, as with a single site (``targets``).
        self._replay = self.sites[0].replay
        self.uplink = self.sites[0].uplink
        self.link = self.sites[0].link
        sink = self.uplink if not more else Fanout([site.uplink for site in self.sites])
        self.receive = Receive(config.name, sink, self._limited)
        self.receivers = Receivers(self.receive, config.busy_poll)
        #: Its health and samples (relayd/capture/report.py).
        self.report = CaptureReport(config.name, self.sites, self.receive)
        self.upstream: UpstreamCheck | None = None  # upstream_check = "deribit", from open()
        self._interface: IPv4Address | None = None
        # The feed this one replaces, until run() takes its counters (it has stopped by then):
        # the report adds them to this feed's own, so a reload or restart resets none.
        self._previous: CaptureFeedRuntime | None = None

    # -- Feed protocol ---------------------------------------------------------------------

    def set_close_reason(self, code: int, message: str) -> None:
        for site in self.sites:
            site.link.close_code = code
            site.link.close_message = message

    def wake_senders(self) -> None:
        """Run by Trio on behalf of a receive thread: every site's sender looks."""
        for site in self.sites:
            site.link.wake_sender()

    def update_keys(self, config: CaptureFeed) -> bool:
        """Take ``config`` without a restart when it differs from the running one in its key
        files only: read them again for the next connection (the current connection, session
        and replay buffer are kept). False when a restart is needed. Raises KeyFileError and
        keeps the current keys when a file cannot be used."""
        old = self.config
        if _without_keys(old) != _without_keys(config) or not (
            _key_files(old) or _key_files(config)
        ):
            return False
        keys = _load_keys(config)
        for site, key, named in zip(self.sites, keys, config.sites, strict=True):
            site.link.key = key
            site.link.config = site_config(config, named)
        self.config = config
        return True

    @property
    def connected(self) -> bool:
        """Streaming to at least one site."""
        return any(site.uplink.connected for site in self.sites)

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
        return self.report.health()

    def samples(self) -> Iterable[Sample]:
        """This feed's samples, its counters carrying on from the feed it replaced."""
        return self.report.samples()

    def open(self, previous: Feed | None = None) -> None:
        """Read the key, find the interface and join the groups (raises when one of them
        fails; nothing stays open then). ``previous``: the capture feed this one replaces,
        whose counters it carries on once it runs."""
        config = self.config
        for site, key in zip(self.sites, _load_keys(config), strict=True):
            site.link.key = key
        interface = resolve_interface(config.interface)
        plane = select_plane()
        for site in self.sites:
            site.link.plane = plane
        if config.upstream_check == "deribit" and self.upstream is None:
            layout = DeribitLayout(config.deribit_layout)
            # Positions are resumed at a start only: a feed a reload replaces is still running
            # and counting past what its file says.
            self.upstream = UpstreamCheck(
                self.name,
                layout,
                plane,
                self._limited,
                state_directory(),
                resume=previous is None,
            )
            self.receive.upstream = self.upstream.counter
            self.report.upstream = self.upstream
        groups = [(gp.group, gp.port) for gp in config.groups]
        self.receivers.adopt(
            open_group_receivers(groups, interface, config.receive_buffer, sources=config.sources)
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

    def prepare_update(self, config: CaptureFeed) -> LiveUpdate | None:
        """Acquire what ``config`` needs to run in place of the running configuration without
        a new session (relayd/capture/change.py): the key read, the added groups' sockets
        opened and joined. None when it cannot be applied live (not running, or the change
        needs a restart). Raises, holding nothing, when something cannot be acquired."""
        interface = self._interface
        if not self.receivers.running or interface is None:
            return None
        change = plan_capture_change(self.config, config)
        if change.restart is not None:
            log.info(
                "feed %s: the change of %s restarts the feed (a new session)",
                self.name,
                change.restart.value,
                extra={"feed": self.name},
            )
            return None
        keys = _load_keys(config)
        opened = (
            open_group_receivers(
                change.added, interface, config.receive_buffer, sources=config.sources
            )
            if change.added
            else []
        )
        return LiveUpdate(self, config, change, keys, opened)

    def _apply_live(self, update: LiveUpdate) -> None:
        config, change = update.config, update.change
        self.receivers.adopt(update.opened)  # the new groups are read before any is left
        if change.removed:
            try:
                self.receivers.leave(change.removed, config.sources)
            except InterfaceError as exc:
                log.warning("feed %s: %s (still joined)", self.name, exc)
        if change.receive_buffer_changed:
            capped = self.receivers.set_buffer(config.receive_buffer)
            if capped:
                log.warning(
                    "feed %s: receive buffer capped at %d bytes (asked %d)",
                    self.name,
                    capped[0].receive_buffer_effective,
                    config.receive_buffer,
                )
        self.config = config
        for site, named, key in zip(self.sites, config.sites, update.keys, strict=True):
            site_conf = site_config(config, named)
            site.uplink.set_replay_bounds(site_conf.replay_max_bytes, site_conf.replay_max_age)
            site.link.key = key
            site.link.retarget(site_conf)
        log.info(
            "feed %s: new configuration applied to session %s (%d groups joined, %d left, "
            "%d sockets)",
            self.name,
            self.link.session_id.hex(),
            len(change.added),
            len(change.removed),
            len(self.receivers),
            extra={"feed": self.name},
        )

    def close(self) -> None:
        """Release what ``open`` acquired, when ``run`` will not."""
        self.receivers.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self.receivers:
            self.open()
        plane = self.link.plane
        assert plane is not None
        previous, self._previous = self._previous, None
        if previous is not None:
            self.report.carry_on_from(previous.samples())  # it has stopped by now
            self._new_session_after(previous)
        try:
            async with trio.open_nursery() as nursery:
                wake = self.link.wake_sender if len(self.sites) == 1 else self.wake_senders
                self.receivers.start(nursery, plane, wake)
                if self.upstream is not None:
                    nursery.start_soon(self.upstream.watch)
                    nursery.start_soon(self.upstream.keep_state)
                self.report.started = True
                for site in self.sites:
                    site.link.down_since = trio.current_time()
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
                for site in self.sites[1:]:
                    nursery.start_soon(site.link.run)
                await self.link.run()
        finally:
            self.receivers.close()
            for site in self.sites:
                site.uplink.apply_acks()
            self.unacked_at_end = unacked = sum(s.replay.unacked_datagrams for s in self.sites)
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
        lost = previous.unacked_at_end or 0
        self.report.session_replaced(lost)
        log.warning(
            "feed %s: new capture session %s replaces %s: the emit side resumes nothing of the "
            "old one, whose %d unacknowledged datagrams are lost",
            self.name,
            self.link.session_id.hex(),
            previous.link.session_id.hex(),
            lost,
            extra={"feed": self.name},
        )


class LiveUpdate:
    """A new configuration prepared for a running capture feed (``prepare_update``): ``apply``
    puts it in place (same session, sequence and replay buffer), ``discard`` releases what
    was acquired for it."""

    def __init__(
        self,
        runtime: CaptureFeedRuntime,
        config: CaptureFeed,
        change: CaptureChange,
        keys: Sequence[bytes | None],
        opened: Sequence[GroupReceiver],
    ) -> None:
        self.runtime = runtime
        self.config = config
        self.change = change
        self.keys = tuple(keys)  # one per site
        self.opened = list(opened)

    def apply(self) -> None:
        self.runtime._apply_live(self)
        self.opened = []

    def discard(self) -> None:
        for receiver in self.opened:
            receiver.close()
        self.opened = []


def _load_keys(config: CaptureFeed) -> list[bytes | None]:
    """The key of each site (its own, else the feed's; None: no authentication)."""
    return [
        None if site.auth_key_file is None else load_auth_keys([site.auth_key_file])[0]
        for site in config.sites
    ]


def _key_files(config: CaptureFeed) -> list[object]:
    return [config.auth_key_file, *(site.auth_key_file for site in config.site)]


def _without_keys(config: CaptureFeed) -> CaptureFeed:
    """``config`` with every key file taken out (what must be equal for a key-only change)."""
    sites = tuple(attrs.evolve(site, auth_key_file=None) for site in config.site)
    return attrs.evolve(config, auth_key_file=None, site=sites)
