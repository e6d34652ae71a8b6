"""The appliance under real systemd: install.sh's result booted with systemd-nspawn.

One machine is booted for the module (boots take well under a second; the install takes the
time). Each test leaves relayd running on the base config, whatever it did to it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relayd import wire
from tests.appliance import machine as m

pytestmark = [pytest.mark.appliance, pytest.mark.slow]

UNIT = "relayd.service"
CONFIG = "/etc/relayd/relayd.toml"
GROUP = "239.192.5.1"
GROUP_PORT = 5001
TTL = 4
RMEM_MAX = 32 * 1024 * 1024  # etc/sysctl.d/60-relayd.conf

FEED = """
[[emit]]
name = "{name}"
listen = "0.0.0.0:{port}"
interface = "host0"
ttl = {ttl}
allowed_sources = ["{net}/30"]
allowed_groups = ["239.192.0.0/16"]
allowed_ports = ["5000-5999"]
"""
BASE = """\
[process]
log_level = "info"

[health]
listen = "0.0.0.0:8080"
"""


def config(net: str, feeds: dict[str, int]) -> str:
    return BASE + "".join(
        FEED.format(name=name, port=port, ttl=TTL, net=net) for name, port in feeds.items()
    )


@dataclass
class BootFigures:
    boot_to_ready: float  # seconds from launching systemd-nspawn to relayd's READY=1
    pid1_to_ready: float  # seconds from the guest's systemd starting to relayd's READY=1
    start_to_ready: float  # seconds from relayd's exec to its READY=1

    @classmethod
    def of(cls, vm: m.Machine) -> BootFigures:
        """Read from the guest's systemd; its CLOCK_MONOTONIC is the host's (no time ns)."""
        ready = vm.show(
            UNIT, "ActiveState", "ActiveEnterTimestampMonotonic", "ExecMainStartTimestampMonotonic"
        )
        assert ready["ActiveState"] == "active", vm.run(
            "journalctl", "-b", "--no-pager", "-u", UNIT, check=False
        ).stdout
        manager = vm.run("systemctl", "show", "--property=UserspaceTimestampMonotonic").stdout
        userspace_us = int(manager.strip().split("=", 1)[1])
        active_us = int(ready["ActiveEnterTimestampMonotonic"])
        exec_us = int(ready["ExecMainStartTimestampMonotonic"])
        return cls(
            boot_to_ready=active_us / 1e6 - vm.launched_at,
            pid1_to_ready=(active_us - userspace_us) / 1e6,
            start_to_ready=(active_us - exec_us) / 1e6,
        )


@dataclass
class Appliance:
    vm: m.Machine
    base_config: str

    def show(self, *props: str) -> dict[str, str]:
        return self.vm.show(UNIT, *props)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])


def _wait(predicate_desc: str, timeout: float, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate_desc}")
        time.sleep(0.05)


def notifications(vm: m.Machine, pid: int | str) -> list[str]:
    """The sd_notify messages systemd accepted for relayd from ``pid``, oldest first."""
    journal = vm.run("journalctl", "-b", "-u", UNIT, "--no-pager", "-o", "cat").stdout
    head = f"{UNIT}: Got notification message from PID {pid} ("
    return [line[len(head) : -1] for line in journal.splitlines() if line.startswith(head)]


def wait_notification(vm: m.Machine, pid: int | str, prefix: str, after: int = 0) -> list[str]:
    """Wait until ``pid`` sent a message starting with ``prefix`` (among those past ``after``)."""
    found: list[str] = []

    def sent() -> bool:
        found[:] = notifications(vm, pid)[after:]
        return any(n.startswith(prefix) for n in found)

    _wait(f"{prefix} from pid {pid} in the journal", 15, sent)
    return found


def wait_active(app: Appliance, timeout: float, not_pid: int = 0) -> dict[str, str]:
    props: dict[str, str] = {}

    def ready() -> bool:
        props.update(app.show("ActiveState", "SubState", "MainPID", "NRestarts", "StatusText"))
        return props["ActiveState"] == "active" and int(props["MainPID"]) not in (0, not_pid)

    _wait(f"{UNIT} active (not pid {not_pid})", timeout, ready)
    return props


@pytest.fixture(scope="module")
def appliance(appliance_layers: list[Path]) -> Iterator[Appliance]:
    configs: list[str] = []

    def prepare(vm: m.Machine) -> None:
        configs.append(config(vm.net, {"dev": 6666}))
        vm.write(CONFIG, configs[0], mode=0o640, group="relayd")
        # The guest's systemd logs every sd_notify message with its sender's PID at debug level.
        vm.write("/etc/systemd/system.conf.d/50-test-debug.conf", "[Manager]\nLogLevel=debug\n")

    with m.booted(appliance_layers, prepare) as vm:
        vm.wait_booted()
        BootFigures.of(vm)  # relayd is active
        yield Appliance(vm=vm, base_config=configs[0])


@pytest.fixture
def app(appliance: Appliance) -> Iterator[Appliance]:
    """The booted appliance with relayd active on the base config, before and after the test."""
    wait_active(appliance, 20)
    yield appliance
    current = (appliance.vm.root / CONFIG.lstrip("/")).read_text()
    if current != appliance.base_config:
        appliance.vm.write(CONFIG, appliance.base_config, mode=0o640, group="relayd")
        appliance.vm.run("systemctl", "reload", UNIT, check=False)
    if appliance.show("ActiveState")["ActiveState"] != "active":
        appliance.vm.run("systemctl", "reset-failed", UNIT, check=False)
        appliance.vm.run("systemctl", "start", UNIT, check=False)


def http_get(url: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=3) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as err:
        return int(err.code), bytes(err.read())


def handshake(host: str, port: int, feed: str) -> tuple[socket.socket, wire.CaptureConnection]:
    """Connect as a capture side and complete CHALLENGE / HELLO / welcome ACK."""
    conn = wire.CaptureConnection(feed, os.urandom(wire.SESSION_ID_SIZE))
    sock = socket.create_connection((host, port), timeout=5)
    try:
        hello_sent = False
        while conn.state is not wire.State.STREAMING:
            data = sock.recv(65536)
            if not data:
                raise AssertionError("emit side closed during the handshake")
            for event in conn.receive(data):
                if isinstance(event, wire.Error):
                    raise AssertionError(f"emit side refused: {event}")
                if isinstance(event, wire.Challenge) and not hello_sent:
                    sock.sendall(conn.hello(event))
                    hello_sent = True
    except BaseException:
        sock.close()
        raise
    return sock, conn


def wait_for_ack(sock: socket.socket, conn: wire.CaptureConnection, seq: int) -> None:
    highest = -1
    while highest < seq:
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"emit side closed before ACK {seq} (highest {highest})")
        for event in conn.receive(data):
            if isinstance(event, wire.Ack):
                highest = max(highest, event.seq)
            elif isinstance(event, wire.Error):
                raise AssertionError(f"emit side error: {event}")


@contextlib.contextmanager
def sniffer(ifname: str) -> Iterator[socket.socket]:
    """IPv4 packets as they cross the host end of the veth (no link-layer header)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
    try:
        sock.bind((ifname, 0x0800))
        sock.settimeout(0.2)
        yield sock
    finally:
        sock.close()


