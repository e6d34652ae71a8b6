"""The relayd container image, built from container/Containerfile and run with podman.

The base image is the Debian 12 rootfs the boot test debootstraps (``rootfs.py``), imported with
``podman import``: no registry is needed. The container runs in a network namespace of the
harness (``podman --network ns:...``), between a sender namespace that plays the capture side
(``run_peer.py send``) and a customer namespace where the multicast is captured off the wire:

    sender ──veth── cloud (the container: relayd run, health :8080) ──veth── customer

What ECS does with the image is done here by hand: the health check (the image's HEALTHCHECK,
run with ``podman healthcheck run``), SIGHUP (``podman kill --signal HUP``) and the stop
(``podman stop``: SIGTERM, then SIGKILL after the timeout).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relayd.wire import ErrorCode
from tests.appliance import rootfs
from tests.helpers.netns import Netns, NetnsHarness
from tests.helpers.relayd_process import groups_arg, peer_argv
from tests.helpers.run_peer import payload

pytestmark = [pytest.mark.appliance, pytest.mark.netns, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "container" / "build-image.sh"
RELAYD_UID = 10001  # container/Containerfile
STOP_TIMEOUT = 10  # podman stop -t: SIGKILL after this long (ECS: stopTimeout)
HEALTH_PORT = 8080
GROUPS = [(f"239.192.7.{i}", 30000 + i) for i in range(1, 4)]
BAR = "!" * 20


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (podman with network namespaces, debootstrap)"
    if shutil.which("podman") is None:
        return "podman is not installed (Debian: podman; .ci/system-deps.sh installs it)"
    if shutil.which("debootstrap") is None:
        return "debootstrap is not installed: no Debian 12 base image (rootfs.py)"
    info = subprocess.run(
        ["podman", "info", "--format", "{{.Store.GraphDriverName}}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if info.returncode != 0:
        return f"podman does not work here: {info.stderr.strip()[-300:]}"
    return None


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def runtime_args() -> list[str]:
    """podman run options this host needs. runc when installed: crun refuses a host with
    cgroups in hybrid mode. Resource limits no higher than this process's: podman's defaults
    are above them, and a root without CAP_SYS_RESOURCE (a sandbox) cannot raise them; relayd
    needs many descriptors (the task definition's nofile) and few processes."""
    args = ["--runtime", "runc"] if shutil.which("runc") else []
    for flag, limit, want in (
        ("nofile", resource.RLIMIT_NOFILE, 65536),
        ("nproc", resource.RLIMIT_NPROC, 4096),
    ):
        hard = resource.getrlimit(limit)[1]
        value = want if hard == resource.RLIM_INFINITY else min(hard, want)
        args += ["--ulimit", f"{flag}={value}:{value}"]
    # The image's HEALTHCHECK stays; podman's timer for it needs a systemd host, so the
    # tests run it themselves (`podman healthcheck run`), as ECS's agent would.
    return [*args, "--health-interval", "disable"]


@dataclass
class Image:
    tag: str
    base: str
    size: int
    build_seconds: float


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    reason = _missing()
    if reason is not None:
        pytest.skip(f"{BAR} CONTAINER TESTS NOT RUN: {reason} {BAR}")
    base_dir = rootfs.ensure_rootfs()
    suffix = secrets.token_hex(4)
    tag, base = f"localhost/relayd-test:{suffix}", f"localhost/relayd-base-test:{suffix}"
    t0 = time.monotonic()
    build = subprocess.run(
        ["bash", str(BUILD), "--rootfs", str(base_dir), "--base", base, "--tag", tag],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        # This interpreter's pip fills the wheelhouse (Debian's python3 may have no pip).
        env={**os.environ, "PYTHON": sys.executable},
    )
    took = time.monotonic() - t0
    try:
        assert build.returncode == 0, f"{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
        size = int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout)
        yield Image(tag=tag, base=base, size=size, build_seconds=took)
    finally:
        podman("rmi", "--force", tag, base, check=False)


