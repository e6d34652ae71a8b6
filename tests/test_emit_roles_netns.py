"""One active emitter per feed, between real namespaces (issue 14 item 2).

    exch ──veth── dc ──veth── nlb ──veth── emit1 ─┐
    sender        capture     HAProxy ──veth── emit2 ─┤ seg (a bridge) ── cust (receiver)

The sender streams numbered datagrams as multicast into "dc"; one capture ``relayd run``
streams them to the NLB stand-in (tests/helpers/nlb.py: HAProxy steering by
``/healthz/<feed>``), which sends them to whichever emit host is healthy. Both emit hosts and
the customer share one multicast segment, so each emit host's observer sees the other emit.
The receiver in "cust" records every datagram's source address, so the tests see which host
emitted what, and when. Measured figures are printed (``-s`` shows them), never asserted on.

Run as a script, this file is the sender (``send``) and the receiver (``recv``).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Final

import attrs
import pytest

from tests.helpers.metrics import value as metric_value
from tests.helpers.netns import Link, Netns, NetnsError, NetnsHarness, read_line
from tests.helpers.nlb import NlbStandIn, Target, haproxy_unavailable

pytestmark = [pytest.mark.netns, pytest.mark.slow]

FEED = "deribit"
EMIT_PORT = 6667
HEALTH_PORT = 18080
NLB_PORT = 7000
GROUPS = ("239.111.111.1:6100", "239.111.111.2:6100")
RATE = 2000  # datagrams per second, over both groups
#: Freeze-then-kill trials: 1 in ``make test``, 20 with RELAYD_SOAK=1 (``make soak``).
TRIALS = 20 if os.environ.get("RELAYD_SOAK", "") not in ("", "0") else 1
HERE = Path(__file__).resolve()
_COUNTER = struct.Struct("!Q")


# -- what runs inside the namespaces (script mode) ------------------------------------------


def _send(args: argparse.Namespace) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(args.interface))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    targets = []
    for text in args.groups:
        group, _, port = text.rpartition(":")
        targets.append((group, int(port)))
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print("ready", flush=True)
    start = time.monotonic()
    n = 0
    while not stop:
        due = start + n / args.rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sock.sendto(_COUNTER.pack(n) + bytes(64), targets[n % len(targets)])
        n += 1
    print(json.dumps({"sent": n}), flush=True)
    return 0


def _recv(args: argparse.Namespace) -> int:
    socks = []
    for text in args.groups:
        group, _, port = text.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IP, 49, 0)  # IP_MULTICAST_ALL off
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.bind((group, int(port)))
        mreq = socket.inet_aton(group) + socket.inet_aton(args.interface)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        sock.setblocking(False)
        socks.append(sock)
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print("ready", flush=True)
    with open(args.out, "w") as out:
        while not stop:
            try:
                ready, _, _ = select.select(socks, [], [], 0.2)
            except InterruptedError:
                continue
            for sock in ready:
                while True:
                    try:
                        payload, (source, _port) = sock.recvfrom(2048)
                    except BlockingIOError:
                        break
                    n = _COUNTER.unpack_from(payload)[0]
                    out.write(f"{time.monotonic():.6f} {source} {n}\n")
            out.flush()  # the test reads the file while this runs
    return 0


def _script(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    send = commands.add_parser("send")
    send.add_argument("--interface", required=True)
    send.add_argument("--rate", type=float, default=RATE)
    send.add_argument("groups", nargs="+")
    recv = commands.add_parser("recv")
    recv.add_argument("--interface", required=True)
    recv.add_argument("--out", required=True)
    recv.add_argument("groups", nargs="+")
    args = parser.parse_args(argv)
    return _send(args) if args.command == "send" else _recv(args)


# -- the topology --------------------------------------------------------------------------


@attrs.define
class Site:
    net: NetnsHarness
    workdir: Path
    exch: Netns
    dc: Netns
    nlb_ns: Netns
    cust: Netns
    seg: Netns
    emits: dict[str, Netns]
    source: Link  # exch - dc
    front: Link  # dc - nlb
    backs: dict[str, Link]  # nlb - emitN
    segment: dict[str, Link]  # seg - emitN / cust
    nlb: NlbStandIn | None = None
    procs: dict[str, subprocess.Popen[bytes]] = attrs.field(factory=dict)
    fds: list[int] = attrs.field(factory=list)

    def address(self, emit: str) -> IPv4Address:
        """The emit host's address on the customer segment (its multicast source)."""
        return self.segment[emit].b_addr.ip

    def _log(self, name: str) -> int:
        fd = os.open(self.workdir / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.fds.append(fd)
        return fd

    def log(self, name: str) -> str:
        path = self.workdir / name
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def _run_relayd(self, ns: Netns, label: str, toml: str) -> None:
        """``relayd run`` in ``ns`` on ``toml`` (kept as ``label``.toml, logs in ``label``.log)."""
        config = self.workdir / f"{label}.toml"
        config.write_text(toml)
        self.procs[label] = ns.popen(
            ns.relayd_argv("run", "--config", str(config)),
            stdout=subprocess.DEVNULL,
            stderr=self._log(f"{label}.log"),
        )

    def start_emit(self, name: str, extra: str = "") -> None:
        watch = ", ".join(f'"{g}"' for g in GROUPS)
        self._run_relayd(
            self.emits[name],
            name,
            f"""
[health]
listen = "0.0.0.0:{HEALTH_PORT}"

[[emit]]
name = "{FEED}"
listen = "{self.backs[name].b_addr.ip}:{EMIT_PORT}"
interface = "{self.segment[name].b_dev}"
ttl = 1
allowed_sources = ["10.99.0.0/16"]
allowed_groups = ["239.111.111.0/24"]
heartbeat_interval = "200ms"
idle_timeout = "1s"
watch_groups = [{watch}]
{extra}""",
        )

    def start_capture(self, label: str, targets: Sequence[str], health: int) -> None:
        listed = ", ".join(f'"{t}"' for t in targets)
        groups = ", ".join(f'"{g}"' for g in GROUPS)
        self._run_relayd(
            self.dc,
            label,
            f"""
[health]
listen = "127.0.0.1:{health}"

[[capture]]
name = "{FEED}"
interface = "{self.source.b_dev}"
groups = [{groups}]
targets = [{listed}]
heartbeat_interval = "200ms"
idle_timeout = "1s"
connect_timeout = "1s"
""",
        )

    def start_sender(self) -> None:
        proc = self.exch.popen(
            self.exch.python_argv(
                str(HERE), "send", "--interface", str(self.source.a_addr.ip), *GROUPS
            ),
            stdout=subprocess.PIPE,
        )
        assert read_line(proc, timeout=20).strip() == "ready"
        self.procs["sender"] = proc

    def start_receiver(self) -> None:
        proc = self.cust.popen(
            self.cust.python_argv(
                str(HERE), "recv", "--interface", str(self.segment["cust"].b_addr.ip),
                "--out", str(self.workdir / "received.txt"), *GROUPS,
            ),
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert read_line(proc, timeout=20).strip() == "ready"
        self.procs["receiver"] = proc

    def received(self) -> list[tuple[float, str, int]]:
        """(arrival time, source, counter) of every datagram the customer got so far."""
        path = self.workdir / "received.txt"
        rows = []
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                rows.append((float(parts[0]), parts[1], int(parts[2])))
        return rows

    def health(self, emit: str) -> tuple[int, dict[str, Any]]:
        status, body = self.emits[emit].http_get(f"http://127.0.0.1:{HEALTH_PORT}/healthz/{FEED}")
        return status, json.loads(body)

    def metric(self, emit: str, name: str, **labels: str) -> float:
        status, body = self.emits[emit].http_get(f"http://127.0.0.1:{HEALTH_PORT}/metrics")
        assert status == 200, body
        return metric_value(body, name, feed=FEED, **labels)

    def role(self, emit: str) -> str | None:
        try:
            return str(self.health(emit)[1]["feeds"][FEED]["role"]["role"])
        except (NetnsError, OSError, ValueError, KeyError, subprocess.TimeoutExpired):
            return None

    def wait_roles(self, want: dict[str, str], timeout: float = 40.0) -> float:
        """Until every named emit host has its role; the seconds it took."""
        start = time.monotonic()
        roles: dict[str, str | None] = {}
        while time.monotonic() < start + timeout:
            roles = {name: self.role(name) for name in want}
            if roles == want:
                return time.monotonic() - start
            time.sleep(0.2)
        logs = "\n".join(f"--- {n}\n{self.log(n + '.log')}" for n in (*self.emits, "capture"))
        raise AssertionError(f"roles {roles}, want {want}\n{logs}")

    def isolate(self, isolated: bool) -> None:
        """Bridge port isolation: the emit hosts stop seeing each other, the customer still
        sees both (a partition between the relays only)."""
        state = "on" if isolated else "off"
        for name in self.emits:
            dev = self.segment[name].a_dev
            self.seg.run(["bridge", "link", "set", "dev", dev, "isolated", state])

    def close(self) -> None:
        if self.nlb is not None:
            self.nlb.close()
        self.net.close()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


@pytest.fixture
def site(netns: NetnsHarness, tmp_path: Path) -> Iterator[Site]:
    reason = haproxy_unavailable()
    if reason is not None:
        pytest.skip(reason)
    exch, dc, nlb = netns.namespace("exch"), netns.namespace("dc"), netns.namespace("nlb")
    emits = {name: netns.namespace(name) for name in ("emit1", "emit2")}
    cust, seg = netns.namespace("cust"), netns.namespace("seg")
    source = netns.link(exch, dc)
    front = netns.link(dc, nlb)
    backs = {name: netns.link(nlb, ns) for name, ns in emits.items()}
    exch.add_multicast_route(source.a_dev)
    nlb.sysctl("net.ipv4.ip_forward", 1)
    dc.run(["ip", "route", "add", "default", "via", str(front.b_addr.ip)])
    for name, ns in emits.items():
        ns.run(["ip", "route", "add", "default", "via", str(backs[name].a_addr.ip)])
    # the customer segment: one bridge, emit1 .11, emit2 .12, cust .20
    seg.run(["ip", "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"])
    segment = {}
    for index, (name, ns) in enumerate([*emits.items(), ("cust", cust)]):
        host = 20 if name == "cust" else 11 + index
        link = netns.link(
            seg, ns, a_addr=f"10.97.{index}.1/30", b_addr=f"10.98.0.{host}/24", b_dev="seg0"
        )
        seg.run(["ip", "addr", "flush", "dev", link.a_dev])
        seg.run(["ip", "link", "set", link.a_dev, "master", "br0"])
        segment[name] = link
    seg.run(["ip", "link", "set", "br0", "up"])
    site = Site(
        net=netns,
        workdir=tmp_path,
        exch=exch,
        dc=dc,
        nlb_ns=nlb,
        cust=cust,
        seg=seg,
        emits=emits,
        source=source,
        front=front,
        backs=backs,
        segment=segment,
    )
    try:
        yield site
    finally:
        site.close()


def _start_nlb(site: Site) -> None:
    site.nlb = NlbStandIn(
        site.nlb_ns,
        listen=site.front.b_addr.ip,
        port=NLB_PORT,
        feed=FEED,
        targets=[
            Target(name, site.backs[name].b_addr.ip, EMIT_PORT, HEALTH_PORT) for name in site.emits
        ],
        check_timeout=1.0,
    )
    site.nlb.start()


#: Arrival-time bins for "two sources at once".
BIN: Final = 0.05


def concurrent_bins(rows: list[tuple[float, str, int]]) -> int:
    """How many BIN-second slices of the customer's arrivals hold two sources: the overlap
    (at RATE, a slice holds about 100 datagrams, so a takeover's silence never counts)."""
    sources: dict[int, set[str]] = {}
    for t, source, _n in rows:
        sources.setdefault(int(t / BIN), set()).add(source)
    return sum(1 for seen in sources.values() if len(seen) > 1)


def silence(rows: list[tuple[float, str, int]], old: str, new: str, after: float) -> float:
    """From the old source's last datagram before the new one's first after ``after``, to
    that first datagram: the takeover as the customer sees it."""
    first_new = min(t for t, source, _n in rows if source == new and t >= after)
    last_old = max(t for t, source, _n in rows if source == old and t < first_new)
    return first_new - last_old


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def test_one_emitter_takeover_on_freeze_and_kill(site: Site) -> None:
    site.start_receiver()
    for name in site.emits:
        site.start_emit(name)
    _start_nlb(site)
    site.start_sender()
    site.start_capture("capture", [f"{site.front.b_addr.ip}:{NLB_PORT}"], 18090)
    # one of them takes the stream; the other sees it emit and stands by
    _wait_for(lambda: "active" in {site.role(n) for n in site.emits}, 40, "an active emitter")
    active = next(n for n in site.emits if site.role(n) == "active")
    standby = next(n for n in site.emits if n != active)
    site.wait_roles({active: "active", standby: "standby"})
    status, body = site.health(standby)
    assert status == 503
    feed = body["feeds"][FEED]
    assert feed["state"] == "standby"
    assert str(site.address(active)) in feed["role"]["reason"]
    assert feed["role"]["other_relays"][0]["source"] == str(site.address(active))
    instance, _ = site.emits[standby].http_get(f"http://127.0.0.1:{HEALTH_PORT}/healthz")
    assert instance == 200  # a standby is not a fault: the host check must not replace it
    assert site.metric(active, "emit_active") == 1
    assert site.metric(standby, "emit_active") == 0
    assert site.nlb is not None
    site.nlb.wait_state(standby, up=False, timeout=20)
    time.sleep(1.0)

    for trial in range(1, TRIALS + 1):
        _freeze_then_kill(site, active, standby, trial)
        if trial < TRIALS:  # the killed host comes back as the standby of the next trial
            site.start_emit(standby)
            site.wait_roles({active: "active", standby: "standby"}, timeout=60)
            site.nlb.wait_state(standby, up=False, timeout=20)
            time.sleep(1.0)
    rows = site.received()
    overlap = concurrent_bins(rows)
    print(f"two sources at once: {overlap} slices of {BIN} s over {len(rows)} datagrams")
    assert overlap == 0


def _freeze_then_kill(site: Site, active: str, standby: str, trial: int) -> None:
    """Freeze ``active``: ``standby`` takes over, and ``active`` wakes to find it active and
    must not emit what it held. Then kill ``standby``: ``active`` takes the feed back."""
    frozen_at = time.monotonic()
    site.procs[active].send_signal(signal.SIGSTOP)
    try:
        _wait_for(lambda: site.role(standby) == "active", 40, f"{standby} taking over")
        took = time.monotonic() - frozen_at
        time.sleep(2.0)
    finally:
        site.procs[active].send_signal(signal.SIGCONT)
    woke_at = time.monotonic()
    site.wait_roles({standby: "active", active: "standby"})
    time.sleep(2.0)
    rows = site.received()
    old, new = str(site.address(active)), str(site.address(standby))
    after_wake = [r for r in rows if r[0] >= woke_at and r[1] == old]
    print(
        f"\ntrial {trial}: freeze: role switched after {took:.2f} s; the woken host emitted "
        f"{len(after_wake)} datagrams after SIGCONT; stepped down (woke_to_another): "
        f"{site.metric(active, 'emit_stepped_down', reason='woke_to_another'):.0f}"
    )
    assert after_wake == [], "the woken host emitted its backlog"
    print(
        f"trial {trial}: freeze: silence at the customer {silence(rows, old, new, frozen_at):.3f} s"
    )
    assert site.metric(active, "split_brain") == 0

    killed_at = time.monotonic()
    site.procs[standby].kill()
    site.procs[standby].wait(timeout=10)
    site.wait_roles({active: "active"}, timeout=60)
    print(
        f"trial {trial}: kill -9: the other host active after {time.monotonic() - killed_at:.2f} s"
    )
    time.sleep(2.0)
    rows = site.received()
    quiet = silence(rows, new, old, killed_at)
    print(f"trial {trial}: kill -9: silence at the customer {quiet:.3f} s")


def test_forced_split_brain_is_counted_and_resolved(site: Site) -> None:
    site.start_receiver()
    site.isolate(True)  # the relays cannot see each other: both will take a stream
    for name in site.emits:
        site.start_emit(name)
    site.start_sender()
    for index, name in enumerate(site.emits):  # each capture side straight to one emit host
        target = f"{site.backs[name].b_addr.ip}:{EMIT_PORT}"
        site.start_capture(f"capture{index}", [target], 18090 + index)
    site.wait_roles(dict.fromkeys(site.emits, "active"))
    time.sleep(1.0)
    sources = {r[1] for r in site.received()}
    assert sources == {str(site.address(n)) for n in site.emits}  # two sources: the fault
    healed_at = time.monotonic()
    site.isolate(False)
    _wait_for(
        lambda: sorted(str(site.role(n)) for n in site.emits) == ["active", "standby"],
        30,
        "the split-brain resolving",
    )
    resolved = time.monotonic() - healed_at
    keeper = next(n for n in site.emits if site.role(n) == "active")
    loser = next(n for n in site.emits if n != keeper)
    counted = {n: site.metric(n, "split_brain") for n in site.emits}
    print(
        f"\nsplit-brain: resolved {resolved:.2f} s after the partition healed; counted "
        f"{counted}; {keeper} keeps the feed"
    )
    assert all(count >= 1 for count in counted.values())
    assert site.metric(loser, "emit_stepped_down") >= 1
    assert site.metric(keeper, "emit_stepped_down") == 0
    # the tie-break (neither saw the other first): the lower address keeps it
    assert site.address(keeper) < site.address(loser)
    status, body = site.health(loser)
    assert status == 503
    assert body["feeds"][FEED]["role"]["split_brains"] >= 1
    rows = site.received()
    both = [t for t, source, _n in rows if source == str(site.address(loser)) and t >= healed_at]
    print(f"split-brain: the loser emitted for {max(both, default=healed_at) - healed_at:.2f} s "
          f"after the heal ({len(both)} datagrams)")  # fmt: skip
    time.sleep(3.0)  # past the grace: the loser no longer counts the keeper as a split
    settled = time.monotonic() - 1.0
    late = {r[1] for r in site.received() if r[0] >= settled}
    assert late == {str(site.address(keeper))}
    assert site.metric(keeper, "emit_split_brain") == 0


def test_two_hosts_given_streams_before_any_data_agree_on_one_emitter(site: Site) -> None:
    """Two capture hosts, each connecting to a different emit host first (as the NLB spreads
    them while both are ready), before any datagram flows: both hosts claim at once, the
    higher address yields before emitting anything, its capture side moves to the other
    host, and only one host ever emits; with ``content`` arbitration nothing arrives twice.
    (Before the claim both became active and emitted until the split-brain tie-break.)"""
    site.start_receiver()
    # A long claim; and the hosts cannot hear each other until both claim (bridge port
    # isolation), so that the two claims surely overlap however slowly the processes start.
    site.isolate(True)
    for name in site.emits:
        site.start_emit(name, 'emitter_claim = "5s"\narbitration = "content"\n')
    names = list(site.emits)
    site.wait_roles(dict.fromkeys(names, "ready"))  # listening: each capture side's first try
    for index, name in enumerate(names):
        own, other = (f"{site.backs[n].b_addr.ip}:{EMIT_PORT}" for n in (name, names[1 - index]))
        site.start_capture(f"capture{index}", [own, other], 18090 + index)
    site.wait_roles(dict.fromkeys(names, "claiming"))
    site.isolate(False)
    keeper, loser = sorted(names, key=site.address)
    site.wait_roles({keeper: "active", loser: "standby"})
    _wait_for(
        lambda: len(site.health(keeper)[1]["feeds"][FEED]["connections"]) == 2,
        30,
        "both capture sides streaming to the active host",
    )
    yielded = site.metric(loser, "emit_claims", outcome="yielded")
    won = site.metric(keeper, "emit_claims", outcome="won")
    print(f"\nclaims: {keeper} won {won:.0f}, {loser} yielded {yielded:.0f}")
    assert yielded >= 1, site.log(f"{loser}.log")
    assert site.metric(loser, "emit_claims", outcome="won") == 0
    site.start_sender()
    time.sleep(3.0)
    rows = site.received()
    assert len(rows) > 1000
    assert {source for _t, source, _n in rows} == {str(site.address(keeper))}
    counters = [n for _t, _source, n in rows]
    assert len(counters) == len(set(counters)), "a datagram arrived twice"
    for name in names:
        assert site.metric(name, "split_brain") == 0
    assert site.metric(loser, "datagrams_out") == 0


if __name__ == "__main__":
    sys.exit(_script())