def udp_to(
    sock: socket.socket, group: str, port: int, want: int, timeout: float
) -> list[tuple[int, bytes]]:
    """(TTL, payload) of UDP datagrams to group:port seen on ``sock``: until ``want`` of them
    came, and a little longer, so that extra ones (duplicates) are seen too."""
    dst = socket.inet_aton(group)
    seen: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(seen) == want:
            deadline = min(deadline, time.monotonic() + 0.5)
        try:
            pkt = sock.recv(65536)
        except TimeoutError:
            continue
        ihl = (pkt[0] & 0x0F) * 4
        if pkt[9] != socket.IPPROTO_UDP or pkt[16:20] != dst:
            continue
        (dport,) = struct.unpack_from("!H", pkt, ihl + 2)
        if dport == port:
            seen.append((pkt[8], pkt[ihl + 8 :]))
    return seen


def test_relayd_is_active_after_boot_and_ready_came_from_relayd(
    appliance: Appliance, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = appliance.vm
    props = appliance.show(
        "Type",
        "NotifyAccess",
        "ActiveState",
        "SubState",
        "MainPID",
        "StatusText",
        "User",
        "NRestarts",
        "WatchdogUSec",
    )
    assert props["Type"] == "notify"
    assert props["NotifyAccess"] == "main"
    assert (props["ActiveState"], props["SubState"]) == ("active", "running")
    assert props["NRestarts"] == "0"
    # Type=notify with NotifyAccess=main: only the main process's READY=1 makes it active, and
    # the main process is the Python interpreter running `relayd run`, as user relayd.
    pid = props["MainPID"]
    cmdline = vm.run("cat", f"/proc/{pid}/cmdline").stdout.split("\0")
    assert Path(cmdline[0]).name.startswith("python"), cmdline
    assert cmdline[1:5] == ["/opt/relayd/bin/relayd", "run", "--config", CONFIG], cmdline
    owner = vm.run("ps", "-o", "user=", "-p", pid).stdout.strip()
    assert owner == "relayd"
    assert props["StatusText"], "relayd sends STATUS= with its READY=1"
    # And the guest's systemd says so: READY=1 arrived from the main PID, before "Started".
    messages = wait_notification(vm, pid, "READY=1")
    assert any(n.startswith("READY=1") for n in messages), messages
    journal = vm.run("journalctl", "-b", "-u", UNIT, "--no-pager", "-o", "cat").stdout
    ready_at = journal.index(f"Got notification message from PID {pid} (READY=1")
    assert ready_at < journal.index("Started relayd.service")
    assert "but reception only permitted for main PID" not in journal
    with capsys.disabled():
        print(f"\n[appliance] relayd READY, STATUS={props['StatusText']!r}")


def test_boot_to_ready_time(
    appliance_layers: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A boot of its own, without the debug logging the other tests' machine runs with."""
    with m.booted(
        appliance_layers,
        lambda vm: vm.write(CONFIG, config(vm.net, {"dev": 6666}), mode=0o640, group="relayd"),
    ) as vm:
        assert vm.wait_booted() == "running"  # no unit failed on the way
        figures = BootFigures.of(vm)
    with capsys.disabled():
        print(
            f"\n[appliance] boot-to-READY {figures.boot_to_ready:.2f}s from systemd-nspawn "
            f"launch, {figures.pid1_to_ready:.2f}s from the guest's systemd starting, "
            f"{figures.start_to_ready:.2f}s from relayd's exec"
        )
    assert 0 < figures.start_to_ready < figures.pid1_to_ready < figures.boot_to_ready
    # Well under a second on an idle machine; the bound only catches a boot that waits on a
    # timeout (network-online, a start job), not a busy CI host.
    assert figures.boot_to_ready < 20


def test_unit_verifies_clean_on_the_installed_system(
    appliance: Appliance, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = appliance.vm
    verify = vm.run("systemd-analyze", "verify", UNIT, check=False)
    assert (verify.returncode, verify.stdout, verify.stderr) == (0, "", "")
    security = vm.run("systemd-analyze", "security", UNIT, "--no-pager", check=False)
    overall = security.stdout.strip().splitlines()[-1]
    exposure = float(overall.split("relayd.service:", 1)[1].split()[0])
    assert exposure <= 1.5, security.stdout
    with capsys.disabled():
        print(f"\n[appliance] on the booted system: {overall}")


def test_healthz_answers_from_the_host_side_of_the_veth(app: Appliance) -> None:
    status, body = http_get(f"http://{app.vm.guest_addr}:8080/healthz")
    assert status == 200, body
    assert isinstance(json.loads(body), dict)
    status, body = http_get(f"http://{app.vm.guest_addr}:8080/healthz/dev")
    assert status == 200, body
    status, body = http_get(f"http://{app.vm.guest_addr}:8080/metrics")
    assert status == 200, body


def login_shell(vm: m.Machine, command: str) -> subprocess.CompletedProcess[str]:
    """``command`` in a root login shell of the guest: its own PATH, no host environment."""
    return vm.run("env", "-i", "HOME=/root", "TERM=dumb", "bash", "-lc", command, check=False)


def test_relayd_status_and_its_man_page_on_the_path(app: Appliance) -> None:
    vm = app.vm
    assert login_shell(vm, "command -v relayd").stdout.strip() == "/usr/local/bin/relayd"
    # the health port comes from /etc/relayd/relayd.toml ([health] listen = "0.0.0.0:8080")
    status = login_shell(vm, "relayd status")
    assert status.returncode == 0, status.stdout + status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].startswith("relayd "), lines
    assert " at http://127.0.0.1:8080: ok, up " in lines[0]
    assert lines[0].endswith((", data path c", ", data path python"))
    assert lines[1].split()[:4] == ["FEED", "KIND", "STATE", "HEALTHY"]
    assert lines[2].split()[:4] == ["dev", "emit", lines[2].split()[2], "yes"]
    page = login_shell(vm, "MANWIDTH=100 man -P cat relayd")
    assert page.returncode == 0, page.stderr
    assert "relayd - Carry UDP multicast market data over TCP" in page.stdout
    assert "relayd status" in page.stdout
    listen = login_shell(vm, "MANWIDTH=100 man -P cat relayd-listen")
    assert "--fail-on-gaps" in listen.stdout
    assert login_shell(vm, "test -s /usr/share/doc/relayd/CONFIG.md").returncode == 0
    completed = login_shell(
        vm,
        "source /usr/share/bash-completion/completions/relayd; COMP_WORDS=(relayd st);"
        " COMP_CWORD=1; _relayd; echo ${COMPREPLY[*]}",
    )
    assert completed.stdout.split() == ["status"]


def test_a_stream_to_the_feed_port_comes_out_as_multicast(app: Appliance) -> None:
    payloads = [f"tick {i} ".encode() * (1 + i % 7) for i in range(1, 21)]
    group = int(ipaddress.IPv4Address(GROUP))
    with sniffer(app.vm.host_if) as sniff:
        sock, conn = handshake(app.vm.guest_addr, 6666, "dev")
        with sock:
            frames = b"".join(
                wire.encode_datagram(seq, group, GROUP_PORT, time.time_ns(), payload)
                for seq, payload in enumerate(payloads, start=1)
            )
            sock.sendall(frames)
            wait_for_ack(sock, conn, len(payloads))
        seen = udp_to(sniff, GROUP, GROUP_PORT, len(payloads), timeout=5)
    assert [payload for _, payload in seen] == payloads
    assert {ttl for ttl, _ in seen} == {TTL}


def test_igmpv2_is_forced_inside_by_systemd_sysctl(app: Appliance) -> None:
    vm = app.vm
    for scope in ("all", "default", m.GUEST_IF):
        value = vm.run("sysctl", "-n", f"net.ipv4.conf.{scope}.force_igmp_version").stdout
        assert value.strip() == "2", scope
    # A fresh network namespace starts at 0: the 2 above was written in the guest's own netns.
    fresh = m.host_run(
        ["unshare", "--net", "cat", "/proc/sys/net/ipv4/conf/all/force_igmp_version"], timeout=10
    )
    assert fresh.stdout.strip() == "0"
    sysctl = vm.show("systemd-sysctl.service", "ActiveState", "Result", "ExecMainStatus")
    assert sysctl == {"ActiveState": "active", "Result": "success", "ExecMainStatus": "0"}
    assert vm.run("test", "-f", "/etc/sysctl.d/60-relayd.conf", check=False).returncode == 0
    value = vm.run("sysctl", "-n", "net.ipv4.igmp_max_memberships").stdout
    assert value.strip() == "1024"
    # A network namespace may not raise net.core.rmem_max above the host's value (the kernel
    # refuses the write), so inside the container 32 MiB holds only when the host allows it.
    host_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    inside = int(vm.run("sysctl", "-n", "net.core.rmem_max").stdout)
    assert inside == (RMEM_MAX if host_max >= RMEM_MAX else host_max)


def test_reload_adds_a_feed_without_restarting(app: Appliance) -> None:
    vm = app.vm
    pid = app.main_pid()
    restarts = app.show("NRestarts")["NRestarts"]
    seen = len(notifications(vm, pid))
    vm.write(CONFIG, config(vm.net, {"dev": 6666, "prod": 6667}), mode=0o640, group="relayd")
    vm.run("systemctl", "reload", UNIT)

    def prod_listens() -> bool:
        try:
            sock, _ = handshake(vm.guest_addr, 6667, "prod")
        except OSError:
            return False
        sock.close()
        return True

    _wait("the prod listener", 10, prod_listens)
    status, body = http_get(f"http://{vm.guest_addr}:8080/healthz/prod")
    assert status == 200, body
    assert app.main_pid() == pid
    assert app.show("NRestarts", "ActiveState") == {"NRestarts": restarts, "ActiveState": "active"}
    # relayd told systemd about the reload: RELOADING=1, then READY=1, from the same PID.
    messages = wait_notification(vm, pid, "READY=1", after=seen)
    reloading = next(i for i, n in enumerate(messages) if n.startswith("RELOADING=1"))
    assert any(n.startswith("READY=1") for n in messages[reloading:]), messages


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param("[[emit]\nname = ", id="toml-syntax"),
        pytest.param('\n[[emit]]\nname = "dup"\nlisten = "0.0.0.0:6666"\n', id="invalid-feed"),
    ],
)
def test_a_broken_edit_makes_reload_fail_and_the_old_config_stays(
    app: Appliance, broken: str
) -> None:
    vm = app.vm
    pid = app.main_pid()
    vm.write(CONFIG, app.base_config + broken, mode=0o640, group="relayd")
    reload = vm.run("systemctl", "reload", UNIT, check=False)
    assert reload.returncode != 0
    time.sleep(0.5)
    props = app.show("ActiveState", "MainPID")
    assert props == {"ActiveState": "active", "MainPID": str(pid)}
    sock, _ = handshake(vm.guest_addr, 6666, "dev")
    sock.close()
    status, _ = http_get(f"http://{vm.guest_addr}:8080/healthz/dev")
    assert status == 200


