"""A soak at 20k/s: 60 s in ``make test``, 10 minutes with RELAYD_SOAK=1 (``make soak``).

Memory and descriptor counts of both relayd processes are sampled once a second. Descriptors
must stay flat; memory may grow only as far as the capture side's replay buffer needed (it
holds more while ACKs are late), and in the long run its least-squares slope after a warm-up
must stay below what a leak of one byte per datagram would give. The slopes are reported (KiB
per minute and descriptors per minute) with the loss of the stream, which must be zero.
RELAYD_SOAK_SECONDS overrides the duration.
"""

from __future__ import annotations

import os

import pytest

from tests.chaos.topology import Relay, Sampler, every, report, scaled
from tests.helpers.metrics import value as metric

pytestmark = [pytest.mark.netns, pytest.mark.slow]

RATE = 20_000
WARM_UP = 15.0  # allocator, caches and socket buffers settle


def test_soak(relay: Relay) -> None:
    relay.start()
    seconds = float(os.environ.get("RELAYD_SOAK_SECONDS", "0")) or scaled(60.0, 600.0)
    stream = relay.stream(RATE, seconds)
    relay.wait_flowing()
    sampler = Sampler({"capture": relay.pid("capture"), "emit": relay.pid("emit")})
    statuses = []
    replay_max = 0.0
    for n, _ in enumerate(every(1.0, seconds)):
        sampler.sample()
        if n % 5 == 0:
            statuses.append(relay.health("emit")[0])
            statuses.append(relay.health("capture")[0])
            capture_text = relay.metrics("capture")
            replay_max = max(replay_max, metric(capture_text, "capture_replay_bytes"))
    result = stream.result(timeout=120)
    figures = sampler.figures(after=WARM_UP)
    capture_text = relay.metrics("capture")
    report(
        "soak",
        seconds=seconds,
        stream=result,
        health_non_200=sum(1 for s in statuses if s != 200),
        kernel_drops=metric(capture_text, "capture_kernel_drops"),
        replay_dropped=metric(capture_text, "capture_replay_dropped_datagrams"),
        replay_bytes_max_seen=replay_max,
        # RSS (KiB) about every 30 s: the shape behind the slope
        rss_series={
            name: [rss for t, rss, _ in rows if int(t) % 30 == 0]
            for name, rows in sampler.rows.items()
        },
        **figures,
    )
    assert result["lost"] == 0, result
    assert result["dup"] == 0
    assert all(s == 200 for s in statuses)
    for name, fig in figures.items():
        assert abs(fig["fds_per_min"]) < 0.5, (name, fig)
        # every descriptor but the data threads' timers as at the start; one timer a thread
        other_first = fig["fds_first"] - fig["timers_first"]
        assert fig["fds_last"] - fig["timers_last"] == other_first, (name, fig)
        assert fig["timers_last"] <= fig["threads_last"], (name, fig)
        # RSS can step up without a leak: when the emit side's ACKs are late (a busy CPU),
        # the capture side's replay buffer (64 MiB at most by default) holds more for a
        # while, and the allocator keeps that memory for the next time. So the growth must
        # stay within what the replay buffer needed (three times its largest size, for the
        # bytes objects, their chunk records and the allocator) plus 8 MiB.
        allowance = 3 * replay_max / 1024 + 8 * 1024
        assert fig["rss_kib_last"] - fig["rss_kib_first"] <= allowance, (name, fig, replay_max)
        if seconds >= 300:
            # Over minutes a leak of one byte per datagram (about 1200 KiB a minute at this
            # rate) shows in the slope even through such steps.
            assert fig["rss_kib_per_min"] < 1024, (name, fig)
