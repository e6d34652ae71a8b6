"""One image for both modes: the ECS agent is off in host mode and starts only in ECS mode.

The Debian rootfs has no ECS agent, so the boot carries stand-ins for the units the Amazon ECS
optimized AMI ships (``ecs.service``, ``docker.service``), enabled as they are there. What the
image adds is ``packer/scripts/ecs-agent.sh`` (run by the install layer, and again here where
the stand-ins exist); what ECS mode adds is the user data's ``ecs-mode`` block, taken from the
Terraform template and run in the booted machine.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.appliance import machine as m

pytestmark = [pytest.mark.appliance, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
USER_DATA = REPO / "terraform/modules/relay/templates/user-data.sh.tftpl"
ECS_AGENT_SCRIPT = REPO / "packer/scripts/ecs-agent.sh"
MARKER = "/etc/relayd/ecs-mode"
CLUSTER = "multicast-boot-test"
CONFIG = "/etc/relayd/relayd.toml"

STAND_IN = """\
[Unit]
Description=stand-in for the ECS-optimized AMI's {unit}
After=network-online.target

[Service]
ExecStart=/bin/sleep infinity

[Install]
WantedBy=multi-user.target
"""

BASE_CONFIG = """\
[health]
listen = "0.0.0.0:8080"

[[emit]]
name = "dev"
listen = "0.0.0.0:6666"
interface = "host0"
allowed_sources = ["{net}/30"]
allowed_groups = ["239.192.0.0/16"]
"""


def ecs_mode_block(cluster: str) -> str:
    """The user data's ECS-mode commands, as Terraform renders them for ``cluster``."""
    text = USER_DATA.read_text()
    block = text.split("# ecs-mode: begin\n", 1)[1].split("# ecs-mode: end\n", 1)[0]
    assert "%{" not in block, "the ecs-mode block must hold plain shell"
    return block.replace("${ecs_cluster_name}", cluster)


def prepare(vm: m.Machine) -> None:
    vm.write(CONFIG, BASE_CONFIG.format(net=vm.net), mode=0o640, group="relayd")
    for unit in ("ecs.service", "docker.service"):
        vm.write(f"/usr/lib/systemd/system/{unit}", STAND_IN.format(unit=unit))
        wants = vm.root / "etc/systemd/system/multi-user.target.wants" / unit
        wants.parent.mkdir(parents=True, exist_ok=True)
        wants.symlink_to(f"/usr/lib/systemd/system/{unit}")
    vm.write("/root/ecs-agent.sh", ECS_AGENT_SCRIPT.read_text(), mode=0o755)
    vm.write("/root/ecs-mode.sh", "set -euo pipefail\n" + ecs_mode_block(CLUSTER), mode=0o755)


def wait_state(vm: m.Machine, unit: str, want: str, timeout: float = 20) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        props = vm.show(unit, "ActiveState", "ConditionResult", "UnitFileState")
        if props["ActiveState"] == want:
            return props
        if time.monotonic() > deadline:
            raise AssertionError(f"{unit}: {props}, want ActiveState={want}")
        time.sleep(0.1)


def test_agent_off_in_host_mode_and_on_in_ecs_mode(appliance_layers: list[Path]) -> None:
    with m.booted(appliance_layers, prepare) as vm:
        vm.wait_booted()
        # The image's drop-in: the agent's unit starts only where the ECS-mode marker exists.
        dropin = vm.show("ecs.service", "DropInPaths")["DropInPaths"]
        assert "/etc/systemd/system/ecs.service.d/50-relayd-mode.conf" in dropin
        assert vm.run("test", "-e", MARKER, check=False).returncode != 0

        # Host mode: relayd runs; the agent, although enabled here, was never started.
        wait_state(vm, "relayd.service", "active")
        ecs = vm.show(
            "ecs.service", "ActiveState", "ConditionResult", "ExecMainStartTimestampMonotonic"
        )
        assert ecs == {
            "ActiveState": "inactive",
            "ConditionResult": "no",
            "ExecMainStartTimestampMonotonic": "0",
        }
        # A start by hand is skipped too: no registration loop, whatever starts it.
        vm.run("systemctl", "start", "ecs.service")
        assert vm.show("ecs.service", "ActiveState")["ActiveState"] == "inactive"

        # What the Packer build does to the ECS-optimized base: both units disabled.
        vm.run("bash", "/root/ecs-agent.sh")
        for unit in ("ecs.service", "docker.service"):
            assert vm.show(unit, "UnitFileState")["UnitFileState"] == "disabled", unit

        # ECS mode: the user data's block stops relayd.service for good and starts the agent.
        vm.run("bash", "/root/ecs-mode.sh")
        relayd = wait_state(vm, "relayd.service", "inactive")
        assert relayd["UnitFileState"] == "disabled"
        ecs = wait_state(vm, "ecs.service", "active")
        assert ecs["ConditionResult"] == "yes"
        assert ecs["UnitFileState"] == "enabled"
        config = vm.run("cat", "/etc/ecs/ecs.config").stdout.splitlines()
        clusters = [line for line in config if line.startswith("ECS_CLUSTER=")]
        assert clusters[-1] == f"ECS_CLUSTER={CLUSTER}", clusters
