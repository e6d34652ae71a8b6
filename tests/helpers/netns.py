"""Network-namespace test harness: real hosts joined by veth links, always cleaned up.

    with NetnsHarness() as net:          # or the ``netns`` pytest fixture
        dc, cust = net.namespace("dc"), net.namespace("cust")
        link = net.link(dc, cust)         # veth pair, addresses, links up
        dc.add_multicast_route(link.a_dev)
        proc = cust.popen(cust.relayd_argv("listen", "239.1.1.1:6100"), stdout=PIPE)

Namespaces are named ``rlyt-<pid>-<random>-<label>``, so parallel runs never collide and a
later run can find (and delete) namespaces left behind by a run that crashed: their pid is
gone. Every process started through a ``Netns`` is tracked; ``close()`` (the context manager,
the fixture teardown, and an ``atexit`` hook) kills them, kills anything else still inside the
harness's namespaces, and deletes the namespaces, also when the test failed.

Run as a script, ``python tests/helpers/netns.py sniff --dev D --proto N --duration S`` prints
the IPv4 packets of protocol N seen on device D as JSON lines (used inside a namespace to
capture IGMP).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import attrs
import trio

PREFIX = "rlyt-"
REPO_ROOT = Path(__file__).resolve().parents[2]
HARNESS_FILE = Path(__file__).resolve()

_unavailable: list[str | None] = []  # cached answer of unavailable_reason()
_open_harnesses: list[NetnsHarness] = []
_stale_checked: set[int] = set()  # pids that already looked for stale namespaces


class NetnsError(Exception):
    """A namespace command failed."""


def _ip(*args: str, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def unavailable_reason() -> str | None:
    """Why namespace tests cannot run here (None when they can). Cached."""
    if _unavailable:
        return _unavailable[0]
    reason: str | None = None
    if not sys.platform.startswith("linux"):
        reason = "network namespaces need Linux"
    elif os.geteuid() != 0:
        reason = "network namespaces need root"
    elif shutil.which("ip") is None:
        reason = "the ip command (iproute2) is not installed"
    else:
        probe = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}-probe"
        created = _ip("netns", "add", probe, check=False)
        if created.returncode != 0:
            reason = f"cannot create a network namespace: {created.stderr.strip()}"
        else:
            _ip("netns", "del", probe, check=False)
    _unavailable.append(reason)
    return reason


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespace_pids(name: str) -> list[int]:
    proc = _ip("netns", "pids", name, check=False)
    return [int(word) for word in proc.stdout.split() if word.isdigit()]


def _kill_namespace_processes(name: str, grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL, every process inside namespace ``name`` (made by this harness)."""
    pids = _namespace_pids(name)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if _pid_alive(pid)]
            if pids:
                time.sleep(0.02)
        if not pids:
            return


def list_harness_namespaces() -> list[str]:
    """Names of every namespace this harness made (any run) that still exists."""
    proc = _ip("netns", "list", check=False)
    names = []
    for line in proc.stdout.splitlines():
        name = line.split(" ", 1)[0]
        if name.startswith(PREFIX):
            names.append(name)
    return names


