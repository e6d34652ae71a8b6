"""Faults during a 20k/s stream: a peer that stops reading, the customer link down, the TCP path
slow and then cut, and a storm of reloads."""

from __future__ import annotations

import json
import time

import pytest

from tests.chaos.topology import (
    EMIT_PORT,
    Relay,
    Sampler,
    every,
    report,
    scaled,
)
from tests.helpers.metrics import value as metric

pytestmark = [pytest.mark.netns, pytest.mark.slow]

RATE = 20_000


def test_peer_that_stops_reading_is_dropped(relay: Relay) -> None:
    relay.start()
    seconds = scaled(14.0, 60.0)
    stream = relay.stream(RATE, seconds)
    stalled = relay.agent(
        relay.edge, "stall",
        "--target", f"{relay.attack.b_addr.ip}:{EMIT_PORT}",
        "--feed", "chaos",
        "--key", str(relay.workdir / "keys" / "feed.key"),
        "--group", "239.111.111.9:6100",
        "--rate", "2000", "--rcvbuf", "1024", "--duration", str(seconds),
    )  # fmt: skip
    closed = 0.0
    for elapsed in every(0.25, seconds + 2):
        if metric(relay.metrics("emit"), "connections_closed_total", reason="slow_consumer"):
            closed = elapsed
            break
    out, _ = stalled.communicate(timeout=seconds + 30)
    peer = json.loads(out.decode().splitlines()[-1])
    result = stream.result(timeout=90)
    status, doc, _ = relay.health("emit")
    report("peer stops reading", seconds=seconds, stream=result, stalled_peer=peer,
           slow_consumer_closed_at_s=closed, emit_state=doc["feeds"]["chaos"]["state"])  # fmt: skip
    assert closed > 0, relay.log_text("emit.log")[-3000:]
    assert "error" in peer or "closed_after" in peer or peer.get("blocked"), peer
    assert result["lost"] == 0, result  # the real capture connection kept streaming
    assert status == 200
    assert len(doc["feeds"]["chaos"]["connections"]) == 1


def test_customer_link_down_is_counted_shown_and_recovered(relay: Relay) -> None:
    relay.start()
    outage = scaled(3.0, 20.0)
    seconds = outage + 8
    stream = relay.stream(RATE, seconds, idle=outage + 5)
    time.sleep(2.0)
    dev = relay.egress.a_dev
    relay.cloud.run(["ip", "link", "set", dev, "down"])
    down_at = time.monotonic()
    unhealthy: list[tuple[int, str]] = []
    try:
        for _ in every(0.25, outage):
            status, doc, _ = relay.health("emit")
            unhealthy.append((status, doc["feeds"]["chaos"]["state"]))
    finally:
        relay.cloud.run(["ip", "link", "set", dev, "up"])
    up_at = time.monotonic()
    recovered = None
    for elapsed in every(0.1, 10.0):
        if relay.health("emit")[0] == 200:
            recovered = elapsed
            break
    result = stream.result(timeout=90)
    text = relay.metrics("emit")
    errors = metric(text, "send_errors_total")
    by_errno = {
        name: metric(text, "send_errors_total", errno=name)
        for name in ("ENETDOWN", "ENETUNREACH", "ENOBUFS", "EPERM", "ENODEV")
    }
    _, doc, _ = relay.health("emit")
    report(
        "customer link down",
        outage_s=round(up_at - down_at, 2),
        stream=result,
        send_errors=errors,
        send_errors_by_errno={k: v for k, v in by_errno.items() if v},
        health_during=sorted(set(unhealthy)),
        recovered_after_s=recovered,
        last_error=doc["feeds"]["chaos"].get("last_error"),
    )
    assert errors > 0
    assert any(status == 503 and state == "failing" for status, state in unhealthy), unhealthy
    assert recovered is not None
    assert recovered < 5.0
    # Every datagram lost was a counted send error, but for the few already queued on the
    # device when it went down (sent, then dropped by the kernel: measured 0 in 3 s and 1 in
    # 20 s outages); and the stream came back: what was sent after the link returned arrived.
    assert 0 < result["lost"] <= errors + 64, (result, errors)
    assert result["lost"] < RATE * (up_at - down_at + 1.0)


