"""A stand-in for the AWS Network Load Balancer in namespace tests: HAProxy in TCP mode.

    nlb = NlbStandIn(net.namespace("nlb"), listen=IPv4Address("10.99.1.2"), port=7000,
                     feed="deribit", targets=[Target("emit1", IPv4Address(...), 7000, 8080), ...])
    nlb.start()                          # returns once HAProxy answers on its admin socket
    nlb.wait_state("emit1", up=False)    # after the emit host reports the feed not ready

What it copies from the NLB (Elastic Load Balancing docs, "Health checks for Network Load
Balancer target groups"): an HTTP health check of ``/healthz/<feed>`` on each target's health
port decides where new connections go; a target is taken out after ``fall`` failed checks in a
row and back in after ``rise`` good ones (the NLB's UnhealthyThresholdCount and
HealthyThresholdCount; its interval is 5-300 s, here a fraction of a second so tests are
short); connections to a target that turns unhealthy are reset; and when no target is healthy
it fails open and spreads connections over every target. HAProxy has no fail-open, so each
target is declared twice: once health-checked, once as an unchecked backup, and the backups
(``option allbackups``) take the traffic only when every checked server is down. Balancing is
round robin (the NLB hashes the flow): which healthy target a connection gets is not part of
the contract.

Run as a script, ``python nlb.py backend ...`` is a fake emit host (a health endpoint whose
answer follows a flag file, and a TCP port that greets every connection with the host's name)
and ``python nlb.py connect HOST PORT`` prints the greeting it gets (used inside namespaces).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.server
import io
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import attrs

HELPER_FILE = Path(__file__).resolve()
BACKEND = "targets"


class NlbError(Exception):
    """HAProxy did not start, or a state was not reached in time."""


@attrs.frozen
class Target:
    """One emit host behind the stand-in: its feed port and its health port."""

    name: str
    address: IPv4Address
    port: int
    health_port: int


def haproxy_unavailable() -> str | None:
    """Why the stand-in cannot run here (None when it can)."""
    if shutil.which("haproxy") is None:
        return "haproxy is not installed (Debian package haproxy)"
    return None


def render_config(
    *,
    listen: IPv4Address,
    port: int,
    feed: str,
    targets: Sequence[Target],
    admin_socket: Path,
    interval: float,
    rise: int,
    fall: int,
    check_timeout: float,
) -> str:
    """The HAProxy configuration of the stand-in (pure: testable without HAProxy)."""
    if not targets:
        raise ValueError("the stand-in needs at least one target")
    inter = f"{max(1, round(interval * 1000))}ms"
    lines = [
        "global",
        f"    stats socket {admin_socket} mode 600 level admin",
        "defaults",
        "    mode tcp",
        "    timeout connect 2s",
        "    timeout client 1h",
        "    timeout server 1h",
        f"    timeout check {max(1, round(check_timeout * 1000))}ms",
        "frontend feed",
        f"    bind {listen}:{port}",
        f"    default_backend {BACKEND}",
        f"backend {BACKEND}",
        "    balance roundrobin",
        f"    option httpchk GET /healthz/{feed}",
        "    http-check expect status 200",
        "    option allbackups",
        f"    default-server inter {inter} fastinter {inter} downinter {inter}"
        f" rise {rise} fall {fall}",
    ]
    for target in targets:
        address = f"{target.address}:{target.port}"
        lines.append(
            f"    server {target.name} {address} check port {target.health_port}"
            " on-marked-down shutdown-sessions"
        )
    for target in targets:  # fail open: used only when every checked server is down
        lines.append(f"    server {target.name}-open {target.address}:{target.port} backup")
    return "\n".join(lines) + "\n"


class NlbStandIn:
    """HAProxy run inside a namespace (a ``netns.Netns``); stopped with the harness."""

    def __init__(
        self,
        netns: Any,
        *,
        listen: IPv4Address,
        port: int,
        feed: str,
        targets: Sequence[Target],
        interval: float = 0.2,
        rise: int = 2,
        fall: int = 2,
        check_timeout: float = 2.0,  # generous: a loaded test machine must not flap targets
    ) -> None:
        self.netns = netns
        self.listen = listen
        self.port = port
        self.feed = feed
        self.targets = tuple(targets)
        self._dir = Path(tempfile.mkdtemp(prefix="rlyt-nlb-"))
        self.admin_socket = self._dir / "admin.sock"
        self.config_text = render_config(
            listen=listen,
            port=port,
            feed=feed,
            targets=self.targets,
            admin_socket=self.admin_socket,
            interval=interval,
            rise=rise,
            fall=fall,
            check_timeout=check_timeout,
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = self._dir / "haproxy.log"

    def start(self, timeout: float = 10.0) -> None:
        config = self._dir / "haproxy.cfg"
        config.write_text(self.config_text)
        check = subprocess.run(
            ["haproxy", "-c", "-q", "-f", str(config)], capture_output=True, text=True, check=False
        )
        if check.returncode != 0:
            raise NlbError(f"haproxy rejected the configuration: {check.stderr.strip()}")
        with self._log.open("wb") as log:
            self.proc = self.netns.popen(
                ["haproxy", "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NlbError(f"haproxy exited {self.proc.returncode}: {self.log()}")
            with contextlib.suppress(OSError):
                self.admin("show info")
                return
            time.sleep(0.05)
        raise NlbError(f"haproxy's admin socket did not answer within {timeout} s: {self.log()}")

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self._log.read_text(errors="replace")[-2000:]
        return ""

    def admin(self, command: str) -> str:
        """One command on HAProxy's admin socket (a Unix socket: no namespace needed)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            sock.connect(str(self.admin_socket))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def states(self) -> dict[str, str]:
        """Each health-checked target's state as HAProxy sees it: "UP", "DOWN", or a
        transition such as "UP 1/2"."""
        text = self.admin("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        names = {target.name for target in self.targets}
        return {
            row["svname"]: row["status"]
            for row in rows
            if row.get("pxname") == BACKEND and row.get("svname") in names
        }

    def wait_state(self, name: str, *, up: bool, timeout: float = 10.0) -> None:
        want = "UP" if up else "DOWN"
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.states().get(name)
            if state == want:
                return
            time.sleep(0.05)
        raise NlbError(f"{name} is {state!r}, not {want}, after {timeout} s")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=3.0)
        shutil.rmtree(self._dir, ignore_errors=True)


