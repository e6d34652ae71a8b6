"""What every running feed offers the supervisor, the health endpoint and /metrics."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final, Literal, NamedTuple, Protocol

import trio

MetricType = Literal["counter", "gauge", "histogram"]


class Sample(NamedTuple):
    """One Prometheus sample; ``name`` without the ``relayd_`` prefix.

    A histogram is given as its samples: ``<family>_bucket`` (with an ``le`` label, cumulative),
    ``<family>_sum`` and ``<family>_count``, each with type "histogram"; the renderer strips the
    suffix to find the family for the HELP and TYPE lines.
    """

    name: str
    type: MetricType
    help: str
    labels: tuple[tuple[str, str], ...]
    value: float


class FeedHealth(NamedTuple):
    healthy: bool
    state: str  # one word: "listening", "streaming", "reconnecting", "failed", ...
    detail: dict[str, Any]  # JSON-able facts for /healthz and `relayd status`
    connections: int = 0  # peers the feed streams with now
    datagrams: int | None = None  # the feed's datagram counter (its rate is shown); None: none
    #: False: healthy, but the load balancer must not send it the feed (an emit host in
    #: standby: another relay emits it); /healthz/<feed> answers 503, /healthz does not.
    ready: bool = True


class Feed(Protocol):
    """A feed runtime: built from its config, run inside the supervisor's nursery.

    ``open`` acquires what the feed needs (keys, interface, bound sockets) and raises when it
    cannot, holding nothing then; ``run`` serves with it, calls ``task_status.started()`` when
    the feed is really ready, runs until cancelled and releases everything on the way out (it
    opens first when ``open`` was not called); ``close`` releases what ``open`` acquired when
    ``run`` will not be called. Kept apart so that a reload opens a changed feed before it
    stops the running one (make-before-break). ``previous`` is the feed this one replaces (a
    reload's running feed, or the crashed one before a restart), still running or not: the
    new one takes over what it can share from it, such as its counters or a bound listener
    on the same address. Cancellation is the stop signal; ``set_close_reason`` beforehand
    tells a feed what to say to its peers (e.g. SHUTTING_DOWN, FEED_REMOVED).
    """

    name: str
    kind: Literal["emit", "capture"]

    def open(self, previous: Feed | None = None) -> None: ...

    def close(self) -> None: ...

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...

    def health(self) -> FeedHealth: ...

    def samples(self) -> Iterable[Sample]: ...

    def set_close_reason(self, code: int, message: str) -> None: ...

    def update_keys(self, config: Any) -> bool:
        """Take ``config`` without a restart when it differs from the running one only in
        its key files (re-read even when unchanged: a file may have been rewritten in place);
        False when a restart is needed. Raises KeyFileError, keeping the current keys, when
        a key file cannot be used."""


#: The help of ``relayd_upstream_gaps_total`` and ``relayd_upstream_missing_total``, which both
#: feed kinds export (one family, one help): ``side="capture"`` as a capture host got the
#: exchange's sequence numbers, ``side="emit"`` what customers see after A/B arbitration.
UPSTREAM_GAPS_HELP: Final = (
    "Gaps in the exchange's sequence numbers, per channel: side=capture as the capture host "
    "got them, side=emit what customers see after A/B arbitration."
)
UPSTREAM_MISSING_HELP: Final = "Sequence numbers those gaps skipped (side as for upstream_gaps)."
