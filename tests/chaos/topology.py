"""The relay the chaos tests torment: five namespaces, real ``relayd run`` processes, a real stream.

    src ──veth── dc ──veth── cloud ──veth── cust
    gen          capture     emit     │     recv (counts every datagram by sequence)
    (C, paced)   feed        feed     │
                                      └──veth── edge: storms, stalled peers, health abusers

The generator (bench/gen.c) sends 160-byte datagrams round robin to four groups at a fixed
rate; the receiver (bench/recv.c) reports how many distinct sequence numbers arrived, so a
loss is ``sent - received``. Both relayd processes run with HELLO authentication on (one key
file each side). The emit feed accepts capture connections from the dc link *and* the edge
link, so attackers in "edge" reach the full HELLO gate, not just the source-CIDR check.

The test process talks HTTP to the health servers inside the namespaces through a worker
thread that entered the namespace (``setns``), and reads the relayd processes' memory and
descriptor counts from /proc.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs

from tests.helpers.metrics import value as metric
from tests.helpers.netns import Link, Netns, NetnsHarness, read_line

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
AGENT = Path(__file__).resolve().parent / "agent.py"
FEED = "chaos"
EMIT_PORT = 6667
CAPTURE_HEALTH = 18080
EMIT_HEALTH = 18081
GROUPS = ("239.111.111.1", "239.111.111.2", "239.111.111.3", "239.111.111.4")
MCAST_PORT = 6100
#: RELAYD_SOAK=1 runs the long versions (``make soak``).
SOAK = os.environ.get("RELAYD_SOAK", "") not in ("", "0")
CLONE_NEWNET = 0x40000000


def scaled(short: float, long: float) -> float:
    """A duration: ``short`` in ``make test``, ``long`` with RELAYD_SOAK=1."""
    return long if SOAK else short


def build_tools(out: Path) -> tuple[Path, Path]:
    """Compile bench/gen.c and bench/recv.c into ``out``."""
    binaries = []
    for name in ("gen", "recv"):
        binary = out / name
        subprocess.run(
            ["gcc", "-O2", "-Wall", "-o", str(binary), str(REPO / "bench" / f"{name}.c")],
            check=True,
            timeout=120,
            capture_output=True,
        )
        binaries.append(binary)
    return binaries[0], binaries[1]


def tools_missing() -> str | None:
    if shutil.which("gcc") is None:
        return "gcc is needed to build the C generator and receiver (bench/gen.c, bench/recv.c)"
    if shutil.which("tc") is None:
        return "tc (iproute2) is needed for the slow-path scenarios"
    return None


# -- inside a namespace from this process -------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _enter_namespace(name: str) -> None:
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


class NsWorker:
    """One thread that lives inside a namespace: sockets it makes belong to that namespace."""

    def __init__(self, netns: Netns) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, initializer=_enter_namespace, initargs=(netns.name,)
        )

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 30.0) -> T:
        return self._pool.submit(fn, *args).result(timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def http_get(
    port: int, path: str, timeout: float = 5.0, host: str = "127.0.0.1"
) -> tuple[int, bytes, float]:
    """(status, body, seconds) of one GET with a fresh connection."""
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body, time.monotonic() - start


# -- process figures -------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def timer_count(pid: int) -> tuple[int, int]:
    """The process's timerfds and its threads: a data-path thread makes one timerfd of its own
    at its first repeated deadline (relayd/_fastpath.c), so there are never more timers than
    threads."""
    timers = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            timers += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[timerfd]"
    return timers, len(os.listdir(f"/proc/{pid}/task"))


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return sxy / sxx if sxx else 0.0


def report(scenario: str, **figures: Any) -> None:
    """Print the scenario's figures (``-s`` shows them) and append them to the file named
    by RELAYD_CHAOS_REPORT, one JSON object a line, for docs/RELIABILITY.md."""
    line = json.dumps({"scenario": scenario, "soak": SOAK, **figures}, sort_keys=True)
    print(f"\nCHAOS {line}")
    target = os.environ.get("RELAYD_CHAOS_REPORT")
    if target:
        with open(target, "a", encoding="utf-8") as out:
            out.write(line + "\n")


# -- the relay -------------------------------------------------------------------------------


@attrs.define
class Stream:
    """A generator run and the receiver counting it."""

    gen: subprocess.Popen[bytes]
    recv: subprocess.Popen[bytes]
    count: int
    rate: float

    def result(self, timeout: float) -> dict[str, Any]:
        """``sent``, ``received``, ``lost``, ``dup`` and the receiver's own socket ``drops``."""
        gen_out, _ = self.gen.communicate(timeout=timeout)
        sent = int(gen_out.decode().split()[1])
        recv_out, _ = self.recv.communicate(timeout=timeout)
        words = recv_out.decode().split()
        fields = dict(zip(words[::2], words[1::2], strict=False))
        received = int(fields["received"])
        return {
            "rate": self.rate,
            "sent": sent,
            "received": received,
            "lost": sent - received,
            "dup": int(fields["dup"]),
            "receiver_drops": int(fields["drops"]),
        }


