"""Fixtures for the appliance boot test: the installed image layers and one booted machine."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.appliance import machine as m
from tests.appliance import rootfs

TOOLS = ("debootstrap", "systemd-nspawn", "nsenter", "ip", "mount", "umount")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap, overlay mounts, systemd-nspawn)"
    absent = [tool for tool in TOOLS if shutil.which(tool) is None]
    if absent:
        return f"needs {', '.join(absent)} (Debian: debootstrap systemd-container iproute2)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "needs overlayfs in the kernel"
    return None


@pytest.fixture(scope="session")
def appliance_layers() -> Iterator[list[Path]]:
    """[install layer, cached Debian 12 rootfs]: install.sh run over the rootfs, as on an AMI."""
    reason = _missing()
    if reason is not None:
        pytest.skip(reason)
    base = rootfs.ensure_rootfs()
    work = Path(tempfile.mkdtemp(prefix="relayd-appliance-"))
    try:
        dist, wheelhouse, layer = work / "dist", work / "wheelhouse", work / "layer"
        wheel = m.build_wheel(dist)
        m.fill_wheelhouse(wheel, wheelhouse)
        layer.mkdir()
        m.install_layer(base, layer, dist, wheelhouse)
        yield [layer, base]
    finally:
        shutil.rmtree(work, ignore_errors=True)
