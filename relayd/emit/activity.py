"""Whether this host is a feed's active emitter: the feed's part of "one active emitter".

An emit feed streams and emits; which of the emit hosts may emit is decided apart from that,
by the feed's role (relayd/emit/role.py behind relayd/emit/observer.py's ``FeedRole``, which
drives the emit gate) and its observer (other relays on the feed's groups, the beacons, the
claim). :class:`FeedActivity` owns both for one feed: it opens the observer with the feed,
runs the glue Trio side (a feed that steps down ends its streams with NOT_ACTIVE) and reports
the role's metrics. Kept out of relayd/emit/feed.py so the feed runtime only serves
connections.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from ipaddress import IPv4Address

import trio

from relayd.config import EmitFeed
from relayd.datapath import run_stoppable
from relayd.emit.observer import TICK as OBSERVER_TICK
from relayd.emit.observer import FeedRole, ObserveHook, Observer
from relayd.emit.sessions import Sessions
from relayd.emit.stats import Closed
from relayd.runtime import Sample
from relayd.wire import ErrorCode

__all__ = ["FeedActivity"]


class FeedActivity:
    """One emit feed's role among the emit hosts, its observer and what they report.

    ``on_other(group, port, payload)`` takes what another relay emits on the feed's groups
    when no ``observe_hook`` is set (the feed's arbiter)."""

    def __init__(
        self,
        name: str,
        grace: float,
        sessions: Sessions,
        on_other: Callable[[int, int, bytes], None],
    ) -> None:
        self.name = name
        self.sessions = sessions
        self._on_other = on_other
        #: This feed's role among the emit hosts (relayd/emit/role.py) and its emit gate.
        self.role = FeedRole(name, None, grace)
        self.observer: Observer | None = None
        self._observe_hook: ObserveHook | None = None

    def open(self, interface_address: IPv4Address, config: EmitFeed) -> None:
        """Join the feed's groups and its beacon on ``interface_address`` (the observer)."""
        self.role.address = interface_address
        beacon = config.beacon_destination()
        self.observer = Observer(
            self.name, self.role, interface_address, config.watch_groups, beacon, config.ttl
        )
        # the claim needs the beacons: without them a stream makes this host active at once
        self.role.claim = config.emitter_claim if self.observer.beacon is not None else 0.0
        self.observer.hook = self._observe_hook or self._observed

    def close(self) -> None:
        if self.observer is not None:
            self.observer.close()

    def _observed(self, group: int, port: int, payload: bytes, _now: float) -> None:
        """The observer's default hook: what another relay emits goes to this feed's arbiter
        (with ``deribit``, a host that becomes active skips what the previous one sent)."""
        self._on_other(group, port, payload)

    @property
    def observe_hook(self) -> ObserveHook | None:
        """Given every datagram the observer drains from another relay, in its thread (None:
        none); may be set before or after ``open``."""
        return self._observe_hook

    @observe_hook.setter
    def observe_hook(self, hook: ObserveHook | None) -> None:
        self._observe_hook = hook
        if self.observer is not None:
            self.observer.hook = hook or self._observed

    def start(self, nursery: trio.Nursery) -> None:
        """Run the observer's thread and ``follow_role`` in ``nursery`` (after ``open``)."""
        observer = self.observer
        assert observer is not None
        nursery.start_soon(self.follow_role)
        nursery.start_soon(run_stoppable, observer.run)

    async def follow_role(self) -> None:
        """End the streams soon after the feed stands down (a yielded claim: the capture
        side should find the active host before it sends anything here)."""
        while True:
            self.end_streams_if_standing_down()
            await trio.sleep(OBSERVER_TICK)

    def end_streams_if_standing_down(self) -> None:
        """A feed that stepped down ends its streams with NOT_ACTIVE. A pump with data ends
        its own at the next datagram (the gate is closed); this ends the idle ones."""
        if not self.sessions.active or not self.role.standing_down():
            return
        for conn in list(self.sessions.active.values()):
            conn.end(
                ErrorCode.NOT_ACTIVE,
                f"feed {self.name!r} stepped down here (another relay emits it): connect again",
                Closed.NOT_ACTIVE,
            )

    def samples(self) -> Iterator[Sample]:
        """The role's and the observer's samples."""
        feed = (("feed", self.name),)
        role = self.role.snapshot()
        yield Sample(
            "emit_active",
            "gauge",
            "1 while this host is the feed's active emitter (holds a stream, may emit), else 0.",
            feed,
            float(role["role"] == "active"),
        )
        yield Sample(
            "emit_standby",
            "gauge",
            "1 while another relay emits the feed's groups and this host refuses its streams.",
            feed,
            float(role["role"] == "standby"),
        )
        yield Sample(
            "emit_split_brain",
            "gauge",
            "1 while this host and another relay both emit the feed's groups.",
            feed,
            float(role["split_brain"]),
        )
        yield Sample(
            "split_brain",
            "counter",
            "Split-brain events: this host emitting while another relay emits the feed's groups.",
            feed,
            role["split_brains"],
        )
        yield Sample(
            "emit_claiming",
            "gauge",
            "1 while this host claims the feed: it holds a stream but emits nothing until the "
            "claim period passes without another relay active or claiming from a lower address.",
            feed,
            float(role["role"] == "claiming"),
        )
        for outcome, count in role["claims"].items():
            yield Sample(
                "emit_claims",
                "counter",
                "Claims of the feed by this host, by outcome (won: became active; yielded: gave "
                "way to another relay before emitting anything).",
                (*feed, ("outcome", outcome)),
                count,
            )
        for reason, count in role["stepped_down"].items():
            yield Sample(
                "emit_stepped_down",
                "counter",
                "Times this host stopped emitting the feed for another relay, by reason.",
                (*feed, ("reason", reason)),
                count,
            )
        observer = self.observer
        if observer is not None:
            for origin, count in (
                ("own", observer.own_datagrams),
                ("other", observer.other_datagrams),
            ):
                yield Sample(
                    "emit_observed_datagrams",
                    "counter",
                    "Datagrams the observer sampled on the feed's groups, by origin "
                    "(own: this host's, looped back).",
                    (*feed, ("origin", origin)),
                    count,
                )
            for kind, count in (
                ("sent", observer.beacons_sent),
                ("received", observer.beacons_received),
                ("ignored", observer.beacons_ignored),
                ("send_error", observer.beacon_send_errors),
            ):
                yield Sample(
                    "emit_beacons",
                    "counter",
                    "Beacons of the feed (one active emitter): sent by this host, received "
                    "from other hosts, ignored (another feed's or unreadable), failed sends.",
                    (*feed, ("kind", kind)),
                    count,
                )
            yield Sample(
                "emit_watched_groups",
                "gauge",
                "group:port pairs the observer watches for other relays.",
                feed,
                len(observer.watched),
            )