@attrs.define
class Relay:
    net: NetnsHarness
    src: Netns
    dc: Netns
    cloud: Netns
    cust: Netns
    edge: Netns
    source: Link
    path: Link
    egress: Link
    attack: Link
    workdir: Path
    gen_bin: Path
    recv_bin: Path
    capture: subprocess.Popen[bytes] | None = None
    emit: subprocess.Popen[bytes] | None = None
    workers: dict[str, NsWorker] = attrs.field(factory=dict)
    _fds: list[int] = attrs.field(factory=list)

    # -- set-up ------------------------------------------------------------------------------

    @classmethod
    def build(cls, net: NetnsHarness, workdir: Path, gen_bin: Path, recv_bin: Path) -> Relay:
        src, dc, cloud = net.namespace("src"), net.namespace("dc"), net.namespace("cloud")
        cust, edge = net.namespace("cust"), net.namespace("edge")
        source = net.link(src, dc)
        path = net.link(dc, cloud)
        egress = net.link(cloud, cust)
        attack = net.link(edge, cloud)
        src.add_multicast_route(source.a_dev)
        cust.add_multicast_route(egress.b_dev)
        for ns in (src, dc, cloud, cust, edge):
            # No reverse-path filter surprises for multicast; IGMPv2 like the TGW.
            ns.sysctl("net.ipv4.conf.all.rp_filter", 0)
            ns.sysctl("net.ipv4.conf.default.rp_filter", 0)
        key = base64.b64encode(os.urandom(32)) + b"\n"
        (workdir / "keys").mkdir()
        key_file = workdir / "keys" / "feed.key"
        key_file.write_bytes(key)
        key_file.chmod(0o400)
        return cls(net, src, dc, cloud, cust, edge, source, path, egress, attack, workdir,
                   gen_bin, recv_bin)  # fmt: skip

    def worker(self, ns: Netns) -> NsWorker:
        if ns.name not in self.workers:
            self.workers[ns.name] = NsWorker(ns)
        return self.workers[ns.name]

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def _log(self, name: str) -> int:
        fd = os.open(self.workdir / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._fds.append(fd)
        return fd

    def log_text(self, name: str) -> str:
        return (self.workdir / name).read_text(errors="replace")

    def capture_toml(self, **overrides: str) -> str:
        groups = ", ".join(f'"{g}:{MCAST_PORT}"' for g in GROUPS)
        keys = {
            "name": f'"{FEED}"',
            "interface": f'"{self.source.b_dev}"',
            "groups": f"[{groups}]",
            "targets": f'["{self.path.b_addr.ip}:{EMIT_PORT}"]',
            "receive_buffer": '"16MiB"',
            "heartbeat_interval": '"200ms"',
            "idle_timeout": '"2s"',
            "connect_timeout": '"1s"',
            "auth_key_file": '"keys/feed.key"',
            **overrides,
        }
        body = "".join(f"{k} = {v}\n" for k, v in keys.items())
        return f'[health]\nlisten = "127.0.0.1:{CAPTURE_HEALTH}"\n\n[[capture]]\n{body}'

    def emit_toml(self, extra: str = "", **overrides: str) -> str:
        keys = {
            "name": f'"{FEED}"',
            "listen": f'"0.0.0.0:{EMIT_PORT}"',
            "interface": f'"{self.egress.a_dev}"',
            "ttl": "1",
            "allowed_sources": f'["{self.path.a_addr.network}", "{self.attack.a_addr.network}"]',
            "allowed_groups": '["239.111.111.0/24"]',
            # as docs/CONFIG.md asks of every emit host: the observer watches from the start
            "watch_groups": "[" + ", ".join(f'"{g}:{MCAST_PORT}"' for g in GROUPS) + "]",
            "max_connections": "4",
            "hello_timeout": '"2s"',
            "heartbeat_interval": '"200ms"',
            "idle_timeout": '"2s"',
            "send_buffer": '"4MiB"',
            "auth_key_files": '["keys/feed.key"]',
            **overrides,
        }
        body = "".join(f"{k} = {v}\n" for k, v in keys.items())
        return f'[health]\nlisten = "0.0.0.0:{EMIT_HEALTH}"\n\n[[emit]]\n{body}{extra}'

    def start(
        self, *, capture: str | None = None, emit: str | None = None, emit_nofile: int = 0
    ) -> None:
        """Both relayd processes (at nice -10, like the appliance's single busy service on a
        shared host); returns when both health servers report every feed healthy.
        ``emit_nofile`` > 0 sets the emit process's descriptor limit (soft and hard)."""
        (self.workdir / "emit.toml").write_text(emit or self.emit_toml())
        (self.workdir / "capture.toml").write_text(capture or self.capture_toml())
        self.emit = self._relayd(self.cloud, "emit", emit_nofile)
        self._wait_healthy(self.cloud, EMIT_HEALTH)
        self.capture = self._relayd(self.dc, "capture")
        self._wait_healthy(self.dc, CAPTURE_HEALTH, state="streaming")

    def _relayd(self, ns: Netns, name: str, nofile: int = 0) -> subprocess.Popen[bytes]:
        config = str(self.workdir / f"{name}.toml")
        argv = ["nice", "-n", "-10", *ns.relayd_argv("run", "--config", config)]
        if nofile:
            argv = ["prlimit", f"--nofile={nofile}:{nofile}", *argv]
        return ns.popen(argv, stdout=subprocess.DEVNULL, stderr=self._log(f"{name}.log"))

    def _wait_healthy(
        self, ns: Netns, port: int, state: str | None = None, timeout: float = 30.0
    ) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                status, body, _ = self.worker(ns).call(http_get, port, "/healthz", 2.0)
                last = body
                doc = json.loads(body)
                if status == 200 and (
                    state is None or all(f["state"] == state for f in doc["feeds"].values())
                ):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"{ns.label} not healthy: {last!r}\n{self.log_text('emit.log')}"
                             f"\n{self.log_text('capture.log')}")  # fmt: skip

    def pid(self, which: str) -> int:
        """The relayd process (``ip netns exec``, ``prlimit`` and ``nice`` exec into it: same
        pid)."""
        proc = self.capture if which == "capture" else self.emit
        assert proc is not None
        assert proc.poll() is None, f"{which} relayd is not running"
        return proc.pid

    def health(self, which: str, path: str = "/healthz") -> tuple[int, dict[str, Any], float]:
        ns, port = (self.dc, CAPTURE_HEALTH) if which == "capture" else (self.cloud, EMIT_HEALTH)
        status, body, seconds = self.worker(ns).call(http_get, port, path, 5.0)
        return status, json.loads(body), seconds

    def metrics(self, which: str) -> str:
        ns, port = (self.dc, CAPTURE_HEALTH) if which == "capture" else (self.cloud, EMIT_HEALTH)
        return self.worker(ns).call(http_get, port, "/metrics", 5.0)[1].decode()

    def hup(self, which: str) -> None:
        os.kill(self.pid(which), signal.SIGHUP)

    # -- the stream --------------------------------------------------------------------------

    def stream(self, rate: float, seconds: float, run_id: int = 1, idle: float = 5.0) -> Stream:
        """Start the receiver, then the generator: ``rate`` datagrams/s for ``seconds``. The
        receiver stops after ``idle`` seconds without a datagram (longer than any outage the
        test makes), or once it has every datagram."""
        count = int(rate * seconds)
        groups = ",".join(GROUPS)
        recv = self.cust.popen(
            [str(self.recv_bin), "--iface", str(self.egress.b_addr.ip), "--groups", groups,
             "--port", str(MCAST_PORT), "--count", str(count), "--run-id", str(run_id),
             "--idle-ms", str(int(idle * 1000)),
             "--timeout-ms", str(int((seconds + idle + 60) * 1000))],
            stdout=subprocess.PIPE, stderr=self._log("recv.log"),
        )  # fmt: skip
        assert read_line(recv, 10.0).strip() == "ready"
        gen = self.src.popen(
            ["nice", "-n", "-10", str(self.gen_bin), "--iface", str(self.source.a_addr.ip),
             "--groups", groups, "--port", str(MCAST_PORT), "--rate", str(rate),
             "--count", str(count), "--run-id", str(run_id)],
            stdout=subprocess.PIPE, stderr=self._log("gen.log"),
        )  # fmt: skip
        return Stream(gen, recv, count, rate)

    def wait_flowing(self, timeout: float = 10.0) -> None:
        """Until every group has had a datagram out of the emit side: the emit feed opens a
        socket per destination on first use, so descriptor baselines are taken after this."""
        deadline = time.monotonic() + timeout
        while metric(self.metrics("emit"), "datagrams_out_total") < 2 * len(GROUPS):
            if time.monotonic() > deadline:
                raise AssertionError(f"no datagrams out of the emit side within {timeout:g} s")
            time.sleep(0.05)

    def agent(self, ns: Netns, *args: str) -> subprocess.Popen[bytes]:
        """tests/chaos/agent.py inside ``ns`` (stdout: one JSON line at its end)."""
        return ns.popen(
            ns.python_argv(str(AGENT), *args),
            stdout=subprocess.PIPE,
            stderr=self._log("agent.log"),
        )


