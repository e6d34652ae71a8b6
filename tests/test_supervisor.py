"""The supervisor in-process, with small real feeds defined here (TCP listeners, crashers):
start order, READY after the health server answers, crash-restart with backoff, reload diff,
fail-fast start-up, shutdown."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, Literal

import attrs
import pytest
import trio

import relayd.feedslot as feedslot
from relayd.config import Config, ConfigError, EmitFeed, Endpoint, HealthConfig, ProcessConfig
from relayd.netif import bind_tcp_listener
from relayd.notify import Notifier
from relayd.reload import plan_reload
from relayd.runtime import Feed, FeedHealth, Sample
from relayd.supervisor import Supervisor
from relayd.wire import ErrorCode
from tests.helpers.loopback import free_tcp_port

# -- feeds for the tests -------------------------------------------------------------------

_instances = itertools.count(1)


class EchoFeed:
    """A real TCP listener that echoes; on stop it writes ``BYE <code> <message>`` to every
    connection, so a test sees what the supervisor told it. It binds in ``open`` (taking a
    duplicate of its ``previous``'s listener on the same fixed port, as an emit feed does) and
    counts its connections across restarts (``served``, carried over from ``previous``)."""

    kind: Literal["emit", "capture"] = "emit"

    def __init__(self, config: EmitFeed, journal: list[tuple[str, str]]) -> None:
        self.config = config
        self.name = config.name
        self.journal = journal
        self.instance = next(_instances)
        self.port = 0
        self.connections = 0
        self.served = [0]  # shared with the feeds that replace this one
        self.reason: tuple[int, str] | None = None
        self.sock: socket.socket | None = None

    def open(self, previous: Feed | None = None) -> None:
        listen = self.config.listen
        if isinstance(previous, EchoFeed):
            if previous.name == self.name:
                self.served = previous.served
            old = previous.sock
            same = listen.port != 0 and previous.config.listen == listen
            if same and old is not None and old.fileno() >= 0:
                self.sock = socket.socket(fileno=os.dup(old.fileno()))
        if self.sock is None:
            self.sock = bind_tcp_listener(listen.host, listen.port)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.journal.append(("closed", self.name))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.sock is None:
            self.open()
        assert self.sock is not None
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self.sock))
        self.journal.append(("started", self.name))
        try:
            async with trio.open_nursery() as handlers:
                task_status.started()
                await trio.serve_listeners(self._handle, [listener], handler_nursery=handlers)
        finally:
            listener.socket.close()
            self.journal.append(("stopped", self.name))

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self.served[0] += 1
        try:
            while True:
                data = await stream.receive_some(4096)
                if not data:
                    return
                await stream.send_all(data)
        finally:
            self.connections -= 1
            with trio.move_on_after(1) as scope:
                scope.shield = True
                if self.reason is not None:
                    code, message = self.reason
                    await stream.send_all(f"BYE {code} {message}\n".encode())
                await stream.aclose()

    def health(self) -> FeedHealth:
        return FeedHealth(
            True,
            "listening",
            {"port": self.port, "connections": self.connections},
            self.connections,
            10 * self.instance,
        )

    def samples(self) -> list[Sample]:
        return [
            Sample("datagrams_out", "counter", "Datagrams.", (), 10.0 * self.instance),
            Sample("active_connections", "gauge", "Connections.", (), self.connections),
        ]

    def set_close_reason(self, code: int, message: str) -> None:
        self.reason = (code, message)

    def update_keys(self, config: Any) -> bool:
        return False


@attrs.define
class CrashPlan:
    """How a CrashFeed behaves: fail before started() or after ``after`` seconds, for the
    first ``times`` runs; then run quietly."""

    before_start: bool = False
    after: float = 0.0
    times: int = 1_000_000
    starts: list[float] = attrs.field(factory=list)


class CrashFeed:
    kind: Literal["emit", "capture"] = "emit"

    def __init__(self, config: EmitFeed, plan: CrashPlan) -> None:
        self.name = config.name
        self.plan = plan

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.plan.starts.append(trio.current_time())
        crash = len(self.plan.starts) <= self.plan.times
        if crash and self.plan.before_start:
            raise OSError(98, "Address already in use (simulated)")
        task_status.started()
        if crash:
            await trio.sleep(self.plan.after)
            raise RuntimeError(f"boom {len(self.plan.starts)}")
        await trio.sleep_forever()

    def health(self) -> FeedHealth:
        return FeedHealth(True, "listening", {})

    def samples(self) -> list[Sample]:
        return []

    def set_close_reason(self, code: int, message: str) -> None:
        pass

    def open(self, previous: Feed | None = None) -> None:
        pass

    def close(self) -> None:
        pass

    def update_keys(self, config: Any) -> bool:
        return False


def emit(name: str, port: int = 0, ttl: int = 16) -> EmitFeed:
    return EmitFeed(
        name=name,
        listen=Endpoint("127.0.0.1", port),
        interface="lo",
        allowed_sources=(IPv4Network("127.0.0.0/8"),),
        allowed_groups=(IPv4Network("239.0.0.0/8"),),
        ttl=ttl,
    )


def config(*feeds: EmitFeed, health_port: int = 0, level: str = "info") -> Config:
    return Config(
        process=ProcessConfig(log_level=level),  # type: ignore[arg-type]
        health=HealthConfig(listen=Endpoint("127.0.0.1", health_port)),
        emit=feeds,
    )


@attrs.define
class Harness:
    journal: list[tuple[str, str]] = attrs.field(factory=list)
    crash: dict[str, CrashPlan] = attrs.field(factory=dict)
    feeds: dict[str, list[Feed]] = attrs.field(factory=dict)

    def factory(self, cfg: Any) -> Feed:
        feed: Feed
        if cfg.name in self.crash:
            feed = CrashFeed(cfg, self.crash[cfg.name])
        else:
            feed = EchoFeed(cfg, self.journal)
        self.feeds.setdefault(cfg.name, []).append(feed)
        return feed

    def echo(self, name: str) -> EchoFeed:
        feed = self.feeds[name][-1]
        assert isinstance(feed, EchoFeed)
        return feed


@pytest.fixture
async def notify_path() -> AsyncIterator[tuple[trio.socket.SocketType, str]]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "notify")
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        raw.bind(path)
        tsock = trio.socket.from_stdlib_socket(raw)
        try:
            yield tsock, path
        finally:
            tsock.close()


async def recv_messages(
    sock: trio.socket.SocketType, until: str, timeout: float = 5.0
) -> list[str]:
    """Notify datagrams, up to and including the first that contains ``until``."""
    got: list[str] = []
    with trio.fail_after(timeout):
        while True:
            got.append((await sock.recv(4096)).decode())
            if until in got[-1]:
                return got


async def http(port: int, path: str) -> tuple[int, dict[str, Any] | str]:
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    if b"application/json" in head:
        return status, json.loads(body)
    return status, body.decode()


_clients: list[trio.SocketStream] = []


@pytest.fixture
async def close_clients() -> AsyncIterator[None]:
    """Echo clients a failed test left open are closed, so that no ResourceWarning leaks into
    the next test (every test that opens them asks for this fixture)."""
    yield
    while _clients:
        await trio.aclose_forcefully(_clients.pop())


async def echo_client(port: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    _clients.append(stream)
    await stream.send_all(b"ping\n")
    with trio.fail_after(2):
        assert await stream.receive_some(100) == b"ping\n"
    return stream


async def read_all(stream: trio.SocketStream, timeout: float = 3.0) -> bytes:
    """Everything until the peer closes; then the stream is closed."""
    data = b""
    async with stream:
        with trio.fail_after(timeout):
            while chunk := await stream.receive_some(4096):
                data += chunk
    return data


class Running:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.exit_status: int | None = None

    async def run(self) -> None:
        self.exit_status = await self.sup.run()

    @property
    def port(self) -> int:
        assert self.sup.health_address is not None
        return self.sup.health_address[1]


def quiet_notifier() -> Notifier:
    return Notifier({})


# -- tests ---------------------------------------------------------------------------------


def test_plan_reload() -> None:
    a, b, c = emit("a", 7001), emit("b", 7002), emit("c", 7003)
    old = config(a, b, c)
    new = config(a, emit("b", 7002, ttl=3), emit("d", 7004), level="debug")
    plan = plan_reload(old, new)
    assert plan.added == (("emit", "d"),)
    assert plan.removed == (("emit", "c"),)
    assert plan.changed == (("emit", "b"),)
    assert plan.unchanged == (("emit", "a"),)
    assert not plan.health_changed
    assert plan.logging_changed
    assert plan_reload(old, old).empty
    assert plan_reload(old, config(a, b, c, health_port=9999)).health_changed


async def test_start_order_ready_after_health_answers(
    notify_path: tuple[trio.socket.SocketType, str], close_clients: None
) -> None:
    sock, path = notify_path
    h = Harness()
    order: list[str] = []

    class Probe(EchoFeed):
        async def run(
            self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            # The health server is up before any feed starts.
            assert sup.health_address is not None
            status, _ = await http(sup.health_address[1], "/healthz")
            order.append(f"{self.name}: health answered {status}")
            await trio.sleep(0.05)
            await super().run(task_status=task_status)

    def factory(cfg: Any) -> Feed:
        return Probe(cfg, h.journal)

    sup = Supervisor(
        Path("x"),
        config(emit("a"), emit("b")),
        factory=factory,
        notifier=Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"}),
    )
    r = Running(sup)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        messages = await recv_messages(sock, "READY=1")
        # Before READY: only watchdog pings; READY comes after both feeds started.
        assert all(m == "WATCHDOG=1" for m in messages[:-1])
        assert h.journal == [("started", "a"), ("started", "b")]
        assert order == ["a: health answered 503", "b: health answered 503"]
        assert messages[-1].startswith("READY=1\nSTATUS=2 feeds (2 healthy), 0 connections")
        assert sup.ready.is_set()
        status, body = await http(r.port, "/healthz")
        assert status == 200
        assert isinstance(body, dict)
        assert list(body["feeds"]) == ["a", "b"]
        # Watchdog keeps pinging at half of WATCHDOG_USEC.
        more = await recv_messages(sock, "WATCHDOG=1")
        more += await recv_messages(sock, "WATCHDOG=1")
        assert more.count("WATCHDOG=1") >= 2
        sup.request_stop()
    assert r.exit_status == 0
    assert set(h.journal[2:]) == {("stopped", "a"), ("stopped", "b")}


async def test_crash_restart_with_backoff_isolated(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, close_clients: None
) -> None:
    monkeypatch.setattr(feedslot, "BACKOFF_INITIAL", 0.05)
    monkeypatch.setattr(feedslot, "BACKOFF_MAX", 0.2)
    caplog.set_level(logging.INFO, logger="relayd.supervisor")
    h = Harness(crash={"bad": CrashPlan(after=0.0, times=5)})
    sup = Supervisor(
        Path("x"), config(emit("good"), emit("bad")), factory=h.factory, notifier=quiet_notifier()
    )
    r = Running(sup)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        await sup.ready.wait()
        client = await echo_client(h.echo("good").port)
        # While "bad" crash-loops it is reported failed, "good" stays healthy.
        await trio.sleep(0.02)
        status, body = await http(r.port, "/healthz")
        assert status == 503
        assert isinstance(body, dict)
        bad = body["feeds"]["bad"]
        assert bad["healthy"] is False
        assert bad["state"] == "failed"
        assert bad["last_error"].startswith("RuntimeError: boom")
        assert (await http(r.port, "/healthz/good"))[0] == 200
        assert (await http(r.port, "/healthz/bad"))[0] == 503
        # After 5 crashes it runs; total backoff 0.05 + 0.1 + 0.2 + 0.2 + 0.2.
        with trio.fail_after(5):
            while len(h.crash["bad"].starts) < 6:
                await trio.sleep(0.01)
        starts = h.crash["bad"].starts
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        # Backoff doubles from 0.05 s up to 0.2 s: a sleep is never shorter than its backoff,
        # and the last two stay below the 0.4 s an uncapped doubling would give (bounds with
        # room for a loaded machine).
        for gap, want in zip(gaps, [0.05, 0.1, 0.2, 0.2, 0.2], strict=True):
            assert gap >= want - 0.005, gaps
        assert max(gaps[3:]) < 0.39, gaps
        await trio.sleep(0.05)
        status, body = await http(r.port, "/healthz")
        assert status == 200
        assert isinstance(body, dict)
        assert body["feeds"]["bad"]["restarts"] == 5
        assert body["feeds"]["bad"]["last_error"] == "RuntimeError: boom 5"
        # The other feed's connection never noticed.
        await client.send_all(b"still\n")
        with trio.fail_after(2):
            assert await client.receive_some(100) == b"still\n"
        status, text = await http(r.port, "/metrics")
        assert isinstance(text, str)
        assert 'relayd_feed_restarts_total{feed="bad",kind="emit"} 5' in text
        assert 'relayd_feed_up{feed="good",kind="emit"} 1' in text
        sup.request_stop()
        assert (await read_all(client)).startswith(b"BYE 6 ")
    assert r.exit_status == 0
    crash_logs = [rec for rec in caplog.records if "): RuntimeError: boom" in rec.getMessage()]
    assert len(crash_logs) == 5
    # The traceback once per distinct error: each "boom N" differs, so each has one here...
    assert all(rec.exc_info for rec in crash_logs)


async def test_same_crash_logs_traceback_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(feedslot, "BACKOFF_INITIAL", 0.01)
    monkeypatch.setattr(feedslot, "BACKOFF_MAX", 0.02)
    caplog.set_level(logging.INFO, logger="relayd.supervisor")
    h = Harness(crash={"bad": CrashPlan(before_start=True)})
    sup = Supervisor(Path("x"), config(emit("good")), factory=h.factory, notifier=quiet_notifier())
    r = Running(sup)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        await sup.ready.wait()
        # Added by a reload, a feed that cannot start is retried, not fatal.
        sup.load = lambda _path: config(emit("good"), emit("bad"))
        await sup.reload()
        with trio.fail_after(5):
            while len(h.crash["bad"].starts) < 4:
                await trio.sleep(0.01)
        status, body = await http(r.port, "/healthz/bad")
        assert status == 503
        assert isinstance(body, dict)
        assert "Address already in use" in body["feeds"]["bad"]["last_error"]
        sup.request_stop()
    assert r.exit_status == 0
    crash_logs = [rec for rec in caplog.records if "feed bad failed" in rec.getMessage()]
    assert len(crash_logs) >= 3
    # A port in use is an expected condition: one line each, never a traceback.
    assert "OSError: [Errno 98] Address already in use" in crash_logs[0].getMessage()
    assert not any(rec.exc_info for rec in crash_logs)


async def test_reload_applies_only_the_difference(
    caplog: pytest.LogCaptureFixture, close_clients: None
) -> None:
    h = Harness()
    current = config(emit("keep"), emit("change"), emit("drop"))
    sup = Supervisor(Path("x"), current, factory=h.factory, notifier=quiet_notifier())
    sup.load = lambda _path: current
    r = Running(sup)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        await sup.ready.wait()
        keep, change, drop = h.echo("keep"), h.echo("change"), h.echo("drop")
        c_keep = await echo_client(keep.port)
        c_change = await echo_client(change.port)
        c_drop = await echo_client(drop.port)

        current = config(emit("keep"), emit("change", ttl=2), emit("add"), level="debug")
        await sup.reload()

        # Removed: told FEED_REMOVED. Changed: told it restarts, and runs as a new instance.
        assert (
            await read_all(c_drop)
        ) == f"BYE {int(ErrorCode.FEED_REMOVED)} feed removed from the configuration\n".encode()
        assert (await read_all(c_change)).startswith(
            f"BYE {int(ErrorCode.SHUTTING_DOWN)} ".encode()
        )
        assert h.echo("change") is not change
        assert len(h.feeds["keep"]) == 1
        # Unchanged: the same instance, the connection untouched.
        await c_keep.send_all(b"again\n")
        with trio.fail_after(2):
            assert await c_keep.receive_some(100) == b"again\n"
        # Added: listening.
        c_add = await echo_client(h.echo("add").port)
        await c_add.aclose()
        status, body = await http(r.port, "/healthz")
        assert status == 200
        assert isinstance(body, dict)
        assert list(body["feeds"]) == ["keep", "change", "add"]
        assert logging.getLogger().level == logging.DEBUG
        assert sup.reloader.reloads["ok"] == 1

        # An invalid file keeps everything running and shows the errors, still healthy.
        def broken(_path: Path) -> Config:
            raise ConfigError(["invalid value @ $.emit[0].ttl", "unknown key 'x' @ $"])

        sup.load = broken
        await sup.reload()
        status, body = await http(r.port, "/healthz")
        assert status == 200
        assert isinstance(body, dict)
        assert body["config_errors"] == ["invalid value @ $.emit[0].ttl", "unknown key 'x' @ $"]
        assert "reload failed with 2 config errors, old config kept" in sup.status_line()
        await c_keep.send_all(b"third\n")
        with trio.fail_after(2):
            assert await c_keep.receive_some(100) == b"third\n"
        errors = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.ERROR]
        assert "reload: invalid value @ $.emit[0].ttl" in errors
        assert "reload: unknown key 'x' @ $" in errors
        status, text = await http(r.port, "/metrics")
        assert isinstance(text, str)
        assert 'relayd_reloads_total{result="invalid"} 1' in text
        assert "relayd_config_errors 2" in text

        # The next good reload clears them.
        sup.load = lambda _path: current
        await sup.reload()
        assert sup.config_errors() == ()
        sup.request_stop()
        assert (await read_all(c_keep)).startswith(b"BYE 6 relayd is shutting down")
    assert r.exit_status == 0


async def test_reload_moves_the_health_server(close_clients: None) -> None:
    h = Harness()
    new_port = free_tcp_port()
    current = config(emit("a"))
    sup = Supervisor(Path("x"), current, factory=h.factory, notifier=quiet_notifier())
    sup.load = lambda _path: config(emit("a"), health_port=new_port)
    r = Running(sup)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        await sup.ready.wait()
        old_port = r.port
        client = await echo_client(h.echo("a").port)
        await sup.reload()
        assert r.port == new_port
        assert (await http(new_port, "/healthz"))[0] == 200
        with pytest.raises(OSError, match=r"refused|connect"):
            await trio.open_tcp_stream("127.0.0.1", old_port)
        await client.send_all(b"x")
        with trio.fail_after(2):
            assert await client.receive_some(10) == b"x"
        sup.request_stop()
        assert (await read_all(client)).startswith(b"BYE 6 ")
    assert r.exit_status == 0


async def test_start_fails_fast_when_a_port_is_taken(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        h = Harness()
        sup = Supervisor(
            Path("x"),
            config(emit("a"), emit("b", port)),
            factory=h.factory,
            notifier=quiet_notifier(),
        )
        with trio.fail_after(5):
            assert await sup.run() == 1
        assert any(
            "cannot start emit feed b" in rec.getMessage() and "in use" in rec.getMessage()
            for rec in caplog.records
        )
        assert ("stopped", "a") in h.journal
        sup2 = Supervisor(
            Path("x"),
            config(emit("a"), health_port=port),
            factory=h.factory,
            notifier=quiet_notifier(),
        )
        with trio.fail_after(5):
            assert await sup2.run() == 1
        assert any("cannot start the health server" in rec.getMessage() for rec in caplog.records)


async def test_status_line_counts(close_clients: None) -> None:
    h = Harness()
    sup = Supervisor(
        Path("x"), config(emit("a"), emit("b")), factory=h.factory, notifier=quiet_notifier()
    )
    r = Running(sup)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        await sup.ready.wait()
        clients = [await echo_client(h.echo("a").port) for _ in range(2)]
        clients.append(await echo_client(h.echo("b").port))
        assert sup.status_line().startswith("2 feeds (2 healthy), 3 connections, ")
        for c in clients:
            await c.aclose()
        sup.request_stop()


# -- `relayd run` as a process: real config file, real signals, real emit feeds on loopback ---

from tests.helpers.relayd_process import (  # noqa: E402
    NotifyListener,
    RelaydProcess,
    emit_toml,
    feed_port,
    get_json,
    get_text,
    groups_arg,
    peer_argv,
    pick_groups,
    process_toml,
)


@pytest.mark.slow
def test_run_process_notify_reload_and_stop(tmp_path: Path, notify: NotifyListener) -> None:
    config_path = tmp_path / "relayd.toml"
    config_path.write_text(process_toml(emit_toml("alpha")))
    relayd = RelaydProcess(config_path, {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"})
    receiver = sender = None
    try:
        first = notify.wait("READY=1")
        assert first[-1].startswith("READY=1\nSTATUS=1 feed (1 healthy), 0 connections")
        health = relayd.health_port()
        alpha = feed_port(health, "alpha")
        status, doc = get_json(health)
        assert status == 200
        assert doc["feeds"]["alpha"]["state"] == "listening"
        # Watchdog pings at half of WATCHDOG_USEC; STATUS refreshes.
        pings = notify.wait("STATUS=")
        assert pings.count("WATCHDOG=1") >= 2

        groups = pick_groups(3)
        total = 3000
        receiver = subprocess.Popen(
            peer_argv("receive", "--interface", "127.0.0.1", "--groups", groups_arg(groups),
                      "--count", str(total), "--duration", "60"),
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert receiver.stdout is not None
        assert receiver.stdout.readline() == b"ready\n"
        # 3000 datagrams at 500/s: the reload below happens in the middle of the stream, once
        # it flows (a loaded machine can take seconds to start the sender).
        sender = subprocess.Popen(
            peer_argv("send", "--connect", f"127.0.0.1:{alpha}", "--feed", "alpha",
                      "--groups", groups_arg(groups), "--count", str(total), "--rate", "500",
                      "--linger", "20"),
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert sender.stdout is not None
        deadline = time.monotonic() + 30
        while get_json(health, "/healthz/alpha")[1]["feeds"]["alpha"]["datagrams_out"] == 0:
            assert time.monotonic() < deadline, "the sender streamed nothing"
            time.sleep(0.05)
        config_path.write_text(process_toml(emit_toml("alpha"), emit_toml("beta")))
        mark = len(relayd.lines)
        relayd.proc.send_signal(signal.SIGHUP)
        reload_msgs = notify.wait("READY=1")
        reloading = [m for m in reload_msgs if m.startswith("RELOADING=1")]
        assert len(reloading) == 1
        assert re.search(r"\nMONOTONIC_USEC=\d+", reloading[0])
        assert reload_msgs.index(reloading[0]) < len(reload_msgs) - 1
        relayd.wait_line(r"reload: 1 added, 0 removed, 0 changed, 1 unchanged", start=mark)
        status, doc = get_json(health)
        assert list(doc["feeds"]) == ["alpha", "beta"]
        assert doc["feeds"]["beta"]["state"] == "listening"
        assert 0 < doc["feeds"]["alpha"]["datagrams_out"] < total  # mid-stream
        beta = feed_port(health, "beta")
        with socket.create_connection(("127.0.0.1", beta), timeout=5) as c:
            assert c.recv(3)[2:3] == b"\x10"  # CHALLENGE at once

        streamed = json.loads(sender.stdout.readline())
        assert streamed == {"streamed": total}
        out, _ = receiver.communicate(timeout=60)
        got = json.loads(out)["got"]
        assert len(got) == total
        assert [seq for _, _, seq in got] == list(range(1, total + 1))
        text = get_text(health, "/metrics")
        assert f'relayd_datagrams_out_total{{feed="alpha"}} {total}' in text
        assert 'relayd_reloads_total{result="ok"} 1' in text

        # An invalid file: the old config keeps serving, errors shown, still healthy.
        config_path.write_text(process_toml(emit_toml("alpha", ttl=0), emit_toml("beta")))
        relayd.proc.send_signal(signal.SIGHUP)
        msgs = notify.wait("READY=1")
        assert any(m.startswith("RELOADING=1") for m in msgs)
        assert "config error" in msgs[-1]
        status, doc = get_json(health)
        assert status == 200
        assert len(doc["config_errors"]) == 1
        assert "$.emit[0].ttl" in doc["config_errors"][0]
        assert list(doc["feeds"]) == ["alpha", "beta"]

        # SIGTERM: the streaming connection is told SHUTTING_DOWN, exit 0 promptly: well before
        # the sender's linger (20 s) or the idle timeout (30 s) would end the connection.
        code, took = relayd.stop(signal.SIGTERM, timeout=15)
        assert code == 0
        assert took < 10.0
        result = json.loads(sender.communicate(timeout=10)[0])
        assert result["acked"] == total
        assert result["errors"] == [[int(ErrorCode.SHUTTING_DOWN), result["errors"][0][1]]]
        assert result["closed"] is True
        assert any(m.startswith("STOPPING=1") for m in notify.wait("STOPPING=1"))
    finally:
        for p in (sender, receiver):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
        relayd.kill()


def test_run_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(process_toml(emit_toml("alpha", ttl=0)))
    proc = subprocess.run(
        [sys.executable, "-m", "relayd", "run", "--config", str(bad)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "$.emit[0].ttl" in proc.stderr

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = tmp_path / "busy.toml"
        busy.write_text(process_toml(emit_toml("alpha", listen=f"127.0.0.1:{port}")))
        proc = subprocess.run(
            [sys.executable, "-m", "relayd", "run", "--config", str(busy)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert proc.returncode == 1
        assert "cannot start emit feed alpha" in proc.stderr
        assert "Address already in use" in proc.stderr


def test_run_sigint_exits_zero(tmp_path: Path, notify: NotifyListener) -> None:
    config_path = tmp_path / "relayd.toml"
    config_path.write_text(process_toml(emit_toml("alpha"), level="warning"))
    relayd = RelaydProcess(config_path, {"NOTIFY_SOCKET": notify.path})
    try:
        notify.wait("READY=1")
        code, took = relayd.stop(signal.SIGINT, timeout=15)
        assert code == 0
        assert took < 10.0  # promptly, with room for a loaded machine
        assert notify.wait("STOPPING=1")[-1].startswith("STOPPING=1")
    finally:
        relayd.kill()


# -- make-before-break reloads ---------------------------------------------------------------


async def test_reload_that_cannot_bind_leaves_the_running_feed_alone(
    caplog: pytest.LogCaptureFixture, close_clients: None
) -> None:
    """A changed feed's new port is in use: the running feed goes on (its connection too),
    the reload counts as failed with the address in its reason (log, STATUS, /healthz), and
    the next SIGHUP tries again rather than finding "nothing changed"."""
    h = Harness()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        sup = Supervisor(Path("x"), config(emit("a")), factory=h.factory, notifier=quiet_notifier())
        sup.load = lambda _path: config(emit("a", busy))
        r = Running(sup)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(r.run)
            await sup.ready.wait()
            running = h.echo("a")
            client = await echo_client(running.port)
            for attempt in (1, 2):
                await sup.reload()
                assert sup.reloader.reloads == {"ok": 0, "invalid": 0, "failed": attempt}
                assert h.journal == [("started", "a")]  # the running one never stopped
                await client.send_all(b"still\n")
                with trio.fail_after(2):
                    assert await client.receive_some(100) == b"still\n"
                status, body = await http(r.port, "/healthz")
                assert status == 200
                assert isinstance(body, dict)
                assert body["feeds"]["a"]["state"] == "listening"
                reload = body["reload"]
                assert reload["generation"] == attempt
                assert reload["result"] == "failed"
                assert reload["errors"] == [
                    f"emit feed a: OSError: [Errno 98] cannot bind 127.0.0.1:{busy}: "
                    "Address already in use"
                ]
                assert (
                    "reload failed, old config kept: emit feed a: OSError: [Errno 98] "
                    f"cannot bind 127.0.0.1:{busy}"
                ) in sup.status_line()
            messages = [rec.getMessage() for rec in caplog.records]
            assert "reload: nothing changed" not in messages
            failed = [rec for rec in caplog.records if rec.getMessage().startswith("reload")]
            assert not any(rec.exc_info for rec in failed)
            assert any("cannot bind 127.0.0.1" in m and "reload failed" in m for m in messages)
            status, text = await http(r.port, "/metrics")
            assert isinstance(text, str)
            assert 'relayd_reloads_total{result="failed"} 2' in text
            taken.close()
            # The port is free now: the same file applies.
            await sup.reload()
            assert sup.reloader.reloads["ok"] == 1
            assert h.echo("a") is not running
            assert h.echo("a").port == busy
            assert "reload failed" not in sup.status_line()
            assert (await read_all(client)).startswith(b"BYE 6 feed restarting")
            sup.request_stop()
    assert r.exit_status == 0


async def test_reload_that_cannot_move_the_health_server_keeps_every_feed(
    close_clients: None,
) -> None:
    """A reload that changes a feed and moves [health] listen to a busy port: nothing stops,
    the health server stays where it was, and the feed is still served under its name."""
    h = Harness()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        sup = Supervisor(
            Path("x"), config(emit("prod")), factory=h.factory, notifier=quiet_notifier()
        )
        sup.load = lambda _path: config(emit("prod", ttl=3), health_port=busy)
        r = Running(sup)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(r.run)
            await sup.ready.wait()
            old_port = r.port
            client = await echo_client(h.echo("prod").port)
            await sup.reload()
            assert sup.reloader.reloads["failed"] == 1
            assert r.port == old_port
            status, body = await http(old_port, "/healthz/prod")
            assert status == 200
            assert isinstance(body, dict)
            assert body["feeds"]["prod"]["state"] == "listening"
            assert body["reload"]["errors"] == [
                f"health server: OSError: [Errno 98] cannot bind 127.0.0.1:{busy}: "
                "Address already in use"
            ]
            assert len(h.feeds["prod"]) == 2
            assert h.journal[-1] == ("closed", "prod")
            await client.send_all(b"x")
            with trio.fail_after(2):
                assert await client.receive_some(10) == b"x"
            sup.request_stop()
            assert (await read_all(client)).startswith(b"BYE 6 relayd is shutting down")
    assert r.exit_status == 0


async def test_changed_feed_on_the_same_port_takes_over_its_listener(close_clients: None) -> None:
    """Make before break on one fixed port: the replacement holds a duplicate of the running
    listener before the old feed stops, so the port is never closed, and it carries on the
    old feed's counters."""
    h = Harness()
    port = free_tcp_port()
    sup = Supervisor(
        Path("x"), config(emit("a", port)), factory=h.factory, notifier=quiet_notifier()
    )
    sup.load = lambda _path: config(emit("a", port, ttl=3))
    r = Running(sup)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        await sup.ready.wait()
        old = h.echo("a")
        client = await echo_client(port)
        # A connection that waits in the accept queue across the switch is served.
        waiting = socket.create_connection(("127.0.0.1", port))
        await sup.reload()
        assert sup.reloader.reloads["ok"] == 1
        new = h.echo("a")
        assert new is not old
        assert (await read_all(client)).startswith(b"BYE 6 feed restarting")
        again = await echo_client(port)
        assert new.served is old.served
        assert new.served[0] >= 2
        waiting.close()
        await again.aclose()
        sup.request_stop()
    assert r.exit_status == 0


def relayd_reload(config_path: Path, pid: int) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "relayd", "reload", "--config", str(config_path)]
    return subprocess.run(
        [*argv, "--pid", str(pid), "--timeout", "20s"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_relayd_reload_waits_for_the_outcome_and_fails_when_the_reload_did(
    tmp_path: Path,
) -> None:
    """`relayd reload` (systemd's ExecReload) exits 1 when a reload that passes check-config
    cannot be applied (an unknown interface, a port in use), and the streaming feed is never
    stopped by it; a changed feed on the same port takes over the listener and the counters."""
    port, health, busy_port = free_tcp_port(), free_tcp_port(), free_tcp_port()
    listen = f"127.0.0.1:{port}"
    config_path = tmp_path / "relayd.toml"

    def write(**changes: Any) -> None:
        feed = emit_toml("alpha", **{"listen": listen, **changes})
        config_path.write_text(process_toml(feed, health=f"127.0.0.1:{health}"))

    write()
    relayd = RelaydProcess(config_path, {})
    sender = None
    try:
        relayd.wait_line(r"relayd \S+ ready")
        groups = pick_groups(2)
        sender = subprocess.Popen(
            peer_argv("send", "--connect", listen, "--feed", "alpha",
                      "--groups", groups_arg(groups), "--count", "200", "--rate", "2000",
                      "--linger", "30"),
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert sender.stdout is not None
        assert json.loads(sender.stdout.readline()) == {"streamed": 200}
        ok = relayd_reload(config_path, relayd.proc.pid)
        assert (ok.returncode, ok.stdout) == (0, "reload 1: ok\n"), ok.stderr

        write(interface="nosuch0")
        for generation in (2, 3):  # the same file again is tried again
            failed = relayd_reload(config_path, relayd.proc.pid)
            assert failed.returncode == 1, failed
            assert f"reload {generation} failed" in failed.stderr
            assert "emit feed alpha: InterfaceError: no interface named 'nosuch0'" in failed.stderr
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", busy_port))
            busy.listen()
            write(listen=f"127.0.0.1:{busy_port}")
            failed = relayd_reload(config_path, relayd.proc.pid)
            assert failed.returncode == 1, failed
            assert f"cannot bind 127.0.0.1:{busy_port}: Address already in use" in failed.stderr
        status, doc = get_json(health)
        assert status == 200
        alpha = doc["feeds"]["alpha"]
        assert (alpha["state"], alpha["connections"] != []) == ("streaming", True)
        assert doc["reload"]["result"] == "failed"
        assert sender.poll() is None  # its connection was never closed
        text = get_text(health, "/metrics")
        assert 'relayd_reloads_total{result="failed"} 3' in text
        assert 'relayd_datagrams_out_total{feed="alpha"} 200' in text

        # A real change on the same port: the listener is handed over, the counters go on.
        write(ttl=3)
        ok = relayd_reload(config_path, relayd.proc.pid)
        assert (ok.returncode, ok.stdout) == (0, "reload 5: ok\n"), ok.stderr
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.settimeout(5)
            assert c.recv(3)[2:3] == b"\x10"  # CHALLENGE from the new feed
        text = get_text(health, "/metrics")
        assert 'relayd_datagrams_out_total{feed="alpha"} 200' in text
        assert 'relayd_reloads_total{result="ok"} 2' in text
        assert not [line for line in relayd.lines if "Traceback" in line or "exc=" in line]
        code, _ = relayd.stop(signal.SIGTERM)
        assert code == 0
    finally:
        if sender is not None:
            if sender.poll() is None:
                sender.kill()
            sender.communicate()
        relayd.kill()


async def test_a_changed_capture_feed_carries_on_its_counters() -> None:
    """A capture feed replaced by a reload (one group added and the interface named, which
    cannot be applied to the running session) starts from the old feed's counters: /metrics
    never goes backwards."""
    from ipaddress import IPv4Address  # noqa: PLC0415

    from relayd.capture import CaptureFeedRuntime  # noqa: PLC0415
    from relayd.netif import open_multicast_sender  # noqa: PLC0415
    from tests.helpers.emit_standin import feed_config  # noqa: PLC0415
    from tests.helpers.loopback import LOOPBACK  # noqa: PLC0415
    from tests.helpers.metrics import value  # noqa: PLC0415

    groups = pick_groups(2)
    nowhere = free_tcp_port()  # the emit side is absent: the feed counts what it receives
    first = feed_config(groups[:1], [nowhere])
    second = feed_config(groups, [nowhere], interface="lo")
    base = Config(health=HealthConfig(listen=Endpoint("127.0.0.1", 0)), capture=(first,))
    sup = Supervisor(Path("x"), base, notifier=quiet_notifier())
    sup.load = lambda _path: attrs.evolve(base, capture=(second,))
    sender = open_multicast_sender(LOOPBACK, 1, True, 1 << 20)

    async def send_and_count(to: list[tuple[str, int]], count: int, want: int) -> None:
        for i in range(count):
            sender.sendto(b"x" * 20, to[i % len(to)])
        with trio.fail_after(10):
            while True:
                text = render_metrics(sup)
                if value(text, "capture_datagrams_in", feed=first.name) >= want:
                    return
                await trio.sleep(0.02)

    r = Running(sup)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(r.run)
            await sup.ready.wait()
            await send_and_count(groups[:1], 50, 50)
            old = sup.slots["capture", first.name].runtime
            await sup.reload()
            assert sup.reloader.reloads["ok"] == 1
            new = sup.slots["capture", first.name].runtime
            assert isinstance(new, CaptureFeedRuntime)
            assert new is not old
            assert {str(g.group) for g in new.config.groups} == {g for g, _ in groups}
            await send_and_count(groups, 40, 90)
            assert value(render_metrics(sup), "capture_datagrams_in", feed=first.name) == 90
            assert value(render_metrics(sup), "capture_bytes_in", feed=first.name) == 90 * 20
            assert IPv4Address(groups[1][0]) in {g.group for g in new.config.groups}
            sup.request_stop()
    finally:
        sender.close()
    assert r.exit_status == 0


def render_metrics(sup: Supervisor) -> str:
    from relayd.metrics import render  # noqa: PLC0415

    return render(sup.samples())


async def test_a_renamed_feed_takes_over_the_listener_of_the_one_it_replaces(
    close_clients: None,
) -> None:
    """Removing feed "a" and adding feed "b" on the same fixed port in one reload: "b" takes
    a duplicate of "a"'s listener before "a" stops (binding anew would find the port in use),
    and starts its own counters."""
    h = Harness()
    port = free_tcp_port()
    sup = Supervisor(
        Path("x"), config(emit("a", port)), factory=h.factory, notifier=quiet_notifier()
    )
    sup.load = lambda _path: config(emit("b", port))
    r = Running(sup)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        await sup.ready.wait()
        client = await echo_client(port)
        await sup.reload()
        assert sup.reloader.reloads["ok"] == 1
        assert (await read_all(client)).startswith(b"BYE 9 feed removed")
        await (await echo_client(port)).aclose()
        assert h.echo("b").served == [1]
        assert list(sup.slots) == [("emit", "b")]
        sup.request_stop()
    assert r.exit_status == 0


async def test_two_emit_feeds_swap_ports_in_one_reload(close_clients: None) -> None:
    """Each changed feed takes over the listener of the feed leaving its new port (a
    duplicate, as from its own predecessor): the reload applies instead of failing with
    "Address already in use", and each feed then answers on the other's old port."""
    from ipaddress import IPv4Network  # noqa: PLC0415

    ports = [free_tcp_port(), free_tcp_port()]

    def real_emit(name: str, port: int) -> EmitFeed:
        return EmitFeed(
            name=name,
            listen=Endpoint("127.0.0.1", port),
            interface="127.0.0.1",
            allowed_sources=(IPv4Network("127.0.0.0/8"),),
            allowed_groups=(IPv4Network("239.255.0.0/16"),),
        )

    before = Config(
        health=HealthConfig(listen=Endpoint("127.0.0.1", 0)),
        emit=(real_emit("a", ports[0]), real_emit("b", ports[1])),
    )
    after = attrs.evolve(before, emit=(real_emit("a", ports[1]), real_emit("b", ports[0])))
    sup = Supervisor(Path("x"), before, notifier=quiet_notifier())
    sup.load = lambda _path: after
    r = Running(sup)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        await sup.ready.wait()
        await sup.reload()
        assert sup.reloader.reloads == {"ok": 1, "invalid": 0, "failed": 0}
        listening = {
            name: sup.slots["emit", name].runtime.listen_port  # type: ignore[union-attr]
            for name in ("a", "b")
        }
        assert listening == {"a": ports[1], "b": ports[0]}
        sup.request_stop()
