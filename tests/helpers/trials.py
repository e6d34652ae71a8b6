"""Failure trials: the whole deployment in namespaces, one host failing at a random moment.

::

    exch ── br0 ──┬── capa (capture) ──┐           ┌── emit1 (emit) ──┐
    player        └── capb (capture) ──┴── nlb ─────┴── emit2 (emit) ──┴── brc ── cust
    (multicast)       (optional)           HAProxy: /healthz/<feed>              receiver

The exchange replays the Deribit sample capture as real multicast (``relayd.tools.player`` at
``speed`` times its pace) onto a bridge that reaches every capture host. Each capture host
streams to the NLB stand-in (``tests/helpers/nlb.py``), which sends each connection to a
healthy emit host. Both emit hosts emit onto one customer segment (a bridge: each sees what
the other emits), where the receiver joins every group and records each datagram's arrival
time, group, port, source address and bytes; ``trial_verdict.judge`` turns that into lost,
duplicated, reordered and overlap figures.

One trial (``TrialBed.run``): every process up and streaming (the ones a previous trial killed
are running again), the receiver and the replay start, at a random moment inside the replay one
fault hits one host, then the trial waits until the capture hosts have everything acknowledged
and the customer's receiver has been quiet for a while, and reads every relayd's counters
(/metrics) to compare with what the customer saw. The namespaces, links and the NLB stay up
from one trial to the next; a killed relayd is started again after ``restart_after`` (the
systemd unit's RestartSec), so the next trial finds every host running.

Hosts: capture A and B are fixed; "emit 1" is the emit host carrying the feed when the fault
hits (the one whose datagrams_out grew since the trial began) and "emit 2" the other one, so
that a trial hits the active host or the standby as named, whichever physical host that is
after earlier failovers. Faults: kill -9 (then restarted), freeze (SIGSTOP, ``hold``
seconds, SIGCONT), link cut (the host's link on the relay's TCP path set down for ``hold``
seconds: capture host to NLB, NLB to emit host; the exchange and customer links stay up).

Run as a script: ``python -m tests.helpers.trials table --trials 20`` runs that many trials of
every host and fault (interleaved) and prints the table; ``play`` and ``receive`` are the
player and the receiver run inside the namespaces.
"""

from __future__ import annotations

import argparse
import enum
import json
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import attrs
import trio

from relayd.netif import open_multicast_sender
from relayd.tools.pcapng import CapturedDatagram, read_datagrams
from relayd.tools.player import DERIBIT_HEADER, replay
from relayd.tools.samples import DERIBIT_SAMPLE, deribit_dir
from tests.chaos.topology import NsWorker, http_get
from tests.helpers.metrics import parse
from tests.helpers.netns import (
    Link,
    Netns,
    NetnsError,
    NetnsHarness,
    read_line,
    stop_process,
)
from tests.helpers.netns import unavailable_reason as netns_unavailable_reason
from tests.helpers.nlb import NlbError, NlbStandIn, Target, haproxy_unavailable
from tests.helpers.trial_verdict import Arrival, Outcome, Sent, judge, render_table, summarise

HERE = Path(__file__).resolve()
FEED = "deribit"
FEED_PORT = 7000
EMIT_HEALTH = 8080
CAPTURE_HEALTH = 18080
EXCHANGE = "10.98.0.1"  # the player's bridge address
CUSTOMER = "10.97.0.20"  # the customer's bridge address (the emit hosts are .11 and .12)
GROUPS_ALLOWED = "239.111.111.0/24"  # the sample's groups
SO_RCVBUFFORCE = 33  # Linux; not in the socket module

#: counters (by name, without ``relayd_``) whose sum is what relayd counted as lost in its own
#: stream, each loss once: the capture side's socket drops, the unacknowledged datagrams gone
#: from its replay buffer when a connection resumed and those a stopped session held, the
#: emit side's jumps within a connection (``capture_replay_dropped_datagrams`` is an upper
#: bound of the replay losses, not a count: not summed)
STREAM_LOSS_COUNTERS = (
    "capture_kernel_drops",
    "capture_resume_lost_datagrams",
    "capture_session_lost_datagrams",
    "gap_sequences",
)
#: ... and what the emit side did not send (refused, oversize, failed sends: by reason)
SEND_LOSS_COUNTERS = ("datagrams_dropped",)
#: The exchange's sequence numbers missing, as the emit side's arbiter saw them (``arbitration =
#: "deribit"``) or the capture side's check (``upstream_check = "deribit"``): they see every
#: loss before the emit side's sends, also where relayd's own numbers cannot (a capture process
#: killed and started again is a new session).
UPSTREAM_MISSING = {"emit": "upstream_missing.emit", "capture": "upstream_missing.capture"}
RESENT_COUNTER = "capture_resent_datagrams"
EMIT_IN_COUNTER = "datagrams_in"  # the emit side's; the capture side's is capture_datagrams_in
OUT_COUNTER = "datagrams_out"


