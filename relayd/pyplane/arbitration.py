"""The Python plane's A/B arbiter: the specification (``relayd.arbitration.Arbiter``) behind
one lock that the emit pumps share."""

from __future__ import annotations

import math
import socket
import threading
from typing import Final

from relayd.arbitration import Arbiter, ArbitrationConfig, Verdict
from relayd.datapath import ARBITER_SOURCES
from relayd.pyplane.sockets import wire_group

#: How long an arbitrated send waits for room in a full socket (the arbiter's lock is held).
ARB_SEND_WAIT: Final = 1.0


class LockedArbiter:
    """:class:`relayd.datapath.FeedArbiter` over the specification itself: one
    ``relayd.arbitration.Arbiter`` behind a ``threading.Lock``, which the pumps hold from the
    verdict until the datagram and what it released are sent (so each channel goes out in
    order whichever thread sends)."""

    def __init__(self, config: ArbitrationConfig) -> None:
        self.arbiter = Arbiter(config)
        self.lock = threading.Lock()
        self._closed = False  # as the C arbiter: nothing observed once closed

    def observe(self, group: int, port: int, payload: bytes, now: float) -> None:
        with self.lock:
            if not self._closed:
                self.arbiter.observe(group, port, payload, now)

    def set_live_sources(self, count: int) -> None:
        with self.lock:
            self.arbiter.set_live_sources(count)

    def counts(self) -> dict[str, int]:
        arbiter = self.arbiter
        stats = arbiter.stats
        return {
            "offered": stats.offered,
            "sent": stats.sent,
            "duplicates": stats.duplicates,
            "held": stats.held,
            "released": stats.released,
            "gaps": stats.gaps,
            "missing": stats.missing,
            "snapshot_gaps": stats.snapshot_gaps,
            "resets": stats.resets,
            "overlaps": stats.overlaps,
            "heartbeats": stats.heartbeats,
            "skipped_heartbeats": stats.skipped_heartbeats,
            "unsequenced": stats.unsequenced,
            "malformed": stats.malformed,
            "observed": stats.observed,
            "hold_overflows": stats.hold_overflows,
            "channel_evictions": arbiter.channel_evictions,
            "content_evictions": arbiter.content_evictions,
            "held_now": arbiter.held_now,
            "held_bytes": arbiter.held_bytes,
            "channels": arbiter.channel_count,
            "live_sources": arbiter.live_sources,
        }

    def sent_by_source(self) -> list[int]:
        sent = [0] * ARBITER_SOURCES
        for source, count in list(self.arbiter.stats.sent_by_source.items()):
            sent[min(source, ARBITER_SOURCES - 1)] += count
        return sent

    def offer(
        self,
        source: int,
        group: int,
        port: int,
        payload: bytes,
        now: float,
        owner: int = 0,
        frame: int = 0,
    ) -> Verdict:
        with self.lock:
            return self.arbiter.offer(source, group, port, payload, now, owner, frame)

    def floor(self, owner: int) -> int | None:
        if not self.arbiter.pending:  # a racy peek: what this owner's pump held it sees
            return None
        with self.lock:
            return self.arbiter.pending_floor(owner)

    def take_released(self) -> list[tuple[int, int, int, bytes, int]]:
        with self.lock:
            released = self.arbiter.released
            out = [(r.source, r.group, r.port, r.payload, r.gap) for r in released]
            released.clear()
        return out

    def expire(self, now: float) -> int:
        with self.lock:
            return self.arbiter.expire(now)

    def next_deadline(self) -> float | None:
        with self.lock:
            return self.arbiter.next_deadline()

    @property
    def gap_size(self) -> int:
        return self.arbiter.gap_size

    def flush(self, mcast: socket.socket) -> tuple[int, int]:
        sent = failed = 0
        with self.lock:
            self.arbiter.expire(math.inf)
            released = self.arbiter.released
            while released:
                item = released.popleft()
                try:
                    mcast.sendto(item.payload, (wire_group(item.group), item.port))
                except OSError:
                    failed += 1
                else:
                    sent += 1
        return sent, failed

    def close(self) -> None:
        with self.lock:
            self._closed = True

    def wake(self) -> float:
        """When a pump must wake for the arbiter (``time.monotonic()``): now (-inf) while
        released datagrams wait to be sent, inf when nothing is held."""
        with self.lock:
            if self.arbiter.released:
                return -math.inf
            deadline = self.arbiter.next_deadline()
        return math.inf if deadline is None else deadline + 1e-6
