"""What every running feed offers the supervisor, the health endpoint and /metrics."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, NamedTuple, Protocol

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


class Feed(Protocol):
    """A feed runtime: built from its config, run inside the supervisor's nursery.

    ``run`` calls ``task_status.started()`` only when the feed is really ready (listener bound,
    groups joined) and runs until cancelled. Cancellation is the stop signal; ``close_reason``
    set beforehand tells a feed what to say to its peers (e.g. SHUTTING_DOWN, FEED_REMOVED).
    """

    name: str
    kind: Literal["emit", "capture"]

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...

    def health(self) -> FeedHealth: ...

    def samples(self) -> Iterable[Sample]: ...

    def set_close_reason(self, code: int, message: str) -> None: ...
