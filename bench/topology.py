"""The benchmark's hosts: four network namespaces joined by veth links, made with the test
suite's namespace harness (tests/helpers/netns.py), which names, tracks and always deletes them.

::

    gen  g0 10.77.1.1 ──── c0 10.77.1.2  cap    (multicast in; capture joins on c0)
    cap  c1 10.77.2.1 ──── e0 10.77.2.2  emit   (the relay's TCP stream)
    emit e1 10.77.3.1 ──── r0 10.77.3.2  recv   (multicast out; emit sends on e1)
    gen  g1 10.77.4.1 ──── r1 10.77.4.2  recv   (the direct path, no relay)

Processes run at one nice level for all (``nice``), with text pipes, and are killed on close;
``pins`` pins every process of a namespace to CPUs (``taskset``), e.g. the generator's and the
receiver's.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tests.helpers import netns
from tests.helpers.netns import Link, Netns, NetnsHarness
from tests.helpers.netns import stop_process as stop

__all__ = ["Topology", "cannot_run", "stop", "unavailable_reason"]

ROLES = ("gen", "cap", "emit", "recv")
# role pairs, device names and /24 subnets of the four links
_LINKS = (
    ("gen", "g0", "cap", "c0", "10.77.1"),
    ("cap", "c1", "emit", "e0", "10.77.2"),
    ("emit", "e1", "recv", "r0", "10.77.3"),
    ("gen", "g1", "recv", "r1", "10.77.4"),
)


def unavailable_reason() -> str | None:
    """Why the benchmark cannot run here, or None when it can."""
    reason = netns.unavailable_reason()
    if reason is not None:
        return f"{reason} (run it as root)"
    if shutil.which("gcc") is None:
        return "needs the 'gcc' command (Debian: apt-get install gcc libc6-dev)"
    return None


def cannot_run(prog: str) -> bool:
    """True, after printing why, when the benchmark ``prog`` cannot run here (it then exits 0)."""
    reason = unavailable_reason()
    if reason is not None:
        print(f"{prog}: skipped: {reason}")
    return reason is not None


class Topology:
    """The four namespaces and four links; a context manager that always tears them down."""

    def __init__(self, nice: int = 0, pins: dict[str, str] | None = None) -> None:
        self.nice = nice
        self.pins = dict(pins or {})  # role -> taskset CPU list of every process started there
        self.ns: dict[str, Netns] = {}
        self.links: dict[str, Link] = {}
        self._net: NetnsHarness | None = None

    def __enter__(self) -> Topology:
        self._net = net = NetnsHarness()
        try:
            self.ns = {role: net.namespace(role) for role in ROLES}
            for a_role, a_dev, b_role, b_dev, subnet in _LINKS:
                self.links[a_dev] = net.link(
                    self.ns[a_role], self.ns[b_role],
                    a_addr=f"{subnet}.1/24", b_addr=f"{subnet}.2/24", a_dev=a_dev, b_dev=b_dev,
                )  # fmt: skip
        except BaseException:
            net.close()
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
        is its own), at the topology's nice level, pinned as ``pins`` says for ``role``."""
        assert self._net is not None, "the topology is not open"
        prefix = ["nice", "-n", str(self.nice)] if self.nice else []
        if role in self.pins:
            prefix += ["taskset", "-c", self.pins[role]]
        proc = subprocess.Popen(
            self.ns[role].argv([*prefix, *argv]), stdout=stdout, stderr=stderr, text=True, cwd=cwd
        )
        self._net.track(proc)
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
        """Kill every process started here, then delete the namespaces. Idempotent."""
        if self._net is not None:
            self._net.close()