def test_a_reload_that_cannot_apply_fails_systemctl_reload_and_dev_keeps_running(
    app: Appliance,
) -> None:
    """Passes check-config, cannot be applied (no such interface): `systemctl reload` exits
    non-zero (ExecReload waits for the outcome), the running feed is never stopped."""
    vm = app.vm
    pid = app.main_pid()
    sock, _ = handshake(vm.guest_addr, 6666, "dev")
    broken = app.base_config.replace('interface = "host0"', 'interface = "nosuch0"')
    assert broken != app.base_config
    vm.write(CONFIG, broken, mode=0o640, group="relayd")
    reload = vm.run("systemctl", "reload", UNIT, check=False)
    assert reload.returncode != 0
    props = app.show("ActiveState", "MainPID")
    assert props == {"ActiveState": "active", "MainPID": str(pid)}
    journal = vm.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat").stdout
    assert "no interface named 'nosuch0'" in journal
    sock.settimeout(0.5)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        data = None
    assert data != b""  # the authenticated connection was not closed (heartbeats may come)
    sock.close()
    status, body = http_get(f"http://{vm.guest_addr}:8080/healthz/dev")
    assert status == 200, body
    assert json.loads(body)["reload"]["result"] == "failed"


def watchdog_timeouts(vm: m.Machine) -> int:
    journal = vm.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat").stdout
    return journal.count(f"{UNIT}: Watchdog timeout")