def cleanup_stale() -> list[str]:
    """Delete namespaces left by earlier runs whose process is gone; returns their names."""
    removed = []
    for name in list_harness_namespaces():
        pid_text = name[len(PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        _kill_namespace_processes(name)
        if _ip("netns", "del", name, check=False).returncode == 0:
            removed.append(name)
    return removed


_HTTP_GET = r"""
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as reply:
        status, body = reply.status, reply.read()
except urllib.error.HTTPError as exc:
    status, body = exc.code, exc.read()
sys.stdout.write(f"{status}\n{body.decode()}")
"""


@attrs.define(eq=False)
class Link:
    """A veth pair: ``a_dev`` in namespace ``a``, ``b_dev`` in namespace ``b``."""

    a: Netns
    a_dev: str
    a_addr: IPv4Interface
    b: Netns
    b_dev: str
    b_addr: IPv4Interface

    @property
    def a_ip(self) -> str:
        return str(self.a_addr.ip)

    @property
    def b_ip(self) -> str:
        return str(self.b_addr.ip)

    def set_up(self, up: bool = True) -> None:
        """Bring both ends up or down (cut the path without removing the link)."""
        state = "up" if up else "down"
        self.a.run(["ip", "link", "set", self.a_dev, state])
        self.b.run(["ip", "link", "set", self.b_dev, state])


@attrs.define(eq=False)
class Netns:
    """One network namespace: run commands and start processes inside it."""

    name: str
    label: str
    harness: NetnsHarness

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` wrapped to run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(
        self,
        cmd: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside, wait for it (text output captured); raise on failure."""
        proc = subprocess.run(
            self.argv(cmd),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=input,
        )
        if check and proc.returncode != 0:
            raise NetnsError(
                f"[{self.label}] {' '.join(cmd)} exited {proc.returncode}:"
                f" {proc.stderr.strip()} {proc.stdout.strip()}"
            )
        return proc

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``cmd`` inside (``subprocess.Popen`` keywords); killed at harness close."""
        kwargs.setdefault("env", _child_env())
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.argv(cmd), **kwargs)
        self.harness.track(proc)
        return proc

    async def open_process(self, cmd: Sequence[str], **kwargs: Any) -> trio.Process:
        """Start ``cmd`` inside as a ``trio.Process``; killed at harness close."""
        kwargs.setdefault("env", _child_env())
        proc = await trio.lowlevel.open_process(self.argv(cmd), **kwargs)
        self.harness.track(proc)
        return proc

    @staticmethod
    def python_argv(*args: str) -> list[str]:
        """The test's own Python (the venv's) with ``args``."""
        return [sys.executable, *args]

    @staticmethod
    def relayd_argv(*args: str) -> list[str]:
        """``python -m relayd args...`` with the test's Python."""
        return [sys.executable, "-m", "relayd", *args]

    def http_get(self, url: str, timeout: float = 5.0) -> tuple[int, str]:
        """(status, body) of a GET of ``url`` from inside this namespace."""
        out = self.run(self.python_argv("-c", _HTTP_GET, url, str(timeout)), timeout=timeout + 15)
        status, _, body = out.stdout.partition("\n")
        return int(status), body

    def sysctl(self, key: str, value: str | int) -> None:
        """Set a sysctl inside this namespace (``net.*`` keys are per namespace)."""
        path = "/proc/sys/" + key.replace(".", "/")
        self.run(["sh", "-c", 'echo "$1" > "$2"', "sysctl", str(value), path])

    def read_sysctl(self, key: str) -> str:
        path = "/proc/sys/" + key.replace(".", "/")
        return self.run(["cat", path]).stdout.strip()

    def add_multicast_route(self, dev: str) -> None:
        """Route 224.0.0.0/4 out of ``dev`` (multicast sent without IP_MULTICAST_IF)."""
        self.run(["ip", "route", "replace", "224.0.0.0/4", "dev", dev])

    def address(self, dev: str) -> IPv4Address:
        """The first IPv4 address of ``dev``."""
        out = json.loads(self.run(["ip", "-j", "-4", "addr", "show", "dev", dev]).stdout)
        for entry in out:
            for info in entry.get("addr_info", []):
                if info.get("family") == "inet":
                    return IPv4Address(info["local"])
        raise NetnsError(f"[{self.label}] {dev} has no IPv4 address")

    def sniffer(self, dev: str, proto: int, duration: float, count: int = 0) -> Sniffer:
        """Capture IPv4 packets of protocol ``proto`` on ``dev`` for ``duration`` seconds, or
        until ``count`` packets (when > 0) were seen. Returns once the capture is running."""
        proc = self.popen(
            self.python_argv(
                str(HARNESS_FILE), "sniff", "--dev", dev, "--proto", str(proto),
                "--duration", str(duration), "--count", str(count),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        sniffer = Sniffer(proc)
        line = read_line(proc, timeout=10.0)
        if line.strip() != "ready":
            raise NetnsError(f"[{self.label}] sniffer did not start: {line!r}")
        return sniffer


@attrs.define
class Sniffer:
    """A running ``sniff`` helper; ``packets()`` waits for its end and returns what it saw."""

    proc: subprocess.Popen[bytes]

    def packets(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        out, err = self.proc.communicate(timeout=timeout)
        if self.proc.returncode != 0:
            raise NetnsError(f"sniffer failed: {err.decode(errors='replace')}")
        return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


def read_line(proc: subprocess.Popen[bytes], timeout: float, *, stderr: bool = False) -> str:
    """One line of ``proc``'s stdout (or stderr) within ``timeout`` seconds (NetnsError
    otherwise). Reads the pipe unbuffered, so ``communicate()`` later still sees the rest."""
    stream = proc.stderr if stderr else proc.stdout
    if stream is None:
        raise NetnsError("the process has no such pipe")
    return _read_line(stream, timeout)


def _read_line(stream: IO[bytes], timeout: float) -> str:
    fd = stream.fileno()  # read the fd itself: nothing may sit in a Python buffer
    deadline = time.monotonic() + timeout
    chunks = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NetnsError(f"no complete line within {timeout} s (got {chunks!r})")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        byte = os.read(fd, 1)
        if not byte:
            raise NetnsError(f"end of output before a complete line (got {chunks!r})")
        chunks += byte
        if byte == b"\n":
            return chunks.decode(errors="replace")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) if not path else f"{REPO_ROOT}{os.pathsep}{path}"
    return env


class NetnsHarness:
    """Creates namespaces and veth links; ``close()`` removes everything it made."""

    def __init__(self) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise NetnsError(reason)
        if os.getpid() not in _stale_checked:
            _stale_checked.add(os.getpid())
            cleanup_stale()
        self.token = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.namespaces: list[Netns] = []
        self.links: list[Link] = []
        self._processes: list[subprocess.Popen[Any] | trio.Process] = []
        self._subnet = 0
        self.closed = False
        _open_harnesses.append(self)

    def __enter__(self) -> NetnsHarness:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def namespace(self, label: str) -> Netns:
        """A new namespace with its loopback up."""
        if not label.replace("_", "").isalnum():
            raise ValueError(f"namespace label {label!r} must be alphanumeric")
        netns = Netns(name=f"{PREFIX}{self.token}-{label}", label=label, harness=self)
        _ip("netns", "add", netns.name)
        self.namespaces.append(netns)
        netns.run(["ip", "link", "set", "lo", "up"])
        return netns

    def link(
        self,
        a: Netns,
        b: Netns,
        *,
        a_addr: str | None = None,
        b_addr: str | None = None,
        a_dev: str | None = None,
        b_dev: str | None = None,
    ) -> Link:
        """A veth pair between ``a`` and ``b`` with addresses (default: the next 10.99.N.0/24,
        .1 on ``a``, .2 on ``b``); devices named ``v-<peer label>`` unless given; both up."""
        if a_addr is None or b_addr is None:
            self._subnet += 1
            if self._subnet > 250:
                raise NetnsError("out of automatic subnets")
            a_addr = a_addr or f"10.99.{self._subnet}.1/24"
            b_addr = b_addr or f"10.99.{self._subnet}.2/24"
        a_dev = a_dev or f"v-{b.label}"[:15]
        b_dev = b_dev or f"v-{a.label}"[:15]
        _ip(
            "link", "add", a_dev, "netns", a.name, "type", "veth",
            "peer", "name", b_dev, "netns", b.name,
        )  # fmt: skip
        link = Link(a, a_dev, IPv4Interface(a_addr), b, b_dev, IPv4Interface(b_addr))
        for netns, dev, addr in ((a, a_dev, a_addr), (b, b_dev, b_addr)):
            netns.run(["ip", "addr", "add", addr, "dev", dev])
            netns.run(["ip", "link", "set", dev, "up"])
        self.links.append(link)
        return link

    def track(self, proc: subprocess.Popen[Any] | trio.Process) -> None:
        """Kill ``proc`` at close (for processes started inside without ``Netns.popen``)."""
        self._processes.append(proc)

    def close(self) -> None:
        """Kill every process started here, then delete every namespace. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for proc in self._processes:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, OSError):
                    proc.terminate()
        deadline = time.monotonic() + 3.0
        for proc in self._processes:
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, OSError):
                    proc.kill()
                end = time.monotonic() + 2.0
                while proc.poll() is None and time.monotonic() < end:
                    time.sleep(0.02)
        for netns in self.namespaces:
            _kill_namespace_processes(netns.name)
            _ip("netns", "del", netns.name, check=False)
        for proc in self._processes:
            if isinstance(proc, subprocess.Popen):
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    if stream is not None:
                        with contextlib.suppress(OSError):
                            stream.close()
        if self in _open_harnesses:
            _open_harnesses.remove(self)


@atexit.register
def _close_open_harnesses() -> None:
    for harness in list(_open_harnesses):
        harness.close()


def stop_process(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """SIGTERM a process we started (by its pid), SIGKILL it when it does not exit in time."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


@contextlib.contextmanager
def harness() -> Iterator[NetnsHarness]:
    """``with harness() as net:`` the same as ``with NetnsHarness() as net:``."""
    with NetnsHarness() as net:
        yield net


# ---- the sniff helper, run inside a namespace --------------------------------------------

_ETH_P_IP = 0x0800


def _sniff(dev: str, proto: int, duration: float, count: int) -> int:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(_ETH_P_IP))
    sock.bind((dev, _ETH_P_IP))
    print("ready", flush=True)
    deadline = time.monotonic() + duration
    seen = 0
    while (remaining := deadline - time.monotonic()) > 0 and not 0 < count <= seen:
        sock.settimeout(remaining)
        try:
            packet, address = sock.recvfrom(65535)
        except TimeoutError:
            break
        if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != proto:
            continue
        header = (packet[0] & 0x0F) * 4
        record = {
            "src": str(IPv4Address(packet[12:16])),
            "dst": str(IPv4Address(packet[16:20])),
            "proto": packet[9],
            "outgoing": address[2] == socket.PACKET_OUTGOING,
            "payload": packet[header:].hex(),
        }
        print(json.dumps(record), flush=True)
        seen += 1
    return 0


def _script(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="namespace test helpers")
    commands = parser.add_subparsers(dest="command", required=True)
    sniff = commands.add_parser("sniff", help="print IPv4 packets of one protocol as JSON")
    sniff.add_argument("--dev", required=True)
    sniff.add_argument("--proto", type=int, required=True)
    sniff.add_argument("--duration", type=float, required=True)
    sniff.add_argument("--count", type=int, default=0, help="stop after this many (0: no limit)")
    args = parser.parse_args(argv)
    return _sniff(args.dev, args.proto, args.duration, args.count)


if __name__ == "__main__":
    sys.exit(_script())