def test_tcp_path_slow_then_cut(relay: Relay) -> None:
    bound = 1024 * 1024
    relay.start(capture=relay.capture_toml(replay_max_bytes=f'"{bound}"'))
    slow, cut = scaled(4.0, 30.0), scaled(3.0, 20.0)
    seconds = slow + cut + 8
    stream = relay.stream(RATE, seconds, idle=cut + 5)
    sampler = Sampler({"capture": relay.pid("capture")})
    replay_max = 0.0

    def watch(duration: float) -> None:
        nonlocal replay_max
        for _ in every(0.25, duration):
            sampler.sample()
            replay_max = max(replay_max, metric(relay.metrics("capture"), "capture_replay_bytes"))

    dev = relay.path.a_dev
    watch(1.0)
    # The TCP path slower than the stream (about 30 Mbit/s of frames): netem is not in every
    # kernel, a token bucket is.
    relay.dc.run(["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "16mbit",
                  "burst", "32kb", "latency", "50ms"])  # fmt: skip
    try:
        watch(slow)
    finally:
        relay.dc.run(["tc", "qdisc", "del", "dev", dev, "root"])
    slow_drops = metric(relay.metrics("capture"), "capture_replay_dropped_datagrams")
    relay.path.set_up(False)
    try:
        watch(cut)
    finally:
        relay.path.set_up(True)
    watch(seconds - slow - cut - 1.0)
    result = stream.result(timeout=90)
    text = relay.metrics("capture")
    dropped = metric(text, "capture_replay_dropped_datagrams")
    kernel = metric(text, "capture_kernel_drops")
    gap_sequences = metric(relay.metrics("emit"), "gap_sequences_total")
    resume_lost = metric(text, "capture_resume_lost_datagrams")
    figures = sampler.figures()["capture"]
    report(
        "tcp path slow then cut",
        slow_s=slow,
        shaped="tbf 16 Mbit/s",
        cut_s=cut,
        replay_max_bytes=bound,
        replay_bytes_max_seen=replay_max,
        replay_dropped_during_slow=slow_drops,
        replay_dropped=dropped,
        kernel_drops=kernel,
        resent=metric(text, "capture_resent_datagrams"),
        emit_gap_sequences=gap_sequences,
        resume_lost=resume_lost,
        stream=result,
        capture=figures,
    )
    assert replay_max <= bound
    assert dropped > 0  # 3 s of 20k/s do not fit in 1 MiB: the oldest were dropped, counted
    # Accounting: each sequence number never emitted is counted once, by the emit side when
    # the stream jumped within a connection (the replay buffer dropped frames it had not sent
    # yet), by the capture side when a connection resumed past frames dropped meanwhile; the
    # capture side's replay drops bound them from above (a dropped frame may already have
    # been sent, only its ACK was missing).
    counted = gap_sequences + resume_lost
    assert 0 < result["lost"] == counted, (result, gap_sequences, resume_lost)
    assert result["lost"] <= dropped + kernel, (result, dropped, kernel)
    assert result["dup"] == 0
    assert figures["rss_kib_max"] <= figures["rss_kib_first"] + bound // 1024 * 3 + 16 * 1024


def test_reload_storm_loses_nothing(relay: Relay) -> None:
    extra = f"""
[[emit]]
name = "extra"
listen = "0.0.0.0:6668"
interface = "{relay.egress.a_dev}"
allowed_sources = ["10.0.0.0/8"]
allowed_groups = ["239.111.112.0/24"]
"""
    relay.start()
    reloads = 100
    window = 10.0
    stream = relay.stream(RATE, window + 4)
    time.sleep(1.0)
    emit_files = [relay.emit_toml(), relay.emit_toml(extra)]
    config = relay.workdir / "emit.toml"
    for n, _ in enumerate(every(window / reloads, window)):
        # Add, then remove, the "extra" feed. Written as config management does, to a new
        # file renamed over the old: a reload must never read a half-written file.
        staging = config.with_suffix(".new")
        staging.write_text(emit_files[(n + 1) % 2])
        staging.replace(config)
        relay.hup("emit")
        relay.hup("capture")  # same file: parsed, compared, keys re-read
    time.sleep(1.0)
    result = stream.result(timeout=90)
    emit_text, capture_text = relay.metrics("emit"), relay.metrics("capture")
    status, doc, _ = relay.health("emit")
    report(
        "100 reloads in 10 s",
        signals_each=reloads,
        emit_reloads_ok=metric(emit_text, "reloads_total", result="ok"),
        capture_reloads_ok=metric(capture_text, "reloads_total", result="ok"),
        reloads_invalid=metric(emit_text, "reloads_total", result="invalid")
        + metric(capture_text, "reloads_total", result="invalid"),
        stream=result,
        feeds=sorted(doc["feeds"]),
    )
    assert result["lost"] == 0, result
    assert result["dup"] == 0
    assert status == 200
    assert metric(emit_text, "reloads_total", result="ok") >= reloads // 4  # coalesced, applied
    assert metric(emit_text, "reloads_total", result="invalid") == 0
    assert relay.capture is not None
    assert relay.capture.poll() is None
