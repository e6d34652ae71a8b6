"""Applying a reload to a running supervisor, make before break, and keeping its record.

Apart from the supervisor because it is one job with its own state (the counts by result, the
last outcome, the configuration errors, the event ``relayd reload`` waits on) and its own
sequence: load the file; open every added and changed feed (keys read, interface resolved,
listener bound, taking over the running feed's listener on the same address) and bind a new
health address before anything running is stopped; then stop what goes and start what comes.
What to change is decided by the pure ``relayd.reload.plan_reload``; this module does it,
through the ``ReloadHost`` the supervisor provides.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import attrs
import trio

from relayd.capture import CaptureFeedRuntime, LiveUpdate
from relayd.config import CaptureFeed, Config, ConfigError, Endpoint
from relayd.emit import EmitFeedRuntime
from relayd.feedslot import FEED_EXPECTED_ERRORS as EXPECTED
from relayd.feedslot import FeedFactory, FeedSlot
from relayd.health import HealthServerError, bind_listener
from relayd.logs import describe_error, feed_context, log_failure, setup_logging
from relayd.notify import Notifier
from relayd.reload import (
    FeedConfig,
    FeedKey,
    ReloadOutcome,
    ReloadResult,
    feeds_of,
    plan_reload,
)
from relayd.runtime import Feed
from relayd.wire import ErrorCode

# Reload lines keep the logger name they have always had (operators filter on it).
log = logging.getLogger("relayd.supervisor")


class ReloadFailedError(Exception):
    """Something the new configuration needs could not be acquired; nothing was changed."""

    def __init__(self, reasons: Sequence[str], *, untouched: bool = True) -> None:
        self.reasons = tuple(reasons)
        self.untouched = untouched  # False: the feeds were replaced, something else failed
        super().__init__("; ".join(self.reasons))


class ReloadHost(Protocol):
    """What a reload needs of the supervisor: the running configuration and feeds, and the
    means to start and stop a feed and the health server."""

    config_path: Path
    config: Config
    slots: dict[FeedKey, FeedSlot]
    factory: FeedFactory
    notifier: Notifier
    load: Callable[[Path], Config]

    def status_line(self) -> str: ...

    async def start_feed(
        self, key: FeedKey, feed: FeedConfig, *, fail_fast: bool, opened: Feed | None = None
    ) -> None: ...

    async def stop_feed(self, key: FeedKey, code: ErrorCode, message: str) -> None: ...

    async def start_health(self, endpoint: Endpoint, sock: socket.socket | None = None) -> None:
        """Raises HealthServerError."""

    async def stop_health(self) -> None: ...


def _refuse(reasons: list[str], key: FeedKey, action: str, exc: BaseException) -> None:
    """The reload cannot ``action`` the feed ``key``: add the reason, log the error."""
    reasons.append(f"{key[0]} feed {key[1]}: {describe_error(exc)}")
    log_failure(
        log,
        logging.ERROR,
        f"reload: cannot {action} %s feed %s",
        *key,
        exc=exc,
        expected=EXPECTED,
        extra={"feed": key[1], "kind": key[0]},
    )


class Reloader:
    """Runs one reload at a time on ``host`` and records how each ended."""

    def __init__(self, host: ReloadHost) -> None:
        self.host = host
        self.reloads: dict[str, int] = {result.value: 0 for result in ReloadResult}
        self.count = 0  # reloads finished, whatever their result
        self.done = trio.Event()  # set after each reload (replaced by a fresh one)
        self.last_outcome: ReloadOutcome | None = None
        self.config_errors: tuple[str, ...] = ()

    async def reload(self) -> None:
        """Load the file again and apply the difference (see the module docstring)."""
        host = self.host
        started_at = time.time()
        await host.notifier.reloading("reloading")
        errors: tuple[str, ...] = ()
        try:
            new = await trio.to_thread.run_sync(host.load, host.config_path)
        except ConfigError as exc:
            self.config_errors = errors = tuple(exc.errors) or ("invalid configuration",)
            result = ReloadResult.INVALID
            for error in self.config_errors:
                log.error("reload: %s", error, extra={"config": str(host.config_path)})
            log.error(
                "reload failed with %d error(s); the running configuration stays",
                len(self.config_errors),
            )
        else:
            try:
                await self._apply(new)
            except ReloadFailedError as exc:
                errors = exc.reasons
                result = ReloadResult.FAILED
                log.error(
                    "reload failed, %s: %s",
                    "the running feeds stay as they were" if exc.untouched else "feeds applied",
                    "; ".join(errors),
                    extra={"config": str(host.config_path)},
                )
            except Exception as exc:
                errors = (describe_error(exc),)
                result = ReloadResult.FAILED
                log_failure(log, logging.ERROR, "reload failed", exc=exc, expected=EXPECTED)
            else:
                result = ReloadResult.OK
        self.reloads[result.value] += 1
        self.count += 1
        self.last_outcome = ReloadOutcome(self.count, result, started_at, time.time(), errors)
        done, self.done = self.done, trio.Event()
        done.set()
        await host.notifier.ready(host.status_line())

    async def _apply(self, new: Config) -> None:
        """Make before break: open every added and changed feed and bind a new health address
        first; only when all of that succeeded stop what goes and start what comes. Raises
        ReloadFailedError (with everything acquired released, nothing running touched) otherwise."""
        host = self.host
        old = host.config
        plan = plan_reload(old, new)
        feeds = feeds_of(new)
        reasons: list[str] = []
        # A feed whose only change is its keys, and every feed with keys (a key file may have
        # been rewritten in place), takes them without a restart: its connections stay up.
        rekeyed = tuple(k for k in plan.changed if self._rekey(k, feeds[k], reasons))
        for key in plan.unchanged:
            self._rekey(key, feeds[key], reasons)
        if rekeyed:
            log.info("reload: new keys for %s", ", ".join(f"{k} feed {n}" for k, n in rekeyed))
            plan = attrs.evolve(
                plan,
                changed=tuple(k for k in plan.changed if k not in rekeyed),
                unchanged=(*plan.unchanged, *rekeyed),
            )
        # A changed capture feed keeps its session where the change allows (a group added or
        # removed, targets, timers, bounds): what it needs is acquired here, applied below.
        live = self._prepare_live(plan.changed, feeds, reasons)
        if live:
            plan = attrs.evolve(
                plan,
                changed=tuple(k for k in plan.changed if k not in live),
                unchanged=(*plan.unchanged, *live),
            )
        opened = self._open_feeds((*plan.changed, *plan.added), feeds, reasons)
        health_sock: socket.socket | None = None
        if plan.health_changed and not reasons:
            listen = new.health.listen
            try:
                health_sock = bind_listener(listen.host, listen.port)
            except OSError as exc:
                reasons.append(f"health server: {describe_error(exc)}")
        if reasons:
            for runtime in opened.values():
                runtime.close()
            for update in live.values():
                update.discard()
            raise ReloadFailedError(reasons)
        # Everything is acquired: from here on, the new configuration is the one that runs.
        self.config_errors = ()
        host.config = new
        if plan.logging_changed:
            setup_logging(new.process.log_level, new.process.log_format)
        for key, update in live.items():
            log.info("reload: applying changed %s feed %s to the running session", *key)
            update.apply()
            host.slots[key].config = feeds[key]
        if plan.empty and not live:
            log.info("reload: nothing changed")
            return
        log.info(
            "reload: %d added, %d removed, %d changed, %d unchanged%s%s",
            len(plan.added),
            len(plan.removed),
            len(plan.changed) + len(live),
            len(plan.unchanged) - len(live),
            ", health server moves" if plan.health_changed else "",
            f" ({len(live)} changed in place)" if live else "",
        )
        for key in plan.removed:
            log.info("reload: stopping removed %s feed %s", *key)
            await host.stop_feed(key, ErrorCode.FEED_REMOVED, "feed removed from the configuration")
        for key in plan.changed:
            log.info("reload: replacing changed %s feed %s", *key)
            await host.stop_feed(
                key, ErrorCode.SHUTTING_DOWN, "feed restarting with a new configuration"
            )
        late: list[str] = []  # what failed after the break: the feeds start all the same
        if health_sock is not None:
            await host.stop_health()
            try:
                await host.start_health(new.health.listen, health_sock)
            except HealthServerError as exc:
                late.append(str(exc))
                log.error("%s; back to %s", exc, old.health.listen)
                host.config = attrs.evolve(new, health=old.health)  # the next SIGHUP retries
                await host.start_health(old.health.listen)
        for key in (*plan.changed, *plan.added):
            log.info("reload: starting %s feed %s", *key)
            await host.start_feed(key, feeds[key], fail_fast=False, opened=opened[key])
        # Keep the file's order for /healthz.
        host.slots = {k: host.slots[k] for k in feeds if k in host.slots}
        if late:
            raise ReloadFailedError(late, untouched=False)

    def _prepare_live(
        self, keys: Sequence[FeedKey], feeds: dict[FeedKey, FeedConfig], reasons: list[str]
    ) -> dict[FeedKey, LiveUpdate]:
        """A prepared live update for each running capture feed of ``keys`` whose change
        allows one; what could not be acquired is added to ``reasons``."""
        prepared: dict[FeedKey, LiveUpdate] = {}
        for key in keys:
            slot = self.host.slots.get(key)
            new = feeds[key]
            runtime = None if slot is None or slot.state != "running" else slot.runtime
            if not isinstance(runtime, CaptureFeedRuntime) or not isinstance(new, CaptureFeed):
                continue
            try:
                with feed_context(key[1]):
                    update = runtime.prepare_update(new)
            except Exception as exc:
                _refuse(reasons, key, "change", exc)
                continue
            if update is not None:
                prepared[key] = update
        return prepared

    def _open_feeds(
        self, keys: Sequence[FeedKey], feeds: dict[FeedKey, FeedConfig], reasons: list[str]
    ) -> dict[FeedKey, Feed]:
        """A new runtime for each of ``keys``, opened (with the running one, if any, as its
        ``previous``); what could not be opened is added to ``reasons``."""
        opened: dict[FeedKey, Feed] = {}
        for key in keys:
            previous = self._predecessor(key, feeds)
            try:
                with feed_context(key[1]):
                    runtime = self.host.factory(feeds[key])
                    if isinstance(runtime, EmitFeedRuntime):
                        runtime.listener_donor = self._listener_donor(key, feeds, previous)
                    runtime.open(previous)
            except Exception as exc:
                _refuse(reasons, key, "open", exc)
            else:
                opened[key] = runtime
        return opened

    def _listener_donor(
        self, key: FeedKey, feeds: dict[FeedKey, FeedConfig], previous: Feed | None
    ) -> EmitFeedRuntime | None:
        """The running emit feed, other than ``previous``, listening on the address the new
        ``key`` feed wants and leaving it in this reload (removed, or moving to another
        address: two feeds swapping ports), so the new feed takes over its listener."""
        listen = getattr(feeds[key], "listen", None)
        if listen is None or listen.port == 0:
            return None
        for other_key, other in self.host.slots.items():
            runtime = other.runtime
            if runtime is previous or not isinstance(runtime, EmitFeedRuntime):
                continue
            staying = feeds.get(other_key)
            if runtime.config.listen == listen and getattr(staying, "listen", None) != listen:
                return runtime
        return None

    def _predecessor(self, key: FeedKey, feeds: dict[FeedKey, FeedConfig]) -> Feed | None:
        """The running feed a new one replaces: the one of the same kind and name, else one
        of the same kind on the same ``listen`` address that is going away or moving off it
        (a renamed feed takes over its listener)."""
        slots = self.host.slots
        slot = slots.get(key)
        if slot is not None:
            return slot.runtime
        listen = getattr(feeds[key], "listen", None)
        if listen is None:
            return None
        for other_key, other in slots.items():
            leaving = feeds.get(other_key)
            if (
                other_key[0] == key[0]
                and getattr(other.config, "listen", None) == listen
                and (leaving is None or getattr(leaving, "listen", None) != listen)
            ):
                return other.runtime
        return None

    def _rekey(self, key: FeedKey, new: FeedConfig, reasons: list[str]) -> bool:
        """Give a running feed the keys of ``new`` when nothing else differs; True when done.

        A key file that cannot be read is logged and added to ``reasons`` (the reload fails),
        and the feed keeps its current keys (the next reload tries again)."""
        slot = self.host.slots.get(key)
        if slot is None or slot.state != "running" or slot.runtime is None:
            return False
        try:
            if not slot.runtime.update_keys(new):
                return False
        except Exception as exc:
            reasons.append(f"{key[0]} feed {key[1]}: {describe_error(exc)}")
            log_failure(
                log,
                logging.ERROR,
                "reload: %s feed %s keeps its current keys",
                *key,
                exc=exc,
                expected=EXPECTED,
                extra={"feed": slot.name, "kind": slot.kind},
            )
            return True
        slot.config = new
        return True