def helper_argv(*args: str) -> list[str]:
    """``python nlb.py args...`` with the test's Python (to run inside a namespace)."""
    return [sys.executable, str(HELPER_FILE), *args]


# ---- the script side: a fake emit host and a client ------------------------------------------


def _serve_backend(name: str, feed: str, feed_port: int, health_port: int, flag: Path) -> int:
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ready = self.path == f"/healthz/{feed}" and not flag.exists()
            body = b"ok\n" if ready else b"not ready\n"
            self.send_response(200 if ready else 503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Greeter(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(name.encode() + b"\n")
            with contextlib.suppress(OSError):
                while self.request.recv(4096):
                    pass

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    health = http.server.ThreadingHTTPServer(("0.0.0.0", health_port), Health)
    greeter = Server(("0.0.0.0", feed_port), Greeter)
    threading.Thread(target=health.serve_forever, daemon=True).start()
    print("ready", flush=True)
    greeter.serve_forever()
    return 0


def _connect(host: str, port: int, hold: bool) -> int:
    """Print the greeting (or the error); with ``hold``, then wait and print how it ended."""
    try:
        sock = socket.create_connection((host, port), timeout=5.0)
    except OSError as exc:
        print(f"error {exc.__class__.__name__}", flush=True)
        return 0
    with sock:
        try:
            line = sock.makefile("rb").readline().decode().strip()
        except OSError as exc:
            line = f"error {exc.__class__.__name__}"
        print(line or "closed", flush=True)
        if hold:
            sock.settimeout(None)
            try:
                ended = "closed" if not sock.recv(4096) else "data"
            except OSError as exc:
                ended = f"error {exc.__class__.__name__}"
            print(ended, flush=True)
    return 0


def _script(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="NLB stand-in helpers")
    commands = parser.add_subparsers(dest="command", required=True)
    backend = commands.add_parser("backend", help="a fake emit host: health and greeting")
    backend.add_argument("--name", required=True)
    backend.add_argument("--feed", required=True)
    backend.add_argument("--port", type=int, required=True)
    backend.add_argument("--health-port", type=int, required=True)
    backend.add_argument("--unhealthy-flag", type=Path, required=True)
    connect = commands.add_parser("connect", help="print the greeting of HOST:PORT")
    connect.add_argument("host")
    connect.add_argument("port", type=int)
    connect.add_argument("--hold", action="store_true", help="then wait for the end")
    args = parser.parse_args(argv)
    if args.command == "backend":
        return _serve_backend(
            args.name, args.feed, args.port, args.health_port, args.unhealthy_flag
        )
    return _connect(args.host, args.port, args.hold)


if __name__ == "__main__":
    sys.exit(_script())