@dataclass
class Container:
    name: str
    started_at: float

    def inspect(self, template: str) -> str:
        return podman("inspect", "--format", template, self.name).stdout.strip()

    def logs(self) -> str:
        proc = podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def healthy(self) -> bool:
        if podman("healthcheck", "run", self.name, check=False).returncode == 0:
            return True
        if not self.running():
            raise AssertionError(f"the container exited:\n{self.logs()}")
        return False

    def running(self) -> bool:
        return self.inspect("{{.State.Running}}") == "true"


@contextlib.contextmanager
def container(image: Image, netns: Netns, *options: str) -> Iterator[Container]:
    name = f"relayd-test-{secrets.token_hex(4)}"
    started_at = time.monotonic()
    podman(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        f"ns:/run/netns/{netns.name}",
        *runtime_args(),
        *options,
        image.tag,
    )
    try:
        yield Container(name=name, started_at=started_at)
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def wait_for(what: str, timeout: float, check: Callable[[], bool]) -> float:
    """Poll ``check`` until true; the seconds it took."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - t0


def feed_toml(name: str, port: int, interface: str, sources: str, auth: str = "") -> str:
    return f"""
[[emit]]
name = "{name}"
listen = "0.0.0.0:{port}"
interface = "{interface}"
ttl = 4
allowed_sources = ["{sources}"]
allowed_groups = ["239.192.0.0/16"]
{auth}"""


def config_toml(*feeds: str) -> str:
    head = f'[process]\nlog_level = "info"\n\n[health]\nlisten = "0.0.0.0:{HEALTH_PORT}"\n'
    return head + "".join(feeds)


def health(sender: Netns, address: str) -> tuple[int, dict[str, Any]]:
    """``relayd status --json`` from the sender namespace: what the NLB's health check sees."""
    proc = sender.run(
        sender.relayd_argv("status", "--url", f"http://{address}:{HEALTH_PORT}", "--json"),
        check=False,
    )
    if proc.returncode not in (0, 1):
        return proc.returncode, {}
    doc: dict[str, Any] = json.loads(proc.stdout)
    return proc.returncode, doc


def udp_datagrams(packets: list[dict[str, Any]]) -> list[tuple[str, int, bytes]]:
    """(group, port, payload) of the UDP packets a sniffer saw, in order."""
    out = []
    for p in packets:
        udp = bytes.fromhex(p["payload"])
        out.append((p["dst"], int.from_bytes(udp[2:4], "big"), udp[8:]))
    return out


@dataclass
class Topology:
    sender: Netns
    cloud: Netns
    customer: Netns
    listen_ip: str  # the cloud's address facing the sender (the feed listeners)
    sender_net: str
    egress: str  # the cloud's device towards the customer
    customer_dev: str


def topology(net: NetnsHarness) -> Topology:
    sender, cloud, customer = net.namespace("sender"), net.namespace("cloud"), net.namespace("cust")
    up = net.link(sender, cloud)
    down = net.link(cloud, customer)
    return Topology(
        sender=sender,
        cloud=cloud,
        customer=customer,
        listen_ip=str(up.b_addr.ip),
        sender_net=str(up.a_addr.network),
        egress=down.a_dev,
        customer_dev=down.b_dev,
    )


