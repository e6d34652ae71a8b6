"""A health model with fixed answers, for the health server and ``relayd status`` tests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from relayd.health import FeedReport, process_samples
from relayd.runtime import Sample


@attrs.define
class StaticHealthModel:
    """Serves ``reports`` and ``errors`` as they are; /metrics has ``extra`` and the process
    samples."""

    reports: list[FeedReport] = attrs.field(factory=list)
    errors: tuple[str, ...] = ()
    is_stopping: bool = False
    extra: list[Sample] = attrs.field(factory=list)
    uptime: float = 12.3456
    reload: dict[str, Any] | None = None

    def feed_reports(self) -> Sequence[FeedReport]:
        return self.reports

    def config_errors(self) -> Sequence[str]:
        return self.errors

    def last_reload(self) -> Mapping[str, Any] | None:
        return self.reload

    def uptime_seconds(self) -> float:
        return self.uptime

    def stopping(self) -> bool:
        return self.is_stopping

    def samples(self) -> Iterable[Sample]:
        yield from self.extra
        yield from process_samples(1000.0)
