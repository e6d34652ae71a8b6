"""What a reload changes in one running capture feed, and whether it can be applied live
(sans-I/O: two configurations in, a plan out).

A feed applied live keeps its session, its sequence numbering and its replay buffer: the emit
side resumes it exactly, so nothing is lost or sent twice. Groups added get sockets of their
own (opened and joined before anything else changes), groups removed are left (a socket with
no group left is closed), targets and timers apply from the next connection (a connection to
a target no longer listed is left, with exact resume), replay bounds and the receive buffer
apply at once. What changes the capture itself (the interface, the source filter, the upstream
check) or the set of sites restarts the feed as a new session, counted as before; a site's own
targets, bounds and key apply live like the feed's.
"""

from __future__ import annotations

import enum
from ipaddress import IPv4Address

import attrs

from relayd.config import CaptureFeed

__all__ = ["CaptureChange", "Restart", "plan_capture_change"]

GroupKey = tuple[IPv4Address, int]


class Restart(enum.Enum):
    """Why a change cannot be applied to the running feed (it restarts, a new session)."""

    INTERFACE = "interface"
    SOURCES = "sources"
    UPSTREAM_CHECK = "upstream_check"  # or its deribit_layout
    SITES = "sites"  # a site added, removed or renamed (each site's own settings apply live)
    BUSY_POLL = "busy_poll"  # the receive threads take the latency mode when they start


@attrs.frozen
class CaptureChange:
    """A change of one capture feed's configuration, applied live unless ``restart``."""

    restart: Restart | None
    added: tuple[GroupKey, ...] = ()
    removed: tuple[GroupKey, ...] = ()
    receive_buffer_changed: bool = False

    @property
    def live(self) -> bool:
        return self.restart is None


def _groups(config: CaptureFeed) -> dict[GroupKey, None]:
    return dict.fromkeys((gp.group, gp.port) for gp in config.groups)


def plan_capture_change(old: CaptureFeed, new: CaptureFeed) -> CaptureChange:
    """How ``old`` (running) becomes ``new``: the groups to join and to leave, or why it
    cannot be done live."""
    if old.interface != new.interface:
        return CaptureChange(Restart.INTERFACE)
    if old.sources != new.sources:
        return CaptureChange(Restart.SOURCES)
    if (old.upstream_check, old.deribit_layout) != (new.upstream_check, new.deribit_layout):
        return CaptureChange(Restart.UPSTREAM_CHECK)
    if old.busy_poll != new.busy_poll:
        return CaptureChange(Restart.BUSY_POLL)
    if [site.name for site in old.sites] != [site.name for site in new.sites]:
        return CaptureChange(Restart.SITES)
    before, after = _groups(old), _groups(new)
    return CaptureChange(
        None,
        added=tuple(g for g in after if g not in before),
        removed=tuple(g for g in before if g not in after),
        receive_buffer_changed=old.receive_buffer != new.receive_buffer,
    )
