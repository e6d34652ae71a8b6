"""Helpers for tests that run ``relayd run`` as a child process (also inside namespaces)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.helpers.loopback import free_tcp_port, free_udp_port

PEER = Path(__file__).resolve().parent / "run_peer.py"


class RelaydProcess:
    """``relayd run`` in a child process; stderr collected line by line."""

    def __init__(self, config_path: Path, env: dict[str, str], prefix: Sequence[str] = ()) -> None:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        full_env.pop("JOURNAL_STREAM", None)
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "relayd", "run", "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=full_env,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    m = regex.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no line matching {pattern!r} in:\n" + "\n".join(self.lines)
                    )
                self._cond.wait(min(left, 0.1))

    def health_port(self) -> int:
        return int(self.wait_line(r"health server listening on [\d.]+:(\d+)").group(1))

    def healthy_port(self, timeout: float) -> int:
        """The health port, once ``/healthz`` answers 200 (fails after ``timeout`` seconds)."""
        health = self.health_port()
        deadline = time.monotonic() + timeout
        while get_json(health)[0] != 200:
            assert time.monotonic() < deadline, self.lines
            time.sleep(0.1)
        return health

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> tuple[int, float]:
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._reader.join(2)
        return code, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(2)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class NotifyListener:
    """A systemd-style notify socket (a path, so it works from any network namespace) read
    by a thread as systemd would, so the sender never finds its queue full."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self._dir.name, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._cursor = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append(data.decode())
                self._cond.notify_all()

    def wait(self, want: str, timeout: float = 30.0) -> list[str]:
        """Messages since the last wait, up to and including the first containing ``want``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(self._cursor, len(self.messages)):
                    if want in self.messages[i]:
                        got = self.messages[self._cursor : i + 1]
                        self._cursor = i + 1
                        return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {want!r} in {self.messages[self._cursor :]}")
                self._cond.wait(min(left, 0.1))

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self.sock.close()
        self._dir.cleanup()


def get_json(port: int, path: str = "/healthz") -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def get_text(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        body: bytes = response.read()
    return body.decode()


def pick_groups(count: int) -> list[tuple[str, int]]:
    port = free_udp_port()
    base = random.randrange(1, 250)
    return [(f"239.255.{base}.{i + 1}", port) for i in range(count)]


def emit_toml(
    name: str,
    *,
    listen: str = "127.0.0.1:0",
    interface: str = "127.0.0.1",
    ttl: int = 16,
    loop: bool = True,
    sources: str = "127.0.0.0/8",
    groups: str = "239.255.0.0/16",
) -> str:
    return f"""
[[emit]]
name = "{name}"
listen = "{listen}"
interface = "{interface}"
loop = {"true" if loop else "false"}
ttl = {ttl}
allowed_sources = ["{sources}"]
allowed_groups = ["{groups}"]
idle_timeout = "30s"
"""


def process_toml(*feeds: str, health: str = "127.0.0.1:0", level: str = "info") -> str:
    return f'[process]\nlog_level = "{level}"\n\n[health]\nlisten = "{health}"\n' + "".join(feeds)


def feed_port(health_port: int, name: str) -> int:
    _, doc = get_json(health_port, f"/healthz/{name}")
    return int(doc["feeds"][name]["listen"].rsplit(":", 1)[1])


def peer_argv(*args: str) -> list[str]:
    return [sys.executable, str(PEER), *args]


def groups_arg(groups: Sequence[tuple[str, int]]) -> str:
    return ",".join(f"{g}:{p}" for g, p in groups)


def loopback_pair_toml(groups: Sequence[tuple[str, int]], capture_extra: str = "") -> str:
    """A process running an emit and a capture feed named "kit", each other's peer on
    loopback. The sender, the emit feed and so the capture feed's source-specific joins use
    three loopback addresses: the emit feed's copies are not captured again.
    ``capture_extra``: more lines for the capture feed's table."""
    port = free_tcp_port()
    group_list = ", ".join(f'"{g}:{p}"' for g, p in groups)
    return process_toml(
        f"""
[[emit]]
name = "kit"
listen = "127.0.0.1:{port}"
interface = "127.0.0.3"
allowed_sources = ["127.0.0.0/8"]
allowed_groups = ["239.255.0.0/16"]

[[capture]]
name = "kit"
interface = "127.0.0.1"
groups = [{group_list}]
targets = ["127.0.0.1:{port}"]
sources = ["127.0.0.2"]
{capture_extra}"""
    )
