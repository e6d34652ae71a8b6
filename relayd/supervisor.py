"""``relayd run``: the one Trio nursery that runs the health server and every feed.

Start order: the signal task, the watchdog, the health server, then each feed with
``nursery.start`` (a feed is started when its listener is bound or its groups are joined).
READY=1 goes to systemd only after the last feed started and the health server answered a
request. Each feed runs under its own supervising task: a crash is logged, shown as "failed" on
``/healthz`` and the feed is restarted with exponential backoff; it never stops another feed or
the health server. At start-up, though, a feed that cannot start (an address in use, an unknown
interface) fails the whole process at once with exit status 1, so a broken deployment is seen.

SIGTERM/SIGINT: every feed is told SHUTTING_DOWN (so it can send its peers an ERROR) and
cancelled, the health server stops, exit 0. A second signal stops at once.

SIGHUP: the file is loaded again. Invalid: the running configuration stays and the errors show
in STATUS, ``/healthz`` (``config_errors``) and the log. Valid: only the difference is applied,
make before break: every added and changed feed is opened (keys read, interface resolved,
listener bound: a changed emit feed on the same address takes a duplicate of the running
listener) and a new health address bound before anything running is stopped. When any of it
fails, what was acquired is released, the running feeds are not touched, the reload counts as
failed and its reasons show in STATUS, ``/healthz`` (``reload``) and the log; the next SIGHUP
tries again. Otherwise removed feeds stop (FEED_REMOVED), changed feeds are replaced by their
opened successors (which carry on their counters), added feeds start, unchanged feeds are not
touched, the health server moves to its new socket and logging is set up again.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from relayd import __version__, fastpath
from relayd.config import (
    Config,
    ConfigError,
    Endpoint,
    load_config,
)
from relayd.datapath import data_threads_alive
from relayd.feedslot import (
    FEED_EXPECTED_ERRORS as EXPECTED,
)
from relayd.feedslot import (
    FeedFactory,
    FeedSlot,
    StartupError,
    default_factory,
)
from relayd.health import (
    FeedReport,
    HealthApp,
    HealthServer,
    HealthServerError,
    bind_listener,
    describe,
    format_address,
    process_samples,
)
from relayd.logs import (
    RateLimitedLogger,
    describe_error,
    feed_context,
    log_failure,
    setup_logging,
)
from relayd.metrics import Rate
from relayd.notify import Notifier
from relayd.reload import (
    FeedConfig,
    FeedKey,
    ReloadOutcome,
    ReloadResult,
    feeds_of,
    plan_reload,
)
from relayd.runtime import Feed, Sample
from relayd.wire import ErrorCode

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


STOP_TIMEOUT = 5.0  # feeds get this long to say goodbye to their peers on shutdown
TICK_INTERVAL = 2.0  # rates and STATUS refresh


class ReloadFailedError(Exception):
    """Something the new configuration needs could not be acquired; nothing was changed."""

    def __init__(self, reasons: Sequence[str], *, untouched: bool = True) -> None:
        self.reasons = tuple(reasons)
        self.untouched = untouched  # False: the feeds were replaced, something else failed
        super().__init__("; ".join(self.reasons))


class Supervisor:
    """Runs one configuration; ``run()`` returns the process exit status."""

    def __init__(
        self,
        config_path: Path,
        config: Config,
        *,
        factory: FeedFactory = default_factory,
        notifier: Notifier | None = None,
        load: Callable[[Path], Config] = load_config,
    ) -> None:
        self.config_path = config_path
        self.config = config
        self.factory = factory
        self.notifier = notifier if notifier is not None else Notifier()
        self.load = load
        self.slots: dict[FeedKey, FeedSlot] = {}
        self.ready = trio.Event()
        self.reloads: dict[str, int] = {"ok": 0, "invalid": 0, "failed": 0}
        self.reload_count = 0  # reloads finished, whatever their result
        self.reload_done = trio.Event()  # set after each reload (replaced by a fresh one)
        self.last_reload_outcome: ReloadOutcome | None = None
        self._config_errors: tuple[str, ...] = ()
        self._stopping = False
        self._started_at: float | None = None  # Trio clock, once run
        self._start_wall = time.time()
        self._rate = Rate(window=10.0)
        self._nursery: trio.Nursery | None = None
        self._reload_send, self._reload_receive = trio.open_memory_channel[None](1)
        self._exit_status = EXIT_OK
        self._rl = RateLimitedLogger(log)
        self.app = HealthApp(self)
        self._health = HealthServer(self.app)

    # -- HealthModel ---------------------------------------------------------------------

    def feed_reports(self) -> Sequence[FeedReport]:
        return [slot.report() for slot in self.slots.values()]

    def config_errors(self) -> Sequence[str]:
        return self._config_errors

    def last_reload(self) -> Mapping[str, Any] | None:
        outcome = self.last_reload_outcome
        return None if outcome is None else outcome.as_json()

    def uptime_seconds(self) -> float:
        if self._started_at is None:
            return 0.0
        return trio.current_time() - self._started_at

    def stopping(self) -> bool:
        return self._stopping

    def samples(self) -> Iterator[Sample]:
        for slot in list(self.slots.values()):
            try:
                yield from slot.feed_samples()
            except Exception as exc:
                self._rl.warning(
                    f"samples:{slot.name}",
                    "feed %s: samples() failed: %s",
                    slot.name,
                    describe(exc),
                    extra={"feed": slot.name},
                )
        for slot in self.slots.values():
            labels = (("feed", slot.name), ("kind", slot.kind))
            report = slot.report()
            yield Sample(
                "feed_up",
                "gauge",
                "1 when the feed is healthy.",
                labels,
                1 if report.healthy else 0,
            )
            yield Sample(
                "feed_restarts_total",
                "counter",
                "Restarts of the feed after a crash.",
                labels,
                slot.restarts,
            )
        for result, count in self.reloads.items():
            yield Sample(
                "reloads_total",
                "counter",
                "Configuration reloads (SIGHUP) by result.",
                (("result", result),),
                count,
            )
        yield Sample(
            "config_errors",
            "gauge",
            "Problems in the configuration file at the last reload (0: it applied).",
            (),
            len(self._config_errors),
        )
        yield Sample(
            "process_uptime_seconds",
            "gauge",
            "Seconds since relayd started.",
            (),
            round(self.uptime_seconds(), 3),
        )
        yield from process_samples(self._start_wall)

    # -- status line ---------------------------------------------------------------------

    def status_line(self) -> str:
        reports = self.feed_reports()
        healthy = sum(1 for r in reports if r.healthy)
        connections = sum(r.connections for r in reports)
        rate = sum(datagram_rate(r) for r in reports)
        feeds = f"{len(reports)} feed{'s' if len(reports) != 1 else ''}"
        text = f"{feeds} ({healthy} healthy), {connections} connections, {rate:.0f} datagrams/s"
        unhealthy = [r.name for r in reports if not r.healthy]
        if unhealthy:
            text += f"; unhealthy: {', '.join(unhealthy)}"
        if self._config_errors:
            n = len(self._config_errors)
            text += f"; reload failed with {n} config error{'s' if n != 1 else ''}, old config kept"
        outcome = self.last_reload_outcome
        if outcome is not None and outcome.result is ReloadResult.FAILED:
            text += f"; reload failed, old config kept: {'; '.join(outcome.errors)}"
        return text

    # -- running -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
        try:
            self._started_at = trio.current_time()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self._signal_task)
                nursery.start_soon(self.notifier.run_watchdog, data_threads_alive)
                try:
                    await self._start_health(self.config.health.listen, fail_fast=True)
                    for key, feed in feeds_of(self.config).items():
                        await self._start_feed(key, feed, fail_fast=True)
                    await self._probe_health()
                except StartupError as exc:
                    log.error("%s", exc)
                    self.notifier.status(f"failed to start: {exc}")
                    self._exit_status = EXIT_FAILURE
                    nursery.cancel_scope.cancel()
                    return self._exit_status
                nursery.start_soon(self._reload_task)
                nursery.start_soon(self._tick_task)
                self._update_rates()
                log.info(
                    "relayd %s ready (data path %s): %s",
                    __version__,
                    fastpath.describe(),
                    self.status_line(),
                    extra={"health": format_address(self.health_address)},
                )
                await self.notifier.ready(self.status_line())
                self.ready.set()
                task_status.started()
        finally:
            self.notifier.close()
        return self._exit_status

    async def _start_feed(
        self, key: FeedKey, feed: FeedConfig, *, fail_fast: bool, opened: Feed | None = None
    ) -> None:
        assert self._nursery is not None
        slot = FeedSlot(key[0], key[1], feed)
        self.slots[key] = slot
        await self._nursery.start(
            partial(slot.supervise, self.factory, fail_fast=fail_fast, opened=opened)
        )

    async def _stop_feed(self, key: FeedKey, code: ErrorCode, message: str) -> None:
        slot = self.slots.get(key)
        if slot is None:
            return
        slot.stop(code, message)
        await slot.done.wait()
        del self.slots[key]

    # -- health server -------------------------------------------------------------------

    @property
    def health_address(self) -> tuple[str, int] | None:
        return self._health.address

    async def _start_health(self, endpoint: Endpoint, *, fail_fast: bool) -> None:
        assert self._nursery is not None
        try:
            await self._health.start(self._nursery, endpoint)
        except HealthServerError as exc:
            if fail_fast:
                raise StartupError(str(exc)) from exc
            raise

    async def _probe_health(self) -> None:
        try:
            await self._health.probe()
        except HealthServerError as exc:
            raise StartupError(str(exc)) from exc

    # -- signals, reload, shutdown -------------------------------------------------------

    async def _signal_task(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    if self._stopping:
                        continue
                    log.info("SIGHUP: reloading %s", self.config_path)
                    # When a reload is already queued, it will read the newest file anyway.
                    with contextlib.suppress(trio.WouldBlock):
                        self._reload_send.send_nowait(None)
                else:
                    self.request_stop(name)

    def request_stop(self, why: str = "stop requested") -> None:
        """What SIGTERM and SIGINT do: a graceful stop, or at once when one is under way."""
        assert self._nursery is not None
        if not self._stopping:
            log.info("%s: stopping", why)
            self._stopping = True
            self._nursery.start_soon(self._shutdown)
        else:
            log.warning("%s again: stopping now", why)
            self._nursery.cancel_scope.cancel()

    async def _shutdown(self) -> None:
        assert self._nursery is not None
        await self.notifier.stopping("stopping")
        slots = list(self.slots.values())
        for slot in slots:
            slot.stop(ErrorCode.SHUTTING_DOWN, "relayd is shutting down")
        with trio.move_on_after(STOP_TIMEOUT):
            for slot in slots:
                await slot.done.wait()
        with trio.move_on_after(2 * STOP_TIMEOUT):
            await self._health.stop()
        log.info("stopped")
        self._nursery.cancel_scope.cancel()

    async def _reload_task(self) -> None:
        async for _ in self._reload_receive:
            if self._stopping:
                return
            await self.reload()

    async def reload(self) -> None:
        """Load the file again and apply the difference (see the module docstring)."""
        started_at = time.time()
        await self.notifier.reloading("reloading")
        errors: tuple[str, ...] = ()
        try:
            new = await trio.to_thread.run_sync(self.load, self.config_path)
        except ConfigError as exc:
            self._config_errors = errors = tuple(exc.errors) or ("invalid configuration",)
            result = ReloadResult.INVALID
            for error in self._config_errors:
                log.error("reload: %s", error, extra={"config": str(self.config_path)})
            log.error(
                "reload failed with %d error(s); the running configuration stays",
                len(self._config_errors),
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
                    extra={"config": str(self.config_path)},
                )
            except Exception as exc:
                errors = (describe_error(exc),)
                result = ReloadResult.FAILED
                log_failure(log, logging.ERROR, "reload failed", exc=exc, expected=EXPECTED)
            else:
                result = ReloadResult.OK
        self.reloads[result.value] += 1
        self.reload_count += 1
        self.last_reload_outcome = ReloadOutcome(
            self.reload_count, result, started_at, time.time(), errors
        )
        done, self.reload_done = self.reload_done, trio.Event()
        done.set()
        await self.notifier.ready(self.status_line())

    async def _apply(self, new: Config) -> None:
        """Make before break: open every added and changed feed and bind a new health address
        first; only when all of that succeeded stop what goes and start what comes. Raises
        ReloadFailedError (with everything acquired released, nothing running touched) otherwise."""
        old = self.config
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
            raise ReloadFailedError(reasons)
        # Everything is acquired: from here on, the new configuration is the one that runs.
        self._config_errors = ()
        self.config = new
        if plan.logging_changed:
            setup_logging(new.process.log_level, new.process.log_format)
        if plan.empty:
            log.info("reload: nothing changed")
            return
        log.info(
            "reload: %d added, %d removed, %d changed, %d unchanged%s",
            len(plan.added),
            len(plan.removed),
            len(plan.changed),
            len(plan.unchanged),
            ", health server moves" if plan.health_changed else "",
        )
        for key in plan.removed:
            log.info("reload: stopping removed %s feed %s", *key)
            await self._stop_feed(
                key, ErrorCode.FEED_REMOVED, "feed removed from the configuration"
            )
        for key in plan.changed:
            log.info("reload: replacing changed %s feed %s", *key)
            await self._stop_feed(
                key, ErrorCode.SHUTTING_DOWN, "feed restarting with a new configuration"
            )
        late: list[str] = []  # what failed after the break: the feeds start all the same
        if health_sock is not None:
            with trio.move_on_after(2 * STOP_TIMEOUT):
                await self._health.stop()
            try:
                await self._health.start(self._nursery_or_fail(), new.health.listen, health_sock)
            except HealthServerError as exc:
                late.append(str(exc))
                log.error("%s; back to %s", exc, old.health.listen)
                self.config = attrs.evolve(new, health=old.health)  # the next SIGHUP retries
                await self._health.start(self._nursery_or_fail(), old.health.listen)
        for key in (*plan.changed, *plan.added):
            log.info("reload: starting %s feed %s", *key)
            await self._start_feed(key, feeds[key], fail_fast=False, opened=opened[key])
        # Keep the file's order for /healthz.
        self.slots = {k: self.slots[k] for k in feeds if k in self.slots}
        if late:
            raise ReloadFailedError(late, untouched=False)

    def _nursery_or_fail(self) -> trio.Nursery:
        assert self._nursery is not None
        return self._nursery

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
                    runtime = self.factory(feeds[key])
                    runtime.open(previous)
            except Exception as exc:
                reasons.append(f"{key[0]} feed {key[1]}: {describe_error(exc)}")
                log_failure(
                    log,
                    logging.ERROR,
                    "reload: cannot open %s feed %s",
                    *key,
                    exc=exc,
                    expected=EXPECTED,
                    extra={"feed": key[1], "kind": key[0]},
                )
            else:
                opened[key] = runtime
        return opened

    def _predecessor(self, key: FeedKey, feeds: dict[FeedKey, FeedConfig]) -> Feed | None:
        """The running feed a new one replaces: the one of the same kind and name, else one
        of the same kind on the same ``listen`` address that is going away or moving off it
        (a renamed feed takes over its listener)."""
        slot = self.slots.get(key)
        if slot is not None:
            return slot.runtime
        listen = getattr(feeds[key], "listen", None)
        if listen is None:
            return None
        for other_key, other in self.slots.items():
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
        slot = self.slots.get(key)
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

    # -- periodic ------------------------------------------------------------------------

    def _update_rates(self) -> None:
        for slot in list(self.slots.values()):
            slot.update_rate()

    async def _tick_task(self) -> None:
        while True:
            await trio.sleep(TICK_INTERVAL)
            self._update_rates()
            self.notifier.status(self.status_line())


def datagram_rate(report: FeedReport) -> float:
    value = report.detail.get("datagrams_per_second", 0.0)
    return float(value) if isinstance(value, int | float) else 0.0


def run_main(config_path: Path) -> int:
    """``relayd run``: exit 0 after SIGTERM/SIGINT, 1 on a runtime failure (a listener that
    cannot bind at start), 2 when the configuration is invalid at start."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        for error in exc.errors:
            print(f"relayd: {config_path}: {error}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.process.log_level, config.process.log_format)
    supervisor = Supervisor(config_path, config)
    try:
        return trio.run(supervisor.run)
    except KeyboardInterrupt:  # a SIGINT before the signal task took over
        return EXIT_OK
    except Exception as exc:
        log_failure(log, logging.CRITICAL, "relayd failed", exc=exc, expected=EXPECTED)
        return EXIT_FAILURE
    finally:
        logging.shutdown()
