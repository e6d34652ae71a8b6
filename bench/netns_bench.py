"""The benchmark's hosts: four network namespaces joined by veth links, always cleaned up.

::

    gen  g0 10.77.1.1 ──── c0 10.77.1.2  cap    (multicast in; capture joins on c0)
    cap  c1 10.77.2.1 ──── e0 10.77.2.2  emit   (the relay's TCP stream)
    emit e1 10.77.3.1 ──── r0 10.77.3.2  recv   (multicast out; emit sends on e1)
    gen  g1 10.77.4.1 ──── r1 10.77.4.2  recv   (the direct path, no relay)

Namespaces are named ``rlyb-<pid>-<random>-<role>``. Every process started here is tracked and
killed by its pid on close; the namespaces are deleted on close, on ``atexit`` and when a run
finds namespaces of a benchmark whose pid is gone (a run that was killed hard).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

PREFIX = "rlyb-"
ROLES = ("gen", "cap", "emit", "recv")


@dataclass(frozen=True)
class Link:
    """One veth pair: device and address on each side."""

    a_ns: str
    a_dev: str
    a_addr: str
    b_ns: str
    b_dev: str
    b_addr: str


# role pairs, device names and /24 subnets of the four links
_LINKS = (
    ("gen", "g0", "cap", "c0", "10.77.1"),
    ("cap", "c1", "emit", "e0", "10.77.2"),
    ("emit", "e1", "recv", "r0", "10.77.3"),
    ("gen", "g1", "recv", "r1", "10.77.4"),
)


def unavailable_reason() -> str | None:
    """Why the benchmark cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth links); run it as root"
    for tool in ("ip", "gcc"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command (Debian: apt-get install iproute2 gcc libc6-dev)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def remove_stale() -> None:
    """Delete benchmark namespaces whose creating process no longer exists."""
    listing = _ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid_text = name[len(PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and not Path(f"/proc/{pid_text}").exists():
            _ip("netns", "del", name, check=False)


class Topology:
    """The four namespaces and four links; a context manager that always tears them down."""

    def __init__(self, nice: int = 0) -> None:
        self.nice = nice
        self.tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.ns = {role: f"{self.tag}-{role}" for role in ROLES}
        self.links: dict[str, Link] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []
        self._closed = False

    def __enter__(self) -> Topology:
        atexit.register(self.close)
        remove_stale()
        try:
            for name in self.ns.values():
                _ip("netns", "add", name)
                self._created.append(name)
                _ip("-n", name, "link", "set", "lo", "up")
            for a_role, a_dev, b_role, b_dev, net in _LINKS:
                a_ns, b_ns = self.ns[a_role], self.ns[b_role]
                _ip("-n", a_ns, "link", "add", a_dev, "type", "veth", "peer", "name", b_dev,
                    "netns", b_ns)  # fmt: skip
                _ip("-n", a_ns, "addr", "add", f"{net}.1/24", "dev", a_dev)
                _ip("-n", b_ns, "addr", "add", f"{net}.2/24", "dev", b_dev)
                _ip("-n", a_ns, "link", "set", a_dev, "up")
                _ip("-n", b_ns, "link", "set", b_dev, "up")
                self.links[a_dev] = Link(a_ns, a_dev, f"{net}.1", b_ns, b_dev, f"{net}.2")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def popen(
        self,
        role: str,
        argv: Sequence[str],
        *,
        stdout: int | IO[Any] | None = subprocess.PIPE,
        stderr: int | IO[Any] | None = subprocess.PIPE,
        cwd: Path | None = None,
    ) -> subprocess.Popen[str]:
        """Start ``argv`` inside a namespace (``ip netns exec`` and ``nice`` exec it: the pid
        is its own), at the topology's nice level."""
        prefix = ["nice", "-n", str(self.nice)] if self.nice else []
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[role], *prefix, *argv],
            stdout=stdout,
            stderr=stderr,
            text=True,
            cwd=cwd,
        )
        self._procs.append(proc)
        return proc

    def run(
        self, role: str, argv: Sequence[str], *, timeout: float, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside a namespace to completion; killed when it overruns."""
        proc = self.popen(role, argv, cwd=cwd)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            out, err = proc.communicate()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            stop(proc)
        for name in self._created:
            _ip("netns", "del", name, check=False)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)


def stop(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
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
