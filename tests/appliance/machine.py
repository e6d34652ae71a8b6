"""Boot the appliance under systemd-nspawn: install once, then boot fresh overlays of it.

Layers, bottom up: the cached Debian 12 rootfs (``rootfs.py``), an install layer made by running
``packer/scripts/install.sh`` in a container on top of it, and one throw-away upper layer per
boot holding that boot's network and relayd config. Nothing of a boot survives it.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The Packer build's provisioning scripts (packer/scripts/), in its order.
PROVISION = ("install", "ecs-agent", "validate", "cleanup")
# Mount points inside the install container (its /run is a fresh tmpfs, so nothing is left).
IN_DIST = "/run/relayd-install/dist"
IN_WHEELHOUSE = "/run/relayd-install/wheelhouse"
IN_TREE = "/run/relayd-install/tree"

GUEST_IF = "host0"


class MachineError(Exception):
    """A container step failed; the message carries the output that explains it."""


def host_run(
    cmd: Sequence[str], *, timeout: float, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    if check and proc.returncode != 0:
        raise MachineError(
            f"{' '.join(cmd)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def build_wheel(dest: Path, source: Path = REPO, env: dict[str, str] | None = None) -> Path:
    """Build the relayd wheel from ``source`` (this checkout), as `make dist` does."""
    host_run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--wheel-dir",
            str(dest),
            str(source),
        ],
        timeout=300,
        env=env,
    )
    wheels = sorted(dest.glob("relayd-*.whl"))
    if len(wheels) != 1:
        raise MachineError(f"expected one relayd wheel in the build output, got {wheels}")
    return wheels[0]


def fill_wheelhouse(wheel: Path, dest: Path) -> None:
    """Download the wheel's dependencies on the host: pip inside the rootfs is offline."""
    host_run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--dest",
            str(dest),
            str(wheel),
        ],
        timeout=300,
    )


def mount_overlay(lower: Sequence[Path], upper: Path, work: Path, merged: Path) -> None:
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    lowerdir = ":".join(str(p) for p in lower)
    host_run(
        [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={lowerdir},upperdir={upper},workdir={work}",
            str(merged),
        ],
        timeout=30,
    )


def unmount(path: Path) -> None:
    if os.path.ismount(path):
        proc = host_run(["umount", str(path)], timeout=30, check=False)
        if proc.returncode != 0:
            host_run(["umount", "--lazy", str(path)], timeout=30, check=False)


def install_layer(base: Path, layer: Path, wheel_dir: Path, wheelhouse: Path) -> str:
    """Run install.sh, validate.sh and cleanup.sh, as the Packer build does, in a container over
    ``base``; the files they write land in ``layer``. Then enable systemd-networkd, which the
    test's network uses (the AMI has its own network set-up). Returns the scripts' output."""
    scratch = Path(tempfile.mkdtemp(prefix="relayd-install-"))
    merged = scratch / "merged"
    try:
        mount_overlay([base], layer, scratch / "work", merged)
        script = "; ".join(
            [
                "set -e",
                *(f"bash {IN_TREE}/packer/scripts/{name}.sh" for name in PROVISION),
                "systemctl enable systemd-networkd.service",
            ]
        )
        return host_run(
            [
                "systemd-nspawn",
                "--quiet",
                "--register=no",
                "--keep-unit",
                "--pipe",
                "-D",
                str(merged),
                f"--bind-ro={wheel_dir}:{IN_DIST}",
                f"--bind-ro={wheelhouse}:{IN_WHEELHOUSE}",
                f"--bind-ro={REPO}:{IN_TREE}",
                f"--setenv=RELAYD_WHEEL_DIR={IN_DIST}",
                f"--setenv=RELAYD_WHEELHOUSE={IN_WHEELHOUSE}",
                f"--setenv=RELAYD_TREE={IN_TREE}",
                "/bin/bash",
                "-c",
                script,
            ],
            timeout=300,
        ).stdout
    finally:
        unmount(merged)
        shutil.rmtree(scratch, ignore_errors=True)


def _free_subnet() -> tuple[str, str, str]:
    """A /30 in 10.0.0.0/8 that no host route uses: (network, host side, guest side)."""
    used = host_run(["ip", "-4", "-o", "addr", "show"], timeout=10).stdout
    used += host_run(["ip", "-4", "route", "show", "table", "all"], timeout=10).stdout
    rng = random.Random()
    for _ in range(100):
        b, c, d = rng.randrange(64, 250), rng.randrange(256), rng.randrange(0, 256, 4)
        prefix = f"10.{b}.{c}."
        if prefix not in used:
            return f"{prefix}{d}", f"{prefix}{d + 1}", f"{prefix}{d + 2}"
    raise MachineError("no free 10.x.y.0/30 for the veth pair")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rpartition(")")[2].split()[1])
            if ppid == pid:
                kids.append(int(entry.name))
    return kids