class Host(enum.Enum):
    CAPTURE_A = "capture A"
    CAPTURE_B = "capture B"
    EMIT_1 = "emit 1"  # the emit host carrying the feed when the fault hits
    EMIT_2 = "emit 2"  # the other emit host


class Fault(enum.Enum):
    KILL = "kill -9"
    FREEZE = "freeze"
    CUT = "link cut"


class TrialError(Exception):
    """The bed could not be brought to a state a trial needs."""


@attrs.frozen
class TrialSettings:
    capture_hosts: int = 1
    #: ``arbitration = "<mode>"`` written into each emit feed; None writes nothing (main today)
    arbitration: str | None = None
    #: ``upstream_check = "deribit"`` written into each capture feed
    upstream_check: bool = False
    speed: float = 10.0  # the replay's pace: the sample's 80.7 s in about 8 s
    hold: float = 2.0  # how long a freeze or a link cut lasts
    restart_after: float = 1.0  # a killed relayd starts again after this (RestartSec)
    #: when the fault hits, as fractions of the replay: early enough that a killed capture
    #: host is back (restart plus start-up, about 3 s) before the replay ends
    fault_window: tuple[float, float] = (0.1, 0.5)
    quiet: float = 1.5  # the receiver idle this long (and everything acknowledged): trial over
    settle_timeout: float = 40.0

    def upstream_missing(self) -> str | None:
        """The counter of the exchange's missing sequence numbers these settings export."""
        if self.arbitration == "deribit":
            return UPSTREAM_MISSING["emit"]
        return UPSTREAM_MISSING["capture"] if self.upstream_check else None

    def counted_loss(self, counters: dict[str, float]) -> float:
        """What relayd counted as lost, each loss once: its own stream's counters or, with
        a sequenced feed, the exchange's numbers where they saw more (both views count the
        losses before the emit side's sends), plus what the emit side did not send."""
        own = sum(counters.get(name, 0.0) for name in STREAM_LOSS_COUNTERS)
        upstream = self.upstream_missing()
        if upstream is not None:
            own = max(own, counters.get(upstream, 0.0))
        return own + sum(counters.get(name, 0.0) for name in SEND_LOSS_COUNTERS)

    def hosts(self) -> tuple[Host, ...]:
        captures = (Host.CAPTURE_A, Host.CAPTURE_B)[: self.capture_hosts]
        return (*captures, Host.EMIT_1, Host.EMIT_2)


