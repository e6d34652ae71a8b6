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
The reload itself is applied by ``relayd.reloader.Reloader``.
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
    describe,
    format_address,
    process_samples,
)
from relayd.logs import (
    RateLimitedLogger,
    log_failure,
    setup_logging,
)
from relayd.metrics import Rate
from relayd.notify import Notifier
from relayd.reload import FeedConfig, FeedKey, ReloadResult, feeds_of
from relayd.reloader import Reloader
from relayd.runtime import Feed, Sample
from relayd.wire import ErrorCode

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


STOP_TIMEOUT = 5.0  # feeds get this long to say goodbye to their peers on shutdown
TICK_INTERVAL = 2.0  # rates and STATUS refresh


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
        self.reloader = Reloader(self)

    # -- HealthModel ---------------------------------------------------------------------

    def feed_reports(self) -> Sequence[FeedReport]:
        return [slot.report() for slot in self.slots.values()]

    def config_errors(self) -> Sequence[str]:
        return self.reloader.config_errors

    def last_reload(self) -> Mapping[str, Any] | None:
        outcome = self.reloader.last_outcome
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
        for result, count in self.reloader.reloads.items():
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
            len(self.reloader.config_errors),
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
        if self.reloader.config_errors:
            n = len(self.reloader.config_errors)
            text += f"; reload failed with {n} config error{'s' if n != 1 else ''}, old config kept"
        outcome = self.reloader.last_outcome
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
                    await self._start_health(self.config.health.listen)
                    for key, feed in feeds_of(self.config).items():
                        await self.start_feed(key, feed, fail_fast=True)
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

    async def start_feed(
        self, key: FeedKey, feed: FeedConfig, *, fail_fast: bool, opened: Feed | None = None
    ) -> None:
        assert self._nursery is not None
        slot = FeedSlot(key[0], key[1], feed)
        self.slots[key] = slot
        await self._nursery.start(
            partial(slot.supervise, self.factory, fail_fast=fail_fast, opened=opened)
        )

    async def stop_feed(self, key: FeedKey, code: ErrorCode, message: str) -> None:
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

    async def _start_health(self, endpoint: Endpoint) -> None:
        try:
            await self.start_health(endpoint)
        except HealthServerError as exc:
            raise StartupError(str(exc)) from exc

    async def start_health(self, endpoint: Endpoint, sock: socket.socket | None = None) -> None:
        """Serve on ``endpoint`` (on ``sock`` when already bound); raises HealthServerError."""
        assert self._nursery is not None
        await self._health.start(self._nursery, endpoint, sock)

    async def stop_health(self) -> None:
        with trio.move_on_after(2 * STOP_TIMEOUT):
            await self._health.stop()

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
        await self.stop_health()
        log.info("stopped")
        self._nursery.cancel_scope.cancel()

    async def _reload_task(self) -> None:
        async for _ in self._reload_receive:
            if self._stopping:
                return
            await self.reload()

    async def reload(self) -> None:
        """Load the file again and apply the difference (``relayd.reloader``)."""
        await self.reloader.reload()

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