@dataclass
class Machine:
    """One booted container. Create with ``boot()``, always ``shutdown()``."""

    name: str
    root: Path
    scratch: Path
    host_if: str
    net: str
    host_addr: str
    guest_addr: str
    launched_at: float  # CLOCK_MONOTONIC seconds, just before systemd-nspawn was started
    proc: subprocess.Popen[bytes] | None = None
    leader: int = 0  # the container's PID 1 as the host sees it
    _console: Path = field(default=Path())

    # -- commands inside ----------------------------------------------------------------------

    def run(
        self, *cmd: str, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return host_run(
            ["nsenter", "-t", str(self.leader), "-a", *cmd], timeout=timeout, check=check
        )

    def show(self, unit: str, *props: str) -> dict[str, str]:
        args = ["systemctl", "show", unit, "--no-pager"]
        args += [f"--property={p}" for p in props]
        out = self.run(*args).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def write(self, path: str, text: str, *, mode: int = 0o644, group: str | None = None) -> None:
        """Write a file inside the running container (through the overlay's merged view)."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        os.chmod(tmp, mode)
        if group is not None:
            os.chown(tmp, 0, self.gid(group))
        tmp.rename(target)

    def gid(self, group: str) -> int:
        for line in (self.root / "etc/group").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == group:
                return int(fields[2])
        raise MachineError(f"no group {group!r} in the container")

    def console_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            text = self._console.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    # -- life cycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        console = self._console.open("wb")
        self.launched_at = time.monotonic()
        self.proc = subprocess.Popen(
            [
                "systemd-nspawn",
                "--quiet",
                "--boot",
                "-D",
                str(self.root),
                "-M",
                self.name,
                "--network-veth",
                "--register=no",
                "--keep-unit",
            ],
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
        )
        console.close()
        deadline = time.monotonic() + timeout
        # The host end of the veth: up and addressed at once, so systemd-networkd-wait-online
        # in the guest sees a carrier and relayd's After=network-online.target is not delayed.
        while not Path(f"/sys/class/net/{self.host_if}").exists():
            self._check_alive(deadline)
            time.sleep(0.01)
        host_run(["ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_if], timeout=10)
        host_run(["ip", "link", "set", self.host_if, "up"], timeout=10)
        while not self.leader:
            self._check_alive(deadline)
            for pid in _children(self.proc.pid):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/exe").endswith("/systemd"):
                        self.leader = pid
            time.sleep(0.01)

    def wait_booted(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(deadline)
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.1)

    def _check_alive(self, deadline: float) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise MachineError(
                f"systemd-nspawn exited {self.proc.returncode}\n{self.console_tail()}"
            )
        if time.monotonic() > deadline:
            raise MachineError(f"container {self.name} timed out\n{self.console_tail()}")

    def shutdown(self, timeout: float = 20.0) -> None:
        """Power off (SIGTERM to nspawn asks the guest's systemd to halt), then clean up."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        finally:
            if Path(f"/sys/class/net/{self.host_if}").exists():
                host_run(["ip", "link", "del", self.host_if], timeout=10, check=False)
            unmount(self.root)
            shutil.rmtree(self.scratch, ignore_errors=True)


NETWORK_UNIT = """\
[Match]
Name={ifname}

[Network]
Address={addr}/30
LinkLocalAddressing=no
IPv6AcceptRA=no
"""


@contextlib.contextmanager
def booted(
    layers: Sequence[Path], prepare: Callable[[Machine], None] | None = None
) -> Iterator[Machine]:
    """Boot a fresh overlay of ``layers`` (top first) with its own veth subnet; ``prepare``
    writes into its file system before the boot."""
    suffix = f"{os.getpid() % 10000:04d}{random.randrange(16**4):04x}"
    name = f"rly{suffix}"
    scratch = Path(tempfile.mkdtemp(prefix=f"relayd-boot-{suffix}-"))
    net, host_addr, guest_addr = _free_subnet()
    machine = Machine(
        name=name,
        root=scratch / "merged",
        scratch=scratch,
        host_if=f"ve-{name}",
        net=net,
        host_addr=host_addr,
        guest_addr=guest_addr,
        launched_at=0.0,
        _console=scratch / "console.log",
    )
    try:
        mount_overlay(layers, scratch / "upper", scratch / "work", machine.root)
        machine.write(
            "/etc/systemd/network/10-host0.network",
            NETWORK_UNIT.format(ifname=GUEST_IF, addr=guest_addr),
        )
        if prepare is not None:
            prepare(machine)
        machine.start()
        yield machine
    finally:
        machine.shutdown()
