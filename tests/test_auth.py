"""Authenticated feeds end to end on loopback: real sockets, real ``relayd run`` processes.

The capture side is played by a small client built on relayd's own codec, so that each test
can send exactly the HELLO it wants: the right key, a wrong one, none, or a HELLO recorded
from another connection. Datagrams go out as multicast on 127.0.0.1 (loop on) and a receiver
joined to the test's groups counts them.
"""

from __future__ import annotations

import base64
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import trio

from relayd.config import EmitFeed
from relayd.emit import EmitFeedRuntime
from relayd.metrics import render
from relayd.netif import GroupReceiver, drain, open_group_receivers
from relayd.wire import (
    FROM_EMIT,
    Ack,
    Challenge,
    Decoder,
    Error,
    ErrorCode,
    Event,
    encode_datagram,
    encode_hello,
    hello_mac,
)
from tests.helpers.capture_standin import make_config, running
from tests.helpers.metrics import parse
from tests.helpers.metrics import value as metric_value
from tests.helpers.relayd_process import (
    RelaydProcess,
    get_json,
    get_text,
    pick_groups,
    process_toml,
)

FEED = "secure"
LOOPBACK = IPv4Address("127.0.0.1")


def new_key(path: Path) -> bytes:
    """A key file as the docs say to make one: 32 random bytes, base64."""
    text = base64.b64encode(os.urandom(32))
    path.write_bytes(text + b"\n")
    path.chmod(0o400)
    return text


