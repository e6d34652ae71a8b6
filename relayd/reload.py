"""What a reload changes (the difference between two configurations, a pure function) and
what became of it (``ReloadOutcome``, shown on ``/healthz`` for ``relayd reload``)."""

from __future__ import annotations

import enum
from typing import Any

import attrs

from relayd.config import CaptureFeed, Config, EmitFeed

__all__ = [
    "FeedConfig",
    "FeedKey",
    "ReloadOutcome",
    "ReloadPlan",
    "ReloadResult",
    "feeds_of",
    "plan_reload",
]

FeedConfig = EmitFeed | CaptureFeed
FeedKey = tuple[str, str]  # (kind, name)


def feeds_of(config: Config) -> dict[FeedKey, FeedConfig]:
    """Every feed of a configuration by (kind, name), in file order."""
    out: dict[FeedKey, FeedConfig] = {("emit", f.name): f for f in config.emit}
    out.update({("capture", f.name): f for f in config.capture})
    return out


@attrs.frozen
class ReloadPlan:
    """What a reload changes; feeds by (kind, name)."""

    added: tuple[FeedKey, ...]
    removed: tuple[FeedKey, ...]
    changed: tuple[FeedKey, ...]
    unchanged: tuple[FeedKey, ...]
    health_changed: bool
    logging_changed: bool

    @property
    def empty(self) -> bool:
        return not (
            self.added
            or self.removed
            or self.changed
            or self.health_changed
            or self.logging_changed
        )


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """The difference between two configurations; a feed whose settings differ in any way is
    "changed" (configs are frozen attrs classes, compared by value)."""
    before, after = feeds_of(old), feeds_of(new)
    return ReloadPlan(
        added=tuple(k for k in after if k not in before),
        removed=tuple(k for k in before if k not in after),
        changed=tuple(k for k in after if k in before and before[k] != after[k]),
        unchanged=tuple(k for k in after if k in before and before[k] == after[k]),
        health_changed=old.health != new.health,
        logging_changed=old.process != new.process,
    )


class ReloadResult(enum.Enum):
    """How a reload ended (``reloads_total{result}``)."""

    OK = "ok"  # the new configuration runs
    INVALID = "invalid"  # the file did not validate; nothing was touched
    FAILED = "failed"  # something the new configuration needs could not be acquired; the
    # running feeds were left as they were


@attrs.frozen
class ReloadOutcome:
    """The last reload: its number (from 1), its result, when it began and ended (wall clock,
    seconds since the epoch, so ``relayd reload`` can tell its own reload from an older one)
    and why it did not apply."""

    generation: int
    result: ReloadResult
    started_at: float
    finished_at: float
    errors: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "result": self.result.value,
            "started_at": round(self.started_at, 6),
            "finished_at": round(self.finished_at, 6),
            "errors": list(self.errors),
        }
