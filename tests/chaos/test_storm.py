"""Connection storm on the data port and abuse of the health port, during a 20k/s stream."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.chaos.topology import (
    EMIT_HEALTH,
    EMIT_PORT,
    Relay,
    Sampler,
    every,
    fd_count,
    http_get,
    report,
    scaled,
)
from tests.helpers.metrics import value as metric

pytestmark = [pytest.mark.netns, pytest.mark.slow]

RATE = 20_000


def _agent_result(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, object]:
    out, _ = proc.communicate(timeout=timeout)
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    result: dict[str, object] = json.loads(lines[-1])
    return result


def test_connection_storm_on_the_data_port(relay: Relay) -> None:
    relay.start()
    seconds = scaled(12.0, 60.0)
    storm_rate = 400
    stream = relay.stream(RATE, seconds + 6)
    relay.wait_flowing()
    sampler = Sampler({"emit": relay.pid("emit")})
    sampler.sample()
    storm = relay.agent(
        relay.edge, "storm",
        "--target", f"{relay.attack.b_addr.ip}:{EMIT_PORT}",
        "--rate", str(storm_rate),
        "--duration", str(seconds),
        "--syn-from", str(relay.attack.a_addr.network),
    )  # fmt: skip
    statuses: list[int] = []
    latencies: list[float] = []
    half_open = 0
    for elapsed in every(0.5, seconds + 3):
        status, _, took = relay.health("emit")
        statuses.append(status)
        latencies.append(took)
        sampler.sample()
        if elapsed < seconds:  # SYN_RECV sockets on the data port: the half-open ones
            listing = relay.cloud.run(["ss", "-Htn", "state", "syn-recv", f"sport = :{EMIT_PORT}"])
            half_open = max(half_open, len(listing.stdout.splitlines()))
    attack = _agent_result(storm, 30)
    result = stream.result(timeout=60)
    # The storm is over: its connections are closed once their timeouts and lingers run out,
    # which takes longer on a busy CPU; measure the end state after that, as below for health.
    pid = relay.pid("emit")
    for _ in every(0.2, 10.0):
        if fd_count(pid) <= sampler.rows["emit"][0][2] + 2:
            break
    sampler.sample()
    text = relay.metrics("emit")
    rejected = {
        reason: metric(text, "connections_rejected_total", reason=reason)
        for reason in ("hello_timeout", "no_hello", "protocol", "pending_limit", "auth")
    }
    figures = sampler.figures()["emit"]
    report(
        "connection storm",
        seconds=seconds,
        storm_rate=storm_rate,
        attack=attack,
        stream=result,
        health_non_200=sum(1 for s in statuses if s != 200),
        health_max_s=round(max(latencies), 3),
        half_open_max=half_open,
        rejected=rejected,
        emit=figures,
    )
    assert result["lost"] == 0, (result, relay.log_text("emit.log")[-3000:])
    assert result["dup"] == 0
    assert all(s == 200 for s in statuses), statuses
    assert max(latencies) < 1.0
    # the storm really happened: refused ones are reset at accept, the agent may count them as
    # connect errors, so count what the relay refused
    assert sum(rejected.values()) > seconds * storm_rate * 0.5, (attack, rejected)
    assert half_open > 0  # spoofed SYNs left half-open connections on the listener
    # Bounded: pending connections are capped (8 x max_connections = 32) and refused ones
    # linger at most 0.2 s for the peer's FIN (longer when the CPU is busy): well under one
    # second of the storm's connections at any time, and back to the start once it is over.
    assert figures["fds_max"] <= figures["fds_first"] + 32 + storm_rate, figures
    assert figures["fds_last"] <= figures["fds_first"] + 2, figures
    assert figures["rss_kib_max"] <= figures["rss_kib_first"] + 20 * 1024, figures
    assert relay.health("emit")[0] == 200


def test_health_port_abuse(relay: Relay) -> None:
    relay.start()
    seconds = scaled(8.0, 60.0)
    stream = relay.stream(RATE, seconds + 4)
    relay.wait_flowing()
    sampler = Sampler({"emit": relay.pid("emit")})
    sampler.sample()
    abuse = relay.agent(
        relay.edge, "health",
        "--target", f"{relay.attack.b_addr.ip}:{EMIT_HEALTH}",
        "--idle", "300", "--slow", "100", "--duration", str(seconds),
    )  # fmt: skip
    latencies: list[float] = []
    statuses: list[int] = []
    for _ in every(0.25, seconds + 1):
        status, _, took = relay.health("emit")
        statuses.append(status)
        latencies.append(took)
        sampler.sample()
    attack = _agent_result(abuse, 30)
    result = stream.result(timeout=60)
    # The abusers are gone: their descriptors are released.
    pid = relay.pid("emit")
    for _ in every(0.2, 10.0):
        if fd_count(pid) <= sampler.rows["emit"][0][2] + 2:
            break
    sampler.sample()
    figures = sampler.figures()["emit"]
    latencies.sort()
    report(
        "health port abuse",
        seconds=seconds,
        attack=attack,
        stream=result,
        probes=len(latencies),
        health_non_200=sum(1 for s in statuses if s != 200),
        health_p50_s=round(latencies[len(latencies) // 2], 4),
        health_max_s=round(latencies[-1], 4),
        emit=figures,
    )
    assert result["lost"] == 0, result
    assert all(s == 200 for s in statuses), statuses
    assert latencies[-1] < 1.0
    assert int(attack.get("idle_opened", 0)) >= 300, attack  # type: ignore[call-overload]
    assert figures["rss_kib_max"] <= figures["rss_kib_first"] + 30 * 1024, figures
    assert figures["fds_last"] <= figures["fds_first"] + 2, figures


def test_descriptor_limit_reached_through_the_health_port(relay: Relay) -> None:
    """More idle health clients than the process may hold descriptors, from before the stream
    starts (so the emit side opens its destination sockets under the flood): health
    connections are shed first, the stream loses nothing, /healthz answers the load balancer
    throughout and at once after the abusers leave."""
    nofile = 256
    relay.start(emit_nofile=nofile)
    seconds = scaled(8.0, 30.0)
    abuse = relay.agent(
        relay.edge, "health",
        "--target", f"{relay.attack.b_addr.ip}:{EMIT_HEALTH}",
        "--idle", str(nofile + 100), "--slow", "0", "--duration", str(seconds),
    )  # fmt: skip
    time.sleep(2.0)  # the flood holds what it can before the first datagram
    stream = relay.stream(RATE, seconds)
    worker = relay.worker(relay.cloud)
    failed = answered = 0
    for _ in every(0.5, seconds - 2.0):
        try:
            worker.call(http_get, EMIT_HEALTH, "/healthz", 1.0)
            answered += 1
        except OSError:
            failed += 1
    attack = _agent_result(abuse, 30)
    recovered = None
    for elapsed in every(0.1, 15.0):
        try:
            if worker.call(http_get, EMIT_HEALTH, "/healthz", 1.0)[0] == 200:
                recovered = elapsed
                break
        except OSError:
            pass
    result = stream.result(timeout=60)
    log = relay.log_text("emit.log")
    internal = metric(relay.metrics("emit"), "connections_closed_total", reason="internal_error")
    report(
        "descriptor limit via the health port",
        nofile=nofile,
        seconds=seconds,
        attack=attack,
        probes_answered=answered,
        probes_failed=failed,
        recovered_after_s=recovered,
        emfile_log_lines=sum(1 for line in log.splitlines() if "Too many open files" in line),
        closed_internal_error=internal,
        stream=result,
    )
    assert int(attack.get("idle_opened", 0)) >= nofile, attack  # type: ignore[call-overload]
    assert result["lost"] == 0, (result, log[-3000:])
    assert internal == 0
    assert failed == 0, (answered, failed)  # shed first: the abusers', not the probes'
    assert recovered is not None
    assert relay.emit is not None
    assert relay.emit.poll() is None