class Client:
    """The capture side of one connection, with a HELLO of the test's choosing."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = Decoder(FROM_EMIT)
        self.events: list[Event] = []

    @classmethod
    @contextmanager
    def connect(cls, port: int) -> Iterator[Client]:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            yield cls(sock)
        finally:
            sock.close()

    def next_event(self, timeout: float = 5.0) -> Event | None:
        """The next frame from the emit side; None at EOF."""
        deadline = time.monotonic() + timeout
        while not self.events:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return None
            self.events.extend(self.decoder.feed(data))
        return self.events.pop(0)

    def challenge(self) -> Challenge:
        event = self.next_event()
        assert isinstance(event, Challenge), event
        return event

    def hello(self, key: bytes | None, session: bytes, feed: str = FEED) -> bytes:
        """Answer the CHALLENGE with a HELLO (mac from ``key``); returns the HELLO sent."""
        challenge = self.challenge()
        mac = hello_mac(key, challenge.nonce, feed, session) if key is not None else b""
        frame = encode_hello(feed, session, mac)
        self.sock.sendall(frame)
        return frame

    def refused(self) -> Error:
        """The ERROR that precedes the close, then EOF."""
        event = self.next_event()
        assert isinstance(event, Error), event
        assert self.next_event() is None
        return event

    def welcome(self) -> int:
        event = self.next_event()
        assert isinstance(event, Ack), event
        return event.seq

    def stream(self, groups: list[tuple[IPv4Address, int]], first: int, count: int) -> None:
        frames = [
            encode_datagram(s, int(groups[s % len(groups)][0]), groups[s % len(groups)][1],
                            time.time_ns(), s.to_bytes(8, "big"))
            for s in range(first, first + count)
        ]  # fmt: skip
        self.sock.sendall(b"".join(frames))

    def acked(self, seq: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = self.next_event(deadline - time.monotonic())
            if isinstance(event, Ack) and event.seq >= seq:
                return
            assert event is not None, "closed before the ACK"
        raise AssertionError(f"no ACK of {seq}")


def receive_all(receivers: list[GroupReceiver], want: int, timeout: float = 5.0) -> list[int]:
    """Sequence numbers of the datagrams received, until ``want`` arrived or ``timeout``."""
    got: list[int] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        for receiver in receivers:
            got += [int.from_bytes(data[:8], "big") for _, _, data, _ in drain(receiver)]
        time.sleep(0.005)
    time.sleep(0.05)
    for receiver in receivers:
        got += [int.from_bytes(data[:8], "big") for _, _, data, _ in drain(receiver)]
    return got


@contextmanager
def receivers(groups: list[tuple[IPv4Address, int]]) -> Iterator[list[GroupReceiver]]:
    opened = open_group_receivers(groups, LOOPBACK, 4 * 1024 * 1024)
    try:
        yield opened
    finally:
        for receiver in opened:
            receiver.close()


def emit_config(keys: tuple[Path, ...]) -> EmitFeed:
    return make_config(name=FEED, auth_key_files=keys, send_buffer=4 * 1024**2)


def rejected(feed: EmitFeedRuntime, reason: str) -> float:
    return metric_value(render(feed.samples()), "connections_rejected", feed=FEED, reason=reason)


async def in_thread(fn: Any, *args: Any) -> Any:
    """Blocking client code off the Trio thread, so the feed keeps running meanwhile."""
    return await trio.to_thread.run_sync(fn, *args)


# -- one emit feed in process ----------------------------------------------------------------


async def test_right_key_streams_wrong_or_missing_key_is_refused_and_counted(
    tmp_path: Path,
) -> None:
    key = new_key(tmp_path / "feed.key")
    groups = [(IPv4Address(g), p) for g, p in pick_groups(3)]
    with trio.fail_after(20), receivers(groups) as rx:
        async with running(emit_config((tmp_path / "feed.key",))) as feed:
            assert feed.listen_port is not None
            port = feed.listen_port

            def announces() -> bool:
                with Client.connect(port) as client:
                    return client.challenge().auth_required

            def streams() -> list[int]:
                with Client.connect(port) as client:
                    client.hello(key, os.urandom(16))
                    assert client.welcome() == 0
                    client.stream(groups, 1, 200)
                    client.acked(200)
                return receive_all(rx, 200)

            assert await in_thread(announces) is True
            got = await in_thread(streams)
            assert sorted(got) == list(range(1, 201))

            def refused(hello_key: bytes | None, pipelined: bool = False) -> Error:
                with Client.connect(port) as client:
                    client.hello(hello_key, os.urandom(16))
                    if pipelined:  # DATA right behind the HELLO, before any welcome
                        client.stream(groups, 1000, 10)
                    return client.refused()

            altered = key[:-1] + (b"A" if key[-1:] != b"A" else b"B")
            for bad in (b"w" * 44, None, altered):
                error = await in_thread(refused, bad)
                assert error.code == ErrorCode.AUTH_FAILED
            # Pipelined DATA is refused too (as a protocol error: DATA before the welcome is
            # decoded in the same chunk as the HELLO) and never emitted.
            error = await in_thread(refused, b"w" * 44, True)
            assert error.code in (ErrorCode.AUTH_FAILED, ErrorCode.PROTOCOL)
            # Whether the DATA came in the HELLO's read decides which refusal it is; the count
            # follows the refusal the peer was told.
            assert rejected(feed, "auth") == (4 if error.code == ErrorCode.AUTH_FAILED else 3)
            assert await in_thread(receive_all, rx, 1, 0.3) == []
            assert feed.health().healthy


async def test_recorded_hello_cannot_be_replayed(tmp_path: Path) -> None:
    key = new_key(tmp_path / "feed.key")
    with trio.fail_after(20):
        async with running(emit_config((tmp_path / "feed.key",))) as feed:
            assert feed.listen_port is not None
            port = feed.listen_port

            def replay() -> tuple[int, Error]:
                session = os.urandom(16)
                with Client.connect(port) as first:
                    recorded = first.hello(key, session)
                    welcome = first.welcome()
                # An eavesdropper sends the recorded HELLO on a new connection.
                with Client.connect(port) as second:
                    second.challenge()
                    second.sock.sendall(recorded)
                    return welcome, second.refused()

            welcome, error = await in_thread(replay)
            assert welcome == 0
            assert error.code == ErrorCode.AUTH_FAILED
            assert rejected(feed, "auth") == 1


async def test_failed_authentication_logs_are_rate_limited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    new_key(tmp_path / "feed.key")
    caplog.set_level(logging.INFO, logger="relayd.emit")
    attempts = 100
    with trio.fail_after(30):
        async with running(emit_config((tmp_path / "feed.key",))) as feed:
            assert feed.listen_port is not None
            port = feed.listen_port

            def storm() -> None:
                for _ in range(attempts):
                    with Client.connect(port) as client:
                        client.hello(os.urandom(32), os.urandom(16))
                        assert client.refused().code == ErrorCode.AUTH_FAILED

            await in_thread(storm)
            assert rejected(feed, "auth") == attempts
    lines = [r for r in caplog.records if "authentication failed" in r.getMessage()]
    assert 1 <= len(lines) <= 3, [r.getMessage() for r in lines]


# -- relayd run: rotation by reload, a key that arrives late ---------------------------------


def _emit_toml(name: str, keys: list[Path]) -> str:
    files = ", ".join(f'"{k}"' for k in keys)
    return f"""