def test_kill_9_is_restarted_by_systemd(app: Appliance) -> None:
    vm = app.vm
    pid = app.main_pid()
    restarts = int(app.show("NRestarts")["NRestarts"])
    vm.run("kill", "-9", str(pid))
    props = wait_active(app, 20, not_pid=pid)
    assert int(props["NRestarts"]) == restarts + 1
    assert http_get(f"http://{vm.guest_addr}:8080/healthz")[0] == 200


def test_sigstop_is_caught_by_the_watchdog(app: Appliance) -> None:
    vm = app.vm
    pid = app.main_pid()
    restarts = int(app.show("NRestarts")["NRestarts"])
    watchdog = app.show("WatchdogUSec")["WatchdogUSec"]
    assert watchdog.endswith("s"), watchdog
    assert watchdog[:-1].isdigit(), watchdog
    # relayd itself pings the watchdog (every WatchdogSec/2); SIGSTOP silences it.
    wait_notification(vm, pid, "WATCHDOG=1")
    timeouts_before = watchdog_timeouts(vm)
    stopped_at = time.monotonic()
    vm.run("kill", "-STOP", str(pid))
    props = wait_active(app, 60, not_pid=pid)
    took = time.monotonic() - stopped_at
    assert int(props["NRestarts"]) == restarts + 1
    assert watchdog_timeouts(vm) == timeouts_before + 1
    assert took >= int(watchdog[:-1]), "restarted before the watchdog could have fired"


def test_systemctl_stop_is_clean_and_prompt(app: Appliance) -> None:
    vm = app.vm
    t0 = time.monotonic()
    vm.run("systemctl", "stop", UNIT)
    took = time.monotonic() - t0
    props = app.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert props == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainCode": "1",  # CLD_EXITED: it exited, nothing had to kill it
        "ExecMainStatus": "0",
    }
    assert took < 5
    vm.run("systemctl", "start", UNIT)
    wait_active(app, 20)