@pytest.mark.parametrize("pid1", ["relayd", "podman-init"])
def test_stream_health_reload_and_stop(
    image: Image,
    netns: NetnsHarness,
    tmp_path: Path,
    pid1: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The mounted-file mode: relayd as PID 1 (the entrypoint execs it), or as the child of
    podman's init (catatonit; ECS: initProcessEnabled), which forwards the signals."""
    init: list[str] = []
    if pid1 == "podman-init":
        init_path = shutil.which("catatonit") or "/usr/libexec/podman/catatonit"
        if not Path(init_path).exists():
            pytest.skip("podman --init needs catatonit (Debian: catatonit)")
        init = ["--init", "--init-path", init_path]
    net = topology(netns)
    config = tmp_path / "relayd.toml"
    config.write_text(config_toml(feed_toml("dev", 6666, net.egress, net.sender_net)))
    config.chmod(0o644)

    with container(
        image, net.cloud, *init, "--volume", f"{config}:/etc/relayd/relayd.toml:ro"
    ) as ctr:
        wait_for("the container's health check", 60, ctr.healthy)
        to_healthy = time.monotonic() - ctr.started_at  # from `podman run`

        # Who runs: relayd as the non-root user, PID 1 or catatonit's child.
        top = podman("top", ctr.name, "pid", "user", "args").stdout.splitlines()[1:]
        procs = {int(line.split()[0]): line.split(None, 2)[1:] for line in map(str.strip, top)}
        relayd_pid = next(pid for pid, (_, args) in procs.items() if " run --config " in args)
        assert procs[relayd_pid][0] == "relayd", top
        assert procs[relayd_pid][1].endswith("relayd run --config /etc/relayd/relayd.toml"), top
        if pid1 == "relayd":
            assert relayd_pid == 1, top
        else:
            assert relayd_pid != 1, top
            assert "init" in procs[1][1] or "catatonit" in procs[1][1], top
        assert "data path C" in ctr.logs()

        # /healthz from the sender's side, as the NLB asks it.
        code, doc = health(net.sender, net.listen_ip)
        assert code == 0, doc
        assert doc["feeds"]["dev"]["healthy"] is True

        # Multicast out, byte for byte, on the customer's wire.
        count = 300
        sniffer = net.customer.sniffer(net.customer_dev, 17, duration=30, count=count)
        sender = net.sender.popen(
            peer_argv("send", "--connect", f"{net.listen_ip}:6666", "--feed", "dev",
                      "--groups", groups_arg(GROUPS), "--count", str(count), "--rate", "1000",
                      "--linger", "60"),
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert sender.stdout is not None
        assert json.loads(sender.stdout.readline()) == {"streamed": count}
        got = udp_datagrams(sniffer.packets())
        want = [(*GROUPS[seq % len(GROUPS)], payload(seq)) for seq in range(1, count + 1)]
        assert got == want

        # SIGHUP: a second feed, without a restart.
        config.write_text(
            config_toml(
                feed_toml("dev", 6666, net.egress, net.sender_net),
                feed_toml("beta", 6668, net.egress, net.sender_net),
            )
        )
        t0 = time.monotonic()
        podman("kill", "--signal", "HUP", ctr.name)
        reload_took = wait_for(
            "the beta feed after SIGHUP",
            15,
            lambda: "beta" in health(net.sender, net.listen_ip)[1].get("feeds", {}),
        )
        code, doc = health(net.sender, net.listen_ip)
        assert code == 0, doc
        assert doc["feeds"]["beta"]["state"] == "listening"
        assert ctr.running()
        assert ctr.inspect("{{.RestartCount}}") == "0"
        # A broken file: the reload is refused, the running configuration stays.
        config.write_text(config_toml(feed_toml("dev", 6666, net.egress, net.sender_net)) + "[[")
        podman("kill", "--signal", "HUP", ctr.name)
        wait_for(
            "the refused reload",
            15,
            lambda: bool(health(net.sender, net.listen_ip)[1].get("config_errors")),
        )
        code, doc = health(net.sender, net.listen_ip)
        assert code == 0, doc
        assert sorted(doc["feeds"]) == ["beta", "dev"]
        reload_seconds = time.monotonic() - t0

        # podman stop: SIGTERM; relayd tells the capture side SHUTTING_DOWN and exits 0 well
        # within the timeout (a SIGKILL would show as exit status 137).
        t0 = time.monotonic()
        podman("stop", "--time", str(STOP_TIMEOUT), ctr.name, timeout=STOP_TIMEOUT + 30)
        stop_took = time.monotonic() - t0
        assert ctr.inspect("{{.State.ExitCode}}") == "0"
        assert stop_took < STOP_TIMEOUT
        logs = ctr.logs()
        assert "SIGTERM: stopping" in logs
        assert "SIGKILL" not in logs
        result = json.loads(sender.communicate(timeout=30)[0])
        assert result["acked"] == count
        assert [code for code, _ in result["errors"]] == [int(ErrorCode.SHUTTING_DOWN)]

    with capsys.disabled():
        print(
            f"\n[container] {image.tag}: {image.size / 1e6:.1f} MB, built in "
            f"{image.build_seconds:.0f}s; PID 1 {pid1}: healthy {to_healthy:.2f}s after podman "
            f"run, reload (new feed listening) {reload_took:.2f}s, refused reload checked "
            f"within {reload_seconds:.2f}s, stop {stop_took:.2f}s (exit 0)"
        )


def test_config_and_keys_from_the_environment_on_a_read_only_root(
    image: Image, netns: NetnsHarness
) -> None:
    """What the ECS task definition does: relayd.toml in RELAYD_CONFIG_TOML, the feed's key in
    RELAYD_KEY_1 (ECS: `secrets` from SSM), a read-only root and a tmpfs for /run/relayd."""
    net = topology(netns)
    key = secrets.token_urlsafe(32)
    auth = 'auth_key_files = ["/etc/relayd/keys/dev-1.key"]\n'
    env = {
        "RELAYD_CONFIG_TOML": config_toml(
            feed_toml("dev", 6666, net.egress, net.sender_net, auth=auth)
        ),
        "RELAYD_KEY_FILES": "/etc/relayd/keys/dev-1.key",
        "RELAYD_KEY_1": key,
    }
    env_args = [arg for name, value in env.items() for arg in ("--env", f"{name}={value}")]
    # ECS mounts its tmpfs with uid=/gid= options; podman 4.3 takes U (chown to the user).
    tmpfs = "/run/relayd:rw,noexec,nosuid,size=1m,mode=0700,U"
    with container(image, net.cloud, "--read-only", "--tmpfs", tmpfs, *env_args) as ctr:
        wait_for("the container's health check", 60, ctr.healthy)
        code, doc = health(net.sender, net.listen_ip)
        assert code == 0, doc
        # The key loaded: an authenticated feed with an unreadable key would be down.
        assert doc["feeds"]["dev"]["healthy"] is True
        stat = podman("exec", ctr.name, "stat", "-L", "-c", "%u %a %s",
                      "/etc/relayd/keys/dev-1.key").stdout.split()  # fmt: skip
        assert stat == [str(RELAYD_UID), "400", str(len(key))]
        # Neither the key nor the config text is in relayd's environment.
        environ = podman("exec", ctr.name, "cat", "/proc/1/environ").stdout
        assert "RELAYD_KEY_1" not in environ
        assert key not in environ
        assert "RELAYD_CONFIG_TOML" not in environ
        assert "configuration from RELAYD_CONFIG_TOML" in ctr.logs()
        assert key not in ctr.logs()
        podman("stop", "--time", str(STOP_TIMEOUT), ctr.name, timeout=STOP_TIMEOUT + 30)
        assert ctr.inspect("{{.State.ExitCode}}") == "0"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param({}, "no configuration: mount a relayd.toml", id="no-config"),
        pytest.param({"RELAYD_CONFIG_TOML": "[[emit]\n"}, "relayd.toml", id="broken-config"),
        pytest.param(
            {"RELAYD_CONFIG_TOML": config_toml(), "RELAYD_KEY_FILES": "/run/relayd/keys/a.key"},
            "RELAYD_KEY_1 is empty or unset",
            id="missing-key",
        ),
    ],
)
def test_a_bad_start_exits_2_with_a_clear_message(
    image: Image, env: dict[str, str], message: str
) -> None:
    args = [a for name, value in env.items() for a in ("--env", f"{name}={value}")]
    proc = podman(
        "run", "--rm", "--network", "none", *runtime_args(), *args, image.tag, check=False
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