[[emit]]
name = "{name}"
listen = "127.0.0.1:0"
interface = "127.0.0.1"
loop = true
ttl = 1
allowed_sources = ["127.0.0.0/8"]
allowed_groups = ["239.255.0.0/16"]
idle_timeout = "30s"
auth_key_files = [{files}]
"""


def _plain_toml(name: str) -> str:
    return _emit_toml(name, []).replace("auth_key_files = []\n", "")


def _feed_port(health: int, name: str, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        _, doc = get_json(health, f"/healthz/{name}")
        listen = doc["feeds"][name].get("listen")
        if listen and not listen.endswith(":0"):
            return int(listen.rsplit(":", 1)[1])
        if time.monotonic() > deadline:
            raise AssertionError(f"feed {name} never listened: {doc}")
        time.sleep(0.1)


@pytest.fixture
def relayd_runs() -> Iterator[list[RelaydProcess]]:
    started: list[RelaydProcess] = []
    yield started
    for proc in started:
        proc.kill()


def test_key_rotation_by_reload(tmp_path: Path, relayd_runs: list[RelaydProcess]) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    old = new_key(keys / "old.key")
    config = tmp_path / "relayd.toml"
    # Relative key paths: relative to the configuration file's directory.
    config.write_text(process_toml(_emit_toml(FEED, [Path("keys/old.key")])))
    relayd = RelaydProcess(config, {})
    relayd_runs.append(relayd)
    health = relayd.health_port()
    relayd.wait_line("ready")
    port = _feed_port(health, FEED)
    groups = [(IPv4Address(g), p) for g, p in pick_groups(2)]

    def reload(keys_now: list[str]) -> None:
        config.write_text(process_toml(_emit_toml(FEED, [Path(k) for k in keys_now])))
        mark = len(relayd.lines)
        relayd.proc.send_signal(signal.SIGHUP)
        relayd.wait_line("reload: nothing changed", start=mark)

    def attempt(key: bytes) -> Error | int:
        with Client.connect(port) as client:
            client.hello(key, os.urandom(16))
            event = client.next_event()
            if isinstance(event, Ack):
                return event.seq
            assert isinstance(event, Error), event
            return event

    with receivers(groups) as rx, Client.connect(port) as long_lived:
        long_lived.hello(old, session := os.urandom(16))
        assert long_lived.welcome() == 0
        long_lived.stream(groups, 1, 100)
        long_lived.acked(100)

        new = new_key(keys / "new.key")
        reload(["keys/old.key", "keys/new.key"])  # both accepted during the change
        assert attempt(old) == 0
        assert attempt(new) == 0
        # The streaming connection was not restarted by the reload.
        long_lived.stream(groups, 101, 100)
        long_lived.acked(200)

        reload(["keys/new.key"])  # the old key is retired
        refused = attempt(old)
        assert isinstance(refused, Error)
        assert refused.code == ErrorCode.AUTH_FAILED
        assert attempt(new) == 0
        long_lived.stream(groups, 201, 100)
        long_lived.acked(300)

        # Rewriting a key file in place and reloading takes its new bytes too.
        newer = new_key_in_place(keys / "new.key")
        reload(["keys/new.key"])
        assert isinstance(attempt(new), Error)
        assert attempt(newer) == 0
        got = receive_all(rx, 300)
        assert sorted(got) == list(range(1, 301)), "datagrams lost or duplicated"
        assert session  # the one session streamed throughout
    families = parse(get_text(health, "/metrics"))  # a running relayd's, parsed independently
    assert metric_value(families, "connections_rejected_total", feed=FEED, reason="auth") == 2
    assert metric_value(families, "feed_restarts_total", feed="secure", kind="emit") == 0


def new_key_in_place(path: Path) -> bytes:
    path.chmod(0o600)
    return new_key(path)


def test_key_provisioned_after_start(tmp_path: Path, relayd_runs: list[RelaydProcess]) -> None:
    key_file = tmp_path / "late.key"
    config = tmp_path / "relayd.toml"
    config.write_text(process_toml(_emit_toml(FEED, [key_file]), _plain_toml("open")))
    check = subprocess.run(
        [sys.executable, "-m", "relayd", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    assert check.stderr == (
        f"{config}: warning: key file {key_file} does not exist yet; feed {FEED!r} will not"
        f" start until it does @ $.emit[0].auth_key_files[0]\n"
    )

    relayd = RelaydProcess(config, {})
    relayd_runs.append(relayd)
    health = relayd.health_port()
    relayd.wait_line("ready")
    status, doc = get_json(health, "/healthz")
    assert status == 503
    secure, open_feed = doc["feeds"][FEED], doc["feeds"]["open"]
    assert secure["healthy"] is False
    assert secure["state"] == "failed"
    assert "does not exist" in secure["last_error"]
    assert "retry_in_seconds" in secure
    assert open_feed["healthy"] is True  # the other feed is unaffected

    key = new_key(key_file)  # provisioned later (user data, a secrets agent)
    port = _feed_port(health, FEED, timeout=40.0)
    deadline = time.monotonic() + 10
    while get_json(health, "/healthz")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert get_json(health, "/healthz")[0] == 200
    with Client.connect(port) as client:
        client.hello(key, os.urandom(16))
        assert client.welcome() == 0
    assert relayd.proc.poll() is None


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"too-short\n", "holds fewer than 16 bytes"), (None, "Is a directory")],
)
def test_unusable_key_file_is_a_config_error(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    key_file = tmp_path / "bad.key"
    if content is None:
        key_file.mkdir()
    else:
        key_file.write_bytes(content)
    config = tmp_path / "relayd.toml"
    config.write_text(process_toml(_emit_toml(FEED, [Path("bad.key")])))
    for command in ("check-config", "run"):
        result = subprocess.run(
            [sys.executable, "-m", "relayd", command, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 2, (command, result.stderr)
        assert message in result.stderr
        assert "@ $.emit[0].auth_key_files[0]" in result.stderr


def test_a_fifo_key_file_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO where a key file should be (no writer): refused with a clear error instead of
    blocking the open for ever (which hung a reload, and stop behind it). In a child process,
    so that the old behaviour fails the test by its timeout instead of hanging the run."""
    fifo = tmp_path / "feed.key"
    os.mkfifo(fifo)
    code = (
        "import sys\n"
        "from relayd.keys import KeyFileError, load_auth_keys\n"
        "try:\n"
        "    load_auth_keys([sys.argv[1]])\n"
        "except KeyFileError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(fifo)],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    assert result.stdout == f"cannot read key file {fifo}: not a regular file (a FIFO)\n"