class Sampler:
    """RSS and descriptor counts of processes, sampled by the caller at its own pace."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start = time.monotonic()
        self.rows: dict[str, list[tuple[float, int, int]]] = {k: [] for k in pids}
        self.timers: dict[str, list[tuple[int, int]]] = {k: [] for k in pids}

    def sample(self) -> None:
        now = time.monotonic() - self.start
        for name, pid in self.pids.items():
            self.rows[name].append((now, rss_kib(pid), fd_count(pid)))
            self.timers[name].append(timer_count(pid))

    def figures(self, after: float = 0.0) -> dict[str, Any]:
        """Per process: RSS first/max/last (KiB), fds first/max/last, the timerfds and
        threads at the first and last sample (a data thread makes its timer at its first
        repeated deadline, which may come after the first sample), and least-squares slopes
        (KiB per minute, fds per minute) of the samples taken after ``after`` s."""
        out: dict[str, Any] = {}
        for name, rows in self.rows.items():
            late = [r for r in rows if r[0] >= after] or rows
            out[name] = {
                "rss_kib_first": rows[0][1],
                "rss_kib_max": max(r[1] for r in rows),
                "rss_kib_last": rows[-1][1],
                "rss_kib_per_min": round(60 * slope([(t, r) for t, r, _ in late]), 1),
                "fds_first": rows[0][2],
                "fds_max": max(r[2] for r in rows),
                "fds_last": rows[-1][2],
                "timers_first": self.timers[name][0][0],
                "timers_last": self.timers[name][-1][0],
                "threads_last": self.timers[name][-1][1],
                "fds_per_min": round(60 * slope([(t, f) for t, _, f in late]), 2),
                "samples": len(rows),
            }
        return out


def every(interval: float, until: float) -> Iterator[float]:
    """Yield the elapsed time every ``interval`` seconds until ``until`` seconds passed."""
    start = time.monotonic()
    tick = 0
    while (now := time.monotonic() - start) < until:
        yield now
        tick += 1
        time.sleep(max(0.0, start + tick * interval - time.monotonic()))


def python() -> str:
    return sys.executable