@attrs.define(eq=False)
class Relayd:
    """One ``relayd run`` host: its namespace, configuration, process and data-path link."""

    name: str  # capa, capb, emit1, emit2
    netns: Netns
    config: Path
    log: Path
    health_port: int
    tcp_link_dev: str  # the device a link cut sets down (in ``netns``)
    worker: NsWorker
    proc: subprocess.Popen[bytes] | None = None
    #: counters of the current process at the trial's start (empty: born during the trial)
    baseline: dict[str, float] = attrs.field(factory=dict)
    #: counter deltas of processes that died during the trial (read just before the kill)
    dead_deltas: dict[str, float] = attrs.field(factory=dict)

    def start(self) -> None:
        # what the unit's StateDirectory gives it (a capture feed's upstream check keeps its
        # channel positions there across a restart)
        state = self.config.with_suffix(".state")
        state.mkdir(exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = self.netns.popen(
                [
                    "env",
                    f"STATE_DIRECTORY={state}",
                    *self.netns.relayd_argv("run", "--config", str(self.config)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def get(self, path: str) -> tuple[int, str] | None:
        """(status, body) of a GET of ``path`` on this host's health server, or None when it
        does not answer."""
        try:
            status, body, _ = self.worker.call(http_get, self.health_port, path, 3.0)
        except (OSError, TimeoutError, ValueError, IndexError):
            return None
        return status, body.decode(errors="replace")

    def metrics_text(self) -> str | None:
        """/metrics of this host, or None when it does not answer."""
        answer = self.get("/metrics")
        return answer[1] if answer is not None and answer[0] == 200 else None

    def counters(self) -> dict[str, float] | None:
        """Every sample of the feed's metrics, summed over labels other than ``feed`` (and
        ``side``: a family with it is kept apart per side, as ``<name>.<side>``)."""
        text = self.metrics_text()
        if text is None:
            return None
        try:
            families = parse(text)
        except (AssertionError, ValueError):  # cut short: the process died while answering
            return None
        out: dict[str, float] = {}
        for family in families.values():
            for sample in family.samples:
                if sample.labels.get("feed", FEED) != FEED:
                    continue
                name = sample.name.removeprefix("relayd_").removesuffix("_total")
                if "side" in sample.labels:
                    name = f"{name}.{sample.labels['side']}"
                out[name] = out.get(name, 0.0) + float(sample.value)
        return out

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@attrs.frozen
class TrialRecord:
    """One trial: the outcome plus what the report file keeps about it."""

    outcome: Outcome
    fault_at_s: float  # after the replay's start
    target: str  # the physical host hit (capa, emit2, ...)
    counters: dict[str, float]  # relayd's counter deltas over the trial, all hosts summed

    def as_json(self) -> dict[str, Any]:
        verdict = self.outcome.verdict
        return {
            "host": self.outcome.host,
            "fault": self.outcome.fault,
            "target": self.target,
            "fault_at_s": round(self.fault_at_s, 3),
            "lost": verdict.lost,
            "lost_span_ms": round(verdict.lost_span_ms, 1),
            "lost_runs": verdict.lost_runs,
            "duplicates": verdict.duplicates,
            "reordered": verdict.reordered,
            "foreign": verdict.foreign,
            "overlap_ms": round(verdict.overlap_ms, 1),
            "two_source_groups": verdict.two_source_groups,
            "max_delay_ms": round(verdict.max_delay_ms, 1),
            "recovered_ms": round(verdict.recovered_ms, 1),
            "by_source": verdict.by_source,
            "duplicates_by_source": verdict.duplicates_by_source,
            "counted_lost": self.outcome.counted_lost,
            "resent": self.outcome.resent,
            "resent_received": self.outcome.resent_received,
            "counters": {k: v for k, v in sorted(self.counters.items()) if v and _reported(k)},
        }


def _reported(counter: str) -> bool:
    """Whether the report keeps a counter (the process and latency figures say nothing here)."""
    return not counter.startswith(("process_", "build_", "last_")) and "latency" not in counter


def sample_datagrams(path: Path | None = None) -> list[CapturedDatagram]:
    """The Deribit sample capture (``../shared/testdata/deribit/``); TrialError if absent."""
    if path is None:
        folder = deribit_dir()
        if folder is None:
            raise TrialError("the Deribit sample captures are not at ../shared/testdata/deribit/")
        path = folder / DERIBIT_SAMPLE
    return read_datagrams(path)


def unavailable_reason() -> str | None:
    """Why trials cannot run here (None when they can)."""
    return netns_unavailable_reason() or haproxy_unavailable()


def emit_key_refused(key: str, value: str) -> str | None:
    """``relayd check-config``'s complaint about ``key = "value"`` in an emit feed, or None
    when this relayd accepts it (a test that needs a feature skips while it is refused)."""
    with tempfile.TemporaryDirectory(prefix="rlyt-cc-") as folder:
        path = Path(folder) / "probe.toml"
        path.write_text(
            f'[[emit]]\nname = "{FEED}"\nlisten = "127.0.0.1:{FEED_PORT}"\n'
            f'interface = "127.0.0.1"\nallowed_sources = ["10.0.0.0/8"]\n'
            f'allowed_groups = ["{GROUPS_ALLOWED}"]\n{key} = "{value}"\n'
        )
        proc = subprocess.run(
            [sys.executable, "-m", "relayd", "check-config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    if proc.returncode == 0:
        return None
    return (proc.stderr or proc.stdout).strip().replace(str(path), "probe.toml")


class TrialBed:
    """The namespaces, links, NLB and relayd hosts of the trials; reused trial after trial.

    ``close()`` stops the NLB and the stand-alone processes; the namespaces (and everything
    in them) go with the ``NetnsHarness`` the bed was built on."""

    def __init__(
        self,
        net: NetnsHarness,
        workdir: Path,
        settings: TrialSettings,
        datagrams: Sequence[CapturedDatagram],
        pcap: Path,
    ) -> None:
        self.net = net
        self.workdir = workdir
        self.settings = settings
        self.pcap = pcap
        first_ts = datagrams[0].ts_ns
        self.datagrams = list(datagrams)
        self.sent = [Sent(str(d.group), d.port, d.payload, d.ts_ns - first_ts) for d in datagrams]
        self.replay_seconds = (datagrams[-1].ts_ns - first_ts) / 1e9 / settings.speed
        self.groups = sorted({f"{d.group}:{d.port}" for d in datagrams})
        self.captures: list[Relayd] = []
        self.emits: list[Relayd] = []
        self.customer_addresses: list[str] = []
        self._workers: list[NsWorker] = []
        self.trials = 0
        self._build()

    # -- the topology ------------------------------------------------------------------------

    def _build(self) -> None:
        net = self.net
        exch = net.namespace("exch")
        nlb_ns = net.namespace("nlb")
        cust = net.namespace("cust")
        exch.run(["ip", "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"])
        exch.run(["ip", "addr", "add", f"{EXCHANGE}/24", "dev", "br0"])
        exch.run(["ip", "link", "set", "br0", "up"])
        exch.add_multicast_route("br0")
        self.exch = exch
        for n, label in enumerate(("capa", "capb")[: self.settings.capture_hosts]):
            host = net.namespace(label)
            upstream = net.link(
                exch, host, a_addr=f"10.98.0.{101 + n}/24", b_addr=f"10.98.0.{2 + n}/24"
            )
            exch.run(["ip", "addr", "flush", "dev", upstream.a_dev])
            exch.run(["ip", "link", "set", upstream.a_dev, "master", "br0"])
            path = net.link(host, nlb_ns)
            self.captures.append(
                self._relayd(label, host, self._capture_config(label, upstream, path), path.a_dev)
            )
        # the customer segment: one bridge, as a Transit Gateway multicast domain is one group
        # membership for every host, so each emit host's observer sees the other emit
        cust.run(["ip", "link", "add", "brc", "type", "bridge", "mcast_snooping", "0"])
        cust.run(["ip", "addr", "add", f"{CUSTOMER}/24", "dev", "brc"])
        cust.run(["ip", "link", "set", "brc", "up"])
        self.customer_addresses.append(CUSTOMER)
        targets = []
        for n, label in enumerate(("emit1", "emit2")):
            host = net.namespace(label)
            path = net.link(nlb_ns, host)
            egress = net.link(
                host, cust, a_addr=f"10.97.0.{11 + n}/24", b_addr=f"10.97.{1 + n}.1/30"
            )
            cust.run(["ip", "addr", "flush", "dev", egress.b_dev])
            cust.run(["ip", "link", "set", egress.b_dev, "master", "brc"])
            self.emits.append(
                self._relayd(label, host, self._emit_config(label, egress), path.b_dev)
            )
            targets.append(Target(label, IPv4Address(path.b_ip), FEED_PORT, EMIT_HEALTH))
        self.cust = cust
        self.nlb = NlbStandIn(
            nlb_ns, listen=IPv4Address("0.0.0.0"), port=FEED_PORT, feed=FEED, targets=targets
        )
        self.nlb.start()

    def _relayd(self, label: str, netns: Netns, config: Path, tcp_dev: str) -> Relayd:
        worker = NsWorker(netns)
        self._workers.append(worker)
        health = CAPTURE_HEALTH if label.startswith("cap") else EMIT_HEALTH
        return Relayd(label, netns, config, self.workdir / f"{label}.log", health, tcp_dev, worker)

    def _capture_config(self, label: str, upstream: Link, path: Link) -> Path:
        groups = ", ".join(f'"{g}"' for g in self.groups)
        config = self.workdir / f"{label}.toml"
        config.write_text(
            f'[health]\nlisten = "127.0.0.1:{CAPTURE_HEALTH}"\n\n'
            f'[[capture]]\nname = "{FEED}"\ninterface = "{upstream.b_dev}"\n'
            f'groups = [{groups}]\ntargets = ["{path.b_ip}:{FEED_PORT}"]\n'
            'heartbeat_interval = "200ms"\nidle_timeout = "1s"\nconnect_timeout = "1s"\n'
            + ('upstream_check = "deribit"\n' if self.settings.upstream_check else "")
        )
        return config

    def _emit_config(self, label: str, egress: Link) -> Path:
        config = self.workdir / f"{label}.toml"
        arbitration = self.settings.arbitration
        watch = ", ".join(f'"{g}"' for g in self.groups)
        config.write_text(
            f'[health]\nlisten = "0.0.0.0:{EMIT_HEALTH}"\n\n'
            f'[[emit]]\nname = "{FEED}"\nlisten = "0.0.0.0:{FEED_PORT}"\n'
            f'interface = "{egress.a_dev}"\nttl = 1\nallowed_sources = ["10.0.0.0/8"]\n'
            f'allowed_groups = ["{GROUPS_ALLOWED}"]\n'
            f"watch_groups = [{watch}]\n"
            'heartbeat_interval = "200ms"\nidle_timeout = "1s"\n'
            + (f'arbitration = "{arbitration}"\n' if arbitration is not None else "")
        )
        return config

    def close(self) -> None:
        for host in (*self.captures, *self.emits):
            host.stop()
        self.nlb.close()
        for worker in self._workers:
            worker.close()

    # -- bringing every host up --------------------------------------------------------------

    def ready(self, timeout: float = 60.0) -> None:
        """Every link up, every relayd running, every emit host in service at the NLB (or a
        standby), every capture host streaming with nothing unacknowledged."""
        for host in (*self.captures, *self.emits):
            host.netns.run(["ip", "link", "set", host.tcp_link_dev, "up"])
            if host.alive():
                assert host.proc is not None
                host.proc.send_signal(signal.SIGCONT)  # after a trial that failed mid-freeze
        for host in self.emits:
            if not host.alive():
                host.start()
        deadline = time.monotonic() + timeout
        # Every emit host in service at the NLB, or a standby (with one active emitter per
        # feed, the standby reports the feed not ready, so the NLB takes it out).
        while not all(self._emit_settled(host) for host in self.emits):
            if time.monotonic() > deadline:
                raise TrialError(f"emit hosts not in service at the NLB: {self.nlb.states()}")
            time.sleep(0.2)
        for host in self.captures:
            if not host.alive():
                host.start()
        while True:
            states = [self._capture_settled(host) for host in self.captures]
            if all(states):
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {h.name}\n{h.tail()}" for h in self.captures)
                raise TrialError(f"capture hosts not streaming after {timeout} s:\n{logs}")
            time.sleep(0.2)

    def _emit_settled(self, host: Relayd) -> bool:
        if self.nlb.states().get(host.name) == "UP":
            return True
        answer = host.get(f"/healthz/{FEED}")
        if answer is None:
            return False
        try:
            feed = json.loads(answer[1]).get("feeds", {}).get(FEED, {})
        except ValueError:
            return False
        return bool(feed.get("state") == "standby")

    def _capture_settled(self, host: Relayd) -> bool:
        counters = host.counters()
        return (
            counters is not None
            and counters.get("capture_connected") == 1
            and counters.get("capture_unacked_datagrams", 0) == 0
        )

    # -- one trial -----------------------------------------------------------------------------

    def run(self, host: Host, fault: Fault, rng: random.Random) -> TrialRecord:
        """One trial of ``fault`` on ``host``; the bed is ready again afterwards."""
        if host not in self.settings.hosts():
            raise ValueError(f"{host.value} is not part of this bed")
        self.ready()
        everyone = (*self.captures, *self.emits)
        self.trials += 1
        for relayd in everyone:
            with relayd.log.open("a") as log:
                log.write(f"=== trial {self.trials}: {fault.value} of {host.value}\n")
            relayd.baseline = relayd.counters() or {}
            relayd.dead_deltas = {}
        received = self.workdir / "received.jsonl"
        receiver = self._start_receiver(received)
        player: subprocess.Popen[bytes] | None = None
        try:
            # Each trial's replay continues every channel's sequence where the last one
            # ended: an emit host's arbiter would take the same numbers again for a stale copy.
            self.sent = [
                s._replace(payload=d.payload)
                for s, d in zip(
                    self.sent, continue_sequences(self.datagrams, self.trials - 1), strict=True
                )
            ]
            player = self._start_player()
            replay_start_ns = int(read_line(player, timeout=60).split()[1])
            started = time.monotonic()
            fault_at = rng.uniform(*self.settings.fault_window) * self.replay_seconds
            time.sleep(max(0.0, started + fault_at - time.monotonic()))
            target = self._resolve(host)
            fault_ns = time.time_ns()
            self._inject(target, fault)
            _, err = player.communicate(timeout=120)
            if player.returncode != 0:
                raise TrialError(f"the player failed: {err.decode(errors='replace')}")
            self._settle(received)
            counters = self._deltas(everyone)
            receiver.send_signal(signal.SIGTERM)
            _, err = receiver.communicate(timeout=30)
            if receiver.returncode != 0:
                raise TrialError(f"the receiver failed: {err.decode(errors='replace')}")
        finally:
            for proc in (player, receiver):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.communicate(timeout=10)
        arrivals = list(_read_arrivals(received))
        verdict = judge(
            self.sent,
            arrivals,
            replay_start_ns=replay_start_ns,
            fault_ns=fault_ns,
            speed=self.settings.speed,
        )
        outcome = Outcome(
            host=host.value,
            fault=fault.value,
            verdict=verdict,
            counted_lost=self.settings.counted_loss(counters),
            resent=counters.get(RESENT_COUNTER, 0.0),
            resent_received=counters.get(EMIT_IN_COUNTER, 0.0) - len(self.sent),
        )
        return TrialRecord(outcome, fault_ns / 1e9 - replay_start_ns / 1e9, target.name, counters)

    def channel_edge_loss(self) -> int:
        """``lost_at_channel_edges`` of the latest trial."""
        return lost_at_channel_edges(self.sent, _read_arrivals(self.workdir / "received.jsonl"))

    def _resolve(self, host: Host) -> Relayd:
        if host is Host.CAPTURE_A:
            return self.captures[0]
        if host is Host.CAPTURE_B:
            return self.captures[1]
        grown = []
        for emit in self.emits:
            now = emit.counters() or {}
            grown.append(now.get(OUT_COUNTER, 0.0) - emit.baseline.get(OUT_COUNTER, 0.0))
        active = 0 if grown[0] >= grown[1] else 1
        return self.emits[active if host is Host.EMIT_1 else 1 - active]

    def _inject(self, target: Relayd, fault: Fault) -> None:
        hold = self.settings.hold
        if fault is Fault.KILL:
            self._record_death(target)
            assert target.proc is not None
            target.proc.kill()
            target.proc.wait(timeout=10)
            time.sleep(self.settings.restart_after)
            target.start()
            target.baseline = {}
        elif fault is Fault.FREEZE:
            assert target.proc is not None
            target.proc.send_signal(signal.SIGSTOP)
            time.sleep(hold)
            target.proc.send_signal(signal.SIGCONT)
        else:
            target.netns.run(["ip", "link", "set", target.tcp_link_dev, "down"])
            time.sleep(hold)
            target.netns.run(["ip", "link", "set", target.tcp_link_dev, "up"])

    def _record_death(self, host: Relayd) -> None:
        """Keep what the process counted since the trial began (it dies next)."""
        last = host.counters() or {}
        host.dead_deltas = {k: v - host.baseline.get(k, 0.0) for k, v in last.items()}

    def _settle(self, received: Path) -> None:
        """Wait until every capture host streams with nothing unacknowledged and the
        customer received nothing for ``quiet`` seconds (TrialError after settle_timeout)."""
        deadline = time.monotonic() + self.settings.settle_timeout
        size, quiet_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now_size = received.stat().st_size if received.exists() else 0
            if now_size != size:
                size, quiet_since = now_size, time.monotonic()
            quiet = time.monotonic() - quiet_since >= self.settings.quiet
            if quiet and all(self._capture_settled(h) for h in self.captures):
                return
            time.sleep(0.2)
        # Not settled: the verdict still counts what arrived, and the loss shows in it.

    def _deltas(self, hosts: Sequence[Relayd]) -> dict[str, float]:
        total: dict[str, float] = {}
        for host in hosts:
            current = host.counters() or {}
            for name, value in current.items():
                total[name] = total.get(name, 0.0) + value - host.baseline.get(name, 0.0)
            for name, value in host.dead_deltas.items():
                total[name] = total.get(name, 0.0) + value
        return total

    def _start_receiver(self, out: Path) -> subprocess.Popen[bytes]:
        out.unlink(missing_ok=True)
        proc = self.cust.popen(
            self.cust.python_argv(
                "-m", "tests.helpers.trials", "receive", "--out", str(out),
                "--interfaces", ",".join(self.customer_addresses), *self.groups,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            line = read_line(proc, timeout=60).strip()
        except NetnsError as exc:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise TrialError(f"the receiver did not start: {err.decode(errors='replace')}") from exc
        if line != "ready":
            raise TrialError(f"the receiver did not start: {line!r}")
        return proc

    def _start_player(self) -> subprocess.Popen[bytes]:
        return self.exch.popen(
            self.exch.python_argv(
                "-m", "tests.helpers.trials", "play", "--pcap", str(self.pcap),
                "--interface", EXCHANGE, "--speed", str(self.settings.speed),
                "--round", str(self.trials - 1),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip


def lost_at_channel_edges(sent: Sequence[Sent], arrivals: Iterable[Arrival]) -> int:
    """Datagrams lost before the first or after the last one the customer got in the trial on
    their Deribit channel (group, port and the 8-byte header's channel id). Sequence numbers
    show such a loss only to an emit host that knew the channel from before the trial (the
    one that emitted it, or observed the one that did) and with the channel's next packet (in
    the next trial); a loss between two packets the customer got, any emit host that carried
    the channel before it counts."""
    got = {(a.group, a.port, a.payload) for a in arrivals}
    edges = 0
    channels: dict[tuple[str, int, int], list[bool]] = {}
    for s in sent:
        key = (s.group, s.port, int.from_bytes(s.payload[2:4], "little"))
        channels.setdefault(key, []).append((s.group, s.port, s.payload) in got)
    for received in channels.values():
        if True not in received:
            edges += len(received)
            continue
        first = received.index(True)
        last = len(received) - 1 - received[::-1].index(True)
        edges += first + len(received) - 1 - last
    return edges


def _read_arrivals(path: Path) -> Iterator[Arrival]:
    with path.open() as lines:
        for line in lines:
            if line.strip():
                t, group, port, source, data = json.loads(line)
                yield Arrival(t, group, port, source, bytes.fromhex(data))


# -- run inside the namespaces ---------------------------------------------------------------


def continue_sequences(
    datagrams: Sequence[CapturedDatagram], rounds: int
) -> list[CapturedDatagram]:
    """The capture as its ``rounds``-th repetition would carry it: on each channel (group,
    port and the 8-byte Deribit header's ChannelID) the Sequence moves on by ``rounds`` times
    the channel's span in the capture (modulo 2**32), so repetitions follow each other
    without a gap or a repeat. Payloads shorter than the header stay as they are."""
    if not rounds:
        return list(datagrams)
    low: dict[tuple[IPv4Address, int, int], int] = {}
    high: dict[tuple[IPv4Address, int, int], int] = {}
    for d in datagrams:
        if len(d.payload) >= DERIBIT_HEADER.size:
            _, channel, sequence = DERIBIT_HEADER.unpack_from(d.payload)
            key = (d.group, d.port, channel)
            low[key] = min(low.get(key, sequence), sequence)
            high[key] = max(high.get(key, sequence), sequence)
    out = []
    for d in datagrams:
        if len(d.payload) < DERIBIT_HEADER.size:
            out.append(d)
            continue
        length, channel, sequence = DERIBIT_HEADER.unpack_from(d.payload)
        key = (d.group, d.port, channel)
        moved = (sequence + rounds * (high[key] - low[key] + 1)) % 2**32
        head = DERIBIT_HEADER.pack(length, channel, moved)
        out.append(d._replace(payload=head + d.payload[DERIBIT_HEADER.size :]))
    return out


def _play(pcap: Path, interface: str, speed: float, rounds: int) -> int:
    datagrams = continue_sequences(read_datagrams(pcap), rounds)
    sock = open_multicast_sender(IPv4Address(interface), 1, False, 4 * 1024 * 1024)
    print(f"start {time.time_ns()}", flush=True)
    stats = trio.run(lambda: replay(sock, datagrams, speed=speed))
    print(json.dumps({"sent": stats.datagrams, "max_late": stats.max_late}), flush=True)
    return 0


def _receive(out_path: Path, interfaces: Sequence[str], groups: Sequence[str]) -> int:
    """Join every group on every interface (one socket per group, bound to it), then write
    each datagram as a JSON line [arrival ns, group, port, source, hex] until SIGTERM."""
    sockets: dict[int, tuple[socket.socket, str, int]] = {}
    for text in groups:
        group, _, port_text = text.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 * 1024 * 1024)
        sock.bind((group, int(port_text)))
        for interface in interfaces:
            mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(interface))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        sock.setblocking(False)
        sockets[sock.fileno()] = (sock, group, int(port_text))
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print("ready", flush=True)
    with out_path.open("w") as out:
        while True:
            try:
                ready, _, _ = select.select(list(sockets), [], [], 0.1)
            except InterruptedError:
                ready = []
            if not ready and stop:
                break
            for fd in ready:
                sock, group, port = sockets[fd]
                while True:
                    try:
                        data, (source, _) = sock.recvfrom(65536)
                    except BlockingIOError:
                        break
                    record = [time.time_ns(), group, port, source, data.hex()]
                    out.write(json.dumps(record) + "\n")
            out.flush()
    return 0


# -- many trials -------------------------------------------------------------------------------


def run_trials(
    settings: TrialSettings,
    trials: int,
    kinds: Sequence[tuple[Host, Fault]],
    *,
    seed: int | None = None,
    report: Path | None = None,
    logs: Path | None = None,
    progress: bool = False,
) -> tuple[list[TrialRecord], list[str]]:
    """``trials`` of each (host, fault) on one bed, interleaved (so a busy spell of the
    machine spreads over every kind); each record is appended to ``report`` as a JSON line.
    The relayd logs and configurations stay in ``logs`` when given (else a temporary folder).
    Returns the records and why the trials that could not run failed."""
    rng = random.Random(seed)
    failures: list[str] = []
    datagrams = sample_datagrams()
    folder = deribit_dir()
    assert folder is not None
    records: list[TrialRecord] = []
    with NetnsHarness() as net, tempfile.TemporaryDirectory(prefix="rlyt-trials-") as tmp:
        workdir = Path(tmp) if logs is None else logs
        workdir.mkdir(parents=True, exist_ok=True)
        bed = TrialBed(net, workdir, settings, datagrams, folder / DERIBIT_SAMPLE)
        try:
            for n in range(trials):
                for host, fault in kinds:
                    try:
                        record = bed.run(host, fault, rng)
                    except (TrialError, NetnsError, NlbError, subprocess.TimeoutExpired) as exc:
                        # Counted, reported and skipped: one broken trial on a loaded
                        # machine must not end a run of hundreds.
                        failures.append(f"{host.value}, {fault.value}: {exc}")
                        print(f"trial failed: {failures[-1]}", file=sys.stderr, flush=True)
                        continue
                    records.append(record)
                    line = json.dumps({"trial": n, **record.as_json()}, sort_keys=True)
                    if progress:
                        print(line, file=sys.stderr, flush=True)
                    if report is not None:
                        with report.open("a") as out:
                            out.write(line + "\n")
        finally:
            bed.close()
    return records, failures


def all_kinds(settings: TrialSettings) -> list[tuple[Host, Fault]]:
    return [(host, fault) for host in settings.hosts() for fault in Fault]


def _kind(text: str) -> tuple[Host, Fault]:
    host, _, fault = text.partition(":")
    try:
        return Host[host.upper()], Fault[fault.upper()]
    except KeyError:
        hosts = ", ".join(h.name for h in Host)
        faults = ", ".join(f.name for f in Fault)
        raise argparse.ArgumentTypeError(
            f"HOST:FAULT with HOST in {hosts}, FAULT in {faults}"
        ) from None


def _script(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="failure trials and their in-namespace parts")
    commands = parser.add_subparsers(dest="command", required=True)
    play = commands.add_parser("play", help="replay a capture as multicast (the exchange)")
    play.add_argument("--pcap", type=Path, required=True)
    play.add_argument("--interface", required=True)
    play.add_argument("--speed", type=float, default=1.0)
    play.add_argument(
        "--round", type=int, default=0, help="continue the sequences this many repetitions on"
    )
    receive = commands.add_parser("receive", help="record every datagram (the customer)")
    receive.add_argument("--out", type=Path, required=True)
    receive.add_argument("--interfaces", required=True)
    receive.add_argument("groups", nargs="+")
    table = commands.add_parser("table", help="run trials of every host and fault, print a table")
    table.add_argument("--trials", type=int, default=20, help="trials per host and fault")
    table.add_argument("--capture-hosts", type=int, choices=(1, 2), default=1)
    table.add_argument("--arbitration", help="written into the emit feeds when given")
    table.add_argument(
        "--upstream-check",
        action="store_true",
        help='upstream_check = "deribit" on the capture feeds',
    )
    table.add_argument("--speed", type=float, default=attrs.fields(TrialSettings).speed.default)
    table.add_argument("--seed", type=int)
    table.add_argument("--report", type=Path, help="append each trial as a JSON line")
    table.add_argument("--logs", type=Path, help="keep the relayd logs in this folder")
    table.add_argument(
        "--kind",
        action="append",
        type=_kind,
        help="only this HOST:FAULT, e.g. EMIT_2:KILL (repeatable; default: every one)",
    )
    args = parser.parse_args(argv)
    if args.command == "play":
        return _play(args.pcap, args.interface, args.speed, args.round)
    if args.command == "receive":
        return _receive(args.out, args.interfaces.split(","), args.groups)
    reason = unavailable_reason()
    if reason is not None:
        print(f"trials: skipped: {reason}")
        return 0
    settings = TrialSettings(
        capture_hosts=args.capture_hosts,
        arbitration=args.arbitration,
        upstream_check=args.upstream_check,
        speed=args.speed,
    )
    records, failures = run_trials(
        settings,
        args.trials,
        args.kind or all_kinds(settings),
        seed=args.seed,
        report=args.report,
        logs=args.logs,
        progress=True,
    )
    print(
        f"trials: {args.trials} per host and fault, {settings.capture_hosts} capture host(s),"
        f" arbitration {settings.arbitration or '(not set)'},"
        f" upstream_check {'deribit' if settings.upstream_check else '(not set)'},"
        f" replay at {settings.speed:g}x,"
        f" freeze and cut {settings.hold:g} s, restart after kill {settings.restart_after:g} s"
    )
    print(render_table(summarise(r.outcome for r in records)), end="")
    if failures:
        print(f"{len(failures)} trial(s) could not run:")
        for failure in failures:
            print(f"- {failure.splitlines()[0]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_script())
