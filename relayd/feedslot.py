"""One configured feed under supervision: its runtime, its state, restarts with backoff.

A feed that crashes is logged (the traceback once per distinct error), shown as "failed" on
``/healthz`` and started again after a backoff that doubles up to ``BACKOFF_MAX``; it never
stops another feed. At process start-up, though, a feed that cannot start fails the start
(``StartupError``), unless only its key file is missing (it may be provisioned later).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from relayd.capture import CaptureFeedRuntime
from relayd.config import CaptureFeed, EmitFeed, MissingKeyFileError
from relayd.emit import EmitFeedRuntime
from relayd.health import FeedReport, describe
from relayd.keys import KeyFileError
from relayd.logs import EXPECTED_ERRORS, current_feed, describe_error, log_failure
from relayd.metrics import Rate
from relayd.netif import InterfaceError
from relayd.reload import FeedConfig, FeedKey
from relayd.runtime import Feed, Sample
from relayd.wire import ErrorCode

__all__ = [
    "RUNTIMES",
    "FeedFactory",
    "FeedSlot",
    "StartupError",
    "default_factory",
    "describe",
]

log = logging.getLogger("relayd.supervisor")

BACKOFF_INITIAL = 0.5  # first restart after a crash
BACKOFF_MAX = 30.0  # doubling up to this
STABLE_AFTER = 60.0  # a feed that ran this long without crashing starts again at the initial
START_TIMEOUT = 30.0  # a feed's run() must call started() within this

FeedFactory = Callable[[FeedConfig], Feed]

#: What a feed meets in the outside world (a port in use, an unknown interface, a missing or
#: unusable key file): one log line, no traceback.
FEED_EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    *EXPECTED_ERRORS,
    InterfaceError,
    KeyFileError,
)

#: The one place that says which class runs which kind of feed, by config class.
RUNTIMES: dict[type, Callable[[Any], Feed]] = {
    EmitFeed: EmitFeedRuntime,
    CaptureFeed: CaptureFeedRuntime,
}


def default_factory(feed_config: FeedConfig) -> Feed:
    """Build the runtime of one feed from its config (see ``RUNTIMES``)."""
    return RUNTIMES[type(feed_config)](feed_config)


class StartupError(Exception):
    """A component could not start at process start-up (exit status 1)."""


def _find(exc: BaseException, kind: type[Exception]) -> Exception | None:
    """The first ``kind`` inside ``exc`` or its (nested) groups."""
    if isinstance(exc, kind):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _find(inner, kind)
        if found is not None:
            return found
    return None


class FeedSlot:
    """One configured feed and the state of its supervising task."""

    def __init__(self, kind: str, name: str, config: FeedConfig) -> None:
        self.kind = kind
        self.name = name
        self.config = config
        self.runtime: Feed | None = None
        self.state = "starting"
        self.restarts = 0
        self.last_error: str | None = None
        self.last_error_time: float | None = None  # wall clock, for people
        self.retry_at: float | None = None  # trio clock
        self.cancel_scope = trio.CancelScope()
        self.done = trio.Event()
        self.rate = Rate(window=10.0)
        self._last_crash: tuple[type[BaseException], str] | None = None

    @property
    def key(self) -> FeedKey:
        return (self.kind, self.name)

    def stop(self, code: ErrorCode, message: str) -> None:
        """Tell the feed why it stops, then cancel it."""
        self.state = "stopping"
        if self.runtime is not None:
            try:
                self.runtime.set_close_reason(int(code), message)
            except Exception:
                log.exception("set_close_reason failed", extra={"feed": self.name})
        self.cancel_scope.cancel()

    def feed_samples(self) -> list[Sample]:
        if self.runtime is None or self.state != "running":
            return []
        samples = []
        for sample in self.runtime.samples():
            if any(k == "feed" for k, _ in sample.labels):
                samples.append(sample)
            else:
                samples.append(sample._replace(labels=(("feed", self.name), *sample.labels)))
        return samples

    def update_rate(self) -> None:
        """Feed the rate window with the feed's datagram counter (``FeedHealth.datagrams``)."""
        if self.runtime is None or self.state != "running":
            return
        try:
            total = self.runtime.health().datagrams
        except Exception:
            return
        if total is not None:
            self.rate.update(total, trio.current_time())

    def report(self) -> FeedReport:
        common: dict[str, Any] = {"restarts": self.restarts}
        if self.last_error is not None:
            common["last_error"] = self.last_error
            common["last_error_time"] = self.last_error_time
        if self.state == "running" and self.runtime is not None:
            try:
                h = self.runtime.health()
            except Exception as exc:
                return FeedReport(self.name, self.kind, False, "error", {"error": describe(exc)})
            detail = dict(h.detail)
            detail.setdefault("datagrams_per_second", round(self.rate.per_second(), 1))
            for key, value in common.items():
                detail.setdefault(key, value)
            return FeedReport(
                self.name, self.kind, h.healthy, h.state, detail, h.connections, h.ready
            )
        if self.state == "failed" and self.retry_at is not None:
            common["retry_in_seconds"] = round(max(0.0, self.retry_at - trio.current_time()), 1)
        return FeedReport(self.name, self.kind, False, self.state, common)

    async def supervise(
        self,
        factory: FeedFactory,
        *,
        fail_fast: bool,
        opened: Feed | None = None,
        task_status: trio.TaskStatus[None],
    ) -> None:
        """Run the feed until the slot is stopped; restart it with backoff when it fails.

        ``opened``: a runtime whose ``open`` already succeeded (a reload's make-before-break),
        run first; every later start builds one with ``factory`` and opens it with the last
        runtime as its ``previous`` (so a restart keeps the feed's counters)."""
        slot = self
        extra = {"feed": slot.name, "kind": slot.kind}
        backoff = BACKOFF_INITIAL
        reported = False
        previous: Feed | None = None
        current_feed.set(slot.name)  # this task's own context: its tasks and threads log so
        try:
            with slot.cancel_scope:
                while True:
                    slot.state = "starting"
                    began = trio.current_time()
                    try:
                        if opened is not None:
                            slot.runtime, opened = opened, None
                        else:
                            slot.runtime = factory(slot.config)
                            slot.runtime.open(previous)
                        previous = slot.runtime
                        async with trio.open_nursery() as inner:
                            with trio.fail_after(START_TIMEOUT):
                                await inner.start(slot.runtime.run)
                            slot.state = "running"
                            slot.retry_at = None
                            log.info("%s feed %s started", slot.kind, slot.name, extra=extra)
                            if not reported:
                                reported = True
                                task_status.started()
                        raise RuntimeError("run() returned while the feed was not stopped")
                    except Exception as exc:
                        # A key not provisioned yet fails this feed alone, retried below.
                        missing_key = _find(exc, MissingKeyFileError) is not None
                        if fail_fast and not reported and not missing_key:
                            raise StartupError(
                                f"cannot start {slot.kind} feed {slot.name}: {describe_error(exc)}"
                            ) from exc
                        if trio.current_time() - began >= STABLE_AFTER:
                            backoff = BACKOFF_INITIAL
                        slot._crashed(exc, backoff)
                        if not reported:
                            reported = True
                            task_status.started()
                        await trio.sleep(backoff)
                        backoff = min(backoff * 2, BACKOFF_MAX)
                        slot.restarts += 1
        except StartupError:
            raise
        except Exception as exc:  # raised by the feed while it was being stopped
            log_failure(
                log,
                logging.ERROR,
                "%s feed %s failed while stopping",
                slot.kind,
                slot.name,
                exc=exc,
                expected=FEED_EXPECTED_ERRORS,
                extra=extra,
            )
        finally:
            if opened is not None:  # stopped before it ran: release what it acquired
                opened.close()
            slot.state = "stopped"
            slot.runtime = None
            slot.done.set()

    def _crashed(self, exc: Exception, backoff: float) -> None:
        slot = self
        message = describe(exc)
        slot.state = "failed"
        slot.last_error = message
        slot.last_error_time = round(time.time(), 3)
        slot.retry_at = trio.current_time() + backoff
        # An expected condition is one line; anything else its traceback once per distinct
        # error, so a crash loop logs one line per restart.
        key = (type(exc), message)
        repeated = key == slot._last_crash
        slot._last_crash = key
        log_failure(
            log,
            logging.ERROR,
            "%s feed %s failed (restarting in %.1f s)",
            slot.kind,
            slot.name,
            backoff,
            exc=exc,
            expected=(BaseException,) if repeated else FEED_EXPECTED_ERRORS,
            extra={"feed": slot.name, "kind": slot.kind, "restarts": slot.restarts},
        )
